"""Trained tokens/s of ``kd train`` on CPU, and where a step's time goes.

Setup, made once per run: a synthetic cache of realistic shape (k=64, sqrtq codec,
the default student's tokenizer and vocabulary; prompts 32-256 tokens, completions
64-512; teacher top-k skewed to low ids with top-k mass ~0.9, like real teachers)
and the embedded default student (``kd.stages.models.default_student_dir``, 6
layers). Token content is random: throughput does not depend on it.

Measured, side by side:

  kd train        ``run(TrainConfig)`` end to end (loader with 1 decode thread, AdamW,
                  chunked loss, fp32 on CPU); tokens/s from metrics.jsonl, first
                  ``--warmup-steps`` steps dropped; ``data wait`` is the share of step
                  time spent blocked in next(loader).
  split           the same kind of step taken apart on batches collated beforehand,
                  each part timed alone (mean over ``--split-batches`` after one warm-up):
                    data       decode + collate, one epoch in one thread / its batches (what
                               the loader's prefetch thread hides from the step)
                    fwd+bwd    the student's decoder forward + backward (gradient from the loss)
                    loss       chunked lm_head + loss, forward + backward (``fused.chunked_distill_loss``),
                               and within it the three lm_head GEMMs alone (part of the student)
                    optimizer  AdamW step + zero_grad
                  and, as the baseline the chunked loss replaces, the dense loss
                  (full (M, V) logits + ``losses.distill_loss``) forward + backward.

    python benchmarks/bench_train.py [--steps 8] [--batch-tokens 2048] [--threads N]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

K = 64


def synthetic_cache(url: str, fingerprint, positions: int, shards: int) -> None:
    """Shards of realistic shape for ``fingerprint``'s vocabulary (random token content)."""
    from kd.storage.batch import SequenceBatch
    from kd.storage.cache import LogitCache
    from kd.storage.format import CacheFingerprint, CodecConfig, TeacherFingerprint

    vocab = fingerprint.vocab_size
    cache = LogitCache.create(url, CacheFingerprint(TeacherFingerprint("synthetic", "0" * 64), fingerprint, K,
                                                    CodecConfig()))
    rng, first = np.random.default_rng(0), 0
    for s in range(shards):
        prompt_lens, completion_lens = [], []
        while sum(completion_lens) < positions // shards:
            prompt_lens.append(int(rng.integers(32, 257)))
            completion_lens.append(int(rng.integers(64, 513)))
        n, p = len(prompt_lens), sum(completion_lens)
        ids = np.sort(((vocab - K) * rng.random((p, K)) ** 3).astype(np.int64), 1) + np.arange(K)  # distinct
        mass = np.clip(rng.beta(8, 1, p), 0.3, 0.999)  # top-k mass
        w = np.arange(1, K + 1)[None, :] ** -rng.uniform(1.0, 2.5, p)[:, None]
        probs = w / w.sum(1, keepdims=True) * mass[:, None]  # (P, K) rank order
        targets = ids[:, 0]
        tokens, off = [], 0
        for pl, cl in zip(prompt_lens, completion_lens):
            tokens += [((vocab - 1) * rng.random(pl) ** 3).astype(np.int64), targets[off: off + cl]]
            off += cl
        lengths = np.array(prompt_lens) + np.array(completion_lens)
        batch = SequenceBatch(
            token_ids=np.concatenate(tokens).astype(np.int32),
            seq_offsets=np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
            completion_start=np.array(prompt_lens, np.int32),
            topk_ids=ids.astype(np.int32), topk_logprobs=np.log(probs).astype(np.float32),
            tail_logprobs=np.log1p(-mass).astype(np.float32), target_logprobs=np.log(probs[:, 0]).astype(np.float32),
            behaviour_logprobs=np.full(p, np.nan, np.float32), source=np.full(n, 1, np.uint8),
            round=np.zeros(n, np.int32), prompt_index=np.arange(first, first + n, dtype=np.int64),
            sample_index=np.zeros(n, np.int32),
        )
        first += n
        cache.write_shard(f"bench-{s:03d}", batch, {"round": 0, "source": "teacher"})


