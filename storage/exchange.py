"""`kd cache export` and `kd cache import`: a logit cache as Parquet rows, one row per sequence, and back.

The row schema (docs/FORMAT.md section 9 is normative) is what axolotl- and
DistillKit-style trainers and ``datasets.load_dataset("parquet", ...)`` read:
token ids, a loss mask, and per completion position the teacher's top-k ids and
log-probs as ``list<list<...>>`` columns. Exported values are the *decoded*
ones, exactly what ``LogitCache.read_shard(...).read()`` returns (under
``sqrtq`` the rounded, renormalized probabilities, not the teacher's original
numbers); within a position the k entries are sorted by descending log-prob.

Export streams: each block of at most ``ROW_GROUP_POSITIONS`` completion
positions is decoded, turned into one Arrow table and written as a row group;
nothing holds a whole shard. Files are written under a temporary name and
renamed at the end, so a failed export leaves nothing at ``--out``.

Import validates every row of every file first (columns, types, shapes, ids <
vocab_size, log-probs finite and <= 0, masses <= 1), naming file, row and
column of the first problem, and only then writes shards: a bad file leaves
nothing committed. Shard ``import-<file stem>-<first row>-<end row>`` holds rows
[first, end) of one file; rerunning an import skips shards already committed
from the same file (same SHA-256), so a crashed import resumes.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import re
import uuid
from pathlib import Path
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from kd import __version__
from kd.storage import remote
from kd.storage.batch import SequenceBatch, tail_logprob_from_topk
from kd.storage.cache import LogitCache
from kd.storage.errors import CacheError, ConfigError, KdError
from kd.storage.import_config import ImportConfig  # noqa: F401  (part of this module's API)
from kd.storage.format import (
    CODECS,
    SOURCE_CODE,
    SOURCES,
    CacheFingerprint,
    CodecConfig,
    TeacherFingerprint,
    TokenizerFingerprint,
    canonical_json,
    format_version_str,
    sha256_hex,
)

EXPORT_FORMATS = ("parquet", "hf-dataset")
ROW_GROUP_POSITIONS = 65536
"""Completion positions per Parquet row group (bounded memory: 65536 x k ids and log-probs)."""
PARQUET_META_KEY = b"kd"
"""Key of the Parquet schema metadata holding the source cache's header (JSON)."""

EXPORT_SCHEMA = pa.schema([
    ("input_ids", pa.list_(pa.int32())),
    ("completion_start", pa.int32()),
    ("loss_mask", pa.list_(pa.int8())),
    ("topk_ids", pa.list_(pa.list_(pa.int32()))),
    ("topk_logprobs", pa.list_(pa.list_(pa.float32()))),
    ("tail_logprob", pa.list_(pa.float32())),
    ("target_logprob", pa.list_(pa.float32())),
    ("behaviour_logprob", pa.list_(pa.float32())),
    ("source", pa.string()),
    ("round", pa.int32()),
    ("prompt_index", pa.int64()),
    ("sample_index", pa.int32()),
    ("shard", pa.string()),
])


