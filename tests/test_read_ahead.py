"""Read-ahead on object stores: whole shards fetched ahead of decode, concurrently, in bounded memory.

The remote is ``LatencyFileSystem`` from benchmarks/bench_remote.py (the instrument the
benchmark's figures come from): a local folder behind an fsspec filesystem whose every
request sleeps a fixed latency, counts itself and its overlap with others, and can be told
to fail. What is promised (storage/cache.py ``ShardPrefetcher``, ``LogitCache.read_ahead``):
the same bytes as plain reads; several shards' requests in flight at once; never more than
``max_shards`` shards held; a bad or unreachable prefetched object raises a kd error where
the shard is used, not in a background thread; ``kd cache verify`` downloads each object once.
"""

from __future__ import annotations

import collections
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from kd.stages.train.loader import CacheLoader, LoaderConfig
from kd.storage.cache import LogitCache, ShardPrefetcher
from kd.storage.errors import CorruptShardError
from kd.storage.remote import FetchError
from kd.storage.verify import verify_cache

FIELDS = ("token_ids", "seq_offsets", "completion_start", "topk_ids", "topk_logprobs", "tail_logprobs",
          "target_logprobs", "behaviour_logprobs", "source", "round", "prompt_index", "sample_index")
SHARDS = 6


@pytest.fixture(scope="module")
def lfs(benchmark_module):
    """The latency filesystem class, registered as kdlatency://; 5 ms per request by default."""
    fs_class = benchmark_module("bench_remote").LatencyFileSystem
    fs_class.register()
    fs_class.reset(0.005, 1e9)
    counts = collections.Counter()
    real = fs_class._cat_file

    async def counting_cat_file(self, path, start=None, end=None, **kwargs):
        counts[(self._strip_protocol(path), start, end)] += 1
        return await real(self, path, start=start, end=end, **kwargs)

    fs_class._cat_file = counting_cat_file
    fs_class.reads = counts
    yield fs_class
    fs_class._cat_file = real


@pytest.fixture
def latency(lfs):
    lfs.reset(0.005, 1e9)
    lfs.reads.clear()
    yield lfs
    lfs.reset(0.005, 1e9)


@pytest.fixture
def local_cache(tmp_path, make_batch, make_fingerprint) -> Path:
    path = tmp_path / "cache"
    cache = LogitCache.create(str(path), make_fingerprint())
    rng = np.random.default_rng(0)
    for s in range(SHARDS):
        batch = make_batch(rng, num_sequences=6)
        batch.prompt_index[:] = np.arange(6 * s, 6 * s + 6)
        cache.write_shard(f"s{s}", batch, {"round": 0})
    return path


def remote_url(path: Path) -> str:
    return f"kdlatency://{path}"


def assert_batches_equal(a, b) -> None:
    for name in FIELDS:
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name), err_msg=name)


def epoch(url: str, on_open=None, **config) -> list:
    with CacheLoader(url, LoaderConfig(max_tokens_per_batch=96, shuffle_window_shards=2, **config)) as loader:
        len(loader)  # opened and planned
        if on_open is not None:
            on_open()
        return list(loader.iter_epoch())


# ---------------------------------------------------------------- same data
def test_read_ahead_and_prefetch_return_the_bytes_of_plain_reads(local_cache, latency):
    local = LogitCache.open(str(local_cache))
    cache = LogitCache.open(remote_url(local_cache))
    assert cache.reads_ahead and not local.reads_ahead
    prefetcher = cache.prefetcher(3)
    records = cache.committed_shards()
    tickets = [prefetcher.schedule(r) for r in records]
    for record, ticket in zip(records, tickets):
        reader = cache.read_shard(record)
        expected = local.read_shard(record.name).read()
        before = latency.requests
        assert_batches_equal(reader.read(), expected)  # through Zarr: requests
        assert latency.requests > before
        with cache.read_ahead(record):
            before = latency.requests
            assert_batches_equal(reader.read(1, 4), local.read_shard(record.name).read(1, 4))
            assert latency.requests == before  # served from memory
        with prefetcher.read_ahead(ticket):
            before = latency.requests
            assert_batches_equal(reader.read(), expected)
            assert latency.requests == before
    prefetcher.close()


def test_loader_batches_are_identical_local_prefetched_and_unprefetched(local_cache, latency):
    reference = epoch(str(local_cache), num_workers=2)
    for config in ({"num_workers": 2}, {"num_workers": 2, "read_ahead_shards": 0},
                   {"num_workers": 0}, {"num_workers": 3, "read_ahead_shards": 1}):
        got = epoch(remote_url(local_cache), **config)
        assert len(got) == len(reference) > 3, config
        for a, b in zip(got, reference):
            for name in ("input_ids", "attention_mask", "loss_rows", "loss_cols", "topk_ids", "topk_logprobs",
                         "tail_logprobs", "target_logprobs", "behaviour_logprobs", "source", "round"):
                np.testing.assert_array_equal(getattr(a, name).numpy(), getattr(b, name).numpy(),
                                              err_msg=f"{name} {config}")