def measure_run(cache: str, student: str, out: str, args) -> dict:
    from kd.stages.train.run import TrainConfig, run

    config = TrainConfig(cache=cache, out=out, student=student, steps=args.steps + args.warmup_steps,
                         warmup=1, lr=1e-4, batch_tokens=args.batch_tokens, eval_every=0, heldout_fraction=0.0,
                         save_every=0, loader_workers=1, device="cpu", progress=False)
    t = time.perf_counter()
    summary = run(config)
    wall = time.perf_counter() - t
    records = [json.loads(line) for line in open(Path(out) / "metrics.jsonl")]
    steps = [r for r in records if r["kind"] == "train"][args.warmup_steps:]
    step_s = sum(r["step_s"] for r in steps)
    return {
        "tokens_per_s": sum(r["tokens"] for r in steps) / step_s,
        "positions_per_s": sum(r["loss_positions"] for r in steps) / step_s,
        "step_s": statistics.median(r["step_s"] for r in steps),
        "wait_share": sum(r["data_wait_s"] for r in steps) / step_s,
        "tokens_per_step": statistics.mean(r["tokens"] for r in steps),
        "positions_per_step": statistics.mean(r["loss_positions"] for r in steps),
        "wall_s": wall, "steps": summary["step"],
    }


def measure_split(cache: str, student_dir: str, args) -> dict:
    """Each part of a step timed alone on the same pre-collated batches (mean seconds per batch)."""
    import torch

    from kd.stages import models
    from kd.stages.train.fused import chunked_distill_loss
    from kd.stages.train.loader import CacheLoader, LoaderConfig
    from kd.stages.train.losses import LossConfig, LossTargets, distill_loss

    config = LossConfig()
    loader = CacheLoader(cache, LoaderConfig(max_tokens_per_batch=args.batch_tokens, num_workers=0, seed=1))
    t = time.perf_counter()
    batches = list(loader.iter_epoch())  # one epoch decoded in this thread: the amortized data cost
    data_s = (time.perf_counter() - t) / len(batches)
    loader.close()
    batches = batches[: args.split_batches + 1]
    times = {"fwd+bwd": [], "loss": [], "lm_head": [], "optimizer": [], "dense loss": []}
    student = models.load_model(student_dir, device="cpu", dtype=torch.float32)
    student.train()
    decoder, head = student.get_decoder(), student.get_output_embeddings()
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-5)
    for i, batch in enumerate(batches):
        targets = LossTargets(batch.topk_ids, batch.topk_logprobs, batch.tail_logprobs, batch.target_ids)
        t = time.perf_counter()
        hidden = decoder(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                         use_cache=False).last_hidden_state[batch.loss_rows, batch.loss_cols]  # (M, d)
        t_fwd = time.perf_counter() - t
        h = hidden.detach().requires_grad_()
        t = time.perf_counter()
        chunked_distill_loss(h, head.weight, head.bias, targets, config).total.backward()
        t_loss = time.perf_counter() - t
        t = time.perf_counter()
        hidden.backward(h.grad)
        t_bwd = time.perf_counter() - t
        t = time.perf_counter()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        t_opt = time.perf_counter() - t
        t = time.perf_counter()
        logits = torch.nn.functional.linear(h, head.weight, head.bias)  # (M, V)
        distill_loss(logits, targets, config).total.backward()
        t_dense = time.perf_counter() - t
        grad_logits = torch.randn_like(logits)
        del logits
        t = time.perf_counter()
        torch.nn.functional.linear(h, head.weight, head.bias).backward(grad_logits)  # the 3 lm_head GEMMs alone
        t_head = time.perf_counter() - t
        del grad_logits
        optimizer.zero_grad(set_to_none=True)
        if i == 0:
            continue  # warm-up
        times["fwd+bwd"].append(t_fwd + t_bwd)
        times["loss"].append(t_loss)
        times["lm_head"].append(t_head)
        times["optimizer"].append(t_opt)
        times["dense loss"].append(t_dense)
    return {k: statistics.mean(v) for k, v in times.items()} | {
        "data": data_s,
        "tokens": statistics.mean(b.num_tokens for b in batches[1:]),
        "positions": statistics.mean(b.num_loss_positions for b in batches[1:]),
    }


