"""Encode the teacher's top-k (+ tail) into compact integer arrays, and decode them back.

Two codecs (docs/FORMAT.md, "Codecs", is normative):

``sqrtq`` (default, lossy). Per position, the k ids are sorted ascending and
stored as differences (``topk_id_deltas``; column 0 is the smallest id itself):
sorting turns ids into small gaps that zstd packs well, and ids stay exact. Each
probability p (the k top-k entries, in the same id order, and the tail mass) is
stored as ``code = round(sqrt(p) * levels)``. Rounding in sqrt(p) is the
information-geometric choice: an error d in sqrt(p) costs about 2*d^2 nats of KL
whatever p is, so every bucket gets the same error budget and small
probabilities get few bits, where a uniform step in log(p) wastes bits on them.
Decoding: p_hat(c) = (c / levels)^2, and p_hat(0) = (1 / (4 levels))^2 (the
middle of the zero bucket in sqrt space, never 0, so KL stays finite); the
decoded distribution over the k+1 buckets is p_hat / sum(p_hat), stated in the
format, never silent. Mean KL(true || decoded) is about (k+1) / (6 levels^2)
nats (9.4e-5 at k=64, levels=340, the default); measured figures are in
BENCHMARKS.md.

``raw`` (lossless). ``topk_ids`` int32 and ``topk_logprobs`` float32 in rank
order, ``tail_logprob`` float32, exactly as the teacher produced them.

The target and behaviour log-probs are float16 under ``sqrtq`` (relative error
<= 2^-11, i.e. < 0.005 nats at log-prob -10) and float32 under ``raw``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from kd.storage.errors import CacheError
from kd.storage.format import CodecConfig


@dataclass(frozen=True)
class ArraySpec:
    """How one position array is stored: dtype, columns (0 for 1-D), blosc shuffle mode."""

    dtype: str
    columns: int
    shuffle: str  # "noshuffle" | "shuffle" | "bitshuffle"


def id_dtype(vocab_size: int) -> str:
    return "uint16" if vocab_size <= 1 << 16 else "uint32"


def code_dtype(levels: int) -> str:
    return "uint8" if levels <= 255 else "uint16"


def position_arrays(codec: CodecConfig, k: int, vocab_size: int) -> dict[str, ArraySpec]:
    """The per-position arrays a shard holds under ``codec``: name -> spec."""
    if codec.name == "sqrtq":
        scalar = "float16"
        arrays = {
            "topk_id_deltas": ArraySpec(id_dtype(vocab_size), k, "shuffle"),
            "topk_codes": ArraySpec(code_dtype(codec.levels), k, "shuffle"),
            "tail_code": ArraySpec(code_dtype(codec.levels), 0, "shuffle"),
        }
    else:
        scalar = "float32"
        arrays = {
            "topk_ids": ArraySpec("int32", k, "shuffle"),
            "topk_logprobs": ArraySpec("float32", k, "shuffle"),
            "tail_logprob": ArraySpec("float32", 0, "shuffle"),
        }
    arrays["target_logprob"] = ArraySpec(scalar, 0, "shuffle")
    arrays["behaviour_logprob"] = ArraySpec(scalar, 0, "shuffle")
    return arrays


def codec_attributes(codec: CodecConfig) -> dict[str, dict]:
    """Attributes written on the arrays so any Zarr v3 reader can decode them from the rule."""
    if codec.name != "sqrtq":
        return {}
    rule = {
        "kd_codec": "sqrtq",
        "levels": codec.levels,
        "decode": "p = (code/levels)^2 if code > 0 else (1/(4*levels))^2; "
        "normalize p over the k topk_codes and tail_code of a row",
    }
    return {
        "topk_id_deltas": {"kd_codec": "sqrtq", "decode": "ids = cumsum(row); ids strictly increase"},
        "topk_codes": rule,
        "tail_code": rule,
    }


def sqrt_codes(logprobs: np.ndarray, levels: int, dtype: str = "uint16") -> np.ndarray:
    """sqrtq codes of log-probs: round(sqrt(p) * levels), clipped to [0, levels]."""
    root = np.exp(logprobs.astype(np.float64) * 0.5)  # sqrt(p); exp(-inf) = 0
    return np.clip(np.rint(root * levels), 0, levels).astype(dtype)


def encode(
    topk_ids: np.ndarray,
    topk_logprobs: np.ndarray,
    tail_logprobs: np.ndarray,
    target_logprobs: np.ndarray,
    behaviour_logprobs: np.ndarray,
    codec: CodecConfig,
    vocab_size: int,
) -> dict[str, np.ndarray]:
    """Position arrays (P rows) -> the stored arrays named by ``position_arrays``."""
    arrays = position_arrays(codec, topk_ids.shape[1], vocab_size)
    if codec.name == "sqrtq":
        order = np.argsort(topk_ids, axis=1, kind="stable")
        ids = np.take_along_axis(topk_ids, order, axis=1).astype(np.int64)
        lps = np.take_along_axis(topk_logprobs, order, axis=1)
        deltas = np.diff(ids, axis=1, prepend=0)
        out = {
            "topk_id_deltas": deltas.astype(arrays["topk_id_deltas"].dtype),
            "topk_codes": sqrt_codes(lps, codec.levels, arrays["topk_codes"].dtype),
            "tail_code": sqrt_codes(tail_logprobs, codec.levels, arrays["tail_code"].dtype),
        }
    else:
        out = {
            "topk_ids": topk_ids.astype(np.int32),
            "topk_logprobs": topk_logprobs.astype(np.float32),
            "tail_logprob": tail_logprobs.astype(np.float32),
        }
    out["target_logprob"] = target_logprobs.astype(arrays["target_logprob"].dtype)
    out["behaviour_logprob"] = behaviour_logprobs.astype(arrays["behaviour_logprob"].dtype)
    return out


class _SqrtLut:
    """Look-up tables from a code to p_hat and log(p_hat), cached per ``levels``."""

    _cache: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    @classmethod
    def get(cls, levels: int) -> tuple[np.ndarray, np.ndarray]:
        if levels not in cls._cache:
            codes = np.arange(levels + 1, dtype=np.float64)
            codes[0] = 0.25
            p = (codes / levels) ** 2
            cls._cache[levels] = (p.astype(np.float32), np.log(p).astype(np.float32))
        return cls._cache[levels]


def decode(
    stored: dict[str, np.ndarray], codec: CodecConfig
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Stored arrays -> (topk_ids int32 (P,k), topk_logprobs f32 (P,k), tail_logprobs f32 (P,),
    target_logprobs f32 (P,), behaviour_logprobs f32 (P,)).

    Under ``sqrtq`` the ids come back sorted ascending (not in rank order).
    """
    target = stored["target_logprob"].astype(np.float32)
    behaviour = stored["behaviour_logprob"].astype(np.float32)
    if codec.name == "raw":
        return (stored["topk_ids"], stored["topk_logprobs"], stored["tail_logprob"], target, behaviour)
    deltas, codes, tail_code = stored["topk_id_deltas"], stored["topk_codes"], stored["tail_code"]
    if (codes.size and int(codes.max()) > codec.levels) or (tail_code.size and int(tail_code.max()) > codec.levels):
        raise CacheError(f"sqrtq codes exceed levels={codec.levels}")
    # int32 sums cannot overflow for uint16 deltas when k < 32768; otherwise sum in int64 and
    # refuse ids past int32 (a crafted row must not wrap around into the vocabulary)
    if deltas.dtype == np.uint16 and deltas.shape[1] < 32768:
        ids = np.cumsum(deltas, axis=1, dtype=np.int32)
    else:
        wide = np.cumsum(deltas, axis=1, dtype=np.int64)
        if wide.size and int(wide[:, -1].max()) > np.iinfo(np.int32).max:
            raise CacheError("sqrtq top-k ids exceed the int32 range")
        ids = wide.astype(np.int32)
    lut_p, lut_logp = _SqrtLut.get(codec.levels)
    # np.take is several times faster than fancy indexing for small integer codes
    norm = np.log(np.take(lut_p, codes).sum(axis=1, dtype=np.float32) + np.take(lut_p, tail_code))  # (P,)
    topk_logprobs = np.take(lut_logp, codes)
    topk_logprobs -= norm[:, None]
    tail = np.take(lut_logp, tail_code) - norm
    return ids, topk_logprobs, tail, target, behaviour


def max_normalization_error(codec: CodecConfig, k: int) -> float:
    """Largest |sum(p_hat) - 1| that honest rounding can produce over k+1 buckets.

    Each bucket's sqrt is off by at most d = 1/(2 levels), so |p_hat - p| <= 2 d sqrt(p) + d^2;
    summed with sum(sqrt(p)) <= sqrt(k+1) (Cauchy-Schwarz). Verify flags rows beyond it.
    """
    if codec.name != "sqrtq":
        return 1e-3
    d = 0.5 / codec.levels
    return 2 * d * np.sqrt(k + 1) + (k + 1) * d * d
