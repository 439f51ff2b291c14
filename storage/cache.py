"""Open, create, write and read a logit cache on a local path or any fsspec URL.

Commit protocol (one mechanism for local disks and object stores, which have no
rename; docs/FORMAT.md section 6): every write attempt of shard ``<name>`` puts
its Zarr group in a folder of its own, ``shards/<name>.<32 random hex>/``, reads
every object back to checksum it, and only then creates ``commits/<name>.json``
*exclusively* (``remote.put_exclusive``: a hard link locally, a conditional PUT
on S3). The record names its group. Readers list ``commits/`` and open only the
groups records name, so a shard whose writer died is invisible. Two writers of
one name (a retry racing a slow original, misconfigured workers) never touch
each other's objects: exactly one record is created, the loser deletes its own
group and gets ``ShardExistsError``, and groups of dead writers are garbage for
``kd cache gc``.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import threading
import uuid
import warnings
from concurrent.futures import CancelledError, Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import zarr
import zarr.storage
from zarr.codecs import BloscCodec, Crc32cCodec

from kd import __version__
from kd.storage import arrays as arrays_mod
from kd.storage import checks
from kd.storage import codec as codec_mod
from kd.storage import remote
from kd.storage.batch import SequenceBatch
from kd.storage.errors import CacheError, CorruptShardError, FormatVersionError, ShardExistsError
from kd.storage.format import (
    COMMIT_SUFFIX,
    MAX_JSON_BYTES,
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
    parse_group_name,
    parse_shard_name,
)

CHUNK_BYTES = 1 << 20
"""Target uncompressed chunk size; every array is one Zarr shard of such chunks."""

# numcodecs' blosc prints a warning for zarr v3 codecs outside the core spec; ours are all in it.
warnings.filterwarnings("ignore", message=".*Numcodecs codecs are not in the Zarr version 3.*")


def _chunk_rows(row_bytes: int, rows: int) -> int:
    return max(1, min(max(rows, 1), CHUNK_BYTES // max(row_bytes, 1)))


def _json_bytes(doc: dict) -> bytes:
    return json.dumps(doc, indent=2).encode()


_url_to_fs = remote.url_to_fs
_is_local = remote.is_local


@dataclass
class LogitCache:
    """A handle on one cache: its header (fingerprint) and its committed shards."""

    url: str
    header: CacheHeader
    _fs: object
    _root: str
    _store: object = None

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
            raw = fs.cat_file(meta_path, start=0, end=MAX_JSON_BYTES + 1)  # bounded: untrusted input
        except FileNotFoundError:
            raise CacheError(f"no logit cache at {url!r} ({meta_path} does not exist)") from None
        if len(raw) > MAX_JSON_BYTES:
            raise CacheError(f"{meta_path} is larger than the limit of {MAX_JSON_BYTES} bytes")
        try:
            meta = json.loads(raw)
        except (ValueError, RecursionError) as err:
            raise CacheError(f"{meta_path} is not valid JSON: {type(err).__name__}: {str(err)[:200]}") from None
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

        def existing() -> LogitCache:
            cache = cls.open(url)
            cache.fingerprint.check_same(fingerprint, f"the cache at {url}", "this run")
            return cache

        if fs.exists(f"{root}/zarr.json"):
            return existing()
        # zarr's "*.partial" and put_exclusive's ".<name>.<hex>.tmp" temp files are what a creator
        # killed before its publishing rename/link leaves. zarr.json is the first entry a creator
        # publishes, so a folder listed non-empty here either is another creator's (zarr.json
        # exists by now: open it) or is not a cache at all.
        if fs.exists(root) and [p for p in fs.ls(root, detail=False) if not remote.is_temp_name(p)]:
            if fs.exists(f"{root}/zarr.json"):  # created by a concurrent writer since the check above
                return existing()
            raise CacheError(
                f"{url!r} exists and is not empty but holds no logit cache; choose another --out"
            )
        # The root's zarr.json holds the header and is created exclusively (put_exclusive: a hard
        # link locally, a conditional PUT on S3): of several creators at once (N generate workers on
        # one --out, a retried job) exactly one writes it, and every other one opens it and compares
        # fingerprints. zarr's own create checks, then writes, so two creators could both write it,
        # the later one silently replacing the header the earlier one had already checked against.
        group_meta = {"zarr_format": 3, "node_type": "group"}
        header = CacheHeader(fingerprint=fingerprint)
        root_meta = {**group_meta, "attributes": {ROOT_ATTR: header.to_dict()}}
        remote.put_exclusive(fs, f"{root}/zarr.json", _json_bytes(root_meta))
        remote.put_exclusive(fs, f"{root}/{SHARDS_GROUP}/zarr.json", _json_bytes({**group_meta, "attributes": {}}))
        return existing()

    # ------------------------------------------------------------ paths
    def zarr_store(self):
        """The Zarr store on the cache root (one per handle; same retry settings as kd's calls)."""
        if self._store is None:
            store = remote.zarr_store(self._fs, self._root, self.url)
            self._store = store if _is_local(self._fs) else remote.ReadAheadStore(store)
        return self._store

    @contextlib.contextmanager
    def read_ahead(self, record: ShardRecord):
        """Within the block, Zarr reads of ``record``'s shard are served from memory.

        On object stores, the objects a ``ShardReader.read`` decodes (``read_ahead_objects``)
        are fetched first in one concurrent batch (one round trip instead of one per array,
        in sequence) and checked against the record (size, sha256); locally this does nothing. A
        missing or altered object raises CorruptShardError, an object that cannot be fetched
        FetchError. To fetch several shards ahead of their decode, use ``prefetcher``.
        """
        if not self.reads_ahead:
            yield
            return
        with self._holding(record, self._fetch_objects(record)):
            yield

    @property
    def reads_ahead(self) -> bool:
        """True on object stores, where ``read_ahead`` and ``prefetcher`` fetch whole shards."""
        return hasattr(self.zarr_store(), "hold")

    def prefetcher(self, max_shards: int) -> ShardPrefetcher:
        """Fetches of whole shards ahead of their decode, at most ``max_shards`` held at a time."""
        return ShardPrefetcher(self, max_shards)

    def read_ahead_objects(self, record: ShardRecord) -> list[str]:
        """The objects of ``record`` that reads decode: the chunk files of the token and position
        arrays. Metadata and the per-sequence arrays are read once, when the shard is opened; on
        object stores each request costs client CPU (a few ms with botocore), so they are left out.
        """
        fp = self.fingerprint
        sliced = {*TOKEN_ARRAYS, *codec_mod.position_arrays(fp.codec, fp.k, fp.tokenizer.vocab_size)}
        return [rel for rel in record.objects
                if not rel.endswith("/zarr.json") and rel[len(record.group_dir) + 1:].split("/", 1)[0] in sliced]

    def _fetch_objects(self, record: ShardRecord) -> dict[str, bytes | Exception]:
        """The ``read_ahead_objects`` of ``record`` (relative path -> bytes, or the error), concurrently."""
        paths = {f"{self._root}/{rel}": rel for rel in self.read_ahead_objects(record)}
        if not paths:
            return {}
        try:
            fetched = self._fs.cat(list(paths), on_error="return")
        except OSError as err:
            return {rel: err for rel in paths.values()}
        return {paths[p]: data for p, data in fetched.items() if p in paths}

    @contextlib.contextmanager
    def _holding(self, record: ShardRecord, fetched: dict[str, bytes | Exception]):
        """Check fetched objects against ``record`` and hold them in the Zarr store for the block.

        An object whose fetch failed with an I/O error is fetched once more (the store has
        retried already; this covers a prefetch that failed long before its use).
        """
        store = self.zarr_store()
        objects = {}
        for rel in sorted(fetched):
            meta = record.objects[rel]
            data = fetched[rel]
            if isinstance(data, Exception) and not isinstance(data, FileNotFoundError):
                try:
                    data = self._fs.cat_file(f"{self._root}/{rel}")
                except Exception as err:  # noqa: BLE001 (reported below, whatever the backend raised)
                    data = err
            if isinstance(data, FileNotFoundError):
                raise CorruptShardError(record.name, f"object {rel} is missing")
            if isinstance(data, Exception):
                raise remote.FetchError(
                    f"cannot fetch {rel} of shard {record.name!r} from {self.url} "
                    f"({type(data).__name__}: {data}); the store's retries are exhausted. Check the "
                    "connection and credentials, then rerun (kd train resumes from its last checkpoint)."
                ) from data
            if len(data) != meta["size"]:
                raise CorruptShardError(
                    record.name, f"object {rel} has {len(data)} bytes, its commit record says {meta['size']}"
                )
            if _sha256(data) != meta["sha256"]:
                raise CorruptShardError(
                    record.name, f"object {rel} fails its sha256 checksum (bytes changed in the store or in transit)"
                )
            objects[rel] = data
        store.hold(objects)
        try:
            yield
        finally:
            store.release(objects)

    def shard_group_path(self, record: ShardRecord) -> str:
        """Full fsspec path of the group holding ``record``'s data (``<root>/shards/<group>``)."""
        return f"{self._root}/{record.group_dir}"

    def open_shard_group(self, record: ShardRecord):
        """The committed shard's Zarr group, read-only."""
        return zarr.open_group(store=self.zarr_store(), path=record.group_dir, mode="r", zarr_format=3)

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

    def shard_groups(self) -> list[str]:
        """Folder names under ``shards/`` (committed or not), sorted; gc and verify compare them with records."""
        try:
            paths = self._fs.ls(f"{self._root}/{SHARDS_GROUP}", detail=False, refresh=True)
        except FileNotFoundError:
            return []
        return sorted(b for b in (p.rstrip("/").rsplit("/", 1)[-1] for p in paths)
                      if b != "zarr.json" and not remote.is_temp_name(b))

    def committed_shards(self) -> list[ShardRecord]:
        """Commit records of every committed shard, sorted by name."""
        return [self.load_record(name) for name in self.committed_shard_names()]

    def load_record(self, name: str) -> ShardRecord:
        path = self._commit_path(parse_shard_name(name))
        try:
            data = arrays_mod.read_json(self._fs, path, None, name, f"commit record {path}")
        except CorruptShardError as err:
            if not self._fs.exists(path):
                raise CacheError(f"shard {name!r} is not committed in {self.url}") from None
            raise err from None
        try:
            record = ShardRecord.from_dict(data, where=path)
        except FormatVersionError:
            raise
        except CacheError as err:  # an untrusted record: bad path, count, field
            raise CorruptShardError(name, str(err)) from None
        if record.name != name:
            raise CorruptShardError(name, f"commit record names shard {record.name!r}")
        if record.fingerprint_sha256 != fingerprint_sha256(self.fingerprint):
            raise CorruptShardError(name, "its fingerprint differs from the cache's (merged by hand?)")
        return record

    # ------------------------------------------------------------ writing
    def write_shard(self, name: str, batch: SequenceBatch, provenance: dict) -> ShardRecord:
        """Write ``batch`` as shard ``name`` in a group of its own and commit it exclusively.

        Returns the record. Raises ShardExistsError when ``name`` is committed already,
        before writing or because another writer committed it first (then this
        attempt's group is removed: shards are immutable, the first commit wins).
        A failure before the commit leaves an invisible group for ``kd cache gc``.
        """
        parse_shard_name(name)
        fp = self.fingerprint
        if self.is_committed(name):
            raise ShardExistsError(f"shard {name!r} is already committed in {self.url}; shards are immutable")
        batch.validate(vocab_size=fp.tokenizer.vocab_size, where=f"shard {name!r}")
        if batch.k != fp.k:
            raise CacheError(f"shard {name!r}: batch has k={batch.k} but the cache has k={fp.k}")
        try:
            json.dumps(provenance, allow_nan=False)
        except (TypeError, ValueError) as err:
            raise CacheError(f"shard {name!r}: provenance must be plain JSON ({err})") from None

        # A fresh group per attempt: nothing another writer made is ever overwritten or removed.
        group_name = parse_group_name(f"{name}.{uuid.uuid4().hex}", name)
        group_rel = f"{SHARDS_GROUP}/{group_name}"
        shard_dir = f"{self._root}/{group_rel}"
        # The group is built in memory, then its objects are uploaded concurrently: on object
        # stores that is one PUT per object instead of zarr's existence checks and listings.
        built: dict = {}
        group = zarr.open_group(store=zarr.storage.MemoryStore(built), mode="w", zarr_format=3)
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

        objects = {f"{group_rel}/{key}": {"size": len(buf), "sha256": _sha256(buf.to_bytes())}
                   for key, buf in sorted(built.items())}
        self._upload(group_rel, built)
        stored = self._fs.find(shard_dir, detail=True)  # what a reader will see
        for rel, meta in objects.items():
            got = stored.get(f"{self._root}/{rel}", {}).get("size")
            if got != meta["size"]:
                raise CacheError(f"shard {name!r}: object {rel} has {got} bytes after upload, expected {meta['size']}")
        record = ShardRecord(
            name=name,
            num_sequences=batch.num_sequences,
            num_tokens=batch.num_tokens,
            num_positions=batch.num_positions,
            objects=objects,
            provenance={**provenance, "kd_version": provenance.get("kd_version", __version__)},
            fingerprint_sha256=fingerprint_sha256(fp),
            group=group_name,
        )
        if not self._commit(name, canonical_json(record.to_dict()).encode()):
            try:  # the loser cleans up its own group; if it dies first, gc does
                self._fs.rm(shard_dir, recursive=True)
            except OSError:
                pass
            raise ShardExistsError(
                f"shard {name!r} was committed in {self.url} by another writer while this one wrote it; "
                "the first commit wins and this attempt was discarded"
            )
        return record

    def _upload(self, group_rel: str, built: dict) -> None:
        """Store every object of a group built in memory, concurrently (zarr's own I/O, retries included)."""
        from zarr.core.sync import sync

        store = self.zarr_store()

        async def put_all():
            await asyncio.gather(*(store.set(f"{group_rel}/{key}", buf) for key, buf in built.items()))

        sync(put_all())

    def _commit(self, name: str, payload: bytes) -> bool:
        """Create the commit record exclusively; False if a record for ``name`` exists already."""
        return remote.put_exclusive(self._fs, self._commit_path(name), payload)

    # ------------------------------------------------------------ reading
    def read_shard(self, name: str | ShardRecord) -> ShardReader:
        record = name if isinstance(name, ShardRecord) else self.load_record(name)
        return ShardReader(self, record)

    def iter_batches(self) -> Iterator[SequenceBatch]:
        for record in self.committed_shards():
            yield self.read_shard(record).read()

    def object_bytes(self, record: ShardRecord) -> int:
        return sum(o["size"] for o in record.objects.values())


class ShardPrefetcher:
    """Fetches whole shards ahead of their decode, so a loader's decode never waits on round trips.

    ``schedule(record)`` queues one use of a shard and returns its ticket; fetches start in
    schedule order, each as one concurrent batch of requests for the shard's chunk objects
    (``LogitCache.read_ahead_objects``, via ``fs.cat``), while fewer than ``max_shards`` tickets hold data (in flight, fetched and
    waiting, or being decoded). ``read_ahead(ticket)`` waits for that fetch (doing it at once
    if the ticket is still queued), checks the objects against the record (as
    ``LogitCache.read_ahead``) and serves the shard's Zarr reads from memory for the block;
    leaving the block frees the slot. Errors of a prefetch surface there, at the point of use.
    Memory: the stored (compressed) bytes of at most ``max(max_shards, decode threads)``
    shards. On local caches, and with ``max_shards=0``, it does nothing.
    """

    def __init__(self, cache: LogitCache, max_shards: int):
        self.cache = cache
        self.max_shards = max_shards
        self.enabled = max_shards > 0 and cache.reads_ahead
        self._lock = threading.Lock()
        self._queue: collections.deque[_Ticket] = collections.deque()
        self._held: set[_Ticket] = set()
        self._pool: ThreadPoolExecutor | None = None
        self._closed = False

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def held(self) -> int:
        """Tickets holding data now (in flight, waiting for their decode, or being decoded)."""
        with self._lock:
            return len(self._held)

    def schedule(self, record: ShardRecord) -> _Ticket | None:
        """Queue a fetch of ``record``'s objects for one later ``read_ahead``; None when disabled."""
        if not self.enabled:
            return None
        ticket = _Ticket(record)
        with self._lock:
            if self._closed:
                return None
            self._queue.append(ticket)
            self._start_queued()
        return ticket

    def _start_queued(self) -> None:  # under self._lock
        while self._queue and len(self._held) < self.max_shards:
            ticket = self._queue.popleft()
            if self._pool is None:  # fetches block in fsspec's sync calls: one thread per slot
                self._pool = ThreadPoolExecutor(self.max_shards, thread_name_prefix="kd-read-ahead")
            ticket.future = self._pool.submit(self.cache._fetch_objects, ticket.record)
            self._held.add(ticket)

    @contextlib.contextmanager
    def read_ahead(self, ticket: _Ticket | None):
        """Within the block, the ticket's shard is read from memory (see the class docstring)."""
        if ticket is None:
            yield
            return
        with self._lock:
            if ticket.future is None:  # still queued (or dropped by close): fetch in this thread
                with contextlib.suppress(ValueError):
                    self._queue.remove(ticket)
                if not self._closed:
                    self._held.add(ticket)
        try:
            if ticket.future is not None:
                try:
                    fetched = ticket.future.result()
                except CancelledError:
                    fetched = self.cache._fetch_objects(ticket.record)
            else:
                fetched = self.cache._fetch_objects(ticket.record)
            ticket.future = None  # the bytes live in the store only while held
            with self.cache._holding(ticket.record, fetched):
                del fetched
                yield
        finally:
            with self._lock:
                self._held.discard(ticket)
                if not self._closed:
                    self._start_queued()

    def close(self) -> None:
        """Drop queued and fetched shards; later ``read_ahead`` calls fetch for themselves."""
        with self._lock:
            self._closed = True
            self._queue.clear()
            self._held.clear()
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)