# ---------------------------------------------------------------- concurrency
def test_prefetch_keeps_several_shards_of_requests_in_flight(local_cache, latency):
    latency.reset(0.05, 1e9)  # long enough that overlapping fetches must overlap in the counter
    cache = LogitCache.open(remote_url(local_cache))
    records = cache.committed_shards()
    per_shard = len(cache.read_ahead_objects(records[0]))
    prefetcher = cache.prefetcher(4)
    latency.max_in_flight = 0
    t = time.perf_counter()
    tickets = [prefetcher.schedule(r) for r in records[:4]]
    for ticket in tickets:
        with prefetcher.read_ahead(ticket):
            pass
    seconds = time.perf_counter() - t
    prefetcher.close()
    # four shards' objects requested at once, not one shard (or one object) after another
    assert latency.max_in_flight >= 3 * per_shard, (latency.max_in_flight, per_shard)
    assert seconds < 4 * 0.05 * 0.9, seconds


def test_the_loader_fetches_ahead_of_decode(local_cache, latency):
    latency.reset(0.03, 1e9)
    cache = LogitCache.open(remote_url(local_cache))
    per_shard = len(cache.read_ahead_objects(cache.load_record("s0")))

    def start_counting():  # opening the shards (16 threads) is not what is measured
        latency.max_in_flight = 0

    epoch(remote_url(local_cache), start_counting, num_workers=1, prefetch_windows=1)  # one decode thread
    with_prefetch = latency.max_in_flight
    epoch(remote_url(local_cache), start_counting, num_workers=1, prefetch_windows=1, read_ahead_shards=0)
    assert latency.max_in_flight <= 2  # Zarr's own reads: one request after another
    # one decode thread, yet several shards' objects were requested together
    assert with_prefetch > 2 * per_shard, (with_prefetch, per_shard)


# ---------------------------------------------------------------- bounded memory
def test_prefetcher_never_holds_more_than_max_shards(local_cache, latency, monkeypatch):
    cache = LogitCache.open(remote_url(local_cache))
    records = cache.committed_shards()
    prefetcher = cache.prefetcher(2)
    started, seen = [], []
    real = LogitCache._fetch_objects

    def fetch(self, record):
        started.append(record.name)
        seen.append(prefetcher.held)
        return real(self, record)

    monkeypatch.setattr(LogitCache, "_fetch_objects", fetch)
    tickets = [prefetcher.schedule(r) for r in records]
    time.sleep(0.2)
    assert started == ["s0", "s1"]  # the rest wait for a free slot
    with prefetcher.read_ahead(tickets[0]):
        assert prefetcher.held == 2
    time.sleep(0.2)
    assert started == ["s0", "s1", "s2"]  # leaving the block freed one slot
    for ticket in tickets[1:]:
        with prefetcher.read_ahead(ticket):
            assert prefetcher.held <= 2
    assert started == [r.name for r in records] and max(seen) <= 2
    assert prefetcher.held == 0 and not cache.zarr_store()._held  # nothing left in memory
    prefetcher.close()


def test_loader_read_ahead_memory_is_bounded_by_read_ahead_shards(local_cache, latency, monkeypatch):
    prefetchers, peak = [], collections.Counter()
    lock = threading.Lock()
    real_prefetcher, real_fetch = LogitCache.prefetcher, LogitCache._fetch_objects

    def prefetcher(self, n):
        p = real_prefetcher(self, n)
        prefetchers.append(p)
        return p

    def fetch(self, record):
        with lock:
            store = self.zarr_store()
            groups = {key.split("/")[1] for key in list(store._held)}  # shards/<group>/<array>/...
            peak["held"] = max(peak["held"], *(p.held for p in prefetchers), 0)
            peak["in_store"] = max(peak["in_store"], len(groups))
        return real_fetch(self, record)

    monkeypatch.setattr(LogitCache, "prefetcher", prefetcher)
    monkeypatch.setattr(LogitCache, "_fetch_objects", fetch)
    epoch(remote_url(local_cache), num_workers=2, read_ahead_shards=2, prefetch_windows=2)
    assert prefetchers and all(p.max_shards == 2 for p in prefetchers)
    assert 1 <= peak["held"] <= 2 and peak["in_store"] <= 2, peak


