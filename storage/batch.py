"""``SequenceBatch``: N sequences and their per-position teacher data, flat (CSR).

This is what a writer takes and what a reader gives back (decoded). Sequence i
holds tokens ``token_ids[seq_offsets[i]:seq_offsets[i+1]]`` (prompt + completion);
its completion starts at index ``c_i = completion_start[i]`` (c_i >= 1). The
logits at position t predict token t+1, so the completion tokens c_i..L_i-1 are
predicted at positions c_i-1..L_i-2: ``P_i = L_i - c_i`` predicted positions,
stored at rows ``pos_offsets[i]:pos_offsets[i+1]`` of every position array.
Row j of sequence i is the distribution over token ``c_i + j`` (its "target").
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np

from kd.storage.errors import CacheError
from kd.storage.format import SOURCE_CODE


@dataclass
class SequenceBatch:
    token_ids: np.ndarray  # (T,) int32 prompt + completion tokens, all sequences
    seq_offsets: np.ndarray  # (N+1,) int64
    completion_start: np.ndarray  # (N,) int32
    topk_ids: np.ndarray  # (P, k) int32 teacher top-k token ids (any order)
    topk_logprobs: np.ndarray  # (P, k) float32 teacher log-probs (T=1, full-vocab log-softmax)
    tail_logprobs: np.ndarray  # (P,) float32 log(1 - sum(exp(topk_logprobs))), may be -inf
    target_logprobs: np.ndarray  # (P,) float32 teacher log-prob of the actual next token
    behaviour_logprobs: np.ndarray  # (P,) float32 student log-prob of a sampled token, NaN if none
    source: np.ndarray  # (N,) uint8 SOURCE_CODE
    round: np.ndarray  # (N,) int32
    prompt_index: np.ndarray  # (N,) int64
    sample_index: np.ndarray  # (N,) int32

    @property
    def num_sequences(self) -> int:
        return len(self.seq_offsets) - 1

    @property
    def num_tokens(self) -> int:
        return int(self.seq_offsets[-1] - self.seq_offsets[0])

    @property
    def k(self) -> int:
        return int(self.topk_ids.shape[1])

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.seq_offsets)

    @property
    def pos_offsets(self) -> np.ndarray:
        return np.concatenate([[0], np.cumsum(self.lengths - self.completion_start)]).astype(np.int64)

    @property
    def num_positions(self) -> int:
        return int(self.topk_ids.shape[0])

    def sequence_tokens(self, i: int) -> np.ndarray:
        return self.token_ids[self.seq_offsets[i] - self.seq_offsets[0] : self.seq_offsets[i + 1] - self.seq_offsets[0]]

    def validate(self, vocab_size: int | None = None, where: str = "batch") -> None:
        """Check shapes and ranges; raise CacheError naming the first problem found."""
        n = self.num_sequences
        if n < 0 or self.seq_offsets.ndim != 1:
            raise CacheError(f"{where}: seq_offsets must be 1-D with N+1 entries")
        lengths = self.lengths
        if (lengths < 0).any():
            raise CacheError(f"{where}: seq_offsets go backwards at sequence {int(np.argmax(lengths < 0))}")
        if len(self.token_ids) != self.num_tokens:
            raise CacheError(f"{where}: {len(self.token_ids)} token ids but offsets say {self.num_tokens}")
        for name in ("completion_start", "source", "round", "prompt_index", "sample_index"):
            if getattr(self, name).shape != (n,):
                raise CacheError(f"{where}: {name} has shape {getattr(self, name).shape}, expected ({n},)")
        cs = self.completion_start
        bad = np.flatnonzero((cs < 1) | (cs > lengths))
        if bad.size:
            i = int(bad[0])
            raise CacheError(
                f"{where}: sequence {i} has completion_start {int(cs[i])} outside [1, length {int(lengths[i])}]"
            )
        p = int((lengths - cs).sum())
        if self.topk_ids.ndim != 2 or self.topk_ids.shape[0] != p:
            raise CacheError(f"{where}: topk_ids has shape {self.topk_ids.shape}, expected ({p}, k)")
        if self.topk_logprobs.shape != self.topk_ids.shape:
            raise CacheError(f"{where}: topk_logprobs shape {self.topk_logprobs.shape} != topk_ids {self.topk_ids.shape}")
        for name in ("tail_logprobs", "target_logprobs", "behaviour_logprobs"):
            if getattr(self, name).shape != (p,):
                raise CacheError(f"{where}: {name} has shape {getattr(self, name).shape}, expected ({p},)")
        if vocab_size is not None:
            for name, ids in (("token_ids", self.token_ids), ("topk_ids", self.topk_ids)):
                if ids.size and (ids.min() < 0 or ids.max() >= vocab_size):
                    raise CacheError(f"{where}: {name} has ids outside [0, vocab_size={vocab_size})")
        lp = self.topk_logprobs
        if lp.size and not (np.isfinite(lp).all() and (lp <= 0).all()):
            raise CacheError(f"{where}: topk_logprobs must be finite and <= 0")
        if (self.source >= len(SOURCE_CODE)).any():
            raise CacheError(f"{where}: source codes must be < {len(SOURCE_CODE)}")

    def select(self, indices) -> SequenceBatch:
        """The sequences at ``indices`` (in that order), as a new batch."""
        indices = np.asarray(indices, dtype=np.int64)
        so, po = self.seq_offsets - self.seq_offsets[0], self.pos_offsets
        tok = [self.token_ids[so[i] : so[i + 1]] for i in indices]
        pos = np.concatenate([np.arange(po[i], po[i + 1]) for i in indices]) if len(indices) else np.zeros(0, np.int64)
        lengths = np.array([len(t) for t in tok], dtype=np.int64)
        return SequenceBatch(
            token_ids=np.concatenate(tok) if tok else np.zeros(0, np.int32),
            seq_offsets=np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
            completion_start=self.completion_start[indices],
            topk_ids=self.topk_ids[pos],
            topk_logprobs=self.topk_logprobs[pos],
            tail_logprobs=self.tail_logprobs[pos],
            target_logprobs=self.target_logprobs[pos],
            behaviour_logprobs=self.behaviour_logprobs[pos],
            source=self.source[indices],
            round=self.round[indices],
            prompt_index=self.prompt_index[indices],
            sample_index=self.sample_index[indices],
        )

    @staticmethod
    def concat(batches: list[SequenceBatch]) -> SequenceBatch:
        if not batches:
            raise ValueError("concat of no batches")
        out = {}
        for f in fields(SequenceBatch):
            if f.name == "seq_offsets":
                lengths = np.concatenate([b.lengths for b in batches])
                out[f.name] = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
            else:
                out[f.name] = np.concatenate([getattr(b, f.name) for b in batches])
        return SequenceBatch(**out)


def tail_logprob_from_topk(topk_logprobs: np.ndarray) -> np.ndarray:
    """log(1 - sum(exp(topk))) in float64, for producers that only have the top-k.

    Accurate to about 1e-7 absolute in probability; a producer holding the full
    logits should compute the tail from them instead (exact for tiny tails).
    """
    mass = np.exp(topk_logprobs.astype(np.float64)).sum(-1)
    with np.errstate(divide="ignore"):
        return np.log(np.clip(1.0 - mass, 0.0, 1.0)).astype(np.float32)
