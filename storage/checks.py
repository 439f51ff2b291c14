"""The value rules of a shard (docs/FORMAT.md, sections 4-5), shared by the reader and `kd cache verify`.

Each check returns a list of problems, one per broken rule, each naming the first bad index
(a sequence, a token or a position row, counted from the start of the shard), so a message
points at the exact place. The reader raises on the first problem of what it reads (nothing
bad reaches training); verify reports them all.

Structure (``check_sequence_arrays``, run when a shard opens): offsets start at 0, never go
backwards and end at the record's counts; 1 <= completion_start <= length; pos_offsets is the
cumulative sum of the completion lengths; source codes are known.

Values (``check_decoded``, run on every decoded slice): token ids and top-k ids lie in
[0, vocab_size); a row's top-k ids are distinct; top-k log-probs are finite and <= 0; tail
log-probs are <= 0 (or -inf) and not NaN; target log-probs are not NaN and <= a rounding
tolerance; behaviour log-probs are NaN (not sampled by the student) or <= that tolerance.
"""

from __future__ import annotations

import numpy as np

from kd.storage.batch import SequenceBatch
from kd.storage.format import LOGPROB_TOLERANCE, SEQUENCE_ARRAYS, SOURCE_CODE, ShardRecord


def check_sequence_arrays(seq: dict[str, np.ndarray], record: ShardRecord) -> list[str]:
    """Problems of the per-sequence arrays of a whole shard (shapes already match the record)."""
    n = record.num_sequences
    for name in SEQUENCE_ARRAYS:
        expected = (n + 1,) if name.endswith("_offsets") else (n,)
        if seq[name].shape != expected:
            return [f"{name} has shape {seq[name].shape}, the commit record implies {expected}"]
    problems = []
    for name, total in (("seq_offsets", record.num_tokens), ("pos_offsets", record.num_positions)):
        off = seq[name]
        if off[0] != 0:
            problems.append(f"{name}[0] is {int(off[0])}, must be 0")
        back = np.flatnonzero(np.diff(off) < 0)
        if back.size:
            i = int(back[0])
            problems.append(f"{name} goes backwards at index {i + 1} ({int(off[i])} -> {int(off[i + 1])})")
        if off[-1] != total:
            problems.append(f"{name}[{n}] is {int(off[-1])}, the commit record says {total}")
    if problems:
        return problems
    lengths = np.diff(seq["seq_offsets"])
    cs = seq["completion_start"].astype(np.int64)
    bad = np.flatnonzero((cs < 1) | (cs > lengths))
    if bad.size:
        i = int(bad[0])
        where = "past the end of" if cs[i] > lengths[i] else "before the first token of"
        problems.append(f"completion_start[{i}] = {int(cs[i])} is {where} sequence {i} (length {int(lengths[i])})")
        return problems
    expected = np.concatenate([[0], np.cumsum(lengths - cs)])
    bad = np.flatnonzero(seq["pos_offsets"] != expected)
    if bad.size:
        i = int(bad[0])
        problems.append(
            f"pos_offsets[{i}] = {int(seq['pos_offsets'][i])} disagrees with the completion lengths "
            f"(expected {int(expected[i])})"
        )
    bad = np.flatnonzero(seq["source"] >= len(SOURCE_CODE))
    if bad.size:
        i = int(bad[0])
        problems.append(f"source[{i}] = {int(seq['source'][i])} is not a known source code (< {len(SOURCE_CODE)})")
    return problems


BLOCK_ROWS = 2048
"""Rows checked at a time: a block's temporaries stay in cache, and a clean block costs only a
few reductions (min/max); the elementwise masks are built only for a block that fails."""


def _first_bad_row(values: np.ndarray, all_good, is_bad) -> int:
    """Index of the first row of ``values`` where ``is_bad`` holds anywhere, or -1.

    ``all_good(block)`` is a cheap test, true exactly when no element of the block is bad.
    """
    for r in range(0, len(values), BLOCK_ROWS):
        block = values[r : r + BLOCK_ROWS]
        if all_good(block):
            continue
        mask = is_bad(block)
        rows = np.flatnonzero(mask.any(axis=1) if mask.ndim == 2 else mask)
        if rows.size:
            return r + int(rows[0])
    return -1


