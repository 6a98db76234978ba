#!/usr/bin/env python3
"""memferry save/restore on a local S3 server against plain parallel loops
written here with boto3: 16 concurrent 8 MiB ranged GETs over the snapshot's
shard objects, 16 concurrent PUTs of 8 MiB objects (as many bytes as the
snapshot), and the save's own shape done plainly (one multipart upload per
shard, 8 MiB parts, 16 in flight, then completed). Every figure is the median of --runs, measured in the same run,
in rotating order.

Starts its own server (moto or s3s-fs from .tools, installed by
tests/tools/install-s3-servers.sh) on 127.0.0.1, or uses --endpoint.
Run with the tools' Python, which has boto3:

    .tools/moto/bin/python bench/s3.py --server s3s-fs --size 1GiB --runs 3

With --kv it runs `memferry kv bench` on an s3:// root instead: KV block
store and load against the plain concurrent whole-object PUT and GET loops
that `kv bench` runs itself at the same object size and requests in flight,
medians of --runs:

    .tools/moto/bin/python bench/s3.py --server s3s-fs --kv --blocks 512 --block-size 2MiB --runs 3
"""

import argparse, concurrent.futures as cf, json, os, shutil, socket, statistics
import subprocess, sys, tempfile, time

import boto3
from botocore.config import Config

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
# MEMFERRY_BIN picks another build (to compare two side by side).
BIN = os.environ.get("MEMFERRY_BIN") or os.path.join(REPO, "target", "release", "memferry")
TOOLS = os.path.join(REPO, ".tools")
MIB = 1 << 20
GIB = float(1 << 30)
AK, SK, BUCKET = "benchkey", "bench-secret-key", "memferry-bench"
REQ = 8 * MIB
CONC = 16


