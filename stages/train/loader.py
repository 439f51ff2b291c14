"""Stream committed cache shards into ``TrainBatch``es: shuffled, token-budgeted, resumable.

The algorithm. Steps 1-5 read metadata only (each shard's small sequence arrays,
read once per shard and kept), so the plan of an epoch is cheap to recompute:

1. Shard set. The loader holds a snapshot of committed shard names (sorted,
   after an optional ``shard_filter``). It changes only when ``refresh()`` is
   called, never behind the caller's back, so every rank plans from the same
   set and a plan never changes while it is being read.
2. Split. A sequence is held out iff a hash of (``prompt_index``,
   ``heldout_salt``) falls below ``heldout_fraction``: all samples of a prompt
   land on the same side, whatever the shard, seed or world size.
3. Rank pieces. Shards are permuted by (seed, epoch); the split's sequences, in
   that shard order, are cut into ``world_size`` contiguous pieces of equal
   token count. Rank r reads only piece r: ranks read disjoint sequences, and
   each rank reads a few whole shards plus at most two partial ones.
4. Windows and batches. A piece is cut into windows of ``shuffle_window_shards``
   consecutive shards. Within a window the sequences are shuffled by (seed,
   epoch, rank, window), optionally sorted by length (a stable sort, so equal
   lengths stay shuffled: bucketing cuts padding), greedily packed into batches
   with ``B * L_pad <= max_tokens_per_batch``, and the window's batches shuffled.
5. Lockstep. Every rank computes every rank's batch count and equalizes them, so
   DDP steps stay in lockstep. ``balance="split"`` halves the batches holding
   the most sequences on ranks that have fewer batches, until all have the
   most: every sequence is seen exactly once per epoch, at the price of at most
   a few smaller batches. ``balance="drop"`` drops the last batches of ranks that
   have more (different sequences each epoch).
6. Decoding. A window is decoded once: one contiguous read per shard segment,
   touching only its chunks, in a pool of ``num_workers`` threads,
   ``prefetch_windows`` windows ahead. On object stores each segment's shard is
   fetched whole (one concurrent batch of requests) as soon as its window is
   scheduled, at most ``read_ahead_shards`` shards held, so decode threads find
   the bytes in memory. A producer thread collates batches into
   padded tensors ``prefetch_batches`` ahead of the consumer. zstd/blosc and
   numpy release the GIL, so threads suffice. ``stats.wait_s`` measures how long
   the consumer waited.
7. Resume. The position is (shard set, epoch, batch index); ``load_state_dict``
   recomputes the plan and starts at that batch, decoding nothing it skips. The
   batch stream is bit-identical with and without the interruption.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import queue
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import asdict, dataclass, fields
from collections.abc import Callable, Iterator, Sequence
from typing import NamedTuple

import numpy as np
import torch

from kd.stages.train.batch import TrainBatch
from kd.storage.batch import SequenceBatch
from kd.storage.cache import LogitCache, ShardPrefetcher, ShardReader
from kd.storage.errors import CacheError, ConfigError, CorruptShardError
from kd.storage.format import ShardRecord
from kd.storage.remote import FetchError

logger = logging.getLogger(__name__)

STATE_FORMAT = "kd-loader-state"
STATE_VERSION = 1
SPLITS = ("train", "heldout")
BALANCES = ("split", "drop")


@dataclass(frozen=True)
class LoaderConfig:
    """How the loader plans, shuffles, batches and decodes. Validated on construction."""

    max_tokens_per_batch: int = 16384
    """Budget of a batch in padded tokens: B * L_pad <= this, L_pad being its longest sequence
    rounded up to ``pad_to_multiple_of``. A longer single sequence is an error, not a truncation."""
    max_sequences_per_batch: int | None = None
    """Optional cap on B (sequences per batch); None means only the token budget limits it."""
    pad_to_multiple_of: int = 8
    """Round L_pad up to a multiple of this (tensor-core friendly shapes); counted in the budget."""
    seed: int = 0
    """Seed of every shuffle. Same seed, shards and config -> the same batches, bit for bit."""
    shuffle_window_shards: int = 4
    """Shards decoded and shuffled together. Larger mixes better and holds more decoded data
    in memory: about window x (1 + prefetch_windows) decoded shards per rank."""
    length_bucketing: bool = True
    """Sort each shuffled window by length before packing (less padding); batch order stays
    random."""
    split: str = "train"
    """"train" or "heldout": which side of the prompt-hash split this loader reads."""
    heldout_fraction: float = 0.0
    """Fraction of prompts held out for evaluation, in [0, 1). Train and eval loaders MUST use the
    same value and ``heldout_salt``, or the eval set leaks into training."""
    heldout_salt: int = 0
    """Salt of the prompt hash; changes which prompts are held out, independently of ``seed``."""
    balance: str = "split"
    """How ranks get equal batch counts per epoch: "split" (halve a few batches; every sequence
    once per epoch) or "drop" (drop each longer rank's last batches)."""
    num_workers: int = 2
    """Decode threads. 0 decodes synchronously in the calling thread (no prefetching)."""
    prefetch_batches: int = 4
    """Collated batches kept ready ahead of the consumer (with num_workers > 0)."""
    prefetch_windows: int = 1
    """Windows decoded ahead of the one being batched (with num_workers > 0)."""
    read_ahead_shards: int | None = None
    """Object stores only (with num_workers > 0): shards whose objects are fetched ahead of their
    decode and held, compressed, in memory; at most this many at a time. None: every shard of the
    windows being decoded, shuffle_window_shards x (1 + prefetch_windows). 0: no read-ahead (each
    decode reads through Zarr, one request after another)."""
    pin_memory: bool = False
    """Return tensors in page-locked memory for fast non-blocking copies to CUDA (needs CUDA)."""
    skip_bad_shards: bool = False
    """On a corrupt shard, log a warning (once per shard) and leave its sequences out instead of
    raising CorruptShardError. Batch counts do not change, so a batch can come out smaller, or
    empty (B = 0) if all its sequences were in the bad shard."""

    def __post_init__(self):
        problems = []

        def integer(name, low, optional=False):
            v = getattr(self, name)
            if optional and v is None:
                return
            if not (isinstance(v, int) and not isinstance(v, bool) and v >= low):
                problems.append(
                    f"{name}: must be an integer >= {low}{' or None' if optional else ''}, "
                    f"got {v!r}"
                )

        integer("max_tokens_per_batch", 1)
        integer("max_sequences_per_batch", 1, optional=True)
        integer("pad_to_multiple_of", 1)
        integer("seed", 0)
        integer("shuffle_window_shards", 1)
        integer("heldout_salt", 0)
        integer("num_workers", 0)
        integer("prefetch_batches", 1)
        integer("prefetch_windows", 0)
        integer("read_ahead_shards", 0, optional=True)
        for name in ("length_bucketing", "pin_memory", "skip_bad_shards"):
            if not isinstance(getattr(self, name), bool):
                problems.append(f"{name}: must be true or false, got {getattr(self, name)!r}")
        if self.split not in SPLITS:
            problems.append(f"split: must be one of {SPLITS}, got {self.split!r}")
        if self.balance not in BALANCES:
            problems.append(f"balance: must be one of {BALANCES}, got {self.balance!r}")
        f = self.heldout_fraction
        if not (isinstance(f, (int, float)) and not isinstance(f, bool) and 0.0 <= f < 1.0):
            problems.append(f"heldout_fraction: must be a number in [0, 1), got {f!r}")
        elif self.split == "heldout" and f == 0.0:
            problems.append(
                "split='heldout' needs heldout_fraction > 0 (it would hold no sequence)"
            )
        if problems:
            raise ConfigError("invalid loader config:\n  - " + "\n  - ".join(problems))

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> LoaderConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"loader config: unknown field(s) {unknown}; known: {sorted(known)}")
        return cls(**d)

    def plan_dict(self) -> dict:
        """The fields that decide the batch plan; a resume must not change them."""
        keep = (
            "max_tokens_per_batch",
            "max_sequences_per_batch",
            "pad_to_multiple_of",
            "seed",
            "shuffle_window_shards",
            "length_bucketing",
            "split",
            "heldout_fraction",
            "heldout_salt",
            "balance",
        )
        return {k: getattr(self, k) for k in keep}


