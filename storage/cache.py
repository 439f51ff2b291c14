"""Open, create, write and read a logit cache on a local path or any fsspec URL.

Commit protocol (one mechanism for local disks and object stores, which have no
rename): a writer first writes the shard's Zarr group under
``shards/<name>/``, reads every object back to checksum it, and only then writes
``commits/<name>.json`` (temp file + rename locally, a single PUT remotely).
Readers list ``commits/`` and nothing else, so a shard whose writer died is
invisible, and a rerun rewrites it from scratch. Each shard has exactly one
writer (names come from disjoint work units), so writers never share a file.
"""

from __future__ import annotations

import json
import os
import uuid
import warnings
from dataclasses import dataclass
from typing import Iterator

import fsspec
import numpy as np
import zarr
from zarr.codecs import BloscCodec, Crc32cCodec

from kd import __version__
from kd.storage import codec as codec_mod
from kd.storage.batch import SequenceBatch
from kd.storage.errors import CacheError, CorruptShardError
from kd.storage.format import (
    COMMIT_SUFFIX,
    COMMITS_DIR,
    ROOT_ATTR,
    SEQUENCE_ARRAYS,
    SHARDS_GROUP,
    TOKEN_ARRAYS,
    CacheFingerprint,
    CacheHeader,
    ShardRecord,
    canonical_json,
    fingerprint_sha256,
    parse_shard_name,
)

CHUNK_BYTES = 1 << 20
"""Target uncompressed chunk size; every array is one Zarr shard of such chunks."""

# numcodecs' blosc prints a warning for zarr v3 codecs outside the core spec; ours are all in it.
warnings.filterwarnings("ignore", message=".*Numcodecs codecs are not in the Zarr version 3.*")


def _chunk_rows(row_bytes: int, rows: int) -> int:
    return max(1, min(max(rows, 1), CHUNK_BYTES // max(row_bytes, 1)))


def _url_to_fs(url: str):
    try:
        fs, root = fsspec.core.url_to_fs(url)
    except (ImportError, ValueError) as err:
        raise CacheError(
            f"cannot open cache location {url!r}: {err}. Remote URLs need the 'remote' extra "
            "(pip install 'kd[remote]')."
        ) from err
    return fs, root.rstrip("/")


def _is_local(fs) -> bool:
    return "file" in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,))