# ---------------------------------------------------------------- export
def batch_to_table(batch: SequenceBatch, shard: str) -> pa.Table:
    """A decoded batch as rows of EXPORT_SCHEMA; top-k entries sorted by descending log-prob."""
    n, k = batch.num_sequences, batch.k
    so = (batch.seq_offsets - batch.seq_offsets[0]).astype(np.int32)
    po = batch.pos_offsets.astype(np.int32)
    lengths = np.diff(so)
    seq_of_token = np.repeat(np.arange(n), lengths)
    loss_mask = (np.arange(len(batch.token_ids)) - so[seq_of_token] >= batch.completion_start[seq_of_token])
    order = np.argsort(-batch.topk_logprobs, axis=1, kind="stable")  # sqrtq ids come ascending: ties by id
    ids = np.take_along_axis(batch.topk_ids, order, 1).astype(np.int32)
    lps = np.take_along_axis(batch.topk_logprobs, order, 1).astype(np.float32)
    inner = np.arange(0, (batch.num_positions + 1) * k, k, dtype=np.int32)

    def per_position(values, mask=None):
        return pa.ListArray.from_arrays(po, pa.array(values, type=pa.float32(), mask=mask))

    def per_topk(values, type_):
        return pa.ListArray.from_arrays(po, pa.ListArray.from_arrays(inner, pa.array(values.ravel(), type=type_)))

    behaviour = batch.behaviour_logprobs.astype(np.float32)
    columns = [
        pa.ListArray.from_arrays(so, pa.array(batch.token_ids.astype(np.int32))),
        pa.array(batch.completion_start.astype(np.int32)),
        pa.ListArray.from_arrays(so, pa.array(loss_mask.astype(np.int8))),
        per_topk(ids, pa.int32()),
        per_topk(lps, pa.float32()),
        per_position(batch.tail_logprobs.astype(np.float32)),
        per_position(batch.target_logprobs.astype(np.float32)),
        per_position(behaviour, mask=np.isnan(behaviour)),
        pa.array([SOURCES[c] for c in batch.source], type=pa.string()),
        pa.array(batch.round.astype(np.int32)),
        pa.array(batch.prompt_index.astype(np.int64)),
        pa.array(batch.sample_index.astype(np.int32)),
        pa.array([shard] * n, type=pa.string()),
    ]
    return pa.Table.from_arrays(columns, schema=EXPORT_SCHEMA)


def _blocks(cache: LogitCache, record) -> Iterator[pa.Table]:
    """Tables of consecutive sequences of one shard, each of at most ROW_GROUP_POSITIONS positions."""
    reader = cache.read_shard(record)
    po = reader.sequence_arrays["pos_offsets"]
    start = 0
    while start < reader.num_sequences:
        stop = int(np.searchsorted(po, po[start] + ROW_GROUP_POSITIONS, side="right")) - 1
        stop = min(max(stop, start + 1), reader.num_sequences)  # at least one sequence per block
        yield batch_to_table(reader.read(start, stop), record.name)
        start = stop


def _schema_with_header(cache: LogitCache) -> pa.Schema:
    header = {"source_cache": cache.url, "export_version": format_version_str(), **cache.header.to_dict()}
    return EXPORT_SCHEMA.with_metadata({PARQUET_META_KEY: json.dumps(header).encode()})


def _write_parquet(fs, path: str, schema: pa.Schema, tables) -> int:
    rows = 0
    with fs.open(path, "wb") as f, pq.ParquetWriter(f, schema, compression="zstd") as writer:
        for table in tables:
            writer.write_table(table)
            rows += table.num_rows
    return rows


def export_cache(url: str, out: str, fmt: str = "parquet") -> dict:
    """Write every committed shard of ``url`` as Parquet rows (see the module docstring).

    ``fmt="parquet"``: one file ``out``. ``fmt="hf-dataset"``: a folder ``out`` with
    ``data/train-<i>-of-<n>.parquet`` (one file per shard) and a README.md whose
    ``configs`` header makes ``datasets.load_dataset(out)`` read it.
    """
    if fmt not in EXPORT_FORMATS:
        raise ConfigError(f"--format must be one of {', '.join(EXPORT_FORMATS)}, got {fmt!r}")
    cache = LogitCache.open(url)
    records = cache.committed_shards()
    fs, path = remote.url_to_fs(out)
    path = path.rstrip("/")
    if fs.exists(path):
        raise CacheError(f"{out} already exists; remove it or choose another --out")
    tmp = f"{path.rsplit('/', 1)[0]}/.{path.rsplit('/', 1)[-1]}.{uuid.uuid4().hex[:8]}.tmp" if "/" in path \
        else f".{path}.{uuid.uuid4().hex[:8]}.tmp"
    schema = _schema_with_header(cache)
    try:
        if fmt == "parquet":
            _local_parent(fs, tmp)
            rows = _write_parquet(fs, tmp, schema, (t for r in records for t in _blocks(cache, r)))
            files = [out]
        else:
            files, rows = [], 0
            _local_parent(fs, f"{tmp}/data/x")
            for i, record in enumerate(records):
                name = f"data/train-{i:05d}-of-{len(records):05d}.parquet"
                rows += _write_parquet(fs, f"{tmp}/{name}", schema, _blocks(cache, record))
                files.append(f"{out.rstrip('/')}/{name}")
            with fs.open(f"{tmp}/README.md", "w") as f:
                f.write(_readme(cache, rows))
        fs.mv(tmp, path, recursive=True)
    except BaseException:
        if fs.exists(tmp):
            fs.rm(tmp, recursive=True)
        raise
    return {"out": out, "format": fmt, "rows": rows, "shards": len(records), "files": files}


