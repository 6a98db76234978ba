"""Shared pieces of the bench scripts: running memferry and fio, dropping
the page cache, and giving fio hugepage buffers like memferry's."""

import atexit, json, os, subprocess

HERE = os.path.dirname(os.path.abspath(__file__))
BIN = os.environ.get("MEMFERRY_BIN") or os.path.join(HERE, "..", "target", "release", "memferry")
GIB = float(1 << 30)
HUGEPAGES = "/proc/sys/vm/nr_hugepages"
_fio_mem = ["--mem=malloc"]


def sh(args):
    """Runs a command, returns its stdout; raises on failure."""
    return subprocess.run(args, check=True, capture_output=True, text=True).stdout


def drop_caches():
    """Drops the page cache; False when not permitted (not root)."""
    try:
        os.sync()
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return True
    except OSError:
        return False


def reserve_hugepages(n=160):
    """fio's buffers come from malloc (4 KiB pages) unless given hugepages;
    memferry's are THP-backed, and on virtio disks that changes how large
    each O_DIRECT request can be. For a fair yardstick fio gets hugepage
    buffers (--mem=mmaphuge): reserve them (root) and restore the old value
    at exit. Returns the fio --mem option in use."""
    try:
        old = open(HUGEPAGES).read().strip()
        with open(HUGEPAGES, "w") as f:
            f.write(f"{max(n, int(old))}\n")
        atexit.register(lambda: open(HUGEPAGES, "w").write(old + "\n"))
        _fio_mem[0] = "--mem=mmaphuge"
    except OSError:
        _fio_mem[0] = "--mem=malloc"
    return _fio_mem[0]


def fio(name, files, rw, direct, bs, iodepth, engine="io_uring", extra=()):
    """One fio job over `files` in order; returns GiB/s."""
    out = sh(["fio", f"--name={name}", f"--filename={':'.join(files)}", f"--rw={rw}", f"--bs={bs}",
              f"--iodepth={iodepth}", f"--ioengine={engine}", f"--direct={int(direct)}",
              "--file_service_type=sequential", "--output-format=json", _fio_mem[0], *extra])
    j = json.loads(out)["jobs"][0]
    return (j["read"] if rw in ("read", "randread") else j["write"])["bw_bytes"] / GIB
