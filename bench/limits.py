#!/usr/bin/env python3
"""Do memferry's built-in limits agree with fio? Each trial runs
`memferry bench --limits-on SNAP --runs 1` and fio with the same parameters
on the same shard files, in rotating order; the ratio per metric is the
median of the per-trial ratios. Then runs the full sweep with a chart."""

import argparse, glob, json, os, shutil, statistics

from common import BIN, drop_caches, fio as fio_job, reserve_hugepages, sh


def fio(files, rw, direct, engine, qd, extra=()):
    return fio_job("l", files, rw, direct, "4M", qd, engine, extra)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", default="2GiB")
    ap.add_argument("--dir", default="/var/tmp/memferry-bench")
    ap.add_argument("--trials", type=int, default=6)
    a = ap.parse_args()
    fio_mem = reserve_hugepages()
    os.makedirs(a.dir, exist_ok=True)
    snap = os.path.join(a.dir, "limits-snap")
    sh([BIN, "save", "--source", f"synthetic:{a.size}", "--to", snap, "--shard-size", "256MiB"])
    shards = sorted(glob.glob(os.path.join(snap, "shards", "shard-*.bin")))
    per = sum(os.path.getsize(s) for s in shards) // len(shards)
    wfiles = [os.path.join(a.dir, f".fio-w{i}") for i in range(len(shards))]

    def fio_all():
        drop_caches()
        r = fio(shards, "read", True, "io_uring", 32)
        for f in wfiles:
            if os.path.exists(f):
                os.unlink(f)
        w = fio(wfiles, "write", True, "io_uring", 32, [f"--size={per}", "--end_fsync=1"])
        for f in wfiles:
            os.unlink(f)
        drop_caches()
        p = fio(shards, "read", True, "psync", 1)
        fio(shards, "read", False, "psync", 1, ["--invalidate=0"])  # warm the cache
        b = fio(shards, "read", False, "psync", 1, ["--invalidate=0"])
        return {"odirect_read": r, "odirect_write": w, "pread_direct": p, "buffered_read": b}

    def mf_all():
        j = json.loads(sh([BIN, "bench", "--limits-on", snap, "--runs", "1", "--json"]))["limits"]
        return {k: (j[k]["result"] or {}).get("median") for k in
                ["odirect_read", "odirect_write", "pread_direct", "buffered_read"]}

    names = {"odirect_read": "O_DIRECT read, io_uring qd=32 bs=4M",
             "odirect_write": "O_DIRECT write, io_uring qd=32 bs=4M, fsync",
             "pread_direct": "O_DIRECT pread bs=4M qd=1",
             "buffered_read": "buffered read of cached files, bs=4M"}
    mf, fo, ratio = ({k: [] for k in names} for _ in range(3))
    for t in range(a.trials):
        order = [("mf", mf_all), ("fio", fio_all)]
        if t % 2:
            order.reverse()
        got = {n: f() for n, f in order}
        for k in names:
            if got["mf"][k] is not None:
                mf[k].append(got["mf"][k]); fo[k].append(got["fio"][k])
                ratio[k].append(got["mf"][k] / got["fio"][k])

    lines = [f"memferry built-in limits vs fio, {a.size} in {len(shards)} shards, "
             f"{a.trials} trials (order alternates; ratio = median of per-trial ratios); fio {fio_mem}", "",
             "| limit | memferry GiB/s | fio GiB/s | ratio | within 10% |", "|---|---|---|---|---|"]
    for k, n in names.items():
        if not ratio[k]:
            lines.append(f"| {n} | unavailable | | | |")
            continue
        r = statistics.median(ratio[k])
        lines.append(f"| {n} | {statistics.median(mf[k]):.2f} | {statistics.median(fo[k]):.2f} | "
                     f"{r:.2f} | {'yes' if abs(r - 1) <= 0.10 else 'NO'} |")
    shutil.rmtree(snap, ignore_errors=True)

    out = os.path.join(os.path.dirname(os.path.abspath(__file__)), "out")
    os.makedirs(out, exist_ok=True)
    svg = os.path.join(out, "bench.svg")
    rep = json.loads(sh([BIN, "bench", "--size", a.size, "--roots", a.dir, "--runs", "3",
                         "--json", "--plot", svg]))
    best = [r for r in rep["rows"] if r["best"]]
    lines += ["", f"memferry bench --size {a.size} --roots {a.dir} --runs 3 --plot {svg}:", "",
              "| best of group | setting | GiB/s | % of limit | limit |", "|---|---|---|---|---|"]
    for r in best:
        lines.append(f"| {r['op']} {r['temperature']} | {r['label']} | {r['result']['median']:.2f} "
                     f"±{100 * r['result']['spread']:.0f}% | {r['percent_of_limit']:.0f}% | "
                     f"{r['limit']}: {r['limit_gib_per_s']:.2f} |")
    text = "\n".join(lines)
    print(text)
    with open(os.path.join(out, "limits.md"), "w") as f:
        f.write(text + "\n")


if __name__ == "__main__":
    main()
