"""Capture the embedded teacher's exact top-k distributions on its own samples.

For the codec design: the teacher (SmolLM2-135M-Instruct, via
``kd.stages.models.default_teacher_dir``) samples completions for prompts of
``data/prompts.jsonl`` (HF ``generate``, pure temperature-1 sampling: no top-k,
no top-p; left padding; fixed seed), then scores prompt + completion in one
forward pass and keeps, for every completion position (each position predicts
one completion token, the final EOS included):

    topk_ids        (P, K) int32    ids in rank order (largest first)
    topk_logprobs   (P, K) float32  log_softmax over the full vocabulary
    tail_logprobs   (P,)   float32  log of the mass outside the top-K:
                                    logsumexp(logits[not top-K]) - logsumexp(logits),
                                    exact even when the tail is tiny (no log1p(-sum))
    target_ids      (P,)   int32    the token actually sampled at that position
    target_logprobs (P,)   float32  its log-prob under the scoring forward
    behaviour_logprobs (P,) float32 its log-prob under generate's own logits (same
                                    model, different batch/padding: should agree to ~1e-4)
    entropy         (P,)   float32  full-vocabulary entropy in nats

plus the sequences (CSR): ``token_ids`` (T,), ``seq_offsets`` (N+1,),
``completion_start`` (N,), ``pos_offsets`` (N+1,), ``prompt_index`` (N,, row in
the prompt file), ``prompt_text`` (N,), and a JSON ``meta`` string (settings,
teacher and tokenizer fingerprints, timings, machine, the printed report).
Row j of sequence i predicts token ``token_ids[seq_offsets[i] + completion_start[i] + j]``.

Run: ``.venv/bin/python benchmarks/capture_teacher_topk.py [--out PATH]``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import torch

from kd.stages.models import (
    default_teacher_dir,
    load_model,
    load_tokenizer,
    model_vocab_size,
    teacher_fingerprint,
    tokenizer_fingerprint,
)

REPO = Path(__file__).resolve().parents[1]


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=REPO / ".cache" / "teacher_topk_k64.npz")
    p.add_argument("--prompts", type=Path, default=REPO / "data" / "prompts.jsonl")
    p.add_argument("--split", default="train", help="which split of the prompt file to draw from")
    p.add_argument("--num-prompts", type=int, default=60)
    p.add_argument("--max-new-tokens", type=int, default=96)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--k", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    return p.parse_args()


def read_prompts(path: Path, split: str, n: int) -> list[tuple[int, str]]:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [(i, r["prompt"]) for i, r in enumerate(rows) if r["split"] == split][:n]


@torch.no_grad()
def sample(model, tok, prompts: list[str], max_new_tokens: int):
    """-> list of (prompt_ids, completion_ids, behaviour_logprobs) per prompt."""
    texts = [
        tok.apply_chat_template(
            [{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True
        )
        for p in prompts
    ]
    enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    out = model.generate(
        **enc,
        do_sample=True,
        temperature=1.0,
        top_k=0,
        top_p=1.0,
        max_new_tokens=max_new_tokens,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        return_dict_in_generate=True,
        output_logits=True,
    )
    width = enc["input_ids"].shape[1]
    gen = out.sequences[:, width:]  # (B, G)
    logits = torch.stack(out.logits, dim=1).float()  # (B, G, V)
    gen_lp = torch.log_softmax(logits, -1).gather(-1, gen.unsqueeze(-1)).squeeze(-1)  # (B, G)
    results = []
    for b in range(gen.shape[0]):
        prompt_ids = enc["input_ids"][b][enc["attention_mask"][b].bool()]
        g = gen[b]
        eos = (g == tok.eos_token_id).nonzero()
        n = (
            int(eos[0]) + 1 if len(eos) else g.shape[0]
        )  # keep the EOS: the student must learn to stop
        results.append((prompt_ids, g[:n], gen_lp[b, :n]))
    return results


@torch.no_grad()
def score(model, seqs: list[torch.Tensor], starts: list[int], k: int, pad_id: int):
    """Teacher forward over right-padded sequences -> per completion position arrays."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for b, s in enumerate(seqs):
        ids[b, : len(s)] = s
        mask[b, : len(s)] = 1
    logits = model(input_ids=ids, attention_mask=mask).logits.float()  # (B, T, V)
    rows = []
    for b, s in enumerate(seqs):
        lg = logits[b, starts[b] - 1 : len(s) - 1]  # (P_b, V): row j predicts s[starts[b] + j]
        targets = s[starts[b] :]
        log_z = torch.logsumexp(lg, -1)  # (P_b,)
        vals, top_ids = torch.topk(lg, k, dim=-1)  # sorted, largest first
        rest = lg.scatter(-1, top_ids, float("-inf"))
        tail = torch.logsumexp(rest, -1) - log_z
        logp = lg - log_z[:, None]
        entropy = -(logp.exp() * logp).sum(-1)
        rows.append(
            dict(
                topk_ids=top_ids.int(),
                topk_logprobs=(vals - log_z[:, None]),
                tail_logprobs=tail,
                target_ids=targets.int(),
                target_logprobs=logp.gather(-1, targets[:, None]).squeeze(-1),
                entropy=entropy,
            )
        )
    return rows