def _local_parent(fs, path: str) -> None:
    if remote.is_local(fs):  # object stores have no folders
        fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)


def _readme(cache: LogitCache, rows: int) -> str:
    fp = cache.fingerprint
    return f"""---
configs:
- config_name: default
  data_files:
  - split: train
    path: data/train-*.parquet
---
# kd logit cache export

Exported from `{cache.url}` (kd {__version__}, cache format {cache.header.format_version}):
{rows} sequences, one row each. Teacher `{fp.teacher.name}` (weights sha256 `{fp.teacher.weights_sha256}`),
tokenizer `{fp.tokenizer.name or '?'}` (vocab {fp.tokenizer.vocab_size}, sha256 `{fp.tokenizer.sha256}`),
k = {fp.k}, codec `{canonical_json(fp.codec.to_dict())}`.

Read with `datasets.load_dataset("<this folder>")` or
`datasets.load_dataset("parquet", data_files="<this folder>/data/*.parquet")`.
Columns (kd docs/FORMAT.md, section 9): `input_ids`, `completion_start`, `loss_mask`, and per completion
position j (the teacher's distribution over `input_ids[completion_start + j]`, i.e. from the logits at
position `completion_start + j - 1`): `topk_ids`, `topk_logprobs` (k entries, descending log-prob),
`tail_logprob`, `target_logprob`, `behaviour_logprob` (null where the student did not sample the token);
then `source`, `round`, `prompt_index`, `sample_index`, `shard`. Values are the cache's decoded values
(for the `sqrtq` codec: rounded and renormalized over the k+1 buckets).
"""


# ---------------------------------------------------------------- import
def _fingerprint(config: ImportConfig, k: int) -> CacheFingerprint:
    if config.teacher_weights:
        from kd.stages import models

        weights = models.weights_fingerprint(config.teacher_weights)
    else:
        weights = config.teacher_sha256 or sha256_hex(f"{config.teacher_name}@{config.teacher_revision}")
    if config.tokenizer:
        from kd.stages import models

        folder = Path(config.tokenizer)
        if not folder.is_dir():
            raise ConfigError(f"--tokenizer: {config.tokenizer} is not a folder")
        model_vocab = models.model_vocab_size(folder) if (folder / "config.json").exists() else 0
        tok = models.tokenizer_fingerprint(models.load_tokenizer(folder), name=folder.name,
                                           model_vocab_size=max(model_vocab, config.vocab_size))
    else:
        tok = TokenizerFingerprint(sha256=config.tokenizer_sha256, vocab_size=config.vocab_size)
    codec = CodecConfig(name=config.codec, levels=config.codec_levels, zstd_level=config.zstd_level)
    return CacheFingerprint(TeacherFingerprint(config.teacher_name, weights), tok, k, codec)