@dataclass
class LoaderStats:
    """Counters since the loader was made; ``wait_s`` is the time the consumer blocked in next()."""

    batches: int = 0
    tokens: int = 0
    loss_positions: int = 0
    wait_s: float = 0.0
    decode_s: float = 0.0  # summed over decode threads
    decoded_positions: int = 0


class ShardChanges(NamedTuple):
    added: list[str]
    removed: list[str]


def heldout_mask(prompt_index: np.ndarray, fraction: float, salt: int) -> np.ndarray:
    """True where a prompt is held out: splitmix64(prompt_index + salt * golden) / 2^64 < fraction.

    A fixed integer hash (not Python's ``hash``), so the split is stable across runs,
    machines and versions.
    """
    with np.errstate(over="ignore"):
        z = prompt_index.astype(np.uint64) + np.uint64(
            (salt * 0x9E3779B97F4A7C15 + 0x9E3779B97F4A7C15) % 2**64
        )
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    return (z >> np.uint64(11)).astype(np.float64) / float(1 << 53) < fraction


# ---------------------------------------------------------------- plan (metadata only)
@dataclass
class _ShardMeta:
    name: str
    reader: ShardReader | None  # None: skipped as corrupt
    lengths: np.ndarray  # (N,) int64 tokens per sequence
    selected: np.ndarray  # (n,) int64 indices of this split's sequences, ascending


