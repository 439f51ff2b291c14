"""Does training from an object store keep up with a local cache? Loader tokens/s, local vs S3.

A synthetic cache of realistic shape (bench_loader.py's generator: k=64, vocab
49152, sqrtq, ``--positions`` completion positions in ``--shards`` shards) is
written to a local folder, then copied object by object to an S3 server on
loopback (moto, in its own process so it does not share the GIL with the
loader). Then, side by side, one epoch of ``CacheLoader`` (consumer does
nothing) from each, with N decode threads:

  open      listing + commit records + every shard's sequence arrays (once per run)
  epoch     decode + shuffle + collate of every batch; tokens/s = real tokens / epoch time

Loopback has no network latency, so the server adds ``--latency-ms`` to every
request (a sleep, which costs no CPU; real S3 first-byte latency is ~10-50 ms).
``s3 no-ra`` turns off the loader's read-ahead (``LogitCache.read_ahead``: all of a
shard's objects fetched in one concurrent batch) to show what it buys. moto parses
every request in Python on the same cores as the loader, so S3 figures are pessimistic.

    python benchmarks/bench_remote.py [--positions 100000] [--shards 8] [--workers 2 4] [--latency-ms 20]
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _bench_loader():
    path = Path(__file__).with_name("bench_loader.py")
    spec = importlib.util.spec_from_file_location("bench_loader", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def build(url: str, positions: int, shards: int) -> None:
    import numpy as np

    from kd.storage.cache import LogitCache
    from kd.storage.format import CacheFingerprint, CodecConfig, TeacherFingerprint, TokenizerFingerprint

    bl = _bench_loader()
    fp = CacheFingerprint(TeacherFingerprint("bench", "0" * 64), TokenizerFingerprint("1" * 64, bl.VOCAB, "bench"),
                          bl.K, CodecConfig(name="sqrtq", levels=255, zstd_level=5))
    cache = LogitCache.create(url, fp)
    rng = np.random.default_rng(0)
    first = 0
    for s in range(shards):
        batch = bl.synthetic_batch(rng, positions // shards, first)
        first += batch.num_sequences
        cache.write_shard(f"s{s:03d}", batch, {"round": 0})


SERVER = """
import sys, time
from moto.moto_server.werkzeug_app import DomainDispatcherApplication, MotoRequestHandler, create_backend_app
from werkzeug.serving import make_server
port, latency = int(sys.argv[1]), float(sys.argv[2]) / 1000
inner = DomainDispatcherApplication(create_backend_app)
def app(environ, start_response):
    time.sleep(latency)
    return inner(environ, start_response)
class Quiet(MotoRequestHandler):
    def log_request(self, *a, **k):
        pass
make_server("127.0.0.1", port, app, True, request_handler=Quiet).serve_forever()
"""


def epoch(url: str, workers: int, read_ahead: bool = True) -> dict:
    import contextlib

    from kd.stages.train.loader import CacheLoader, LoaderConfig
    from kd.storage.cache import LogitCache

    real = LogitCache.read_ahead
    if not read_ahead:
        LogitCache.read_ahead = lambda self, record: contextlib.nullcontext()

    t0 = time.perf_counter()
    loader = CacheLoader(url, LoaderConfig(max_tokens_per_batch=16384, num_workers=workers, prefetch_windows=2))
    t1 = time.perf_counter()
    tokens = sum(b.num_tokens for b in loader.iter_epoch())
    t2 = time.perf_counter()
    loader.close()
    LogitCache.read_ahead = real
    return {"open_s": t1 - t0, "epoch_s": t2 - t1, "tokens": tokens, "tokens_per_s": tokens / (t2 - t1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--positions", type=int, default=100_000)
    ap.add_argument("--shards", type=int, default=8)
    ap.add_argument("--workers", type=int, nargs="+", default=[2, 4])
    ap.add_argument("--latency-ms", type=float, default=20.0)
    args = ap.parse_args()

    port = _free_port()
    server = subprocess.Popen([sys.executable, "-c", SERVER, str(port), str(args.latency_ms)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    os.environ.update(AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1",
                      AWS_ENDPOINT_URL=f"http://127.0.0.1:{port}")
    try:
        import s3fs

        fs = s3fs.S3FileSystem()
        for _ in range(100):
            try:
                fs.mkdir("kd-bench")
                break
            except Exception:
                time.sleep(0.1)
        with tempfile.TemporaryDirectory() as tmp:
            local = f"{tmp}/cache"
            build(local, args.positions, args.shards)
            fs.put(local + "/", "kd-bench/cache", recursive=True)
            print(f"# bench_remote  {platform.node()}  {os.cpu_count()} cpus  python {platform.python_version()}  "
                  f"positions={args.positions} shards={args.shards} latency={args.latency_ms:g} ms/request")
            print(f"{'workers':>7}  {'local tok/s':>12}  {'s3 tok/s':>12}  {'s3/local':>8}  {'s3 no-ra':>12}  "
                  f"{'open local':>10}  {'open s3':>8}")
            for w in args.workers:
                lo = epoch(local, w)
                re = epoch("s3://kd-bench/cache", w)
                nr = epoch("s3://kd-bench/cache", w, read_ahead=False)
                print(f"{w:>7}  {lo['tokens_per_s']:>12,.0f}  {re['tokens_per_s']:>12,.0f}  "
                      f"{re['tokens_per_s'] / lo['tokens_per_s']:>8.2f}  {nr['tokens_per_s']:>12,.0f}  "
                      f"{lo['open_s']:>9.2f}s  {re['open_s']:>7.2f}s")
    finally:
        server.terminate()
        server.wait()


if __name__ == "__main__":
    main()
