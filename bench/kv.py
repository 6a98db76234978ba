"""KV block store against fio random I/O at the same request size and queue
depth, on the same filesystem, in the same run (issue 4).

Each trial runs `memferry kv bench` (which also measures its own built-in
raw limit) and fio randwrite/randread over a file of the same total size
with bs = one block file and iodepth = workers x batch. The order of
memferry and fio rotates between trials; ratios are medians of per-trial
ratios."""

import argparse, json, os, statistics, subprocess
from common import BIN, GIB, fio, reserve_hugepages, sh

ap = argparse.ArgumentParser()
ap.add_argument("--dir", default="/var/tmp/memferry-kv-bench")
ap.add_argument("--blocks", type=int, default=512)
ap.add_argument("--block-size", default="2MiB")
ap.add_argument("--workers", type=int, default=4)
ap.add_argument("--batch", type=int, default=4)
ap.add_argument("--trials", type=int, default=5)
a = ap.parse_args()
os.makedirs(a.dir, exist_ok=True)
mem = reserve_hugepages()


def memferry():
    out = sh([BIN, "kv", "bench", "--root", a.dir, "--blocks", str(a.blocks), "--block-size", a.block_size,
              "--writers", str(a.workers), "--readers", str(a.workers), "--batch", str(a.batch),
              "--seed", "1", "--json"])
    return json.loads(out)


def fio_pair(file_bytes, qd):
    path = os.path.join(a.dir, "fio-kv.tmp")
    size = [f"--size={a.blocks * file_bytes}"]
    w = fio("kvw", [path], "randwrite", True, file_bytes, qd, extra=size)
    r = fio("kvr", [path], "randread", True, file_bytes, qd, extra=size)
    os.remove(path)
    return w, r


rows = {"store": [], "load": [], "fio_w": [], "fio_r": [], "rs": [], "rl": [], "bw": [], "br": [],
        "p50": [], "p99": [], "lookup": []}
probe = memferry()
fb, qd = probe["file_bytes"], probe["store"]["queue_depth"]
for t in range(a.trials):
    if t % 2 == 0:
        m = memferry(); w, r = fio_pair(fb, qd)
    else:
        w, r = fio_pair(fb, qd); m = memferry()
    assert m["failed"] == 0 and m["dropped"] == 0, m
    rows["store"].append(m["store"]["gib_per_s"]); rows["load"].append(m["load"]["gib_per_s"])
    rows["fio_w"].append(w); rows["fio_r"].append(r)
    rows["rs"].append(m["store"]["gib_per_s"] / w); rows["rl"].append(m["load"]["gib_per_s"] / r)
    rows["bw"].append(m["store"]["limit_gib_per_s"] or 0); rows["br"].append(m["load"]["limit_gib_per_s"] or 0)
    rows["p50"].append(m["load"]["p50_ms"]); rows["p99"].append(m["load"]["p99_ms"])
    rows["lookup"].append(m["lookup"]["us_per_1000_blocks"])
    print(f"trial {t}: store {rows['store'][-1]:.2f} / fio {w:.2f} = {rows['rs'][-1]:.2f}; "
          f"load {rows['load'][-1]:.2f} / fio {r:.2f} = {rows['rl'][-1]:.2f}; mode {m['mode']}", flush=True)

med = statistics.median
print()
print(f"KV bench: {a.blocks} blocks of {a.block_size} (files of {fb} B), queue depth {qd} "
      f"({a.workers} workers x batch {a.batch}), {a.trials} trials, fio {mem}")
print("| row | memferry GiB/s | fio, same run | ratio (median) | built-in limit |")
print("|---|---|---|---|---|")
print(f"| store (random write, no fsync) | {med(rows['store']):.2f} | randwrite bs={fb} qd={qd}: {med(rows['fio_w']):.2f} "
      f"| {med(rows['rs']):.2f} | {med(rows['bw']):.2f} |")
print(f"| load (random read, verified) | {med(rows['load']):.2f} | randread bs={fb} qd={qd}: {med(rows['fio_r']):.2f} "
      f"| {med(rows['rl']):.2f} | {med(rows['br']):.2f} |")
print(f"| single-key load latency | p50 {med(rows['p50']):.2f} ms, p99 {med(rows['p99']):.2f} ms | | | |")
print(f"| lookup, warm index | {med(rows['lookup']):.1f} us per 1,000-block prefix | | | |")
