"""Peak memory and time of the distillation loss: dense (full logits) vs chunked fused lm_head + loss.

Both variants start from the same student hidden states (M, d), lm_head weight (V, d) and bias,
and the same synthetic teacher top-k data (seeded), and run forward + backward once:

  dense    logits = F.linear(hidden, W, b).float()  (M, V), then losses.distill_loss, backward
           (the repo's dense path: logsumexp + gather + masked logsumexp for the tail, no extra
           full log_softmax tensor, so it is already leaner than a textbook implementation)
  chunked  fused.chunked_distill_loss(hidden, W, b, ...), backward

"Peak" is the loss step's memory above what the inputs already hold:
  CUDA  torch.cuda.max_memory_allocated() - memory_allocated() before the step (after one warm-up
        step, so cuBLAS workspaces are not counted);
  CPU   each variant runs in a fresh child process; peak = ru_maxrss after the step - RSS before it
        (the inputs are built in small pieces first, so they do not set the high-water mark).
The loss values and the gradients w.r.t. hidden, W and b of the two variants are compared.

    python benchmarks/bench_loss_memory.py [--tokens 8192 --vocab 49152 --dim 576 --k 64]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time

import torch
import torch.nn.functional as F

from kd.stages.train.fused import LOGITS_BUDGET, chunked_distill_loss
from kd.stages.train.losses import LossConfig, LossTargets, distill_loss

VARIANTS = ("dense", "chunked")


def make_inputs(args, device: torch.device, dtype: torch.dtype):
    """Seeded inputs, built in pieces of at most (256, V) so building them sets no memory peak."""
    g = torch.Generator().manual_seed(0)
    m, vocab, d, k = args.tokens, args.vocab, args.dim, args.k
    hidden = torch.randn(m, d, generator=g)
    weight = torch.randn(vocab, d, generator=g) * d**-0.5 * 3.0  # logits with std ~3
    bias = torch.randn(vocab, generator=g) * 0.1
    ids = torch.cat([torch.rand(min(256, m - s), vocab, generator=g).topk(k, -1).indices
                     for s in range(0, m, 256)])  # (M, k) distinct per row
    raw = torch.log_softmax(torch.randn(m, k + 1, generator=g) * 2.0, -1)  # k top-k buckets + tail
    sampled = torch.rand(m, generator=g) < 0.5
    target_ids = torch.where(sampled, ids[:, 0], torch.randint(0, vocab, (m,), generator=g))
    targets = LossTargets(
        topk_ids=ids.to(device),
        topk_logprobs=raw[:, :k].contiguous().to(device),
        tail_logprobs=raw[:, k].contiguous().to(device),
        target_ids=target_ids.to(device),
        target_logprobs=torch.where(sampled, raw[:, 0], torch.full((m,), -12.0)).to(device),
        behaviour_logprobs=torch.where(sampled, raw[:, 0] - 0.1, torch.nan).to(device),
    )
    params = [x.to(device=device, dtype=dtype).requires_grad_(True) for x in (hidden, weight, bias)]
    return params, targets


def loss_step(variant: str, params, targets, config: LossConfig, chunk_size: int) -> torch.Tensor:
    hidden, weight, bias = params
    if variant == "dense":
        out = distill_loss(F.linear(hidden, weight, bias).float(), targets, config)
    else:
        out = chunked_distill_loss(hidden, weight, bias, targets, config, chunk_size)
    out.total.backward()
    return out.total.detach()


def rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def run_child(args) -> None:
    """One variant in this (fresh) process; writes its numbers and gradients to args.out."""
    device = torch.device(args.device)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    config = LossConfig(divergence=args.divergence, topk_mode=args.topk_mode, ce_weight=0.1)
    params, targets = make_inputs(args, device, dtype)
    if device.type == "cuda":
        loss_step(args.child, params, targets, config, args.chunk_size)  # warm-up
        for p in params:
            p.grad = None
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        before, maxrss_before = rss_bytes(), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    t0 = time.perf_counter()
    loss = loss_step(args.child, params, targets, config, args.chunk_size)
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    if device.type == "cuda":
        peak, note = torch.cuda.max_memory_allocated() - before, ""
    else:
        maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        peak = maxrss - before
        note = "" if maxrss > maxrss_before else "WARNING: building the inputs set the RSS peak"
    torch.save({"loss": loss.cpu(), "grads": [p.grad.float().cpu() for p in params],
                "peak": peak, "seconds": seconds, "note": note}, args.out)


def machine() -> str:
    cpu = platform.processor() or "?"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    gpu = f", GPU {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""
    return (f"{cpu} x{os.cpu_count()} cores{gpu}; torch {torch.__version__} "
            f"({torch.get_num_threads()} threads); python {platform.python_version()}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, default=8192, help="loss positions M")
    ap.add_argument("--vocab", type=int, default=49152)
    ap.add_argument("--dim", type=int, default=576)
    ap.add_argument("--k", type=int, default=64)
    ap.add_argument("--chunk-size", type=int, default=None, help=f"default {LOGITS_BUDGET} // vocab")
    ap.add_argument("--divergence", default="forward_kl")
    ap.add_argument("--topk-mode", default="tail")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32", help="hidden / lm_head dtype")
    ap.add_argument("--child", choices=VARIANTS, help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.chunk_size is None:
        args.chunk_size = max(1, LOGITS_BUDGET // args.vocab)
    if args.child:
        run_child(args)
        return

    print(f"machine: {machine()}")
    print(f"M={args.tokens} V={args.vocab} d={args.dim} k={args.k} {args.dtype} on {args.device}; "
          f"{args.divergence}/{args.topk_mode} + 0.1 ce; chunk_size={args.chunk_size}")
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for variant in VARIANTS:
            out = os.path.join(tmp, f"{variant}.pt")
            cmd = [sys.executable, os.path.abspath(__file__), *sys.argv[1:],
                   "--child", variant, "--out", out, "--chunk-size", str(args.chunk_size)]
            subprocess.run(cmd, check=True)
            results[variant] = torch.load(out)
    dense, chunked = results["dense"], results["chunked"]
    print(f"\n{'variant':<9} {'peak loss memory':>17} {'fwd+bwd time':>13}")
    for variant, r in results.items():
        print(f"{variant:<9} {r['peak'] / 2**20:>13.1f} MiB {r['seconds']:>11.2f} s  {r['note']}")
    print(f"ratio dense/chunked: memory {dense['peak'] / max(chunked['peak'], 1):.1f}x, "
          f"time {dense['seconds'] / chunked['seconds']:.2f}x")
    print(f"loss: dense {dense['loss'].item():.6f}, chunked {chunked['loss'].item():.6f}")
    checks = {"loss": abs(dense["loss"].item() - chunked["loss"].item()) / abs(dense["loss"].item())}
    for name, a, b in zip(("grad hidden", "grad W", "grad b"), dense["grads"], chunked["grads"]):
        checks[name] = ((a - b).norm() / a.norm()).item()
    print("relative difference: " + ", ".join(f"{n} {v:.1e}" for n, v in checks.items()))
    tol = 1e-4 if args.dtype == "fp32" else 2e-2
    print(json.dumps({"peak_mib": {v: r["peak"] / 2**20 for v, r in results.items()},
                      "seconds": {v: r["seconds"] for v, r in results.items()},
                      "same_within_tol": all(v < tol for v in checks.values())}))


if __name__ == "__main__":
    main()