def test_read_ahead_shards_is_validated():
    with pytest.raises(Exception, match=r"read_ahead_shards: must be an integer >= 0 or None, got -1"):
        LoaderConfig(read_ahead_shards=-1)


# ---------------------------------------------------------------- errors at the point of use
def _chunk(cache: LogitCache, name: str, array: str = "token_ids") -> tuple[str, Path]:
    record = cache.load_record(name)
    rel = next(r for r in record.objects if r.split("/")[2] == array and not r.endswith("zarr.json"))
    return rel, Path(cache._root) / rel


def test_a_corrupt_prefetched_object_raises_corrupt_shard_error_where_it_is_read(local_cache, latency):
    cache = LogitCache.open(remote_url(local_cache))
    reader = cache.read_shard("s2")
    rel, path = _chunk(cache, "s2")
    prefetcher = cache.prefetcher(2)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    ticket = prefetcher.schedule(reader.record)  # no error here, nor in the fetching thread
    time.sleep(0.1)
    with pytest.raises(CorruptShardError) as err:
        with prefetcher.read_ahead(ticket):
            reader.read()
    assert str(err.value) == (
        f"shard 's2' is corrupt: object {rel} fails its sha256 checksum (bytes changed in the store or "
        "in transit). Run `kd cache verify` to list every bad shard; re-generate or delete it."
    )
    assert prefetcher.held == 0
    prefetcher.close()


def test_a_shard_corrupted_after_open_stops_the_loader_or_is_skipped(local_cache, latency):
    url = remote_url(local_cache)
    config = LoaderConfig(max_tokens_per_batch=96, shuffle_window_shards=2, num_workers=2)
    loader = CacheLoader(url, config)
    rel, path = _chunk(loader.cache, "s4", "topk_codes")
    saved = path.read_bytes()
    path.unlink()  # deleted after the loader opened (and checked) every shard
    with pytest.raises(CorruptShardError, match=rf"^shard 's4' is corrupt: object {rel} is missing\. Run"):
        for _ in loader.iter_epoch():
            pass
    loader.close()
    path.write_bytes(saved)
    with CacheLoader(url, LoaderConfig(**{**config.to_dict(), "skip_bad_shards": True})) as loader:
        path.unlink()
        tokens = sum(b.num_tokens for b in loader.iter_epoch())
    total = sum(LogitCache.open(url).load_record(f"s{s}").num_tokens for s in range(SHARDS))
    s4 = LogitCache.open(url).load_record("s4").num_tokens
    assert tokens == total - s4  # the bad shard's sequences were left out, all the others kept


def test_an_unreachable_object_raises_fetch_error_even_with_skip_bad_shards(local_cache, latency):
    url = remote_url(local_cache)
    config = LoaderConfig(max_tokens_per_batch=96, shuffle_window_shards=2, num_workers=2, skip_bad_shards=True)
    loader = CacheLoader(url, config)
    rel, _ = _chunk(loader.cache, "s3")
    latency.fail = {rel: ConnectionError("connection reset by peer")}
    with pytest.raises(FetchError) as err:
        for _ in loader.iter_epoch():
            pass
    loader.close()
    assert str(err.value) == (
        f"cannot fetch {rel} of shard 's3' from {url} (ConnectionError: connection reset by peer); the "
        "store's retries are exhausted. Check the connection and credentials, then rerun (kd train resumes "
        "from its last checkpoint)."
    )
    # the prefetch failed, then the decode thread asked once more before giving up
    assert latency.reads[(f"{local_cache}/{rel}", None, None)] >= 2


def test_a_failed_prefetch_is_retried_at_use(local_cache, latency, monkeypatch):
    cache = LogitCache.open(remote_url(local_cache))
    record = cache.load_record("s1")
    rel, _ = _chunk(cache, "s1")
    latency.fail = {rel: ConnectionError("reset")}
    prefetcher = cache.prefetcher(1)
    ticket = prefetcher.schedule(record)
    time.sleep(0.1)
    latency.fail = {}  # the store came back before the shard was needed
    with prefetcher.read_ahead(ticket):
        batch = cache.read_shard(record).read()
    assert_batches_equal(batch, LogitCache.open(str(local_cache)).read_shard("s1").read())
    prefetcher.close()


# ---------------------------------------------------------------- verify
def test_verify_downloads_each_object_once(local_cache, latency):
    url = remote_url(local_cache)
    cache = LogitCache.open(url)
    objects = {f"{local_cache}/{rel}" for r in cache.committed_shards() for rel in r.objects}
    latency.reads.clear()
    report = verify_cache(url)
    assert report.ok and report.shards_checked == SHARDS, report.format()
    per_object = collections.Counter()
    for (path, _start, _end), n in latency.reads.items():
        if path in objects:
            per_object[path] += n
    assert set(per_object) == objects and set(per_object.values()) == {1}


