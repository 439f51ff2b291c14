"""Can the loader feed the trainer? Loader throughput vs raw shard decode vs CPU training.

A synthetic cache of realistic shape (k=64, vocab 49152, sqrtq codec, ~200k
completion positions in 8 shards; prompts 32-256 tokens, completions 64-768;
teacher top-k ids skewed to low ids, top-k mass ~0.9, like real teachers) is
written once, then each measurement runs in its own process pinned to 1 or 2
cores (``sched_setaffinity`` before anything starts a thread), side by side:

  raw read       ``ShardReader.read()`` of every whole shard, one after another:
                 the decode floor (zarr's own threads included, on the pinned cores)
  raw no-check   the same with ``read(check=False)``: without the per-read value checks
                 (kd.storage.checks), so "raw" / "raw-nocheck" is what the checks cost
  loader wN      ``CacheLoader`` with N decode threads, one epoch, consumer does nothing:
                 windowed decode + shuffle + collation into TrainBatch tensors (opening the
                 shards' metadata and planning, once per process, is timed apart: "open")
  train step     forward + backward + AdamW of a 6-layer, 576-hidden llama (SmolLM2-135M
                 shape cut to 6 layers) with a top-k forward-KL loss, on batches collated
                 beforehand: what CPU training consumes
  train+loader   the same steps fed live by the loader (1 decode thread), sharing the cores;
                 ``wait`` is the share of wall time the step spent blocked in next(loader)

tokens = real tokens (prompt + completion, no padding); positions = completion
positions carrying teacher data. ``--positions`` and ``--shards`` change the cache.

    python benchmarks/bench_loader.py [--positions 200000] [--train-steps 4]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

import numpy as np

VOCAB, K = 49152, 64


def synthetic_batch(rng: np.random.Generator, positions: int, first_prompt: int):
    from kd.storage.batch import SequenceBatch

    prompt_lens, completion_lens = [], []
    while sum(completion_lens) < positions:
        prompt_lens.append(int(rng.integers(32, 257)))
        completion_lens.append(int(rng.integers(64, 769)))
    n, p = len(prompt_lens), sum(completion_lens)
    # k distinct ids per row, skewed to low (frequent) ids: sorted draws + arange are distinct
    ids = np.sort(((VOCAB - K) * rng.random((p, K)) ** 3).astype(np.int64), 1) + np.arange(K)
    ids = np.take_along_axis(ids, np.argsort(rng.random((p, K)), 1), 1)  # random rank order
    mass = np.clip(rng.beta(8, 1, p), 0.3, 0.999)
    w = np.arange(1, K + 1)[None, :] ** -rng.uniform(1.0, 2.5, p)[:, None]
    probs = w / w.sum(1, keepdims=True) * mass[:, None]  # (P, K) in rank order
    rank = np.minimum((np.cumsum(probs, 1) / mass[:, None] < rng.random(p)[:, None]).sum(1), K - 1)
    targets = ids[np.arange(p), rank]
    tokens, starts, off = [], [], 0
    for pl, cl in zip(prompt_lens, completion_lens):
        tokens += [((VOCAB - 1) * rng.random(pl) ** 3).astype(np.int64), targets[off : off + cl]]
        starts.append(pl)
        off += cl
    lengths = np.array(prompt_lens) + np.array(completion_lens)
    return SequenceBatch(
        token_ids=np.concatenate(tokens).astype(np.int32),
        seq_offsets=np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
        completion_start=np.array(starts, np.int32),
        topk_ids=ids.astype(np.int32),
        topk_logprobs=np.log(probs).astype(np.float32),
        tail_logprobs=np.log1p(-mass).astype(np.float32),
        target_logprobs=np.log(probs[np.arange(p), rank]).astype(np.float32),
        behaviour_logprobs=np.where(
            rng.random(p) < 0.5, np.log(probs[np.arange(p), rank]), np.nan
        ).astype(np.float32),
        source=np.full(n, 2, np.uint8),
        round=np.zeros(n, np.int32),
        prompt_index=np.arange(first_prompt, first_prompt + n, dtype=np.int64),
        sample_index=np.zeros(n, np.int32),
    )


def make_cache(url: str, positions: int, shards: int) -> None:
    from kd.storage.cache import LogitCache
    from kd.storage.format import (
        CacheFingerprint,
        CodecConfig,
        TeacherFingerprint,
        TokenizerFingerprint,
    )

    fp = CacheFingerprint(
        TeacherFingerprint("synthetic", "0" * 64),
        TokenizerFingerprint("0" * 64, VOCAB),
        K,
        CodecConfig(),
    )
    cache = LogitCache.create(url, fp)
    rng = np.random.default_rng(0)
    first = 0
    for s in range(shards):
        batch = synthetic_batch(rng, positions // shards, first)
        first += batch.num_sequences
        cache.write_shard(f"bench-{s:03d}", batch, {"round": 0, "source": "student"})


# ---------------------------------------------------------------- measurements (in a pinned child)
def measure_raw(url: str, args, check: bool = True) -> dict:
    from kd.storage.cache import LogitCache

    cache = LogitCache.open(url)
    records = cache.committed_shards()
    readers = [cache.read_shard(r) for r in records]
    best = None
    for _ in range(args.repeats):
        t = time.perf_counter()
        for reader in readers:
            reader.read(check=check)
        best = min(best or 1e9, time.perf_counter() - t)
    return {
        "positions": sum(r.num_positions for r in records),
        "tokens": sum(r.num_tokens for r in records),
        "seconds": best,
    }


def measure_loader(url: str, args, workers: int) -> dict:
    from kd.stages.train.loader import CacheLoader, LoaderConfig

    best, stats, open_s = None, None, None
    for _ in range(args.repeats):
        t = time.perf_counter()
        loader = CacheLoader(
            url, LoaderConfig(max_tokens_per_batch=args.batch_tokens, num_workers=workers)
        )
        len(loader)  # shard metadata read + the epoch's plan
        t_open = time.perf_counter() - t
        t = time.perf_counter()
        for _ in loader.iter_epoch():
            pass
        seconds = time.perf_counter() - t
        loader.close()
        if best is None or seconds < best:
            best, stats, open_s = seconds, loader.stats, t_open
    return {
        "positions": stats.loss_positions,
        "tokens": stats.tokens,
        "seconds": best,
        "batches": stats.batches,
        "open_s": open_s,
    }


def _student():
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=6,
        num_attention_heads=9,
        num_key_value_heads=3,
        tie_word_embeddings=True,
        max_position_embeddings=2048,
    )
    model = LlamaForCausalLM(config)
    return model, torch.optim.AdamW(model.parameters(), lr=1e-4)


def _train_step(model, optimizer, batch) -> None:
    import torch

    logits = model(
        input_ids=batch.input_ids, attention_mask=batch.attention_mask
    ).logits  # (B, L, V)
    student = torch.log_softmax(logits[batch.loss_rows, batch.loss_cols].float(), -1)  # (M, V)
    teacher = batch.topk_logprobs  # (M, k) forward KL over the top-k (enough for a cost estimate)
    loss = (teacher.exp() * (teacher - student.gather(1, batch.topk_ids))).sum() / max(
        1, batch.num_loss_positions
    )
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def measure_train(url: str, args, live: bool) -> dict:
    import itertools

    import torch

    from kd.stages.train.loader import CacheLoader, LoaderConfig

    torch.set_num_threads(args.cores)
    model, optimizer = _student()
    config = LoaderConfig(max_tokens_per_batch=args.train_batch_tokens, num_workers=1, seed=1)
    loader = CacheLoader(url, config)
    batches = list(itertools.islice(loader, args.train_steps + 1))
    if live:  # same batches, fed by a fresh loader while training
        loader.close()
        loader = CacheLoader(url, config)
        source = loader
    else:
        source = iter(batches)
    _train_step(model, optimizer, next(source))  # warm-up
    loader.stats.wait_s = 0.0
    tokens, t = 0, time.perf_counter()
    for _ in range(args.train_steps):
        batch = next(source)
        _train_step(model, optimizer, batch)
        tokens += batch.num_tokens
    seconds = time.perf_counter() - t
    loader.close()
    return {
        "tokens": tokens,
        "seconds": seconds,
        "wait_s": loader.stats.wait_s if live else 0.0,
        "positions": sum(b.num_loss_positions for b in batches[1:]),
    }


MEASURES = {
    "raw": lambda url, a: measure_raw(url, a),
    "raw-nocheck": lambda url, a: measure_raw(url, a, check=False),
    "loader-w1": lambda url, a: measure_loader(url, a, 1),
    "loader-w2": lambda url, a: measure_loader(url, a, 2),
    "train": lambda url, a: measure_train(url, a, live=False),
    "train+loader": lambda url, a: measure_train(url, a, live=True),
}


def run_pinned(name: str, cores: int, url: str, args) -> dict:
    cpus = sorted(os.sched_getaffinity(0))[:cores]
    env = {**os.environ, "OMP_NUM_THREADS": str(cores), "MKL_NUM_THREADS": str(cores)}
    cmd = [
        sys.executable,
        __file__,
        "--measure",
        name,
        "--cache",
        url,
        "--cores",
        str(cores),
        "--repeats",
        str(args.repeats),
        "--batch-tokens",
        str(args.batch_tokens),
        "--train-batch-tokens",
        str(args.train_batch_tokens),
        "--train-steps",
        str(args.train_steps),
    ]
    out = subprocess.run(
        cmd,
        env=env,
        check=True,
        capture_output=True,
        text=True,
        preexec_fn=lambda: os.sched_setaffinity(0, cpus),
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def machine() -> str:
    import numcodecs
    import torch
    import zarr

    with open("/proc/cpuinfo") as f:
        names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
    model = names[0] if names else platform.processor() or platform.machine()
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    return (
        f"machine: {model}, {len(os.sched_getaffinity(0))} usable cores, load average {load} (shared box: "
        f"other jobs skew timings)\nsoftware: python {platform.python_version()}, torch {torch.__version__}, "
        f"zarr {zarr.__version__}, numcodecs {numcodecs.__version__}, numpy {np.__version__}"
    )


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--positions", type=int, default=200_000)
    ap.add_argument("--shards", type=int, default=8)
    ap.add_argument("--cache", default=None, help="reuse a cache (written if absent)")
    ap.add_argument("--repeats", type=int, default=2, help="best of N for decode measurements")
    ap.add_argument(
        "--batch-tokens", type=int, default=16384, help="loader token budget for throughput"
    )
    ap.add_argument(
        "--train-batch-tokens", type=int, default=1024, help="token budget of a CPU train step"
    )
    ap.add_argument("--train-steps", type=int, default=4)
    ap.add_argument("--only", nargs="+", choices=sorted(MEASURES), default=None,
                    help="run only these measurements (default: all)")
    ap.add_argument("--measure", choices=sorted(MEASURES), help=argparse.SUPPRESS)
    ap.add_argument("--cores", type=int, default=1, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.measure:
        print(json.dumps(MEASURES[args.measure](args.cache, args)))
        return

    with tempfile.TemporaryDirectory() as tmp:
        url = args.cache or os.path.join(tmp, "cache")
        if not os.path.exists(os.path.join(url, "zarr.json")):
            t = time.perf_counter()
            make_cache(url, args.positions, args.shards)
            print(f"wrote {url} in {time.perf_counter() - t:.0f}s")
        size = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(url) for f in fs)
        print(machine())
        plan = [
            ("raw", 1),
            ("raw-nocheck", 1),
            ("loader-w1", 1),
            ("loader-w2", 1),
            ("raw", 2),
            ("loader-w1", 2),
            ("loader-w2", 2),
            ("train", 2),
            ("train+loader", 2),
        ]
        plan = [(n, c) for n, c in plan if args.only is None or n in args.only or n == "raw"]
        results = [(name, cores, run_pinned(name, cores, url, args)) for name, cores in plan]
        r0 = next(r for n, c, r in results if n == "raw" and c == 1)
        pos0 = r0["positions"]
        print(
            f"cache: {r0['positions']} positions, {r0['tokens']} tokens, {args.shards} shards, k={K}, "
            f"vocab {VOCAB}, sqrtq, {size / 2**20:.1f} MiB on disk ({size / pos0:.0f} B/position)"
        )
        print(
            f"loader: max_tokens_per_batch={args.batch_tokens}; train step: max_tokens_per_batch="
            f"{args.train_batch_tokens}, 6-layer 576-hidden llama, fp32, AdamW\n"
        )
        print(
            f"| {'measurement':<15}| cores | {'tokens/s':>10} | {'tokens/s/core':>13} | {'positions/s':>11} "
            f"| vs raw (same cores) | notes"
        )
        print("|" + "|".join("-" * w for w in (16, 7, 12, 15, 13, 21, 30)) + "|")
        for name, cores, r in results:
            tok_s, pos_s = r["tokens"] / r["seconds"], r["positions"] / r["seconds"]
            raw = next((x for n, c, x in results if n == "raw" and c == cores), None)
            ratio = (
                f"{pos_s / (raw['positions'] / raw['seconds']):.2f}x"
                if name.startswith("loader") or name == "raw-nocheck"
                else "-"
            )
            note = ""
            if name.startswith("loader"):
                note = f"{r['batches']} batches; open+plan {r['open_s']:.2f}s"
            elif name == "train+loader":
                note = f"waited {100 * r['wait_s'] / r['seconds']:.1f}% of wall time"
            print(
                f"| {name:<15}| {cores:>5} | {tok_s:>10,.0f} | {tok_s / cores:>13,.0f} | {pos_s:>11,.0f} "
                f"| {ratio:>19} | {note}"
            )
        nocheck = next((r for n, c, r in results if n == "raw-nocheck"), None)
        if nocheck is not None:
            print(f"\nper-read value checks: {100 * (1 - nocheck['seconds'] / r0['seconds']):.1f}% of raw read time "
                  "(1 core)")
        train = next((r for n, c, r in results if n == "train"), None)
        if train is None:
            return
        best = max(
            r["tokens"] / r["seconds"] for n, c, r in results if n.startswith("loader") and c == 1
        )
        print(
            f"\nloader (1 core, best) / CPU training (2 cores): "
            f"{best / (train['tokens'] / train['seconds']):,.0f}x the tokens/s training consumes"
        )


if __name__ == "__main__":
    main()
