"""Shared test helpers (fixtures only: tests import nothing from each other)."""

from __future__ import annotations

import numpy as np
import pytest

from kd.storage.batch import SequenceBatch
from kd.storage.format import CacheFingerprint, CodecConfig, TeacherFingerprint, TokenizerFingerprint


def random_batch(
    rng: np.random.Generator,
    num_sequences: int = 5,
    k: int = 8,
    vocab_size: int = 100,
    max_len: int = 30,
    peaked: bool = True,
) -> SequenceBatch:
    """A batch with valid structure and realistic-looking teacher distributions."""
    lengths = rng.integers(2, max_len + 1, size=num_sequences)
    starts = np.array([rng.integers(1, L + 1) for L in lengths], dtype=np.int32)
    p = int((lengths - starts).sum())
    logits = rng.standard_normal((p, vocab_size)) * (4.0 if peaked else 1.0)
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    ids = np.argsort(-logp, axis=1)[:, :k]
    topk = np.take_along_axis(logp, ids, axis=1)
    with np.errstate(divide="ignore"):
        tail = np.log(np.clip(1 - np.exp(topk).sum(-1), 0, 1))
    tokens = rng.integers(0, vocab_size, size=int(lengths.sum())).astype(np.int32)
    so = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    # the target of row j of sequence i is token c_i + j
    targets = np.concatenate([tokens[so[i] + starts[i] : so[i + 1]] for i in range(num_sequences)]) if p else np.zeros(0, np.int32)
    target_lp = logp[np.arange(p), targets] if p else np.zeros(0)
    behaviour = np.where(rng.random(p) < 0.5, -rng.random(p) * 5, np.nan)
    return SequenceBatch(
        token_ids=tokens,
        seq_offsets=so,
        completion_start=starts,
        topk_ids=ids.astype(np.int32),
        topk_logprobs=topk.astype(np.float32),
        tail_logprobs=tail.astype(np.float32),
        target_logprobs=target_lp.astype(np.float32),
        behaviour_logprobs=behaviour.astype(np.float32),
        source=rng.integers(0, 3, size=num_sequences).astype(np.uint8),
        round=np.full(num_sequences, 0, np.int32),
        prompt_index=np.arange(num_sequences, dtype=np.int64),
        sample_index=np.zeros(num_sequences, np.int32),
    )


def fingerprint(k: int = 8, vocab_size: int = 100, codec: CodecConfig | None = None, tok: str = "a" * 64) -> CacheFingerprint:
    return CacheFingerprint(
        teacher=TeacherFingerprint(name="tiny-teacher", weights_sha256="b" * 64),
        tokenizer=TokenizerFingerprint(sha256=tok, vocab_size=vocab_size, name="tiny-tok"),
        k=k,
        codec=codec or CodecConfig(),
    )


@pytest.fixture
def make_batch():
    return random_batch


@pytest.fixture
def make_fingerprint():
    return fingerprint