class _Ticket:
    """One scheduled use of a shard by ``ShardPrefetcher`` (identity matters, not the record)."""

    __slots__ = ("record", "future")

    def __init__(self, record: ShardRecord):
        self.record = record
        self.future: Future | None = None


def _sha256(data: bytes) -> str:
    import hashlib

    return hashlib.sha256(data).hexdigest()


class ShardReader:
    """Reads sequences [start, stop) of one committed shard, decoding only the chunks they touch.

    The shard is untrusted input: on open, ``kd.storage.arrays`` checks every array's metadata,
    shard index and stored size against the format and the commit record before zarr reads a
    byte of data, and ``kd.storage.checks`` checks the per-sequence arrays; every ``read`` checks
    the values it decodes. Anything wrong raises ``CorruptShardError`` naming the shard and the
    first bad index; I/O errors (``OSError``) pass through, since they are not corruption.
    """

    def __init__(self, cache: LogitCache, record: ShardRecord):
        self.cache = cache
        self.record = record
        self.name = record.name
        fp = cache.fingerprint
        self._position_specs = codec_mod.position_arrays(fp.codec, fp.k, fp.tokenizer.vocab_size)
        self._arrays = self._guard("cannot open its arrays", lambda: arrays_mod.open_shard_arrays(
            cache, record, _schemas(record, self._position_specs)))
        seq = self._guard("cannot read its sequence arrays",
                          lambda: {n: self._arrays[n][...] for n in SEQUENCE_ARRAYS})
        problems = checks.check_sequence_arrays(seq, record)
        if problems:
            raise CorruptShardError(self.name, "; ".join(problems))
        self._seq = seq

    def _guard(self, what: str, fn):
        """Run ``fn``; kd errors become CorruptShardError of this shard, I/O errors pass through."""
        try:
            return fn()
        except CorruptShardError:
            raise
        except (OSError, TimeoutError):
            raise  # transient I/O errors are not corruption: let the caller retry or fail
        except CacheError as err:
            raise CorruptShardError(self.name, str(err)) from None
        except Exception as err:  # noqa: BLE001 (zarr/blosc/crc32c raise many types on damaged bytes)
            raise CorruptShardError(self.name, f"{what} ({type(err).__name__}: {err})") from None

    def _array(self, name: str):
        return self._arrays[name]

    @property
    def num_sequences(self) -> int:
        return self.record.num_sequences

    @property
    def sequence_arrays(self) -> dict[str, np.ndarray]:
        """The shard's small per-sequence arrays (offsets, completion starts, ...), read on open."""
        return self._seq

    def _range(self, start: int, stop: int | None) -> tuple[int, int]:
        n = self.num_sequences
        stop = n if stop is None else min(stop, n)
        return max(0, min(start, stop)), stop

    def read(self, start: int = 0, stop: int | None = None, check: bool = True) -> SequenceBatch:
        """Decoded sequences [start, stop).

        With ``check`` (the default) the decoded values are checked (ids < vocab_size, log-prob
        rules; ``kd.storage.checks``) and the first problem raises CorruptShardError;
        ``kd cache verify`` passes False and collects every problem itself.
        """
        start, stop = self._range(start, stop)
        s = self._seq
        t0, t1 = int(s["seq_offsets"][start]), int(s["seq_offsets"][stop])
        p0 = int(s["pos_offsets"][start])
        fp = self.cache.fingerprint
        token_ids = self._guard("cannot decode its chunks", lambda: self._array("token_ids")[t0:t1])
        stored = self.stored_position_arrays(start, stop)
        ids, lps, tail, target, behaviour = self._guard(
            "cannot decode its position arrays", lambda: codec_mod.decode(stored, fp.codec))
        batch = SequenceBatch(
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
        if check:
            problems = checks.check_decoded(batch, fp.tokenizer.vocab_size, start, p0,
                                            ids_sorted=fp.codec.name == "sqrtq")
            if problems:
                raise CorruptShardError(self.name, problems[0])
        return batch

    def stored_position_arrays(self, start: int = 0, stop: int | None = None) -> dict[str, np.ndarray]:
        """The raw (still encoded) position arrays of sequences [start, stop), for verify and copy."""
        start, stop = self._range(start, stop)
        s = self._seq
        p0, p1 = int(s["pos_offsets"][start]), int(s["pos_offsets"][stop])
        return self._guard("cannot decode its chunks", lambda: {
            name: self._array(name)[p0:p1] for name in self._position_specs
        })


def _schemas(record: ShardRecord, position_specs: dict) -> dict[str, arrays_mod.ArraySchema]:
    """Every array the format prescribes for ``record``: dtype, exact shape, read whole or sliced."""
    n, t, p = record.num_sequences, record.num_tokens, record.num_positions
    out = {
        name: arrays_mod.ArraySchema(dtype, (n + 1,) if name.endswith("_offsets") else (n,), False)
        for name, dtype in SEQUENCE_ARRAYS.items()
    }
    out.update({name: arrays_mod.ArraySchema(dtype, (t,), True) for name, dtype in TOKEN_ARRAYS.items()})
    for name, spec in position_specs.items():
        out[name] = arrays_mod.ArraySchema(spec.dtype, (p, spec.columns) if spec.columns else (p,), True)
    return out
