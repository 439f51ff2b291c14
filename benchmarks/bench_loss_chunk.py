"""Loss maths of one fused-loss chunk: autograd through the logits vs the analytic gradient.

One chunk of ``fused.chunked_distill_loss`` as the default training run sees it: c = 2**24 // V
rows of fp32 logits (V = 49,152 for SmolLM2: 341 rows), teacher top-k k = 64, the loss values
and d loss / d logits, and nothing else (the lm_head GEMMs around it are not timed). Side by side:

  autograd   ``fused._autograd_chunk``: autograd through ``losses.loss_sums`` on the (c, V) logits
  analytic   ``fused._analytic_chunk``: a few student log-probs per row, autograd on those, the
             (c, V) gradient in closed form, in place in the logits buffer

for the default loss (forward KL, top-k + tail, T = 1) and a loss with every part (JSD, T = 2,
CE, token reverse KL with importance weights). Each variant gets a fresh copy of the same logits
(the copy is not timed); wall and CPU time are the median over ``--repeats``.

With ``--positions M`` (e.g. 1088, what bench_train's steps hold), also the whole
``chunked_distill_loss`` forward + backward on M positions with a random (V, 576) lm_head, both
gradient methods and the three lm_head GEMMs alone, interleaved so that a shared box's load
drifts over all three alike; "loss maths" is the fused time minus the GEMMs.

    python benchmarks/bench_loss_chunk.py [--vocab 49152] [--k 64] [--threads 2] [--repeats 15]
                                          [--positions 1088 --step-repeats 5]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import torch

from kd.stages.train.fused import LOGITS_BUDGET, _analytic_chunk, _autograd_chunk, chunked_distill_loss
from kd.stages.train.losses import LossConfig, LossTargets, loss_denominators

CONFIGS = {
    "forward_kl, tail, T=1": LossConfig(),
    "jsd, tail, T=2, +ce +token_rkl +iw": LossConfig(divergence="jsd", temperature=2.0, ce_weight=0.3,
                                                    token_reverse_kl_weight=0.5, importance_clip=2.0),
}


def chunk_case(rows: int, vocab: int, k: int, seed: int = 0):
    """Student-like logits and a teacher top-k skewed to low ids (as in bench_train's synthetic cache)."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(rows, vocab, generator=g) * 3.0  # (c, V)
    ids = torch.sort(((vocab - k) * torch.rand(rows, k, generator=g) ** 3).long(), 1).values + torch.arange(k)
    probs = torch.softmax(torch.randn(rows, k + 1, generator=g) * 2.0, -1)
    targets = LossTargets(
        topk_ids=ids, topk_logprobs=probs[:, :k].log(), tail_logprobs=probs[:, k].log(),
        target_ids=ids[:, 0], target_logprobs=probs[:, 0].log(),
        behaviour_logprobs=torch.where(torch.rand(rows, generator=g) < 0.5, -1.0, float("nan")),
    )
    return logits, targets


def time_chunk(fn, logits, targets, config, repeats: int) -> tuple[float, float]:
    """Median (wall s, CPU s) of one chunk's loss + d loss / d logits."""
    dens = loss_denominators(targets, config)
    wall, cpu = [], []
    for i in range(repeats + 1):
        buffer = logits.clone()
        t, c = time.perf_counter(), time.process_time()
        sums, total, dlogits = fn(buffer, targets, config, None, dens, True)
        float(total.detach())
        t, c = time.perf_counter() - t, time.process_time() - c
        del sums, total, dlogits, buffer
        if i:  # the first call warms up
            wall.append(t)
            cpu.append(c)
    return statistics.median(wall), statistics.median(cpu)


def time_fused(vocab: int, k: int, positions: int, repeats: int, hidden_size: int = 576) -> dict:
    """Median wall s of the fused loss (both gradients) and of the lm_head GEMMs alone, interleaved."""
    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(positions, hidden_size, generator=g).requires_grad_(True)
    weight = (torch.randn(vocab, hidden_size, generator=g) * 0.05).requires_grad_(True)
    _, targets = chunk_case(positions, vocab, k)
    times = {"autograd": [], "analytic": [], "lm_head GEMMs": []}
    for i in range(repeats + 1):
        for name in times:
            t = time.perf_counter()
            if name == "lm_head GEMMs":
                logits = torch.nn.functional.linear(hidden, weight)  # (M, V)
                logits.backward(torch.ones_like(logits))
            else:
                chunked_distill_loss(hidden, weight, None, targets, LossConfig(), gradient=name).total.backward()
            if i:
                times[name].append(time.perf_counter() - t)
            hidden.grad = weight.grad = None
    return {name: statistics.median(v) for name, v in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vocab", type=int, default=49_152)
    ap.add_argument("--k", type=int, default=64)
    ap.add_argument("--rows", type=int, default=None, help="rows per chunk (default 2**24 // vocab)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--positions", type=int, default=0, help="also time the whole fused loss on M positions")
    ap.add_argument("--step-repeats", type=int, default=5)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rows = args.rows or LOGITS_BUDGET // args.vocab
    logits, targets = chunk_case(rows, args.vocab, args.k)

    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               platform.processor())
    print(f"machine: {cpu}, torch {torch.__version__}, {args.threads} threads, "
          f"load average {', '.join(f'{x:.1f}' for x in os.getloadavg())}")
    print(f"chunk: {rows} rows x V={args.vocab:,} fp32, k={args.k}; median of {args.repeats}\n")
    print("| loss | autograd ms (CPU ms) | analytic ms (CPU ms) | speedup (wall, CPU) |")
    print("|---|---|---|---|")
    for name, config in CONFIGS.items():
        (aw, ac), (fw, fc) = (time_chunk(fn, logits, targets, config, args.repeats)
                              for fn in (_autograd_chunk, _analytic_chunk))
        print(f"| {name} | {1e3 * aw:.1f} ({1e3 * ac:.1f}) | {1e3 * fw:.1f} ({1e3 * fc:.1f}) | "
              f"{aw / fw:.1f}x, {ac / fc:.1f}x |")
    if args.positions:
        t = time_fused(args.vocab, args.k, args.positions, args.step_repeats)
        head = t["lm_head GEMMs"]
        print(f"\nchunked_distill_loss fwd+bwd, {args.positions} positions, lm_head ({args.vocab:,}, 576), "
              f"default loss; median of {args.step_repeats}, load average "
              f"{', '.join(f'{x:.1f}' for x in os.getloadavg())}\n")
        print("| gradient | fused loss s | lm_head GEMMs alone s | loss maths s |")
        print("|---|---|---|---|")
        for name in ("autograd", "analytic"):
            print(f"| {name} | {t[name]:.2f} | {head:.2f} | {t[name] - head:.2f} |")
        print(f"\nloss maths: {(t['autograd'] - head) / max(t['analytic'] - head, 1e-9):.1f}x less time; "
              f"fused loss {t['autograd'] / t['analytic']:.2f}x faster")


if __name__ == "__main__":
    main()
