"""Bytes/token, KL error and decode speed of the cache codecs on real teacher log-probs.

Input: an .npz of teacher top-k captured from the embedded teacher's own samples
(benchmarks/capture_teacher_topk.py writes it): per completion position the
top-k ids and log-probs (rank order), the exact tail log-prob and the target
token's log-prob. Everything is measured in this one run, side by side:

  naive       int32 ids + float16 log-probs, uncompressed (the usual baseline)
  naive+zstd  the same bytes through zstd (level 5)
  kd raw      kd's lossless codec, as written on disk by LogitCache (all arrays)
  kd sqrtq    kd's default codec at several `levels`, as written on disk

Bytes/token for the kd rows are the whole shard on disk (ids, probabilities,
tail, target and behaviour log-probs, token ids, offsets, metadata) divided by
the number of completion positions. The naive rows count ids + log-probs only,
which flatters them. Mean KL is KL(true top-k + tail || decoded top-k + tail).
Decode throughput is single-threaded (blosc and zarr pinned to one thread).

    python benchmarks/bench_codec.py [--npz .cache/teacher_topk_k64.npz]
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import tempfile
import time

import numcodecs
import numpy as np
import zarr

from kd.storage import codec as codec_mod
from kd.storage.batch import SequenceBatch
from kd.storage.cache import LogitCache
from kd.storage.format import CacheFingerprint, CodecConfig, TeacherFingerprint, TokenizerFingerprint

VOCAB = 49152


def load(path: str) -> dict[str, np.ndarray]:
    d = np.load(path)
    return {
        "ids": d["topk_ids"].astype(np.int32),
        "lp": d["topk_logprobs"].astype(np.float32),
        "tail": d["tail_logprobs"].astype(np.float32),
        "target_lp": d["target_logprobs"].astype(np.float32),
        "target_ids": d["target_ids"].astype(np.int32) if "target_ids" in d else None,
    }


def as_batch(data: dict) -> SequenceBatch:
    p = len(data["ids"])
    tokens = data["target_ids"] if data["target_ids"] is not None else np.zeros(p, np.int32)
    return SequenceBatch(
        token_ids=np.concatenate([[1], tokens]).astype(np.int32),
        seq_offsets=np.array([0, p + 1], np.int64),
        completion_start=np.array([1], np.int32),
        topk_ids=data["ids"],
        topk_logprobs=data["lp"],
        tail_logprobs=data["tail"],
        target_logprobs=data["target_lp"],
        behaviour_logprobs=np.full(p, np.nan, np.float32),
        source=np.array([2], np.uint8),
        round=np.zeros(1, np.int32),
        prompt_index=np.zeros(1, np.int64),
        sample_index=np.zeros(1, np.int32),
    )


def kl_true_vs_decoded(data: dict, ids_d: np.ndarray, lp_d: np.ndarray, tail_d: np.ndarray) -> np.ndarray:
    order_t = np.argsort(data["ids"], 1)
    order_d = np.argsort(ids_d, 1)
    assert np.array_equal(np.take_along_axis(data["ids"], order_t, 1), np.take_along_axis(ids_d, order_d, 1))
    lp_t = np.concatenate([np.take_along_axis(data["lp"], order_t, 1), data["tail"][:, None]], 1).astype(np.float64)
    lq = np.concatenate([np.take_along_axis(lp_d, order_d, 1), tail_d[:, None]], 1).astype(np.float64)
    p = np.exp(lp_t)
    return (p * (np.where(p > 0, lp_t, 0) - lq)).sum(1)


def measure_kd(data: dict, codec: CodecConfig, workdir: str) -> dict:
    k = data["ids"].shape[1]
    fp = CacheFingerprint(
        TeacherFingerprint("smollm2-135m-instruct", "0" * 64), TokenizerFingerprint("0" * 64, VOCAB), k, codec
    )
    url = os.path.join(workdir, f"{codec.name}-{codec.levels}")
    cache = LogitCache.create(url, fp)
    record = cache.write_shard("s0", as_batch(data), {})
    reader = cache.read_shard("s0")
    out = reader.read()
    kl = kl_true_vs_decoded(data, out.topk_ids, out.topk_logprobs, out.tail_logprobs)
    per_array = {}
    for rel, meta in record.objects.items():
        array = rel.split("/")[2] if rel.count("/") >= 3 else "metadata"
        per_array[array] = per_array.get(array, 0) + meta["size"]
    p = len(data["ids"])
    # decode speed: in-memory codec decode, and the whole read (zstd + crc + decode)
    stored = reader.stored_position_arrays()
    t_decode = _best_time(lambda: codec_mod.decode(stored, codec))
    t_read = _best_time(reader.read)
    return {
        "bytes_per_token": sum(m["size"] for m in record.objects.values()) / p,
        "per_array": {a: b / p for a, b in sorted(per_array.items())},
        "mean_kl": float(kl.mean()),
        "p99_kl": float(np.quantile(kl, 0.99)),
        "max_kl": float(kl.max()),
        "decode_tok_s": p / t_decode,
        "read_tok_s": p / t_read,
    }


def _best_time(fn, reps: int = 7) -> float:
    """Best of ``reps`` runs: the figure least disturbed by other work on the machine."""
    fn()
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--npz", default=".cache/teacher_topk_k64.npz")
    ap.add_argument("--levels", default="255,320,360,383,511")
    ap.add_argument("--zstd-level", type=int, default=9)
    ap.add_argument("--repeat", type=int, default=1, help="tile the data N times into one shard")
    args = ap.parse_args()
    numcodecs.blosc.set_nthreads(1)
    zarr.config.set({"threading.max_workers": 1})
    data = load(args.npz)
    if args.repeat > 1:  # a shard of realistic size: per-read overheads amortize as in training
        data = {k: None if v is None else np.concatenate([v] * args.repeat) for k, v in data.items()}
    p, k = data["ids"].shape
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"python {platform.python_version()}, zarr {zarr.__version__}, numcodecs {numcodecs.__version__}")
    print(f"data: {args.npz}: {p} positions, k={k}, mean top-k mass {np.exp(data['lp'].astype(np.float64)).sum(1).mean():.3f}")
    rows = []
    naive = data["ids"].astype(np.int32).tobytes() + data["lp"].astype(np.float16).tobytes()
    rows.append(("naive int32+fp16", len(naive) / p, _kl_fp16(data), None, None))
    z = numcodecs.Zstd(level=5).encode(naive)
    rows.append(("naive + zstd", len(z) / p, _kl_fp16(data), None, None))
    results = {}
    with tempfile.TemporaryDirectory() as workdir:
        configs = [CodecConfig(name="raw", zstd_level=args.zstd_level)] + [
            CodecConfig(levels=int(x), zstd_level=args.zstd_level) for x in args.levels.split(",")
        ]
        for codec in configs:
            r = measure_kd(data, codec, workdir)
            label = "kd raw (lossless)" if codec.name == "raw" else f"kd sqrtq levels={codec.levels}"
            results[label] = r
            rows.append((label, r["bytes_per_token"], r["mean_kl"], r["decode_tok_s"], r["read_tok_s"]))
    print()
    print(f"| scheme | B/token | mean KL | decode tok/s/core | read+decode tok/s/core |")
    print(f"|---|---|---|---|---|")
    for label, bpt, kl, dec, rd in rows:
        f = lambda v: "-" if v is None else f"{v / 1e6:.2f}M"
        print(f"| {label} | {bpt:.1f} | {kl:.2e} | {f(dec)} | {f(rd)} |")
    print()
    for label, r in results.items():
        parts = ", ".join(f"{a} {b:.1f}" for a, b in r["per_array"].items())
        print(f"{label}: B/token by array: {parts}; KL p99 {r['p99_kl']:.2e} max {r['max_kl']:.2e}")


def _kl_fp16(data: dict) -> float:
    lp16 = data["lp"].astype(np.float16).astype(np.float32)
    tail = data["tail"]
    return float(kl_true_vs_decoded(data, data["ids"], lp16, tail).mean())


if __name__ == "__main__":
    main()