def main():
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    t0 = time.time()
    teacher_dir = default_teacher_dir()
    t_convert = time.time() - t0
    tok = load_tokenizer(teacher_dir, padding_side="left")
    model = load_model(teacher_dir, "cpu", torch.float32)
    prompts = read_prompts(args.prompts, args.split, args.num_prompts)

    t1 = time.time()
    sampled = []
    for i in range(0, len(prompts), args.batch_size):
        chunk = prompts[i : i + args.batch_size]
        sampled += sample(model, tok, [p for _, p in chunk], args.max_new_tokens)
        print(
            f"sampled {len(sampled)}/{len(prompts)} prompts ({time.time() - t1:.0f}s)", flush=True
        )
    t_gen = time.time() - t1
    num_generated = sum(len(c) for _, c, _ in sampled)

    t2 = time.time()
    seqs = [torch.cat([p, c]) for p, c, _ in sampled]
    starts = [len(p) for p, _, _ in sampled]
    scored = []
    for i in range(0, len(seqs), args.batch_size):
        scored += score(
            model,
            seqs[i : i + args.batch_size],
            starts[i : i + args.batch_size],
            args.k,
            tok.pad_token_id,
        )
        print(f"scored {len(scored)}/{len(seqs)} sequences ({time.time() - t2:.0f}s)", flush=True)
    t_score = time.time() - t2
    num_scored_tokens = sum(len(s) for s in seqs)

    cat = {key: torch.cat([r[key] for r in scored]).numpy() for key in scored[0]}
    lens = np.array([len(s) for s in seqs])
    plens = np.array([len(c) for _, c, _ in sampled])
    arrays = dict(
        topk_ids=cat["topk_ids"].astype(np.int32),
        topk_logprobs=cat["topk_logprobs"].astype(np.float32),
        tail_logprobs=cat["tail_logprobs"].astype(np.float32),
        target_ids=cat["target_ids"].astype(np.int32),
        target_logprobs=cat["target_logprobs"].astype(np.float32),
        behaviour_logprobs=torch.cat([b for _, _, b in sampled]).numpy().astype(np.float32),
        entropy=cat["entropy"].astype(np.float32),
        token_ids=torch.cat(seqs).numpy().astype(np.int32),
        seq_offsets=np.concatenate([[0], np.cumsum(lens)]).astype(np.int64),
        completion_start=np.array(starts, dtype=np.int32),
        pos_offsets=np.concatenate([[0], np.cumsum(plens)]).astype(np.int64),
        prompt_index=np.array([i for i, _ in prompts], dtype=np.int64),
        prompt_text=np.array([p for _, p in prompts]),
    )
    P = len(arrays["tail_logprobs"])
    mass = {
        k: np.exp(arrays["topk_logprobs"][:, :k].astype(np.float64)).sum(1)
        for k in (1, 8, 16, 32, args.k)
    }
    in_topk = float((arrays["topk_ids"] == arrays["target_ids"][:, None]).any(1).mean())
    report = {
        "positions": P,
        "sequences": len(seqs),
        "ended_with_eos": int(sum(int(c[-1]) == tok.eos_token_id for _, c, _ in sampled)),
        "mean_entropy_nats": float(arrays["entropy"].mean()),
        "target_in_topk": in_topk,
        "topk_mass": {
            f"k={k}": {
                "mean": float(m.mean()),
                **{f"p{q}": float(np.quantile(m, q / 100)) for q in (1, 10, 50, 90)},
                "min": float(m.min()),
            }
            for k, m in mass.items()
        },
        "tail_logprob": {
            "min": float(arrays["tail_logprobs"].min()),
            "median": float(np.median(arrays["tail_logprobs"])),
            "max": float(arrays["tail_logprobs"].max()),
        },
        "check_mass_plus_tail_minus_1_maxabs": float(
            np.abs(mass[args.k] + np.exp(arrays["tail_logprobs"].astype(np.float64)) - 1).max()
        ),
        "check_behaviour_vs_target_logprob_maxabs": float(
            np.abs(arrays["behaviour_logprobs"] - arrays["target_logprobs"]).max()
        ),
    }
    meta = {
        "teacher_dir": str(teacher_dir),
        "teacher": teacher_fingerprint(teacher_dir).to_dict(),
        "tokenizer": tokenizer_fingerprint(tok, "smollm2", model_vocab_size(teacher_dir)).to_dict(),
        "args": {k: str(v) for k, v in vars(args).items()},
        "sampling": "HF generate, do_sample, temperature=1, top_k=0, top_p=1, left padding",
        "seconds": {"convert_or_reuse": t_convert, "generate": t_gen, "score": t_score},
        "generated_tokens": num_generated,
        "generate_tokens_per_s": num_generated / t_gen,
        "scored_tokens": num_scored_tokens,
        "score_tokens_per_s": num_scored_tokens / t_score,
        "machine": {
            "platform": platform.platform(),
            "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__,
        },
        "report": report,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_name(args.out.name + ".tmp.npz")
    np.savez(tmp, meta=np.array(json.dumps(meta)), **arrays)
    os.replace(tmp, args.out)
    print(json.dumps(meta, indent=1))
    print(f"wrote {args.out} ({args.out.stat().st_size / 1e6:.1f} MB, {P} positions)")


if __name__ == "__main__":
    main()