def parse_size(s):
    units = {"KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30}
    for u, m in units.items():
        if s.endswith(u):
            return int(float(s[: -len(u)]) * m)
    return int(s)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(kind):
    port = free_port()
    data = None
    if kind == "moto":
        cmd = [os.path.join(TOOLS, "moto", "bin", "moto_server"), "-H", "127.0.0.1", "-p", str(port)]
    else:
        data = tempfile.mkdtemp(prefix="memferry-s3s-", dir=os.environ.get("BENCH_DIR"))
        os.mkdir(os.path.join(data, BUCKET))
        cmd = [os.path.join(TOOLS, "s3s-fs", "bin", "s3s-fs"), "--host", "127.0.0.1",
               "--port", str(port), "--access-key", AK, "--secret-key", SK, data]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(600):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            break
        except OSError:
            time.sleep(0.05)
    return proc, f"http://127.0.0.1:{port}", data


def client(endpoint):
    return boto3.client(
        "s3", endpoint_url=endpoint, aws_access_key_id=AK, aws_secret_access_key=SK,
        region_name="us-east-1",
        config=Config(max_pool_connections=CONC * 2, s3={"addressing_style": "path"},
                      retries={"max_attempts": 3}))


def memferry(env, *args):
    out = subprocess.run([BIN, "--json", *args], env=env, check=True,
                         capture_output=True, text=True).stdout
    return json.loads(out)


def raw_gets(s3, keys_sizes):
    ranges = [(k, o, min(o + REQ, n) - 1) for k, n in keys_sizes for o in range(0, n, REQ)]

    def get(r):
        k, a, b = r
        body = s3.get_object(Bucket=BUCKET, Key=k, Range=f"bytes={a}-{b}")["Body"]
        n = 0
        for chunk in body.iter_chunks(1 << 20):
            n += len(chunk)
        return n

    t = time.perf_counter()
    with cf.ThreadPoolExecutor(CONC) as ex:
        total = sum(ex.map(get, ranges))
    return total / GIB / (time.perf_counter() - t)


def raw_puts(s3, prefix, size):
    block = os.urandom(REQ)
    keys = [f"{prefix}/raw-put/{i:06d}" for i in range((size + REQ - 1) // REQ)]
    t = time.perf_counter()
    with cf.ThreadPoolExecutor(CONC) as ex:
        list(ex.map(lambda k: s3.put_object(Bucket=BUCKET, Key=k, Body=block), keys))
    rate = len(keys) * REQ / GIB / (time.perf_counter() - t)
    for k in keys:
        s3.delete_object(Bucket=BUCKET, Key=k)
    return rate


def raw_multipart(s3, prefix, size, shard):
    """The save's shape with plain boto3: one multipart upload per shard,
    8 MiB parts, 16 in flight, then every upload completed."""
    block = os.urandom(REQ)
    shards = []
    left = size
    while left > 0:
        shards.append(min(shard, left))
        left -= shard
    t = time.perf_counter()
    ups = [(f"{prefix}/raw-mp/{i:05d}", s3.create_multipart_upload(
        Bucket=BUCKET, Key=f"{prefix}/raw-mp/{i:05d}")["UploadId"], n) for i, n in enumerate(shards)]
    jobs = [(k, u, p, min(REQ, n - p * REQ)) for k, u, n in ups for p in range((n + REQ - 1) // REQ)]

    def part(j):
        k, u, p, ln = j
        body = block if ln == REQ else block[:ln]
        return (k, p, s3.upload_part(Bucket=BUCKET, Key=k, UploadId=u, PartNumber=p + 1, Body=body)["ETag"])

    with cf.ThreadPoolExecutor(CONC) as ex:
        etags = list(ex.map(part, jobs))

    def complete(x):
        k, u, _ = x
        parts = [{"PartNumber": p + 1, "ETag": e} for kk, p, e in sorted(etags) if kk == k]
        s3.complete_multipart_upload(Bucket=BUCKET, Key=k, UploadId=u, MultipartUpload={"Parts": parts})

    with cf.ThreadPoolExecutor(CONC) as ex:
        list(ex.map(complete, ups))
    rate = size / GIB / (time.perf_counter() - t)
    for k, _, _ in ups:
        s3.delete_object(Bucket=BUCKET, Key=k)
    return rate


def kv_bench(a, env, root):
    rows = {"store": [], "raw_put": [], "load": [], "raw_get": []}
    for run in range(a.runs):
        r = memferry(env, "kv", "bench", "--root", root, "--blocks", str(a.blocks),
                     "--block-size", a.block_size, *a.kv_args.split())
        if r["failed"]:
            sys.exit(f"kv bench failed: {r}")
        rows["store"].append(r["store"]["gib_per_s"])
        rows["raw_put"].append(r["store"]["limit_gib_per_s"])
        rows["load"].append(r["load"]["gib_per_s"])
        rows["raw_get"].append(r["load"]["limit_gib_per_s"])
        print(f"run {run}: " + " ".join(f"{k}={v[-1]:.3f}" for k, v in rows.items()),
              file=sys.stderr)
    med = {k: statistics.median(v) for k, v in rows.items()}
    result = {"server": a.server, "blocks": a.blocks, "block_size": a.block_size,
              "runs": a.runs, "median_gib_per_s": med, "all": rows,
              "file_bytes": r["file_bytes"], "in_flight": r["store"]["queue_depth"],
              "store_ratio": med["store"] / med["raw_put"],
              "load_ratio": med["load"] / med["raw_get"],
              "lookup_us_per_1000_blocks": r["lookup"]["us_per_1000_blocks"],
              "load_p50_ms": r["load"]["p50_ms"], "load_p99_ms": r["load"]["p99_ms"]}
    if a.json:
        print(json.dumps(result))
    else:
        print(f"kv on {a.server}: {a.blocks} blocks of {a.block_size}, median of {a.runs} runs, "
              f"{result['in_flight']} requests in flight")
        for k in ["raw_put", "store", "raw_get", "load"]:
            print(f"  {k:<8} {med[k]:7.3f} GiB/s")
        print(f"  store = {100 * result['store_ratio']:.0f}% of raw PUTs; "
              f"load = {100 * result['load_ratio']:.0f}% of raw GETs; "
              f"single-key load p50 {result['load_p50_ms']:.2f} ms, p99 {result['load_p99_ms']:.2f} ms")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--server", choices=["moto", "s3s-fs"], default="s3s-fs")
    ap.add_argument("--size", default="1GiB")
    ap.add_argument("--shard-size", default="256MiB")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--kv", action="store_true", help="run kv bench on an s3:// root")
    ap.add_argument("--blocks", type=int, default=512, help="--kv: blocks")
    ap.add_argument("--block-size", default="2MiB", help="--kv: bytes of one block")
    ap.add_argument("--kv-args", default="", help="--kv: more kv bench flags, e.g. '--writers 16 --batch 1'")
    a = ap.parse_args()
    size = parse_size(a.size)
    proc, endpoint, data = start_server(a.server)
    try:
        s3 = client(endpoint)
        if a.server == "moto":
            s3.create_bucket(Bucket=BUCKET)
        env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "MEMFERRY_"))}
        env.update(AWS_ENDPOINT_URL=endpoint, AWS_ACCESS_KEY_ID=AK, AWS_SECRET_ACCESS_KEY=SK,
                   AWS_REGION="us-east-1")
        prefix = f"bench-{os.getpid()}"
        if a.kv:
            return kv_bench(a, env, f"s3://{BUCKET}/{prefix}/kv")
        url = f"s3://{BUCKET}/{prefix}/snap"
        rows = {"save": [], "restore": [], "raw_put": [], "raw_get": [], "raw_multipart": []}
        memferry(env, "save", "--source", f"synthetic:{a.size}", "--to", url,
                 "--shard-size", a.shard_size)
        for run in range(a.runs):
            for step in range(5):
                which = (step + run) % 5
                if which == 0:
                    r = memferry(env, "save", "--source", f"synthetic:{a.size}", "--to", url,
                                 "--shard-size", a.shard_size)
                    rows["save"].append(r["gib_per_s"])
                elif which == 1:
                    rows["restore"].append(memferry(env, "restore", url)["gib_per_s"])
                elif which == 2:
                    rows["raw_put"].append(raw_puts(s3, prefix, size))
                elif which == 4:
                    rows["raw_multipart"].append(raw_multipart(s3, prefix, size, parse_size(a.shard_size)))
                elif which == 3:
                    m = json.loads(s3.get_object(Bucket=BUCKET, Key=f"{prefix}/snap/manifest.json")["Body"].read())
                    keys = [(f"{prefix}/snap/{sh['path']}", sh["size"]) for sh in m["shards"]]
                    rows["raw_get"].append(raw_gets(s3, keys))
                print(f"run {run}: " + " ".join(f"{k}={v[-1]:.3f}" for k, v in rows.items() if len(v) > run),
                      file=sys.stderr)
        subprocess.run([BIN, "gc", "--grace", "0s", url], env=env, check=True, capture_output=True)
        for page in s3.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix + "/"):
            for o in page.get("Contents", []):
                s3.delete_object(Bucket=BUCKET, Key=o["Key"])
        med = {k: statistics.median(v) for k, v in rows.items()}
        spread = {k: (max(v) - min(v)) / med[k] if med[k] else 0 for k, v in rows.items()}
        result = {"server": a.server, "size": size, "runs": a.runs, "concurrency": CONC,
                  "request_bytes": REQ, "median_gib_per_s": med, "spread": spread, "all": rows,
                  "restore_percent_of_raw_get": 100 * med["restore"] / med["raw_get"],
                  "save_percent_of_raw_put": 100 * med["save"] / med["raw_put"],
                  "save_percent_of_raw_multipart": 100 * med["save"] / med["raw_multipart"]}
        if a.json:
            print(json.dumps(result))
        else:
            print(f"{a.server}, {a.size}, median of {a.runs} runs, {CONC} x 8 MiB in flight")
            for k in ["raw_get", "restore", "raw_put", "raw_multipart", "save"]:
                print(f"  {k:<8} {med[k]:7.3f} GiB/s  ±{100 * spread[k]:.0f}%")
            print(f"  restore = {result['restore_percent_of_raw_get']:.0f}% of raw GETs; "
                  f"save = {result['save_percent_of_raw_put']:.0f}% of raw PUTs, "
                  f"{result['save_percent_of_raw_multipart']:.0f}% of raw multipart uploads")
    finally:
        proc.kill()
        proc.wait()
        if data:
            shutil.rmtree(data, ignore_errors=True)


if __name__ == "__main__":
    main()