def _parquet_files(specs) -> list[Path]:
    files = []
    for spec in specs:
        path = Path(spec)
        if path.is_dir():
            found = sorted(path.rglob("*.parquet"))
            if not found:
                raise ConfigError(f"{spec}: folder holds no *.parquet files")
            files += found
        elif path.is_file():
            files.append(path)
        else:
            raise ConfigError(f"{spec}: no such file or folder")
    return files


REQUIRED_COLUMNS = ("input_ids", "topk_ids", "topk_logprobs")
POSITION_COLUMNS = ("tail_logprob", "target_logprob", "behaviour_logprob")


class _Rows:
    """Validating access to one Arrow record batch: rows [row0, row0 + n) of ``file``."""

    def __init__(self, rb: pa.RecordBatch, file: str, row0: int):
        self.rb, self.file, self.row0 = rb, file, row0

    def fail(self, row: int, column: str, problem: str):
        raise CacheError(f"{self.file}: row {self.row0 + int(row)}, column {column!r}: {problem}; "
                         "nothing was imported")

    def check(self, ok: np.ndarray, column: str, problem, offsets=()) -> None:
        """Fail on the first False of ``ok``: one entry per row, or per flat value of a list column
        whose offsets (outermost first) are ``offsets``. ``problem``: text, or index -> text."""
        bad = np.flatnonzero(~np.asarray(ok, dtype=bool))
        if bad.size:
            i = int(bad[0])
            self.fail(self.row_of(list(offsets), i), column, problem(i) if callable(problem) else problem)

    @staticmethod
    def row_of(offsets: list[np.ndarray], index: int) -> int:
        """Row holding flat value ``index`` of a (possibly nested) list column."""
        for off in reversed(offsets):
            index = int(np.searchsorted(off, index, side="right")) - 1
        return index

    def has(self, name: str) -> bool:
        return name in self.rb.schema.names

    def column(self, name: str) -> pa.Array:
        arr = self.rb.column(self.rb.schema.get_field_index(name))
        self.check(~np.asarray(arr.is_null()), name, "is null")
        return arr

    def list_column(self, name: str, numeric, depth: int = 1, allow_null_values: bool = False):
        """([offsets of each level], flat values) of a list (depth 1) or list<list> (depth 2) column."""
        arr = level = self.column(name)
        offsets = []
        for _ in range(depth):
            if not (pa.types.is_list(level.type) or pa.types.is_large_list(level.type)):
                kind = "integer" if numeric is pa.types.is_integer else "number"
                self.fail(0, name, f"expected {'list<' * depth}{kind}{'>' * depth}, got Arrow type {arr.type}")
            self.check(~np.asarray(level.is_null()), name, "holds a null list", offsets)
            off = np.asarray(level.offsets, dtype=np.int64)
            offsets.append(off - off[0])
            level = level.flatten()
        if not numeric(level.type):
            self.fail(0, name, f"values have Arrow type {level.type}, expected "
                               f"{'integers' if numeric is pa.types.is_integer else 'floats'}")
        nulls = np.asarray(level.is_null())
        if not allow_null_values:
            self.check(~nulls, name, "holds a null value", offsets)
        values = level.to_numpy(zero_copy_only=False)
        if nulls.any():
            values = np.where(nulls, np.nan, values.astype(np.float64))
        return offsets, values

    def scalar_column(self, name: str) -> np.ndarray:
        arr = self.column(name)
        if not pa.types.is_integer(arr.type):
            self.fail(0, name, f"expected integers, got Arrow type {arr.type}")
        return arr.to_numpy(zero_copy_only=False)


