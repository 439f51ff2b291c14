"""What one fresh sequence costs a refresh round, by round size: student sampling + teacher scoring.

The on-policy refresh (benchmarks/bench_refresh.py) pays, every N steps, for M prompts
sampled by the current student and scored by the teacher. This measures that cost per
sequence for several M on the embedded pair (HF backend, the one `kd train` uses by
default), next to the cost of training on a sequence, so the break-even of "generate once,
train on it several times" can be read off:

    python benchmarks/bench_round_cost.py [--sizes 4,8,16,32] [--max-new-tokens 64] [--threads 2]

Sampling a small batch is memory-bound (every new token reads all the student's weights),
so larger rounds are cheaper per sequence; scoring is compute-bound and scales linearly.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="4,8,16,32", help="round sizes M (prompts per round)")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=2, help="best of this many timings per size")
    args = ap.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    from kd.stages import models
    from kd.stages.generate.backend import SamplingParams
    from kd.stages.generate.hf_backend import HfSampler, HfScorer
    from kd.stages.generate.prompts import PromptSource
    from kd.stages.generate.run import eos_token_ids

    teacher_dir, student_dir = models.default_teacher_dir(), models.default_student_dir()
    student = models.load_model(student_dir, device="cpu", dtype="float32")
    teacher = models.load_model(teacher_dir, device="cpu", dtype="float32")
    tok = models.load_tokenizer(teacher_dir)
    sizes = [int(x) for x in args.sizes.split(",")]
    source = PromptSource(str(REPO / "data" / "prompts.jsonl"), tok, split="train")
    prompts = [r.prompt_ids for r in source.encode(0, max(sizes)).rows]
    pad = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
    sampler = HfSampler(student, eos_token_ids=eos_token_ids(tok, student), pad_token_id=pad, batch_size=max(sizes))
    scorer = HfScorer(teacher, batch_size=max(64, max(sizes)), pad_token_id=pad)
    params = SamplingParams(temperature=1.0, top_p=1.0, max_new_tokens=args.max_new_tokens)
    sampler.sample(prompts[:2], params, [0, 1])  # warm-up

    print(f"machine: {platform.processor() or platform.machine()}, torch {torch.__version__} "
          f"({args.threads} threads); student {student_dir.name}, teacher {teacher_dir.name}, "
          f"{args.max_new_tokens} new tokens at T=1; prompts {[len(p) for p in prompts][:4]}... tokens")
    print("\n| round size M | sample s | sampled tok/s | score s | per sequence s |")
    print("|---|---|---|---|---|")
    rows = []
    for m in sizes:
        best = None
        for _ in range(args.repeats):
            t = time.perf_counter()
            done = sampler.sample(prompts[:m], params, list(range(m)))
            t_sample = time.perf_counter() - t
            seqs = [list(p) + c.token_ids.tolist() for p, c in zip(prompts[:m], done)]
            t = time.perf_counter()
            scorer.score(seqs, [len(p) for p in prompts[:m]], 64)
            t_score = time.perf_counter() - t
            tokens = sum(len(c.token_ids) for c in done)
            if best is None or t_sample + t_score < best[0] + best[1]:
                best = (t_sample, t_score, tokens)
        t_sample, t_score, tokens = best
        rows.append({"m": m, "sample_s": t_sample, "score_s": t_score, "per_sequence_s": (t_sample + t_score) / m})
        print(f"| {m} | {t_sample:.2f} | {tokens / t_sample:.0f} | {t_score:.2f} | {(t_sample + t_score) / m:.3f} |")
    print("\n" + json.dumps(rows))


if __name__ == "__main__":
    main()