@dataclass
class LogitCache:
    """A handle on one cache: its header (fingerprint) and its committed shards."""

    url: str
    header: CacheHeader
    _fs: object
    _root: str

    @property
    def fingerprint(self) -> CacheFingerprint:
        return self.header.fingerprint

    # ------------------------------------------------------------ open / create
    @classmethod
    def open(cls, url: str) -> LogitCache:
        """Open an existing cache; raise CacheError when there is none or it is unreadable."""
        fs, root = _url_to_fs(url)
        meta_path = f"{root}/zarr.json"
        try:
            raw = fs.cat_file(meta_path)
        except FileNotFoundError:
            raise CacheError(f"no logit cache at {url!r} ({meta_path} does not exist)") from None
        try:
            meta = json.loads(raw)
        except ValueError as err:
            raise CacheError(f"{meta_path} is not valid JSON: {err}") from None
        if not isinstance(meta, dict) or meta.get("zarr_format") != 3 or meta.get("node_type") != "group":
            raise CacheError(f"{url!r} is not a Zarr v3 group (see docs/FORMAT.md)")
        attrs = meta.get("attributes") or {}
        header = CacheHeader.from_dict(attrs.get(ROOT_ATTR), where=f"{url}: root attributes '{ROOT_ATTR}'")
        return cls(url=url, header=header, _fs=fs, _root=root)

    @classmethod
    def create(cls, url: str, fingerprint: CacheFingerprint) -> LogitCache:
        """Create a cache, or open an existing one whose fingerprint must equal ``fingerprint``.

        Raises FingerprintMismatchError naming both sides when an existing cache differs.
        """
        fs, root = _url_to_fs(url)
        if fs.exists(f"{root}/zarr.json"):
            cache = cls.open(url)
            cache.fingerprint.check_same(fingerprint, f"the cache at {url}", "this run")
            return cache
        if fs.exists(root) and fs.ls(root):
            raise CacheError(
                f"{url!r} exists and is not empty but holds no logit cache; choose another --out"
            )
        header = CacheHeader(fingerprint=fingerprint)
        group = zarr.open_group(store=url, mode="a", zarr_format=3)
        group.attrs[ROOT_ATTR] = header.to_dict()
        group.require_group(SHARDS_GROUP)
        # Another writer may have created the cache at the same moment: re-read and compare.
        cache = cls.open(url)
        cache.fingerprint.check_same(fingerprint, f"the cache at {url}", "this run")
        return cache

    # ------------------------------------------------------------ listing
    def _commit_path(self, name: str) -> str:
        return f"{self._root}/{COMMITS_DIR}/{name}{COMMIT_SUFFIX}"

    def is_committed(self, name: str) -> bool:
        return self._fs.exists(self._commit_path(parse_shard_name(name)))

    def committed_shard_names(self) -> list[str]:
        """Names of the committed shards, sorted: one listing, no record reads."""
        folder = f"{self._root}/{COMMITS_DIR}"
        try:
            paths = self._fs.ls(folder, detail=False, refresh=True)
        except FileNotFoundError:
            return []
        bases = (p.rsplit("/", 1)[-1] for p in paths)
        # names starting with "." are temporary files of commits in flight
        return sorted(b[: -len(COMMIT_SUFFIX)] for b in bases if b.endswith(COMMIT_SUFFIX) and not b.startswith("."))

    def committed_shards(self) -> list[ShardRecord]:
        """Commit records of every committed shard, sorted by name."""
        return [self.load_record(name) for name in self.committed_shard_names()]

    def load_record(self, name: str) -> ShardRecord:
        path = self._commit_path(parse_shard_name(name))
        try:
            record = ShardRecord.from_dict(json.loads(self._fs.cat_file(path)), where=path)
        except FileNotFoundError:
            raise CacheError(f"shard {name!r} is not committed in {self.url}") from None
        except ValueError as err:
            raise CorruptShardError(name, f"commit record {path} is not valid JSON ({err})") from None
        if record.name != name:
            raise CorruptShardError(name, f"commit record names shard {record.name!r}")
        if record.fingerprint_sha256 != fingerprint_sha256(self.fingerprint):
            raise CorruptShardError(name, "its fingerprint differs from the cache's (merged by hand?)")
        return record

    # ------------------------------------------------------------ writing
    def write_shard(self, name: str, batch: SequenceBatch, provenance: dict) -> ShardRecord:
        """Write ``batch`` as shard ``name`` and commit it atomically; return its record.

        Refuses a name that is already committed (shards are immutable).
        """
        parse_shard_name(name)
        fp = self.fingerprint
        if self.is_committed(name):
            raise CacheError(f"shard {name!r} is already committed in {self.url}; shards are immutable")
        batch.validate(vocab_size=fp.tokenizer.vocab_size, where=f"shard {name!r}")
        if batch.k != fp.k:
            raise CacheError(f"shard {name!r}: batch has k={batch.k} but the cache has k={fp.k}")
        try:
            json.dumps(provenance, allow_nan=False)
        except (TypeError, ValueError) as err:
            raise CacheError(f"shard {name!r}: provenance must be plain JSON ({err})") from None

        shard_dir = f"{self._root}/{SHARDS_GROUP}/{name}"
        if self._fs.exists(shard_dir):  # leftovers of a writer that died before committing
            self._fs.rm(shard_dir, recursive=True)
        group = zarr.open_group(store=self.url, path=f"{SHARDS_GROUP}/{name}", mode="w", zarr_format=3)
        group.attrs["kd_provenance"] = provenance
        level = fp.codec.zstd_level

        def put(array_name: str, data: np.ndarray, shuffle: str = "shuffle", attrs: dict | None = None):
            rows = data.shape[0]
            row_bytes = data.dtype.itemsize * (data.shape[1] if data.ndim == 2 else 1)
            chunk = _chunk_rows(row_bytes, rows)
            chunks = (chunk,) + data.shape[1:]
            shard_rows = max(chunk, -(-rows // chunk) * chunk)
            arr = group.create_array(
                array_name,
                shape=data.shape,
                dtype=data.dtype,
                chunks=chunks,
                shards=(shard_rows,) + data.shape[1:],
                compressors=[
                    BloscCodec(cname="zstd", clevel=level, shuffle=shuffle, typesize=data.dtype.itemsize),
                    Crc32cCodec(),
                ],
                fill_value=0,
                attributes=attrs or {},
            )
            if rows:
                arr[...] = data

        so = batch.seq_offsets - batch.seq_offsets[0]
        seq_data = {
            "seq_offsets": so,
            "pos_offsets": batch.pos_offsets,
            "completion_start": batch.completion_start,
            "source": batch.source,
            "round": batch.round,
            "prompt_index": batch.prompt_index,
            "sample_index": batch.sample_index,
        }
        for array_name, dtype in {**SEQUENCE_ARRAYS, **TOKEN_ARRAYS}.items():
            data = batch.token_ids if array_name == "token_ids" else seq_data[array_name]
            put(array_name, np.ascontiguousarray(data, dtype=dtype))
        specs = codec_mod.position_arrays(fp.codec, fp.k, fp.tokenizer.vocab_size)
        attrs = codec_mod.codec_attributes(fp.codec)
        encoded = codec_mod.encode(
            batch.topk_ids, batch.topk_logprobs, batch.tail_logprobs, batch.target_logprobs,
            batch.behaviour_logprobs, fp.codec, fp.tokenizer.vocab_size,
        )
        for array_name, spec in specs.items():
            put(array_name, np.ascontiguousarray(encoded[array_name]), spec.shuffle, attrs.get(array_name))

        objects = {}
        for path in sorted(self._fs.find(shard_dir)):
            data = self._fs.cat_file(path)
            rel = path[len(self._root) + 1 :]
            objects[rel] = {"size": len(data), "sha256": _sha256(data)}
        record = ShardRecord(
            name=name,
            num_sequences=batch.num_sequences,
            num_tokens=batch.num_tokens,
            num_positions=batch.num_positions,
            objects=objects,
            provenance={**provenance, "kd_version": provenance.get("kd_version", __version__)},
            fingerprint_sha256=fingerprint_sha256(fp),
        )
        self._commit(name, canonical_json(record.to_dict()).encode())
        return record

    def _commit(self, name: str, payload: bytes) -> None:
        path = self._commit_path(name)
        if _is_local(self._fs):
            os.makedirs(os.path.dirname(path), exist_ok=True)
            tmp = f"{os.path.dirname(path)}/.{name}.{uuid.uuid4().hex}.tmp"
            with open(tmp, "wb") as f:
                f.write(payload)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        else:
            self._fs.pipe_file(path, payload)

    # ------------------------------------------------------------ reading
    def read_shard(self, name: str | ShardRecord) -> ShardReader:
        record = name if isinstance(name, ShardRecord) else self.load_record(name)
        return ShardReader(self, record)

    def iter_batches(self) -> Iterator[SequenceBatch]:
        for record in self.committed_shards():
            yield self.read_shard(record).read()

    def object_bytes(self, record: ShardRecord) -> int:
        return sum(o["size"] for o in record.objects.values())


def _sha256(data: bytes) -> str:
    import hashlib

    return hashlib.sha256(data).hexdigest()


class ShardReader:
    """Reads sequences [start, stop) of one committed shard, decoding only the chunks they touch."""

    def __init__(self, cache: LogitCache, record: ShardRecord):
        self.cache = cache
        self.record = record
        self.name = record.name
        try:
            self._group = zarr.open_group(
                store=cache.url, path=f"{SHARDS_GROUP}/{record.name}", mode="r", zarr_format=3
            )
            seq = {n: self._array(n)[...] for n in SEQUENCE_ARRAYS}
        except (CorruptShardError, OSError, TimeoutError):
            raise
        except Exception as err:  # zarr raises many types on damaged metadata or chunks
            raise CorruptShardError(record.name, f"cannot read its sequence arrays ({type(err).__name__}: {err})") from None
        self._seq = seq
        self._check_sequence_arrays()
        self._check_objects_present()

    def _array(self, name: str):
        try:
            return self._group[name]
        except KeyError:
            raise CorruptShardError(self.name, f"array {name!r} is missing") from None

    def _check_sequence_arrays(self) -> None:
        r, s = self.record, self._seq
        n = r.num_sequences
        for name in SEQUENCE_ARRAYS:
            expected = n + 1 if name.endswith("_offsets") else n
            if s[name].shape != (expected,):
                raise CorruptShardError(self.name, f"{name} has shape {s[name].shape}, record says ({expected},)")
        for name, total in (("seq_offsets", r.num_tokens), ("pos_offsets", r.num_positions)):
            off = s[name]
            if off[0] != 0 or off[-1] != total or (np.diff(off) < 0).any():
                raise CorruptShardError(self.name, f"{name} is not a non-decreasing 0..{total} CSR offset array")
        lengths = np.diff(s["seq_offsets"])
        cs = s["completion_start"]
        if ((cs < 1) | (cs > lengths)).any():
            raise CorruptShardError(self.name, "a completion_start lies outside its sequence")
        if not np.array_equal(np.diff(s["pos_offsets"]), lengths - cs):
            raise CorruptShardError(self.name, "pos_offsets disagree with sequence lengths and completion starts")

    def _check_objects_present(self) -> None:
        # Zarr reads a missing chunk file as fill values: check the listing so a
        # deleted object is an error, not silent zeros.
        fs, root = self.cache._fs, self.cache._root
        try:
            present = {p[len(root) + 1 :] for p in fs.find(f"{root}/{SHARDS_GROUP}/{self.name}")}
        except FileNotFoundError:
            present = set()
        missing = sorted(set(self.record.objects) - present)
        if missing:
            raise CorruptShardError(self.name, f"{len(missing)} object(s) are missing, e.g. {missing[0]}")

    @property
    def num_sequences(self) -> int:
        return self.record.num_sequences

    @property
    def sequence_arrays(self) -> dict[str, np.ndarray]:
        """The shard's small per-sequence arrays (offsets, completion starts, ...), read on open."""
        return self._seq

    def read(self, start: int = 0, stop: int | None = None) -> SequenceBatch:
        """Decoded sequences [start, stop)."""
        n = self.num_sequences
        stop = n if stop is None else min(stop, n)
        start = max(0, min(start, stop))
        s = self._seq
        t0, t1 = int(s["seq_offsets"][start]), int(s["seq_offsets"][stop])
        p0, p1 = int(s["pos_offsets"][start]), int(s["pos_offsets"][stop])
        fp = self.cache.fingerprint
        try:
            token_ids = self._array("token_ids")[t0:t1]
            stored = {
                name: self._array(name)[p0:p1]
                for name in codec_mod.position_arrays(fp.codec, fp.k, fp.tokenizer.vocab_size)
            }
        except (CorruptShardError, OSError, TimeoutError):
            raise  # transient I/O errors are not corruption: let the caller retry or fail
        except Exception as err:  # zarr/blosc/crc32c raise many types on damaged bytes
            raise CorruptShardError(self.name, f"cannot decode its chunks ({type(err).__name__}: {err})") from None
        try:
            ids, lps, tail, target, behaviour = codec_mod.decode(stored, fp.codec)
        except CacheError as err:
            raise CorruptShardError(self.name, str(err)) from None
        return SequenceBatch(
            token_ids=token_ids,
            seq_offsets=s["seq_offsets"][start : stop + 1] - t0,
            completion_start=s["completion_start"][start:stop],
            topk_ids=ids,
            topk_logprobs=lps,
            tail_logprobs=tail,
            target_logprobs=target,
            behaviour_logprobs=behaviour,
            source=s["source"][start:stop],
            round=s["round"][start:stop],
            prompt_index=s["prompt_index"][start:stop],
            sample_index=s["sample_index"][start:stop],
        )

    def stored_position_arrays(self, start: int = 0, stop: int | None = None) -> dict[str, np.ndarray]:
        """The raw (still encoded) position arrays of sequences [start, stop), for verify and copy."""
        s = self._seq
        stop = self.num_sequences if stop is None else stop
        p0, p1 = int(s["pos_offsets"][start]), int(s["pos_offsets"][stop])
        fp = self.cache.fingerprint
        return {
            name: self._array(name)[p0:p1]
            for name in codec_mod.position_arrays(fp.codec, fp.k, fp.tokenizer.vocab_size)
        }
