#!/usr/bin/env python3
"""Paired cold-restore A/B: several memferry builds or settings against fio
on the same shard files. Every trial drops the page cache before each
reader and rotates the readers' order through every position; ratios are
medians of per-trial ratios to fio.

  bench/restore_ab.py --size 2GiB --trials 10 \\
      old=/tmp/memferry-old new=target/release/memferry \\
      'qd16=target/release/memferry --queue-depth 16'
"""

import argparse, glob, json, os, shlex, statistics, sys

from common import BIN, drop_caches, fio, reserve_hugepages, sh


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", default="2GiB")
    ap.add_argument("--dir", default="/var/tmp/memferry-ab")
    ap.add_argument("--trials", type=int, default=10)
    ap.add_argument("--fio-bs", default="8M")
    ap.add_argument("--fio-qd", type=int, default=8)
    ap.add_argument("readers", nargs="+", help="NAME=BINARY [restore flags...]")
    a = ap.parse_args()
    if not drop_caches():
        sys.exit("needs root: cold restores drop the page cache")
    reserve_hugepages()
    snap = os.path.join(a.dir, "snap")
    if not os.path.exists(os.path.join(snap, "manifest.json")):
        os.makedirs(a.dir, exist_ok=True)
        sh([BIN, "save", "--source", f"synthetic:{a.size}", "--to", snap, "--shard-size", "256MiB", "--json"])
    shards = sorted(glob.glob(os.path.join(snap, "shards", "shard-*.bin")))

    def memferry(cmd):
        return lambda: json.loads(sh([cmd[0], "restore", snap, "--backend", "direct", *cmd[1:], "--json"]))["gib_per_s"]

    readers = [("fio", lambda: fio("r", shards, "read", True, a.fio_bs, a.fio_qd))]
    for spec in a.readers:
        name, cmd = spec.split("=", 1)
        readers.append((name, memferry(shlex.split(cmd))))
    ratios = {name: [] for name, _ in readers}
    speeds = {name: [] for name, _ in readers}
    for t in range(a.trials):
        k = t % len(readers)
        got = {}
        for name, run in readers[k:] + readers[:k]:
            drop_caches()
            got[name] = run()
        for name in got:
            speeds[name].append(got[name])
            ratios[name].append(got[name] / got["fio"])
        print("  ".join(f"{n} {got[n]:.2f}" for n, _ in readers), flush=True)
    print(f"\n| reader | median GiB/s | ratio to fio bs={a.fio_bs} qd={a.fio_qd} | per trial |")
    print("|---|---|---|---|")
    for name, _ in readers:
        print(f"| {name} | {statistics.median(speeds[name]):.2f} | {statistics.median(ratios[name]):.3f} | "
              f"{', '.join(f'{r:.2f}' for r in ratios[name])} |")


if __name__ == "__main__":
    main()