def _sequences(rows: _Rows, vocab_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(seq_offsets, token_ids, completion_start) from input_ids and completion_start or loss_mask."""
    (so,), tokens = rows.list_column("input_ids", pa.types.is_integer)
    lengths = np.diff(so)
    rows.check((tokens >= 0) & (tokens < vocab_size), "input_ids",
               lambda i: f"token id {int(tokens[i])} is outside [0, vocab_size={vocab_size})", [so])
    if rows.has("completion_start"):
        cs = rows.scalar_column("completion_start").astype(np.int64)
    else:
        (mo,), mask = rows.list_column("loss_mask", lambda t: pa.types.is_integer(t) or pa.types.is_boolean(t))
        rows.check(np.diff(mo) == lengths, "loss_mask",
                   lambda r: f"has {int(np.diff(mo)[r])} entries, input_ids {int(lengths[r])}")
        ones = np.concatenate([[0], np.cumsum(mask.astype(np.int64))])
        cs = lengths - (ones[so[1:]] - ones[so[:-1]])
        seq = np.repeat(np.arange(len(lengths)), lengths)
        rows.check(mask.astype(bool) == (np.arange(len(mask)) - so[seq] >= cs[seq]), "loss_mask",
                   "must be 0 on the prompt and 1 on the completion (0…0 1…1)", [so])
    rows.check((cs >= 1) & (cs <= lengths), "completion_start",
               lambda r: f"{int(cs[r])} is outside [1, len(input_ids)={int(lengths[r])}]")
    return so, tokens, cs


def _topk(rows: _Rows, lengths: np.ndarray, cs: np.ndarray, k: int, vocab_size: int):
    """(pos_offsets, topk_ids (P, k), topk_logprobs (P, k)), every row checked."""
    (po, inner), ids = rows.list_column("topk_ids", pa.types.is_integer, depth=2)
    expected = lengths - cs
    rows.check(np.diff(po) == expected, "topk_ids",
               lambda r: f"has {int(np.diff(po)[r])} positions, expected len(input_ids) - completion_start "
                         f"= {int(lengths[r])} - {int(cs[r])} = {int(expected[r])}")
    widths = np.diff(inner)
    rows.check(widths == k, "topk_ids", lambda i: f"a position has {int(widths[i])} ids, expected k={k}", [po])
    ids = ids.reshape(int(po[-1]), k)
    rows.check(((ids >= 0) & (ids < vocab_size)).all(1), "topk_ids",
               f"an id is outside [0, vocab_size={vocab_size})", [po])
    rows.check((np.diff(np.sort(ids, 1), axis=1) != 0).all(1), "topk_ids", "a position repeats a token id", [po])
    (lpo, lpi), lps = rows.list_column("topk_logprobs", pa.types.is_floating, depth=2)
    rows.check(np.diff(lpo) == np.diff(po), "topk_logprobs", "has another number of positions than topk_ids")
    rows.check(np.diff(lpi) == widths, "topk_logprobs", "a position has another length than in topk_ids", [po])
    lps = lps.reshape(ids.shape)
    rows.check((np.isfinite(lps) & (lps <= 0)).all(1), "topk_logprobs", "log-probs must be finite and <= 0", [po])
    mass = np.exp(lps.astype(np.float64)).sum(1)
    rows.check(mass <= 1 + 1e-3, "topk_logprobs",
               lambda i: f"the top-k probabilities sum to {mass[i]:.4f} > 1 (not a full-vocabulary log-softmax?)", [po])
    return po, ids, lps


def _position_values(rows: _Rows, po, so, tokens, cs, ids, lps):
    """(tail, target, behaviour) log-probs (P,) from their columns or the documented defaults."""
    def column(name: str, allow_null: bool = False):
        if not rows.has(name):
            return None
        (off,), values = rows.list_column(name, pa.types.is_floating, allow_null_values=allow_null)
        rows.check(np.diff(off) == np.diff(po), name, "has another number of positions than topk_ids")
        return values.astype(np.float32)

    tail = column("tail_logprob")
    tail = tail_logprob_from_topk(lps) if tail is None else tail
    rows.check(~np.isnan(tail) & (tail <= 0), "tail_logprob", "must be <= 0 (or -inf), not NaN", [po])
    target = column("target_logprob")
    if target is None:  # from the top-k when the target is in it, else the tail (an upper bound)
        seq = np.repeat(np.arange(len(cs)), np.diff(po))
        target_ids = tokens[so[seq] + cs[seq] + np.arange(len(seq)) - po[seq]]
        hit = ids == target_ids[:, None]
        target = np.where(hit.any(1), (lps * hit).sum(1), tail).astype(np.float32)
    rows.check(~np.isnan(target) & (target <= 0), "target_logprob", "must be <= 0, not NaN", [po])
    behaviour = column("behaviour_logprob", allow_null=True)
    behaviour = np.full(len(tail), np.nan, np.float32) if behaviour is None else behaviour
    rows.check(~(behaviour > 0), "behaviour_logprob", "must be <= 0 or null", [po])
    return tail, target, behaviour


def _sequence_meta(rows: _Rows, default_source: str) -> dict[str, np.ndarray]:
    """source, round, prompt_index, sample_index: from their columns or the documented defaults."""
    n = rows.rb.num_rows
    if rows.has("source"):
        values = rows.column("source").to_pylist()
        codes = np.array([SOURCE_CODE.get(v, -1) if isinstance(v, str) else
                          (v if isinstance(v, int) and 0 <= v < len(SOURCES) else -1) for v in values])
        rows.check(codes >= 0, "source", lambda r: f"{values[r]!r} is not one of {', '.join(SOURCES)}")
        out = {"source": codes.astype(np.uint8)}
    else:
        out = {"source": np.full(n, SOURCE_CODE[default_source], np.uint8)}
    defaults = {"round": np.zeros(n), "prompt_index": rows.row0 + np.arange(n), "sample_index": np.zeros(n)}
    for name, default in defaults.items():
        values = rows.scalar_column(name) if rows.has(name) else default
        rows.check(values >= 0, name, lambda r, v=values: f"must be >= 0, got {int(v[r])}")
        out[name] = values
    return out


def _convert(rows: _Rows, k: int, vocab_size: int, default_source: str) -> SequenceBatch:
    """One record batch -> a validated SequenceBatch; CacheError naming file, row and column otherwise."""
    for name in REQUIRED_COLUMNS:
        if not rows.has(name):
            raise CacheError(f"{rows.file}: missing column {name!r} (have {', '.join(rows.rb.schema.names)}); "
                             "nothing was imported")
    if not (rows.has("completion_start") or rows.has("loss_mask")):
        raise CacheError(f"{rows.file}: needs a 'completion_start' or a 'loss_mask' column; nothing was imported")
    so, tokens, cs = _sequences(rows, vocab_size)
    po, ids, lps = _topk(rows, np.diff(so), cs, k, vocab_size)
    tail, target, behaviour = _position_values(rows, po, so, tokens, cs, ids, lps)
    meta = _sequence_meta(rows, default_source)
    batch = SequenceBatch(
        token_ids=tokens.astype(np.int32), seq_offsets=so, completion_start=cs.astype(np.int32),
        topk_ids=ids.astype(np.int32), topk_logprobs=lps.astype(np.float32), tail_logprobs=tail,
        target_logprobs=target, behaviour_logprobs=behaviour.astype(np.float32), source=meta["source"],
        round=meta["round"].astype(np.int32), prompt_index=meta["prompt_index"].astype(np.int64),
        sample_index=meta["sample_index"].astype(np.int32),
    )
    batch.validate(vocab_size=vocab_size, where=rows.file)  # belt and braces: the writer's own rules
    return batch


def _first_k(file: Path) -> int:
    """k from the first position of the first row with one (for --k 0)."""
    pf = _open_parquet(file)
    if "topk_ids" not in pf.schema_arrow.names:
        raise CacheError(f"{file}: missing column 'topk_ids'; nothing was imported")
    for rb in pf.iter_batches(batch_size=256, columns=["topk_ids"]):
        for row in rb.column(0).to_pylist():
            if row:
                return len(row[0])
    raise CacheError(f"{file}: no row has a completion position; cannot infer --k")


def _open_parquet(file: Path) -> pq.ParquetFile:
    try:
        return pq.ParquetFile(file)
    except (pa.ArrowException, OSError) as err:
        raise CacheError(f"{file}: not a readable Parquet file ({err}); nothing was imported") from None


def _file_blocks(file: Path, fp: CacheFingerprint, config: ImportConfig) -> Iterator[tuple[int, int, SequenceBatch]]:
    row = 0
    for rb in _open_parquet(file).iter_batches(batch_size=config.shard_size):
        batch = _convert(_Rows(rb, str(file), row), fp.k, fp.tokenizer.vocab_size, config.source)
        yield row, row + rb.num_rows, batch
        row += rb.num_rows


def _file_sha256(file: Path) -> str:
    digest = hashlib.sha256()
    with open(file, "rb") as f:
        while block := f.read(8 << 20):
            digest.update(block)
    return digest.hexdigest()


def _shard_name(file: Path, start: int, stop: int) -> str:
    stem = re.sub(r"[^a-z0-9._-]+", "-", file.stem.lower()).strip("-.")[:64] or "file"
    return f"import-{stem}-{start:09d}-{stop:09d}"


def import_parquet(config: ImportConfig) -> dict:
    """Build (or extend) a cache from Parquet rows; every row is validated before anything is written."""
    config.validate()
    files = _parquet_files(config.files)
    k = config.k or _first_k(files[0])
    fp = _fingerprint(config, k)
    try:
        cache = LogitCache.open(config.out)
    except KdError:
        cache = None
    if cache is not None:
        cache.fingerprint.check_same(fp, f"the cache at {config.out}", "the import's provenance flags")

    # pass 1: validate everything and plan the shards (nothing is written)
    plan, names = [], set()
    for file in files:
        sha = _file_sha256(file)
        for start, stop, _ in _file_blocks(file, fp, config):
            name = _shard_name(file, start, stop)
            if name in names:
                raise CacheError(f"{file}: two input files give shard name {name!r}; rename one of the files")
            names.add(name)
            done = cache is not None and cache.is_committed(name)
            if done and (cache.load_record(name).provenance.get("imported") or {}).get("file_sha256") != sha:
                raise CacheError(f"shard {name} is already committed in {config.out} from other data; "
                                 "import into a new --out or rename the file")
            plan.append((file, sha, start, stop, name, done))

    # pass 2: write
    cache = cache or LogitCache.create(config.out, fp)
    created_at = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    written = 0
    by_file: dict[Path, dict] = {}
    for file, sha, start, stop, name, done in plan:
        by_file.setdefault(file, {})[(start, stop)] = (sha, name, done)
    sequences = 0
    for file, blocks in by_file.items():
        has_target = "target_logprob" in _open_parquet(file).schema_arrow.names
        for start, stop, batch in _file_blocks(file, fp, config):
            sha, name, done = blocks[(start, stop)]
            sequences += batch.num_sequences
            if done:
                continue
            rounds = sorted({int(r) for r in batch.round})
            cache.write_shard(name, batch, {
                "source": ",".join(SOURCES[c] for c in sorted(set(batch.source.tolist()))) or config.source,
                "round": rounds[0] if len(rounds) == 1 else rounds,
                "teacher": config.teacher_name,
                "teacher_revision": config.teacher_revision,
                "imported": {"file": file.name, "file_sha256": sha, "rows": [start, stop],
                             "target_logprob": "column" if has_target
                             else "from top-k, else the tail log-prob (an upper bound)"},
                "created_at": created_at,
            })
            written += 1
    return {"out": config.out, "files": len(files), "sequences": sequences, "shards_written": written,
            "shards_skipped": len(plan) - written, "k": k, "codec": fp.codec.to_dict()}