def test_remote_verify_reports_what_local_verify_reports(local_cache, latency):
    cache = LogitCache.open(str(local_cache))
    rel, path = _chunk(cache, "s1", "topk_codes")
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    group = Path(cache._root) / cache.load_record("s3").group_dir
    (group / "token_ids" / "c" / "9").write_bytes(b"stray")  # an object the record does not list
    local, remote = verify_cache(str(local_cache)), verify_cache(remote_url(local_cache))
    assert [p for _, p in remote.problems] == [p for _, p in local.problems]
    problems = [p for _, p in remote.problems]
    assert problems[0] == f"object {rel} fails its sha256 checksum (bytes changed on disk or in transit)"
    assert any("token_ids/c/9 is not listed in the commit record" in p for p in problems), problems


def test_read_ahead_fetches_only_the_chunks_reads_decode(local_cache):
    cache = LogitCache.open(str(local_cache))
    record = cache.load_record("s0")
    arrays = {rel.split("/")[2] for rel in cache.read_ahead_objects(record)}
    # sqrtq: token ids and the five position arrays; metadata and per-sequence arrays are read at open
    assert arrays == {"token_ids", "topk_id_deltas", "topk_codes", "tail_code", "target_logprob",
                      "behaviour_logprob"}
    assert not any(rel.endswith("zarr.json") for rel in cache.read_ahead_objects(record))


def test_prefetcher_is_a_no_op_on_local_caches(local_cache):
    cache = LogitCache.open(str(local_cache))
    prefetcher = cache.prefetcher(4)
    assert isinstance(prefetcher, ShardPrefetcher) and not prefetcher.enabled
    assert prefetcher.schedule(cache.load_record("s0")) is None


# ---------------------------------------------------------------- the per-read value checks, in blocks
BAD_VALUES = [
    # (array, value, ids sorted, message start; {j} is the bad row)
    ("topk_logprobs", -np.inf, False, "top-k log-prob -inf at position row {j} "),
    ("topk_logprobs", np.nan, False, "top-k log-prob nan at position row {j} "),
    ("topk_logprobs", 0.25, True, "top-k log-prob 0.25 at position row {j} "),
    ("tail_logprobs", np.nan, False, "tail log-prob nan at position row {j} "),
    ("tail_logprobs", 0.5, False, "tail log-prob 0.5 at position row {j} "),
    ("target_logprobs", np.nan, False, "target log-prob nan at position row {j} "),
    ("target_logprobs", 1.0, True, "target log-prob 1.0 at position row {j} "),
    ("behaviour_logprobs", 0.5, False, "behaviour log-prob 0.5 at position row {j} "),
    ("topk_ids", 100, False, "top-k id 100 at position row {j} "),
    ("topk_ids", 100, True, "top-k id 100 at position row {j} "),
    ("topk_ids", -3, True, "top-k id -3 at position row {j} "),
    ("repeat", None, False, "position row {j} (sequence"),
    ("repeat", None, True, "position row {j} (sequence"),
]


@pytest.mark.parametrize("array, value, ids_sorted, message", BAD_VALUES)
def test_value_checks_name_the_first_bad_row_whichever_block_it_is_in(
        array, value, ids_sorted, message, make_batch, monkeypatch):
    from kd.storage import checks

    monkeypatch.setattr(checks, "BLOCK_ROWS", 16)  # many blocks in a small batch
    batch = make_batch(np.random.default_rng(1), num_sequences=40)
    if ids_sorted:
        batch.topk_ids[:] = np.sort(batch.topk_ids, axis=1)
    batch.behaviour_logprobs[::3] = np.nan  # allowed
    batch.tail_logprobs[::5] = -np.inf  # allowed
    assert checks.check_decoded(batch, 100, ids_sorted=ids_sorted) == []
    rows = batch.num_positions
    assert rows > 10 * 16
    first, later = 5 * 16 + 7, rows - 3  # in the sixth block, and a second one further on
    for j in (later, first):
        if array == "repeat":
            batch.topk_ids[j, 1] = batch.topk_ids[j, 0]
        else:
            values = getattr(batch, array)
            if values.ndim == 2:
                # sorted rows stay sorted: a too large id goes last, a negative one first
                values[j, (-1 if value == 100 else 0) if ids_sorted and array == "topk_ids" else 2] = value
            else:
                values[j] = value
    problems = checks.check_decoded(batch, 100, pos_start=1000, ids_sorted=ids_sorted)
    assert len(problems) == 1 and problems[0].startswith(message.format(j=1000 + first)), problems
