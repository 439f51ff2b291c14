"""`kd cache verify`: check every committed shard of a cache and report every problem.

Checks, per shard: the commit record parses; every object it lists exists with
the recorded size and sha256 (a flipped byte anywhere is caught here, and again
by the crc32c of each chunk when read); the arrays have the dtypes and shapes
the codec prescribes; CSR offsets are consistent; token ids and top-k ids are
< vocab_size; sqrtq ids strictly increase within a row and codes are <= levels;
raw log-probs are finite, <= 0 and sorted descending; the decoded k+1 buckets
sum to 1 within the rounding bound; target log-probs are <= 0; behaviour
log-probs are <= 0 or NaN. Shard folders without a commit record are listed as
leftovers of dead writers (not errors: they are invisible to readers).

On object stores each object is downloaded once: a shard's group is listed, all
of its objects are fetched in one concurrent batch and hashed, and the shard is
then opened and decoded from that copy in memory (an fsspec memory filesystem and
a Zarr memory store), one shard at a time, the next shard's fetch overlapping the
current shard's checks.
"""

from __future__ import annotations

import hashlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from kd.storage import checks
from kd.storage import codec as codec_mod
from kd.storage.cache import LogitCache, ShardReader
from kd.storage.errors import KdError
from kd.storage.format import COMMIT_SUFFIX, COMMITS_DIR, SHARDS_GROUP, ShardRecord

SEQUENCES_PER_STEP = 4096
"""Sequences decoded at a time, so verify's memory does not grow with shard size."""


@dataclass
class VerifyReport:
    url: str
    shards_checked: int = 0
    problems: list[tuple[str, str]] = field(default_factory=list)  # (shard path, problem)
    leftovers: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_dict(self) -> dict:
        return {
            "url": self.url,
            "ok": self.ok,
            "shards_checked": self.shards_checked,
            "problems": [{"shard": s, "problem": p} for s, p in self.problems],
            "uncommitted_leftovers": self.leftovers,
        }

    def format(self) -> str:
        lines = [f"verify {self.url}: {self.shards_checked} committed shard(s) checked"]
        bad = sorted({s for s, _ in self.problems})
        for shard, problem in self.problems:
            lines.append(f"  BAD {shard}: {problem}")
        for path in self.leftovers:
            lines.append(f"  note: {path} has no commit record (a writer died?); invisible to readers")
        lines.append(f"OK: no problems found" if self.ok else f"FAILED: {len(bad)} bad shard(s), {len(self.problems)} problem(s)")
        return "\n".join(lines)


def verify_cache(url: str) -> VerifyReport:
    cache = LogitCache.open(url)
    report = VerifyReport(url=url)
    fs, root = cache._fs, cache._root
    try:
        commit_files = sorted(
            p.rsplit("/", 1)[-1] for p in fs.ls(f"{root}/{COMMITS_DIR}", detail=False) if p.endswith(COMMIT_SUFFIX)
        )
    except FileNotFoundError:
        commit_files = []
    committed = set()
    referenced = set()  # group folders named by records (or possibly, when a record is unreadable)
    names = [base[: -len(COMMIT_SUFFIX)] for base in commit_files if not base.startswith(".")]
    remote = cache.reads_ahead

    def load(name: str) -> ShardRecord | KdError:
        try:
            return cache.load_record(name)
        except KdError as err:
            return err

    with ThreadPoolExecutor(16 if remote else 1, thread_name_prefix="kd-verify-records") as pool:
        records = dict(zip(names, pool.map(load, names)))  # one small read each: overlap them remotely
    with ThreadPoolExecutor(1, thread_name_prefix="kd-verify-fetch") as fetcher:
        # remote: the next shard downloads while this one is checked (two shards in memory at most)
        pending = {}

        def fetch_from(i: int) -> None:
            for name in names[i:]:
                if isinstance(records[name], ShardRecord):
                    pending[name] = fetcher.submit(_fetch_shard, cache, records[name])
                    return

        if remote:
            fetch_from(0)
        for i, name in enumerate(names):
            where = f"{url}/{SHARDS_GROUP}/{name}"
            report.shards_checked += 1
            committed.add(name)
            record = records[name]
            if isinstance(record, KdError):
                report.problems.append((where, str(record)))
                referenced.update(g for g in cache.shard_groups() if g == name or g.startswith(f"{name}."))
                continue
            referenced.add(record.group_dir.rsplit("/", 1)[-1])
            if remote:
                fetched = pending.pop(name).result()
                fetch_from(i + 1)
                problems = _check_fetched_shard(cache, record, fetched)
                del fetched
            else:
                problems = _check_shard(cache, record)
            for problem in problems:
                report.problems.append((where, problem))
    report.leftovers = [f"{url}/{SHARDS_GROUP}/{g}" for g in cache.shard_groups() if g not in referenced]
    return report


def _check_shard(cache: LogitCache, record: ShardRecord, hashed: bool = False) -> list[str]:
    """Every problem of one shard (``hashed``: its objects' sizes and sha256 were checked already)."""
    fs, root = cache._fs, cache._root
    problems = []
    for rel, meta in sorted(record.objects.items()) if not hashed else ():
        try:
            data = fs.cat_file(f"{root}/{rel}")
        except FileNotFoundError as err:
            data = err
        problems += _object_problems(rel, meta, data)
    if problems:
        return problems
    try:
        reader = ShardReader(cache, record)
        problems += _check_schema(cache, reader)
        if problems:
            return problems
        for start in range(0, reader.num_sequences, SEQUENCES_PER_STEP):
            problems += _check_values(cache, reader, start, min(start + SEQUENCES_PER_STEP, reader.num_sequences))
            if problems:
                break
    except KdError as err:
        problems.append(str(err))
    return problems


