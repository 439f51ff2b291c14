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
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import numpy as np

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
    for base in commit_files:
        if base.startswith("."):
            continue
        name = base[: -len(COMMIT_SUFFIX)]
        where = f"{url}/{SHARDS_GROUP}/{name}"
        report.shards_checked += 1
        committed.add(name)
        try:
            record = cache.load_record(name)
        except KdError as err:
            report.problems.append((where, str(err)))
            continue
        for problem in _check_shard(cache, record):
            report.problems.append((where, problem))
    try:
        shard_dirs = [p.rsplit("/", 1)[-1] for p in fs.ls(f"{root}/{SHARDS_GROUP}", detail=False)]
    except FileNotFoundError:
        shard_dirs = []
    report.leftovers = [f"{url}/{SHARDS_GROUP}/{d}" for d in sorted(shard_dirs) if d not in committed and d != "zarr.json"]
    return report


def _check_shard(cache: LogitCache, record: ShardRecord) -> list[str]:
    fs, root = cache._fs, cache._root
    problems = []
    for rel, meta in sorted(record.objects.items()):
        path = f"{root}/{rel}"
        try:
            data = fs.cat_file(path)
        except FileNotFoundError:
            problems.append(f"object {rel} is missing")
            continue
        if len(data) != meta["size"]:
            problems.append(f"object {rel} has {len(data)} bytes, record says {meta['size']}")
        elif hashlib.sha256(data).hexdigest() != meta["sha256"]:
            problems.append(f"object {rel} fails its sha256 checksum (bytes changed on disk or in transit)")
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
    fp = cache.fingerprint
    vocab = fp.tokenizer.vocab_size
    problems = []
    stored = reader.stored_position_arrays(start, stop)
    batch = reader.read(start, stop)
    where = f"sequences {start}..{stop - 1}"
    if batch.token_ids.size and (batch.token_ids.min() < 0 or batch.token_ids.max() >= vocab):
        problems.append(f"{where}: token ids outside [0, vocab_size={vocab})")
    if fp.codec.name == "sqrtq":
        deltas = stored["topk_id_deltas"]
        if deltas.shape[1] > 1 and (deltas[:, 1:] == 0).any():
            problems.append(f"{where}: top-k ids do not strictly increase within a row (repeated id)")
        codes = np.concatenate([stored["topk_codes"].ravel(), stored["tail_code"].ravel()])
        if codes.size and codes.max() > fp.codec.levels:
            problems.append(f"{where}: sqrtq codes exceed levels={fp.codec.levels}")
        lut_p, _ = codec_mod._SqrtLut.get(fp.codec.levels)
        codes_ok = np.minimum(stored["topk_codes"], fp.codec.levels)
        total = lut_p[codes_ok].sum(1, dtype=np.float64) + lut_p[np.minimum(stored["tail_code"], fp.codec.levels)]
        bound = codec_mod.max_normalization_error(fp.codec, fp.k)
        if total.size and np.abs(total - 1).max() > bound + 1e-6:
            row = int(np.argmax(np.abs(total - 1)))
            problems.append(f"{where}: decoded probabilities of row {row} sum to {total[row]:.4f}, off by more than the rounding bound {bound:.4f}")
    else:
        lp = stored["topk_logprobs"]
        if lp.size and not (np.isfinite(lp).all() and (lp <= 0).all()):
            problems.append(f"{where}: top-k log-probs must be finite and <= 0")
        elif lp.shape[1] > 1 and (np.diff(lp, axis=1) > 0).any():
            problems.append(f"{where}: raw top-k log-probs are not sorted descending (rank order)")
        srt = np.sort(stored["topk_ids"], axis=1)
        if srt.shape[1] > 1 and (np.diff(srt, axis=1) == 0).any():
            problems.append(f"{where}: a row repeats a top-k id")
        tail = stored["tail_logprob"]
        if tail.size and (np.isnan(tail).any() or (tail > 0).any()):
            problems.append(f"{where}: tail log-probs must be <= 0 (or -inf)")
    if batch.topk_ids.size and (batch.topk_ids.min() < 0 or batch.topk_ids.max() >= vocab):
        problems.append(f"{where}: top-k ids outside [0, vocab_size={vocab})")
    t = batch.target_logprobs
    if t.size and (np.isnan(t).any() or (t > 1e-3).any()):
        problems.append(f"{where}: target log-probs must be <= 0 and not NaN")
    b = batch.behaviour_logprobs
    if b.size and (b[~np.isnan(b)] > 1e-3).any():
        problems.append(f"{where}: behaviour log-probs must be <= 0 or NaN")
    return problems