def machine(threads: int) -> str:
    import torch

    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               platform.processor() or platform.machine())
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    return (f"machine: {cpu}, {len(os.sched_getaffinity(0))} usable cores, torch threads {threads}, "
            f"load average {load} (a shared box skews timings)\n"
            f"software: python {platform.python_version()}, torch {torch.__version__}, numpy {np.__version__}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=6, help="timed optimizer steps of kd train")
    ap.add_argument("--warmup-steps", type=int, default=2, help="steps run first and not timed")
    ap.add_argument("--batch-tokens", type=int, default=2048, help="--batch-tokens of kd train (padded)")
    ap.add_argument("--split-batches", type=int, default=4, help="batches timed in the split")
    ap.add_argument("--positions", type=int, default=60_000, help="completion positions in the cache")
    ap.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    ap.add_argument("--student", default=None, help="student folder (default: the embedded default student)")
    args = ap.parse_args()

    import torch

    from kd.stages import models

    torch.set_num_threads(args.threads)
    student = args.student or str(models.default_student_dir())
    fingerprint = models.tokenizer_fingerprint(models.load_tokenizer(student))
    with tempfile.TemporaryDirectory() as tmp:
        cache = os.path.join(tmp, "cache")
        t = time.perf_counter()
        synthetic_cache(cache, fingerprint, args.positions, shards=4)
        print(f"synthetic cache: {args.positions} positions, k={K}, vocab {fingerprint.vocab_size}, sqrtq, "
              f"written in {time.perf_counter() - t:.0f}s")
        r = measure_run(cache, student, os.path.join(tmp, "run"), args)
        s = measure_split(cache, student, args)
    n_params = sum(p.numel() for p in models.load_model(student, device="cpu").parameters())

    print(machine(args.threads))
    print(f"student: {student} ({n_params / 1e6:.1f}M parameters), fp32, AdamW; --batch-tokens {args.batch_tokens}\n")
    print("| kd train (end to end)   | value |")
    print("|-------------------------|-------|")
    print(f"| trained tokens/s        | {r['tokens_per_s']:,.0f} |")
    print(f"| loss positions/s        | {r['positions_per_s']:,.0f} |")
    print(f"| median step             | {r['step_s']:.2f} s ({r['tokens_per_step']:,.0f} tokens, "
          f"{r['positions_per_step']:,.0f} positions) |")
    print(f"| data wait               | {100 * r['wait_share']:.1f}% of step time |")
    print(f"| wall (incl. load, save) | {r['wall_s']:.0f} s for {r['steps']} steps |\n")
    step = s["fwd+bwd"] + s["loss"] + s["optimizer"]
    print(f"| split of a step ({s['tokens']:,.0f} tokens, {s['positions']:,.0f} positions) | s/batch | share of step |")
    print("|--------------------------------------|---------|---------------|")
    rows = {"decoder fwd+bwd (6 layers)": s["fwd+bwd"], "loss (chunked lm_head + loss)": s["loss"],
            "  of which lm_head GEMMs (x, dW, dx)": s["lm_head"],
            "  of which loss maths on the logits": s["loss"] - s["lm_head"], "optimizer (AdamW)": s["optimizer"]}
    for name, seconds in rows.items():
        print(f"| {name:<36} | {seconds:7.3f} | {100 * seconds / step:12.1f}% |")
    print(f"| {'data (one thread, not prefetched)':<36} | {s['data']:7.3f} | {100 * s['data'] / step:11.1f}%* |")
    print(f"| {'dense loss (baseline for the loss)':<36} | {s['dense loss']:7.3f} | "
          f"chunked/dense = {s['loss'] / s['dense loss']:.2f}x |")
    print(f"\nsplit sum {step:.2f} s/batch vs kd train's median step {r['step_s']:.2f} s "
          f"(a slightly different batch mix)")
    print("\n* not part of the step: the loader decodes ahead in a thread; 'data wait' above is what remains.")


if __name__ == "__main__":
    main()
