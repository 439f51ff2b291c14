"""Does training from an object store keep up with a local cache? Loader tokens/s, local vs remote.

A synthetic cache of realistic shape (bench_loader.py's generator: k=64, vocab
49152, sqrtq, ``--positions`` completion positions in ``--shards`` shards) is
written to a local folder. Then, side by side, one epoch of ``CacheLoader``
(consumer does nothing) with N decode threads, from the local folder and from
each remote backend:

  latency   ``LatencyFileSystem`` (below): the same folder behind an fsspec
            filesystem that makes every request wait ``--latency-ms`` plus
            size / ``--bandwidth-mbs`` (an asyncio sleep: no CPU, requests overlap
            like real S3 connections). This isolates what round trips cost.
  moto      a real S3 API: the cache copied object by object to moto on loopback,
            in its own process, the server adding ``--latency-ms`` per request.
            moto parses every request in Python on the same cores as the loader,
            so its figures are pessimistic (its CPU, not the latency, dominates).

Arms per backend:
  prefetch  the loader as shipped: the chunk objects of every shard of the windows
            being decoded are fetched (one concurrent batch per shard) as soon as
            its window is scheduled, at most ``read_ahead_shards`` shards held
            (``ShardPrefetcher``)
  at-decode the same batch fetch, but inside each decode task, before it decodes
            (``LogitCache.read_ahead`` only: the loader's scheduling before the prefetcher)
  no-ra     ``read_ahead_shards=0``: Zarr's own reads, one request after another

  open      listing + commit records + every shard's metadata and sequence arrays (once per run)
  epoch     decode + shuffle + collate of every batch; tokens/s = real tokens / epoch time
  CPU s     CPU seconds the epoch cost the loader's process (all threads) and the moto server:
            on a shared 2-core machine, CPU, not waiting, is what the remote arms can run out of

``--verify`` also times ``kd cache verify`` on each backend (requests and seconds).

    python benchmarks/bench_remote.py [--positions 100000] [--shards 8] [--workers 2 4] [--latency-ms 20]
        [--bandwidth-mbs 100] [--backends latency moto] [--arms prefetch at-decode no-ra] [--repeats 1]
        [--read-ahead-shards N] [--cache DIR] [--verify]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.util
import os
import platform
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from fsspec.asyn import AsyncFileSystem
from fsspec.implementations.local import LocalFileSystem

LATENCY_PROTOCOL = "kdlatency"


class LatencyFileSystem(AsyncFileSystem):
    """A local folder served like an object store: ``kdlatency:///abs/path``.

    Every request (read, listing, info, write) first does its local work, then sleeps
    ``latency_s`` + bytes / ``bandwidth`` in asyncio (no CPU; concurrent requests overlap,
    as separate HTTP connections do). Class attributes configure it and count requests:
    ``requests``, ``bytes_read``, ``in_flight`` and its maximum ``max_in_flight`` (the
    overlap: 1 means strictly sequential requests). ``fail`` maps a path suffix to an
    exception that reads of it raise (for tests). Register with ``register()``.
    """

    protocol = LATENCY_PROTOCOL
    cachable = True
    latency_s = 0.020
    bandwidth = 100e6  # bytes/s per request
    fail: dict[str, Exception] = {}
    requests = 0
    bytes_read = 0
    in_flight = 0
    max_in_flight = 0
    _count_lock = threading.Lock()

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.local = LocalFileSystem()

    @classmethod
    def register(cls) -> None:
        import fsspec

        fsspec.register_implementation(cls.protocol, cls, clobber=True)

    @classmethod
    def reset(cls, latency_s: float | None = None, bandwidth: float | None = None) -> None:
        with cls._count_lock:
            cls.requests = cls.bytes_read = cls.in_flight = cls.max_in_flight = 0
            cls.fail = {}
            if latency_s is not None:
                cls.latency_s = latency_s
            if bandwidth is not None:
                cls.bandwidth = bandwidth

    async def _wait(self, nbytes: int = 0, read: bool = False) -> None:
        cls = type(self)
        with cls._count_lock:
            cls.requests += 1
            cls.bytes_read += nbytes if read else 0
            cls.in_flight += 1
            cls.max_in_flight = max(cls.max_in_flight, cls.in_flight)
        try:
            await asyncio.sleep(cls.latency_s + nbytes / cls.bandwidth)
        finally:
            with cls._count_lock:
                cls.in_flight -= 1

    async def _cat_file(self, path, start=None, end=None, **kwargs):
        path = self._strip_protocol(path)
        for suffix, err in type(self).fail.items():
            if path.endswith(suffix):
                await self._wait()
                raise err
        try:
            data = self.local.cat_file(path, start=start, end=end)
        except FileNotFoundError:
            await self._wait()
            raise
        await self._wait(len(data), read=True)
        return data

    async def _info(self, path, **kwargs):
        await self._wait()
        return self.local.info(self._strip_protocol(path))

    async def _ls(self, path, detail=True, **kwargs):
        await self._wait()
        return self.local.ls(self._strip_protocol(path), detail=detail)

    async def _find(self, path, maxdepth=None, withdirs=False, detail=False, **kwargs):
        await self._wait()  # one listing request, like S3's list_objects_v2
        return self.local.find(self._strip_protocol(path), maxdepth=maxdepth, withdirs=withdirs, detail=detail)

    async def _pipe_file(self, path, data, mode="overwrite", **kwargs):
        path = self._strip_protocol(path)
        await self._wait(len(data))
        if mode == "create" and self.local.exists(path):
            raise FileExistsError(path)
        self.local.makedirs(self.local._parent(path), exist_ok=True)
        self.local.pipe_file(path, data)

    async def _rm_file(self, path, **kwargs):
        await self._wait()
        self.local.rm_file(self._strip_protocol(path))

    async def _rm(self, path, recursive=False, **kwargs):
        await self._wait()
        paths = path if isinstance(path, list) else [path]
        self.local.rm([self._strip_protocol(p) for p in paths], recursive=recursive)

    async def _makedirs(self, path, exist_ok=False):
        self.local.makedirs(self._strip_protocol(path), exist_ok=exist_ok)

    async def _mkdir(self, path, create_parents=True, **kwargs):
        self.local.mkdir(self._strip_protocol(path), create_parents=create_parents)


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

ARMS = ("prefetch", "at-decode", "no-ra")
_server_pid: int | None = None  # the moto server, whose CPU time an epoch reports


def _cpu_s(pid: int | None) -> float:
    """User + system CPU seconds of process ``pid`` so far (0 if unknown)."""
    if pid is None:
        return 0.0
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def best_epoch(repeats: int, *args) -> dict:
    return max((epoch(*args) for _ in range(repeats)), key=lambda r: r["tokens_per_s"])


def epoch(url: str, workers: int, arm: str = "prefetch", read_ahead_shards: int | None = None) -> dict:
    """One epoch of the loader over ``url``; ``arm`` picks how shards are read (module docstring)."""
    from kd.stages.train.loader import CacheLoader, LoaderConfig
    from kd.storage.cache import LogitCache, ShardPrefetcher

    real = LogitCache.prefetcher
    if arm == "at-decode":  # no prefetcher: each decode task fetches its shard itself
        LogitCache.prefetcher = lambda self, n: ShardPrefetcher(self, 0)
    ras = 0 if arm == "no-ra" else read_ahead_shards
    LatencyFileSystem.reset()
    try:
        t0 = time.perf_counter()
        loader = CacheLoader(url, LoaderConfig(max_tokens_per_batch=16384, num_workers=workers, prefetch_windows=2,
                                               read_ahead_shards=ras))
        len(loader)  # the epoch's plan
        t1 = time.perf_counter()
        requests0, cpu0, own0 = LatencyFileSystem.requests, _cpu_s(_server_pid), time.process_time()
        LatencyFileSystem.max_in_flight = 0
        tokens = sum(b.num_tokens for b in loader.iter_epoch())
        t2 = time.perf_counter()
        requests, in_flight = LatencyFileSystem.requests - requests0, LatencyFileSystem.max_in_flight
        server_cpu, own_cpu = _cpu_s(_server_pid) - cpu0, time.process_time() - own0
        loader.close()
    finally:
        LogitCache.prefetcher = real
    return {"open_s": t1 - t0, "epoch_s": t2 - t1, "tokens": tokens, "tokens_per_s": tokens / (t2 - t1),
            "requests": requests, "max_in_flight": in_flight, "server_cpu_s": server_cpu, "cpu_s": own_cpu}


def time_verify(url: str) -> dict:
    from kd.storage.verify import verify_cache

    LatencyFileSystem.reset()
    t = time.perf_counter()
    report = verify_cache(url)
    seconds = time.perf_counter() - t
    assert report.ok, report.format()
    return {"seconds": seconds, "requests": LatencyFileSystem.requests, "bytes": LatencyFileSystem.bytes_read}


@contextlib.contextmanager
def moto_server(latency_ms: float):
    global _server_pid
    port = _free_port()
    server = subprocess.Popen([sys.executable, "-c", SERVER, str(port), str(latency_ms)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _server_pid = server.pid
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
        yield fs
    finally:
        _server_pid = None
        server.terminate()
        server.wait()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--positions", type=int, default=100_000)
    ap.add_argument("--shards", type=int, default=8)
    ap.add_argument("--workers", type=int, nargs="+", default=[2, 4])
    ap.add_argument("--latency-ms", type=float, default=20.0, help="added to every remote request")
    ap.add_argument("--bandwidth-mbs", type=float, default=100.0,
                    help="per-request bandwidth of the latency filesystem, MB/s")
    ap.add_argument("--backends", nargs="+", choices=("latency", "moto"), default=["latency", "moto"])
    ap.add_argument("--arms", nargs="+", choices=ARMS, default=list(ARMS))
    ap.add_argument("--read-ahead-shards", type=int, default=None, help="LoaderConfig.read_ahead_shards")
    ap.add_argument("--repeats", type=int, default=1, help="best of N epochs per cell")
    ap.add_argument("--verify", action="store_true", help="also time kd cache verify on each backend")
    ap.add_argument("--cache", default=None, help="reuse this local cache folder (written if absent)")
    args = ap.parse_args()

    LatencyFileSystem.register()
    LatencyFileSystem.reset(args.latency_ms / 1000, args.bandwidth_mbs * 1e6)
    bl = _bench_loader()
    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as stack:
        local = os.path.abspath(args.cache or f"{tmp}/cache")
        if not os.path.exists(f"{local}/zarr.json"):
            build(local, args.positions, args.shards)
        size = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(local) for f in fs)
        urls = {}
        if "latency" in args.backends:
            urls["latency"] = f"{LATENCY_PROTOCOL}://{local}"
        if "moto" in args.backends:
            fs = stack.enter_context(moto_server(args.latency_ms))
            fs.put(local + "/", "kd-bench/cache", recursive=True)
            urls["moto"] = "s3://kd-bench/cache"
        print(bl.machine())
        print(f"# bench_remote  positions={args.positions} shards={args.shards} ({size / 2**20:.1f} MiB stored) "
              f"latency={args.latency_ms:g} ms/request, latency-fs bandwidth {args.bandwidth_mbs:g} MB/s per request, "
              f"read_ahead_shards={args.read_ahead_shards}")
        print(f"| {'backend':<8}| {'arm':<10}| workers | {'tokens/s':>9} | vs local | requests/epoch | max in flight "
              f"| open s | CPU s: loader + server |")
        print("|" + "|".join("-" * w for w in (9, 11, 9, 11, 10, 16, 15, 8, 24)) + "|")
        for w in args.workers:
            lo = best_epoch(args.repeats, local, w)
            print(f"| {'local':<8}| {'-':<10}| {w:>7} | {lo['tokens_per_s']:>9,.0f} | {1:>8.2f} | {'-':>14} | "
                  f"{'-':>13} | {lo['open_s']:>6.2f} | {lo['cpu_s']:>6.2f} {'':>15} |")
            for backend, url in urls.items():
                for arm in args.arms:
                    r = best_epoch(args.repeats, url, w, arm, args.read_ahead_shards)
                    counted = backend == "latency"
                    # CPU seconds the epoch cost this process (all threads) and the moto server
                    cpu = f"{r['cpu_s']:>6.2f}" + (f" + {r['server_cpu_s']:.2f} (moto)" if not counted else "")
                    print(f"| {backend:<8}| {arm:<10}| {w:>7} | {r['tokens_per_s']:>9,.0f} | "
                          f"{r['tokens_per_s'] / lo['tokens_per_s']:>8.2f} | "
                          f"{r['requests'] if counted else '-':>14} | {r['max_in_flight'] if counted else '-':>13} | "
                          f"{r['open_s']:>6.2f} | {cpu:<22} |")
        if args.verify:
            print(f"\n| verify of | seconds | requests | MB read |\n|---|---|---|---|")
            for backend, url in {"local": local, **urls}.items():
                r = time_verify(url)
                counted = backend == "latency"
                requests, mb = (r["requests"], f"{r['bytes'] / 1e6:.1f}") if counted else ("-", "-")
                print(f"| {backend} | {r['seconds']:.2f} | {requests} | {mb} |")


if __name__ == "__main__":
    main()