def _repeats(block: np.ndarray, ids_sorted: bool) -> np.ndarray:
    """(rows, k-1) True where a row of top-k ids holds an id twice (next to itself, once sorted)."""
    srt = block if ids_sorted else np.sort(block, axis=1)
    return srt[:, 1:] == srt[:, :-1]


def check_decoded(
    batch: SequenceBatch, vocab_size: int, seq_start: int = 0, pos_start: int = 0, ids_sorted: bool = False
) -> list[str]:
    """Problems of decoded sequences [seq_start, ...) of a shard; indices are shard-global.

    ``ids_sorted``: each row's top-k ids ascend (the sqrtq codec), which makes the id checks O(P).
    Every rule runs on blocks of ``BLOCK_ROWS`` rows, with a reduction first (this is on the
    loader's hot path: about 4x cheaper than elementwise masks over the whole batch).
    """
    problems = []
    pos_offsets = batch.pos_offsets

    def seq_of_row(j: int) -> int:
        return seq_start + int(np.searchsorted(pos_offsets, j, side="right") - 1)

    def seq_of_token(t: int) -> int:
        return seq_start + int(np.searchsorted(batch.seq_offsets, t, side="right") - 1)

    tok = batch.token_ids
    if tok.size and not (tok.min() >= 0 and tok.max() < vocab_size):
        t = int(np.flatnonzero((tok < 0) | (tok >= vocab_size))[0])
        t0 = int(batch.seq_offsets[0])
        problems.append(
            f"token id {int(tok[t])} at token {t} of sequence {seq_of_token(t + t0)} is outside "
            f"[0, vocab_size={vocab_size})"
        )
    ids = batch.topk_ids
    if ids.size:
        if ids_sorted:
            lo, hi = ids[:, 0], ids[:, -1]
            in_range = lo.min() >= 0 and hi.max() < vocab_size
        else:
            in_range = ids.min() >= 0 and ids.max() < vocab_size
        if not in_range:
            j = _first_bad_row(ids, lambda b: False, lambda b: (b < 0) | (b >= vocab_size))
            bad_id = next(int(v) for v in ids[j] if not 0 <= v < vocab_size)
            problems.append(
                f"top-k id {bad_id} at position row {pos_start + j} (sequence {seq_of_row(j)}) is outside "
                f"[0, vocab_size={vocab_size})"
            )
        if ids.shape[1] > 1:
            j = _first_bad_row(ids, lambda b: not _repeats(b, ids_sorted).any(), lambda b: _repeats(b, ids_sorted))
            if j >= 0:
                problems.append(f"position row {pos_start + j} (sequence {seq_of_row(j)}) repeats a top-k id")
    # (what, values, all_good(block): one or two reductions; NaN propagates through max, not fmax,
    #  is_bad(values): the elementwise rule, used to name the first bad row, rule)
    rules = (
        ("top-k log-prob", batch.topk_logprobs, lambda b: b.max() <= 0 and b.min() > -np.inf,
         lambda v: ~np.isfinite(v) | (v > 0), "must be finite and <= 0"),
        ("tail log-prob", batch.tail_logprobs, lambda b: b.max() <= 0,
         lambda v: np.isnan(v) | (v > 0), "must be <= 0 (or -inf)"),
        ("target log-prob", batch.target_logprobs, lambda b: b.max() <= LOGPROB_TOLERANCE,
         lambda v: np.isnan(v) | (v > LOGPROB_TOLERANCE), "must be <= 0 and not NaN"),
        ("behaviour log-prob", batch.behaviour_logprobs, lambda b: not np.fmax.reduce(b, axis=None) > LOGPROB_TOLERANCE,
         lambda v: v > LOGPROB_TOLERANCE, "must be <= 0 or NaN"),
    )
    for what, values, all_good, is_bad, rule in rules:
        if not values.size:
            continue
        j = _first_bad_row(values, all_good, is_bad)
        if j >= 0:
            value = values[j] if values.ndim == 1 else values[j][is_bad(values[j])][0]
            problems.append(
                f"{what} {float(value)} at position row {pos_start + j} (sequence {seq_of_row(j)}) {rule}"
            )
    return problems