@dataclass(frozen=True)
class _Segment:
    shard: str
    start: int  # contiguous range [start, stop) of sequences read from the shard
    stop: int


@dataclass
class _EpochPlan:
    epoch: int
    windows: list[list[_Segment]]
    batches: list[tuple[int, np.ndarray]]  # (window, window-level sequence indices), this rank


def _greedy_pack(
    order: np.ndarray, lengths: np.ndarray, budget: int, max_seqs: int | None, mult: int
) -> list[np.ndarray]:
    """Cut ``order`` into consecutive batches with count * roundup(max length) <= budget."""
    out, start, cur_max = [], 0, 0
    for j, length in enumerate(lengths[order].tolist()):
        m = max(cur_max, length)
        count = j - start + 1
        if count > 1 and (
            count * (-(-m // mult) * mult) > budget or (max_seqs and count > max_seqs)
        ):
            out.append(order[start:j])
            start, m = j, length
        cur_max = m
    if start < len(order):
        out.append(order[start:])
    return out


def _split_to(batches: list[tuple[int, np.ndarray]], target: int) -> None:
    """Halve the batch with the most sequences (the last such) until there are ``target``."""
    while len(batches) < target:
        sizes = np.array([len(b) for _, b in batches])
        i = len(sizes) - 1 - int(np.argmax(sizes[::-1]))
        w, idx = batches[i]
        h = len(idx) // 2
        batches[i : i + 1] = [(w, idx[:h]), (w, idx[h:])]


class CacheLoader:
    """An endless, resumable stream of ``TrainBatch``es over one cache's committed shards.

    ``next(loader)`` returns the next batch, crossing epochs; ``loader.iter_epoch()``
    yields the rest of the current epoch. ``len(loader)`` is this rank's batch count
    in the current epoch (equal on every rank; it may differ by a few between epochs).

    Under torchrun pass ``rank`` and ``world_size``; every rank gets the same number
    of batches per epoch (``config.balance`` says how). ``shard_filter(record)``
    chooses shards (e.g. by ``record.provenance["round"]``); it is applied when the
    shard set is listed (construction and ``refresh()``).
    """

    def __init__(
        self,
        cache: LogitCache | str,
        config: LoaderConfig | None = None,
        *,
        rank: int = 0,
        world_size: int = 1,
        shard_filter: Callable[[ShardRecord], bool] | None = None,
    ):
        self.cache = LogitCache.open(cache) if isinstance(cache, str) else cache
        self.config = config or LoaderConfig()
        problems = []
        if not (isinstance(world_size, int) and world_size >= 1):
            problems.append(f"world_size: must be an integer >= 1, got {world_size!r}")
        elif not (isinstance(rank, int) and 0 <= rank < world_size):
            problems.append(
                f"rank: must be an integer in [0, world_size={world_size}), got {rank!r}"
            )
        if self.config.pin_memory and not torch.cuda.is_available():
            problems.append("pin_memory: needs CUDA, which is not available here; set it to false")
        if problems:
            raise ConfigError("invalid loader arguments:\n  - " + "\n  - ".join(problems))
        self.rank, self.world_size = rank, world_size
        self.shard_filter = shard_filter
        self.stats = LoaderStats()
        self._k = self.cache.fingerprint.k
        self._metas: dict[str, _ShardMeta] = {}
        self._warned: set[str] = set()
        self._lock = threading.Lock()
        self._plans: dict[int, _EpochPlan] = {}
        n = self.config.num_workers
        self._pool = ThreadPoolExecutor(n, thread_name_prefix="kd-loader") if n else None
        self._pipeline: _Pipeline | None = None
        self._shards: list[str] = []
        self._records: dict[str, ShardRecord] = {}
        self._epoch, self._index = 0, 0
        self._set_shards(self.list_shards())

    # ------------------------------------------------------------ shard set
    def list_shards(self) -> list[str]:
        """Names of the committed shards that pass ``shard_filter``, sorted."""
        names = self.cache.committed_shard_names()
        if self.shard_filter is None:
            return names
        return [n for n in names if self.shard_filter(self._record(n))]

    def _record(self, name: str) -> ShardRecord:
        # commit records are immutable: read each once (one request per shard on object stores)
        if name not in self._records:
            self._records[name] = self.cache.load_record(name)
        return self._records[name]

    @property
    def shards(self) -> list[str]:
        return list(self._shards)

    def refresh(self, names: Sequence[str] | None = None) -> ShardChanges:
        """Re-list committed shards; if the set changed, start a new epoch over it at once.

        The new epoch is ``epoch + 1``, or the current one if no batch of it was taken yet.
        Under DDP every rank must switch to the same set at the same step: list on rank 0
        (``list_shards()``), broadcast, and pass ``names`` on every rank.
        """
        names = sorted(self.list_shards() if names is None else names)
        old = set(self._shards)
        changes = ShardChanges(sorted(set(names) - old), sorted(old - set(names)))
        if changes.added or changes.removed:
            self._stop_pipeline()
            self._set_shards(names)
            if self._index > 0:
                self._epoch, self._index = self._epoch + 1, 0
        return changes

    def _set_shards(self, names: list[str]) -> None:
        missing = [n for n in names if n not in self._metas]
        if missing:
            committed = set(self.cache.committed_shard_names())
            gone = [n for n in missing if n not in committed]
            if gone:
                raise CacheError(
                    f"shard(s) {gone} are not committed in {self.cache.url}: they were deleted, "
                    "or the loader state comes from another cache"
                )
            # Opening a shard is a few small reads: I/O-bound, so many threads help remotely.
            with ThreadPoolExecutor(min(16, len(missing)), thread_name_prefix="kd-meta") as pool:
                metas = list(pool.map(self._load_meta, missing))
            self._check_lengths(metas)
            self._metas.update({m.name: m for m in metas})
        with self._lock:
            self._shards = sorted(names)
            self._plans.clear()

    def _load_meta(self, name: str) -> _ShardMeta:
        # opening checks the record, metadata and per-sequence arrays: a bad shard is refused
        # here, before the first step (values are checked as each window is decoded)
        try:
            reader = self.cache.read_shard(self._record(name))
        except CorruptShardError as err:
            if not self.config.skip_bad_shards:
                raise
            self._warn_bad(name, err)
            empty = np.zeros(0, np.int64)
            return _ShardMeta(name, None, empty, empty)
        seq = reader.sequence_arrays
        lengths = np.diff(seq["seq_offsets"]).astype(np.int64)
        held = heldout_mask(
            seq["prompt_index"], self.config.heldout_fraction, self.config.heldout_salt
        )
        selected = np.flatnonzero(held if self.config.split == "heldout" else ~held).astype(
            np.int64
        )
        return _ShardMeta(name, reader, lengths, selected)

    def _check_lengths(self, metas: list[_ShardMeta]) -> None:
        c = self.config
        too_long = []
        for m in metas:
            lengths = -(-m.lengths[m.selected] // c.pad_to_multiple_of) * c.pad_to_multiple_of
            for i in np.flatnonzero(lengths > c.max_tokens_per_batch)[:3]:
                too_long.append(
                    f"sequence {int(m.selected[i])} of shard {m.name!r} "
                    f"({int(m.lengths[m.selected[i]])} tokens)"
                )
        if too_long:
            raise ConfigError(
                f"max_tokens_per_batch={c.max_tokens_per_batch} is smaller than "
                + ", ".join(too_long[:5])
                + "; raise max_tokens_per_batch (sequences are never truncated)"
            )

    def _warn_bad(self, name: str, err: Exception) -> None:
        with self._lock:
            first = name not in self._warned
            self._warned.add(name)
        if first:
            logger.warning("skipping shard %r (skip_bad_shards=true): %s", name, err)

    # ------------------------------------------------------------ plan
    def _plan(self, epoch: int) -> _EpochPlan:
        with self._lock:
            plan = self._plans.get(epoch)
            shards = self._shards
        if plan is None:
            plan = self._build_plan(epoch, shards)
            with self._lock:
                if shards is self._shards:
                    self._plans = {e: p for e, p in self._plans.items() if e >= epoch - 1}
                    self._plans[epoch] = plan
        return plan

    def _build_plan(self, epoch: int, shards: list[str]) -> _EpochPlan:
        c, ws = self.config, self.world_size
        metas = [self._metas[n] for n in shards]
        order = np.random.default_rng([c.seed, epoch]).permutation(len(metas))
        sel = [metas[s].selected for s in order]
        shard_of = np.repeat(order, [len(x) for x in sel]).astype(np.int64)
        seq_of = np.concatenate(sel) if sel else np.zeros(0, np.int64)
        len_of = (
            np.concatenate([metas[s].lengths[metas[s].selected] for s in order])
            if sel
            else np.zeros(0, np.int64)
        )
        starts = np.cumsum(len_of) - len_of
        total = int(len_of.sum())
        bounds = np.searchsorted(starts, [-(-r * total // ws) for r in range(ws)] + [total + 1])
        bounds[0] = 0
        pieces = []
        for r in range(ws):
            a, b = int(bounds[r]), int(bounds[r + 1])
            pieces.append(
                self._pack_piece(epoch, r, shards, shard_of[a:b], seq_of[a:b], len_of[a:b])
            )
        counts = [len(batches) for _, batches in pieces]
        sizes = [sum(len(idx) for _, idx in batches) for _, batches in pieces]
        windows, batches = pieces[self.rank]
        if c.balance == "split" and all(n >= max(counts) for n in sizes):
            _split_to(batches, max(counts))
        else:
            if c.balance == "split":
                logger.warning(
                    "balance='split' impossible in epoch %d (too few sequences); dropping", epoch
                )
            del batches[min(counts) :]
        if not batches:
            n_seq = sum(len(m.selected) for m in metas)
            raise CacheError(
                f"no {c.split} batches for rank {self.rank}/{ws}: {len(shards)} shard(s) in "
                f"{self.cache.url} hold {n_seq} {c.split} sequence(s) (need >= world_size). "
                "Generate data first (kd generate), or check heldout_fraction and shard_filter."
            )
        return _EpochPlan(epoch, windows, batches)

    def _pack_piece(self, epoch, rank, shards, shard_of, seq_of, len_of):
        """One rank's piece -> (windows of segments, [(window, window-level indices)])."""
        c = self.config
        run_starts = np.concatenate([[0], np.flatnonzero(np.diff(shard_of)) + 1]).astype(np.int64)
        run_ends = np.append(run_starts[1:], len(shard_of))
        windows, batches = [], []
        for w, r0 in enumerate(
            range(0, len(run_starts) if len(shard_of) else 0, c.shuffle_window_shards)
        ):
            r1 = min(r0 + c.shuffle_window_shards, len(run_starts))
            segments, local, base = [], [], 0
            for a, b in zip(run_starts[r0:r1].tolist(), run_ends[r0:r1].tolist()):
                seg = _Segment(shards[shard_of[a]], int(seq_of[a]), int(seq_of[b - 1]) + 1)
                segments.append(seg)
                local.append(base + seq_of[a:b] - seg.start)
                base += seg.stop - seg.start
            local = np.concatenate(local)
            lens = len_of[run_starts[r0] : run_ends[r1 - 1]]
            rng = np.random.default_rng([c.seed, epoch, rank, w])
            order = rng.permutation(len(local))
            if c.length_bucketing:
                order = order[np.argsort(lens[order], kind="stable")]
            packed = _greedy_pack(
                order, lens, c.max_tokens_per_batch, c.max_sequences_per_batch, c.pad_to_multiple_of
            )
            windows.append(segments)
            batches.extend((w, local[packed[i]]) for i in rng.permutation(len(packed)))
        return windows, batches

    # ------------------------------------------------------------ decode + collate
    def _decode_segment(self, seg: _Segment, hold=None) -> SequenceBatch | None:
        """Sequences [start, stop) of one shard, or None when the shard is skipped as corrupt.

        ``hold()`` is the context serving the shard's bytes (a prefetched ticket); by default
        the shard is fetched now in one batch (object stores), or read through Zarr if
        ``read_ahead_shards`` is 0.
        """
        meta = self._metas[seg.shard]
        if meta.reader is None:
            return None
        if hold is None and self.config.read_ahead_shards == 0:
            hold = contextlib.nullcontext
        elif hold is None:
            hold = functools.partial(self.cache.read_ahead, meta.reader.record)
        t = time.perf_counter()
        try:
            try:
                with hold():
                    data = meta.reader.read(seg.start, seg.stop)
            except (CorruptShardError, FetchError):  # I/O failures are not corruption: not skipped
                raise
            except CacheError as err:
                # e.g. codes above `levels`: bad bytes that still passed the checksums
                raise CorruptShardError(seg.shard, str(err)) from None
        except CorruptShardError as err:
            if not self.config.skip_bad_shards:
                raise
            self._warn_bad(seg.shard, err)
            return None
        with self._lock:
            self.stats.decode_s += time.perf_counter() - t
            self.stats.decoded_positions += data.num_positions
        return data

    def _decode_prefetched(
        self, seg: _Segment, prefetcher: ShardPrefetcher, ticket
    ) -> SequenceBatch | None:
        if prefetcher.closed:  # its pipeline has stopped: nobody will take the result
            return None
        return self._decode_segment(seg, functools.partial(prefetcher.read_ahead, ticket))

    def _decode_window(self, segments: list[_Segment]) -> _DecodedWindow:
        parts = [self._decode_segment(s) for s in segments]
        return _DecodedWindow.assemble(segments, parts)

    def _submit_window(
        self, segments: list[_Segment], prefetcher: ShardPrefetcher | None = None
    ) -> Future | _Lazy:
        if self._pool is None:
            return _Lazy(lambda: self._decode_window(segments))
        # Segments decode in parallel; the assembling task is queued after them (the pool is
        # FIFO), so it only ever waits on segments that already run: no deadlock. Their shards'
        # fetches are queued in the same order, so the earliest decode's bytes come first.
        seg_futures = []
        for s in segments:
            reader = self._metas[s.shard].reader
            if prefetcher is not None and prefetcher.enabled and reader is not None:
                ticket = prefetcher.schedule(reader.record)
                future = self._pool.submit(self._decode_prefetched, s, prefetcher, ticket)
            else:
                future = self._pool.submit(self._decode_segment, s)
            seg_futures.append(future)
        return self._pool.submit(
            lambda: _DecodedWindow.assemble(segments, [f.result() for f in seg_futures])
        )

    def _collate(self, win: _DecodedWindow, idx: np.ndarray) -> TrainBatch:
        """Pad the window's sequences ``idx`` into a TrainBatch, gathering from the parts."""
        part = win.part_of[idx]
        idx, part = idx[part >= 0], part[part >= 0]  # sequences of skipped shards drop out
        local = win.local_of[idx]
        b, k, mult = len(idx), self._k, self.config.pad_to_multiple_of
        lens, cs = np.zeros(b, np.int64), np.zeros(b, np.int64)
        groups = [(s, np.flatnonzero(part == s)) for s in np.unique(part).tolist()]
        for s, rows in groups:
            so = win.seq_offsets[s]
            lens[rows] = so[local[rows] + 1] - so[local[rows]]
            cs[rows] = win.parts[s].completion_start[local[rows]]
        width = int(-(-lens.max() // mult) * mult) if b else 0
        npos = lens - cs  # (B,) loss positions per sequence
        m = int(npos.sum())
        first_pos = np.cumsum(npos) - npos
        input_ids = np.zeros((b, width), np.int64)
        out = {
            "topk_ids": np.empty((m, k), np.int64),
            "topk_logprobs": np.empty((m, k), np.float32),
            "tail_logprobs": np.empty(m, np.float32),
            "target_logprobs": np.empty(m, np.float32),
            "behaviour_logprobs": np.empty(m, np.float32),
        }
        source, round_ = np.zeros(b, np.uint8), np.zeros(b, np.int32)
        for s, rows in groups:
            d, loc = win.parts[s], local[rows]
            n_tok = lens[rows]
            col = _ranges(n_tok)
            input_ids[np.repeat(rows, n_tok), col] = d.token_ids[
                np.repeat(win.seq_offsets[s][loc], n_tok) + col
            ]
            n_pos = npos[rows]
            j = _ranges(n_pos)
            src = np.repeat(win.pos_offsets[s][loc], n_pos) + j
            dst = np.repeat(first_pos[rows], n_pos) + j
            for name, array in out.items():
                array[dst] = getattr(d, name)[src]
            source[rows], round_[rows] = d.source[loc], d.round[loc]
        # row j of sequence i is the distribution over token c_i + j, predicted at column
        # c_i - 1 + j
        loss_rows = np.repeat(np.arange(b), npos)
        loss_cols = np.repeat(cs - 1, npos) + _ranges(npos)
        t = torch.from_numpy
        batch = TrainBatch(
            input_ids=t(input_ids),
            attention_mask=t((np.arange(width)[None, :] < lens[:, None]).astype(np.int64)),
            loss_rows=t(loss_rows),
            loss_cols=t(loss_cols),
            target_ids=t(input_ids[loss_rows, loss_cols + 1]),
            **{name: t(array) for name, array in out.items()},
            source=t(source),
            round=t(round_),
            num_tokens=int(lens.sum()),
        )
        if self.config.pin_memory:
            batch = TrainBatch(**{f.name: _pin(getattr(batch, f.name)) for f in fields(TrainBatch)})
        return batch

    def _produce(
        self, epoch: int, index: int, stop: threading.Event
    ) -> Iterator[tuple[int, int, TrainBatch]]:
        """Batches from (epoch, index) on, forever; decodes windows ahead of the one in use."""
        c = self.config
        ahead = c.prefetch_windows if self._pool else 0
        futures: dict[tuple[int, int], Future | _Lazy] = {}
        shards = c.read_ahead_shards
        if shards is None:  # every shard of the windows submitted for decoding
            shards = c.shuffle_window_shards * (1 + ahead)
        prefetcher = self.cache.prefetcher(shards if self._pool else 0)
        try:
            while True:
                plan = self._plan(epoch)
                for i in range(index, len(plan.batches)):
                    w, idx = plan.batches[i]
                    keys = [(epoch, w)]
                    for _ in range(ahead):
                        nxt = self._next_window(*keys[-1])
                        if nxt is None:
                            break
                        keys.append(nxt)
                    for key in [k for k in futures if k not in keys]:
                        futures.pop(key).cancel()
                    for key in keys:
                        if key not in futures:
                            futures[key] = self._submit_window(
                                self._plan(key[0]).windows[key[1]], prefetcher
                            )
                    win = _wait(futures[(epoch, w)], stop)
                    if win is None:
                        return
                    yield epoch, i, self._collate(win, idx)
                epoch, index = epoch + 1, 0
        finally:
            for f in futures.values():
                f.cancel()
            prefetcher.close()

    def _next_window(self, epoch: int, w: int) -> tuple[int, int] | None:
        if w + 1 < len(self._plan(epoch).windows):
            return epoch, w + 1
        try:
            self._plan(epoch + 1)
        except CacheError:  # surfaces when that epoch is actually reached
            return None
        return epoch + 1, 0

    # ------------------------------------------------------------ iteration
    def __iter__(self) -> CacheLoader:
        return self

    def __next__(self) -> TrainBatch:
        if self._pipeline is None:
            self._pipeline = _Pipeline(self, self._epoch, self._index)
        t = time.perf_counter()
        try:
            epoch, i, batch = self._pipeline.get()
        except BaseException:
            self._stop_pipeline()  # a later next() restarts from the same position
            raise
        finally:
            self.stats.wait_s += time.perf_counter() - t
        if (epoch, i) != (self._epoch, self._index):
            raise RuntimeError(
                f"loader out of step: got batch {(epoch, i)}, expected {(self._epoch, self._index)}"
            )
        if i + 1 >= len(self._plan(epoch).batches):
            self._epoch, self._index = epoch + 1, 0
        else:
            self._index = i + 1
        self.stats.batches += 1
        self.stats.tokens += batch.num_tokens
        self.stats.loss_positions += batch.num_loss_positions
        return batch

    def iter_epoch(self) -> Iterator[TrainBatch]:
        """The remaining batches of the current epoch (all of it at its start); advances the loader."""
        epoch = self._epoch
        while self._epoch == epoch:
            yield next(self)

    def __len__(self) -> int:
        return len(self._plan(self._epoch).batches)

    @property
    def epoch(self) -> int:
        return self._epoch

    @property
    def batch_in_epoch(self) -> int:
        return self._index

    def _stop_pipeline(self) -> None:
        if self._pipeline is not None:
            self._pipeline.close()
            self._pipeline = None

    def close(self) -> None:
        self._stop_pipeline()
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None

    def __enter__(self) -> CacheLoader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------ checkpointing
    def state_dict(self) -> dict:
        """The position of the next batch the consumer gets (prefetched batches do not count)."""
        return {
            "format": STATE_FORMAT,
            "version": STATE_VERSION,
            "epoch": self._epoch,
            "batch_in_epoch": self._index,
            "num_batches": len(self),
            "shards": list(self._shards),
            "world_size": self.world_size,
            "plan": self.config.plan_dict(),
        }

    def load_state_dict(self, state: dict, strict: bool = True) -> None:
        """Continue exactly where ``state`` was taken (any rank's state works for every rank).

        With ``strict=False`` a changed plan config or world size is accepted: the loader
        resumes in the same epoch at the same fraction of it, with a new plan (so the
        batches differ from an uninterrupted run, and some sequences may repeat or be missed).
        """
        if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
            raise ConfigError(f"not a loader state (expected format {STATE_FORMAT!r})")
        if state.get("version") != STATE_VERSION:
            raise ConfigError(
                f"loader state version {state.get('version')!r} is not {STATE_VERSION}"
            )
        diffs = [
            f"{k}: checkpoint {v!r}, now {self.config.plan_dict().get(k)!r}"
            for k, v in state["plan"].items()
            if self.config.plan_dict().get(k) != v
        ]
        if state["world_size"] != self.world_size:
            diffs.append(f"world_size: checkpoint {state['world_size']}, now {self.world_size}")
        if diffs and strict:
            raise ConfigError(
                "cannot resume the loader exactly, its plan settings changed:\n  - "
                + "\n  - ".join(diffs)
                + "\nResume with the checkpoint's settings, or pass strict=False to continue in "
                "the same "
                "epoch with a new plan (not bit-identical)."
            )
        self._stop_pipeline()
        self._set_shards(list(state["shards"]))
        self._epoch, self._index = int(state["epoch"]), int(state["batch_in_epoch"])
        if diffs:
            n = len(self)
            self._index = min(n, round(self._index * n / max(1, int(state["num_batches"]))))
            if self._index >= n:
                self._epoch, self._index = self._epoch + 1, 0


# ---------------------------------------------------------------- helpers
@dataclass
class _DecodedWindow:
    """A window's decoded segments, kept apart (no concatenation copy)."""

    parts: list[SequenceBatch | None]  # one per segment; None if its shard was skipped
    part_of: np.ndarray  # (n,) window-level sequence -> its part, -1 if skipped
    local_of: np.ndarray  # (n,) window-level sequence -> its index in the part
    seq_offsets: list[np.ndarray | None]
    pos_offsets: list[np.ndarray | None]

    @classmethod
    def assemble(
        cls, segments: list[_Segment], parts: list[SequenceBatch | None]
    ) -> _DecodedWindow:
        sizes = [seg.stop - seg.start for seg in segments]
        part_of = np.repeat(
            [i if p is not None else -1 for i, p in enumerate(parts)], sizes
        ).astype(np.int64)
        return cls(
            parts=parts,
            part_of=part_of,
            local_of=_ranges(np.array(sizes, np.int64)),
            seq_offsets=[None if p is None else p.seq_offsets - p.seq_offsets[0] for p in parts],
            pos_offsets=[None if p is None else p.pos_offsets for p in parts],
        )


def _ranges(counts: np.ndarray) -> np.ndarray:
    """concatenate(arange(c) for c in counts), vectorized."""
    counts = np.asarray(counts, np.int64)
    return np.arange(int(counts.sum())) - np.repeat(np.cumsum(counts) - counts, counts)


class _Lazy:
    """A future for the synchronous mode: computed on first ``result()``."""

    def __init__(self, fn):
        self._fn, self._done, self._value = fn, False, None

    def result(self, timeout=None):
        if not self._done:
            self._value, self._done = self._fn(), True
        return self._value

    def cancel(self) -> bool:
        return True


def _wait(future, stop: threading.Event):
    """The future's result, or None once ``stop`` is set (so closing never waits on a decode)."""
    if isinstance(future, _Lazy):
        return future.result()
    while True:
        try:
            return future.result(timeout=0.05)
        except FutureTimeout:
            if stop.is_set():
                return None


def _pin(v):
    return v.pin_memory() if isinstance(v, torch.Tensor) else v


class _Failure(NamedTuple):
    error: BaseException


class _Pipeline:
    """Runs ``loader._produce`` in a producer thread into a bounded queue (inline if no workers)."""

    def __init__(self, loader: CacheLoader, epoch: int, index: int):
        self._stop = threading.Event()
        self._gen = loader._produce(epoch, index, self._stop)
        self._thread = None
        if loader._pool is not None:
            self._queue: queue.Queue = queue.Queue(loader.config.prefetch_batches)
            self._thread = threading.Thread(
                target=self._run, name="kd-loader-producer", daemon=True
            )
            self._thread.start()

    def _run(self) -> None:
        try:
            for item in self._gen:
                if not self._put(item):
                    return
        except BaseException as err:  # noqa: BLE001 (handed to the consumer, raised there)
            self._put(_Failure(err))
        finally:
            self._gen.close()

    def _put(self, item) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.05)
                return True
            except queue.Full:
                pass
        return False

    def get(self):
        if self._thread is None:
            return next(self._gen)
        item = self._queue.get()
        if isinstance(item, _Failure):
            raise item.error
        return item

    def close(self) -> None:
        self._stop.set()
        if self._thread is None:
            self._gen.close()
            return
        while self._thread.is_alive():
            try:
                self._queue.get_nowait()
            except queue.Empty:
                self._thread.join(timeout=0.05)