def _object_problems(rel: str, meta: dict, data: bytes | Exception | None) -> list[str]:
    """What is wrong with one object's bytes (or with fetching them) against its record entry."""
    if data is None or isinstance(data, FileNotFoundError):
        return [f"object {rel} is missing"]
    if isinstance(data, Exception):
        return [f"object {rel} cannot be fetched ({type(data).__name__}: {data})"]
    if len(data) != meta["size"]:
        return [f"object {rel} has {len(data)} bytes, record says {meta['size']}"]
    if hashlib.sha256(data).hexdigest() != meta["sha256"]:
        return [f"object {rel} fails its sha256 checksum (bytes changed on disk or in transit)"]
    return []


def _fetch_shard(cache: LogitCache, record: ShardRecord) -> dict[str, bytes | Exception]:
    """Every object under the shard's group (listed, plus the record's): one listing, one concurrent batch."""
    fs, root = cache._fs, cache._root
    try:
        listed = fs.find(f"{root}/{record.group_dir}")
    except FileNotFoundError:
        listed = []
    paths = sorted(set(listed) | {f"{root}/{rel}" for rel in record.objects})
    try:
        fetched = fs.cat(paths, on_error="return")
    except OSError as err:
        fetched = {p: err for p in paths}
    return {p[len(root) + 1:]: data for p, data in fetched.items()}


def _check_fetched_shard(cache: LogitCache, record: ShardRecord, fetched: dict[str, bytes | Exception]) -> list[str]:
    """``_check_shard`` on a shard downloaded by ``_fetch_shard``: hash the bytes, decode from memory."""
    problems = []
    for rel, meta in sorted(record.objects.items()):
        problems += _object_problems(rel, meta, fetched.get(rel))
    if problems:
        return problems
    return _check_shard(_in_memory(cache, {rel: d for rel, d in fetched.items() if isinstance(d, bytes)}), record,
                        hashed=True)


def _in_memory(cache: LogitCache, objects: dict[str, bytes]) -> LogitCache:
    """A read-only view of ``cache`` holding only ``objects``: what ShardReader opens and decodes."""
    import zarr.storage
    from fsspec.implementations.memory import MemoryFileSystem
    from zarr.core.buffer import cpu

    fs = MemoryFileSystem(global_store=False, skip_instance_cache=True)
    root = "/kd-verify"
    for rel, data in objects.items():
        fs.pipe_file(f"{root}/{rel}", data)
    store = zarr.storage.MemoryStore({rel: cpu.Buffer.from_bytes(d) for rel, d in objects.items()}, read_only=True)
    return LogitCache(url=cache.url, header=cache.header, _fs=fs, _root=root, _store=store)


def _check_schema(cache: LogitCache, reader: ShardReader) -> list[str]:
    fp, r = cache.fingerprint, reader.record
    problems = []
    specs = codec_mod.position_arrays(fp.codec, fp.k, fp.tokenizer.vocab_size)
    expected = {"token_ids": ("int32", (r.num_tokens,))}
    for name, spec in specs.items():
        shape = (r.num_positions, spec.columns) if spec.columns else (r.num_positions,)
        expected[name] = (spec.dtype, shape)
    for name, (dtype, shape) in expected.items():
        arr = reader._array(name)
        if str(arr.dtype) != dtype or tuple(arr.shape) != shape:
            problems.append(f"array {name} is {arr.dtype}{tuple(arr.shape)}, expected {dtype}{shape}")
    return problems


def _check_values(cache: LogitCache, reader: ShardReader, start: int, stop: int) -> list[str]:
    """Every value rule (kd.storage.checks) on sequences [start, stop), plus the codec's own rules."""
    fp = cache.fingerprint
    batch = reader.read(start, stop, check=False)
    p0 = int(reader.sequence_arrays["pos_offsets"][start])
    problems = checks.check_decoded(batch, fp.tokenizer.vocab_size, start, p0, ids_sorted=fp.codec.name == "sqrtq")
    stored = reader.stored_position_arrays(start, stop)
    if fp.codec.name == "sqrtq":
        lut_p, _ = codec_mod._SqrtLut.get(fp.codec.levels)
        total = lut_p[stored["topk_codes"]].sum(1, dtype=np.float64) + lut_p[stored["tail_code"]]
        bound = codec_mod.max_normalization_error(fp.codec, fp.k)
        if total.size and np.abs(total - 1).max() > bound + 1e-6:
            row = int(np.argmax(np.abs(total - 1)))
            problems.append(
                f"decoded probabilities of position row {p0 + row} sum to {total[row]:.4f}, off by more "
                f"than the rounding bound {bound:.4f}"
            )
    else:
        lp = stored["topk_logprobs"]
        rows = np.flatnonzero((np.diff(lp, axis=1) > 0).any(axis=1)) if lp.shape[1] > 1 else ()
        if len(rows):
            problems.append(f"raw top-k log-probs of position row {p0 + int(rows[0])} are not sorted descending")
    return problems
