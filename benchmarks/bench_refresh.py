"""Offline KD vs refresh every N vs fully on-policy: held-out KL per step, per second, per generated token.

Same teacher (the embedded SmolLM2-135M-Instruct), student (the default 6-layer
prune), prompts (``data/prompts.jsonl``: rows with split "train" for training,
"heldout" for evaluation), loss (forward KL over top-64 + tail), optimizer and
number of optimizer steps for every variant:

  offline     one cache made up front (``kd generate``: the initial student's samples of
              ``--base-prompts`` train prompts, scored by the teacher), no refresh
  N=n         the same base cache, plus a refresh every n steps: ``--round-prompts`` new
              prompts sampled by the current student and scored by the teacher; lambda =
              ``--fraction`` of every batch from the freshest round, the rest replay
  on-policy   N = 1, lambda = 1: every step trains on a fresh round of one batch

Held-out metric (the student's own distribution): every ``--eval-every`` steps the
current student samples ``--eval-prompts`` held-out prompts (``--eval-samples`` completions
each, fixed seeds), the teacher
scores the samples, and we report the mean KL(teacher || student) over the teacher's
top-64 + tail buckets at the completion positions, and top-1 agreement, with the standard
error of the KL over held-out sequences (``± x``). ``--final-eval-seeds K`` evaluates each
arm's final student K more times with other seeds and pools them, so a final comparison
rests on (K + 1) x the sequences. Evaluation time is excluded from every wall-clock figure.

Generation cost of a variant: student tokens sampled and teacher tokens scored (prompt +
completion, since the teacher runs over both), in the base cache and in all refresh
rounds, and the seconds spent on them.

Peers (optional; need ``pip install --no-deps trl``, here trl 1.16.0; skipped with a
message when trl is missing), with the same student, teacher, prompts, batch size,
learning rate, schedule and steps, and the teacher running live every step (nothing cached):

  trl         TRL's ``DistillationTrainer``: fully on-policy (the student samples every
              step with HF ``generate``), beta = 0 (forward KL over the full vocabulary),
              temperature 1
  trl-gkd     TRL's ``GKDTrainer`` (trl.experimental) with lambda = 1, beta = 0

Throughput is "trained completion tokens per second": completion positions that carry a
loss, divided by the wall-clock of the whole arm (kd: base cache + training + refresh;
TRL: training with its live generation), evaluation excluded. "KL at equal wall-clock" is
TRL's held-out KL at its first evaluation at or after the moment each kd arm finished (TRL
had trained at least as long: the comparison never flatters kd; "-" when TRL ended first).

    python benchmarks/bench_refresh.py --out /tmp/bench-refresh            # the small default
    python benchmarks/bench_refresh.py --steps 60 --variants offline,8,4,2,1 --threads 2

Writes ``results.json``, ``results.md`` and ``refresh.png`` into ``--out``. Runs with the
same ``--out`` and settings share the base cache and the step-0 evaluation, and merge
their variants into one table and plot (so variants can run one invocation at a time).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import time
from dataclasses import replace
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="/tmp/kd-bench-refresh")
    p.add_argument("--variants", default="offline,4,2,1",
                   help="comma list: 'offline', N (refresh every N steps with --round-prompts; 1 = fully on-policy, "
                        "lambda 1), NxM (every N steps, M prompts per round), 'trl', 'trl-gkd'")
    p.add_argument("--steps", type=int, default=24)
    p.add_argument("--batch-seqs", type=int, default=4, help="sequences per optimizer step (about)")
    p.add_argument("--round-prompts", type=int, default=4, help="prompts per refresh round (M)")
    p.add_argument("--fraction", type=float, default=0.5, help="lambda of the N > 1 variants")
    p.add_argument("--max-staleness", type=int, default=None)
    p.add_argument("--base-prompts", type=int, default=48)
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--eval-prompts", type=int, default=16)
    p.add_argument("--eval-samples", type=int, default=1,
                   help="completions per held-out prompt (distinct seeds): more positions, less sampling noise")
    p.add_argument("--eval-every", type=int, default=8)
    p.add_argument("--peer-eval-every", type=int, default=None,
                   help="evaluate the TRL peers this often instead (finer: their KL at an arm's wall-clock is "
                        "read at their first evaluation at or after it)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--final-eval-seeds", type=int, default=0,
                   help="evaluate every arm's final student K more times (other held-out seeds) and report the "
                        "final KL pooled over all its final evaluations, with its standard error")
    p.add_argument("--final-eval-only", action="store_true",
                   help="train nothing: run --final-eval-seeds on the final students --out already holds for "
                        "--variants, then rewrite the report")
    p.add_argument("--report-only", action="store_true",
                   help="rewrite results.md and refresh.png from --out's results.json; run nothing")
    return p.parse_args(argv)


def machine() -> str:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (f"{cpu}, {os.cpu_count()} CPUs, torch {torch.__version__} ({torch.get_num_threads()} threads), "
            f"python {platform.python_version()}")


def split_prompts(out: Path) -> tuple[Path, Path]:
    rows = [json.loads(line) for line in (REPO / "data" / "prompts.jsonl").read_text().splitlines()]
    paths = []
    for split in ("train", "heldout"):
        path = out / f"prompts-{split}.jsonl"
        path.write_text("".join(json.dumps({"prompt": r["prompt"]}) + "\n" for r in rows if r["split"] == split))
        paths.append(path)
    return paths[0], paths[1]


class HeldoutEval:
    """KL(teacher || student) and top-1 agreement on the student's own samples of held-out prompts."""

    def __init__(self, teacher, tokenizer, heldout: Path, n: int, max_new_tokens: int, seed: int, samples: int = 1):
        from kd.stages.generate.backend import SamplingParams
        from kd.stages.generate.hf_backend import HfScorer
        from kd.stages.generate.prompts import PromptSource

        self.tok = tokenizer
        source = PromptSource(str(heldout), tokenizer)
        self.prompts = [r.prompt_ids for r in source.encode(0, min(n, len(source))).rows for _ in range(samples)]
        self.params = SamplingParams(temperature=1.0, top_p=1.0, max_new_tokens=max_new_tokens)
        self.seeds = [seed * 1_000_003 + i for i in range(len(self.prompts))]
        pad = tokenizer.pad_token_id
        self.scorer = HfScorer(teacher, batch_size=64, max_batch_tokens=8192, pad_token_id=pad)

    def __call__(self, student) -> dict:
        import torch

        from kd.stages.generate.hf_backend import HfSampler
        from kd.stages.train.losses import LossTargets, loss_sums
        from kd.stages.train.run import EVAL_LOSS

        t0, cpu0 = time.time(), time.process_time()
        was_training = student.training
        sampler = HfSampler(student, eos_token_ids=[self.tok.eos_token_id], pad_token_id=self.tok.pad_token_id,
                            batch_size=16)
        completions = sampler.sample(self.prompts, self.params, self.seeds)
        seqs = [p + c.token_ids.tolist() for p, c in zip(self.prompts, completions)]
        starts = [len(p) for p in self.prompts]
        scores = self.scorer.score(seqs, starts, 64)
        kl = top1 = n = 0.0
        per_seq = []  # (KL sum, positions) of every sequence, for the standard error
        with torch.no_grad():
            for seq, c, s in zip(seqs, starts, scores):
                if len(seq) == c:
                    continue
                logits = student(torch.tensor([seq])).logits[0, c - 1 : len(seq) - 1].float()  # (P, V)
                targets = LossTargets(topk_ids=torch.from_numpy(s.topk_ids).long(),
                                      topk_logprobs=torch.from_numpy(s.topk_logprobs),
                                      tail_logprobs=torch.from_numpy(s.tail_logprobs),
                                      target_ids=torch.tensor(seq[c:]), target_logprobs=None)
                seq_kl = float(loss_sums(logits, targets, EVAL_LOSS)["divergence"])
                per_seq.append((seq_kl, logits.shape[0]))
                kl += seq_kl
                top1 += float((logits.argmax(-1) == targets.topk_ids[:, 0]).sum())
                n += logits.shape[0]
        student.train(was_training)
        return {"kl": kl / max(n, 1), "kl_se": ratio_se(per_seq), "top1": top1 / max(n, 1), "positions": int(n),
                "student_tokens": sum(len(c.token_ids) for c in completions), "eval_s": time.time() - t0,
                "eval_cpu_s": time.process_time() - cpu0}


def ratio_se(pairs: list[tuple[float, int]]) -> float | None:
    """Standard error of the per-position mean sum(k) / sum(n) over independent sequences (k_i, n_i)
    (delta method for a ratio estimator): how far another draw of the held-out completions could
    move the reported KL. None with fewer than two sequences."""
    m = len(pairs)
    if m < 2:
        return None
    total_k, total_n = sum(k for k, _ in pairs), sum(n for _, n in pairs)
    r = total_k / total_n
    var = sum((k - r * n) ** 2 for k, n in pairs) / (m - 1)
    return (var / m) ** 0.5 / (total_n / m)


def final_student_dir(out: Path, variant: str) -> Path:
    """Where an arm's final student is saved: kd's last checkpoint, TRL's saved model."""
    if variant.startswith("trl"):
        return out / f"run-{variant}" / "final"
    steps = sorted((out / f"run-{variant}" / "run" / "checkpoints").glob("step-*"))
    if not steps:
        raise SystemExit(f"{variant}: no final checkpoint under {out / f'run-{variant}'}; run the arm first")
    return steps[-1]


def pooled(points: list[dict]) -> dict:
    """One final KL from several evaluations of the same student on independent samples: the
    per-position mean over all of them, its standard error (None if one lacks it), top-1 likewise."""
    total = sum(p["positions"] for p in points)
    kl = sum(p["kl"] * p["positions"] for p in points) / total
    top1 = sum(p["top1"] * p["positions"] for p in points) / total
    ses = [p.get("kl_se") for p in points]
    se = None if None in ses else sum((s * p["positions"]) ** 2 for s, p in zip(ses, points)) ** 0.5 / total
    return {"kl": kl, "kl_se": se, "top1": top1, "positions": total, "evaluations": len(points)}


def final_eval(args, out: Path, result: dict, teacher, tokenizer, heldout: Path) -> None:
    """Evaluate an arm's final student with --final-eval-seeds more held-out seeds; pool with its last point."""
    from kd.stages import models

    if args.final_eval_seeds <= 0:
        return
    student = models.load_model(final_student_dir(out, result["variant"]), device="cpu", dtype="float32")
    points = [result["curve"][-1]]
    for j in range(1, args.final_eval_seeds + 1):
        ev = HeldoutEval(teacher, tokenizer, heldout, args.eval_prompts, args.max_new_tokens, args.seed + j,
                         args.eval_samples)
        m = ev(student)
        points.append(m)
        print(f"  [{result['variant']}] final, held-out seed {args.seed + j}: KL {_kl(m)}", flush=True)
    result["final_eval"] = pooled(points)
    print(f"  [{result['variant']}] final KL pooled over {len(points)} evaluations: {_kl(result['final_eval'])}",
          flush=True)


def final_point(r: dict) -> dict:
    """An arm's final held-out KL: pooled over its final evaluations when there were several."""
    return r.get("final_eval") or r["curve"][-1]


def make_base_cache(args, out: Path, train_prompts: Path, teacher_dir, student_dir) -> dict:
    from kd.stages.generate.run import GenerateConfig
    from kd.stages.generate.run import run as generate

    cache = out / "base-cache"
    if cache.exists():
        shutil.rmtree(cache)
    cpu0 = time.process_time()
    summary = generate(GenerateConfig(
        data=str(train_prompts), out=str(cache), student=str(student_dir), teacher=str(teacher_dir),
        source="student", limit=args.base_prompts, max_new_tokens=args.max_new_tokens, seed=args.seed,
        shard_size=16, batch_size=16, device="cpu", progress=False))
    return {"path": str(cache), "student_tokens": summary["completion_tokens"], "teacher_tokens": summary["tokens"],
            "gen_s": summary["seconds"], "gen_cpu_s": time.process_time() - cpu0}


def run_variant(args, name: str, out: Path, base: dict, train_prompts: Path, student_dir, evaluator, kl0) -> dict:
    from kd.stages.train.run import TrainConfig, run

    work = out / f"run-{name}"
    if work.exists():
        shutil.rmtree(work)
    work.mkdir()
    cache = work / "cache"
    shutil.copytree(base["path"], cache)
    n, m = _refresh_shape(name, args)
    seq_tokens = 64 + args.max_new_tokens  # held-out and train prompts are 35-60 tokens with the template
    config = TrainConfig(
        cache=str(cache), out=str(work / "run"), student=str(student_dir), steps=args.steps, lr=args.lr,
        warmup=max(1, args.steps // 10), batch_tokens=args.batch_seqs * seq_tokens, eval_every=0,
        heldout_fraction=0.0, save_every=0, keep=1, loader_workers=1, progress=False, seed=args.seed,
        device="cpu", refresh_every=n, refresh_prompts=m,
        prompts=str(train_prompts), max_new_tokens=args.max_new_tokens,
        on_policy_fraction=1.0 if n == 1 else args.fraction, max_staleness=args.max_staleness,
        refresh_batch_size=16,
    )
    curve = [{"step": 0, **kl0, "train_s": 0.0, "train_cpu_s": 0.0}]
    eval_s = {"total": 0.0, "cpu": 0.0}
    cpu0 = time.process_time()

    def on_step(ctx):
        if ctx.step % args.eval_every == 0 or ctx.step == args.steps:
            train_s = ctx.metrics["elapsed_s"] - eval_s["total"]  # elapsed_s holds the earlier evaluations
            train_cpu_s = time.process_time() - cpu0 - eval_s["cpu"]
            m = evaluator(ctx.student)
            eval_s["total"] += m["eval_s"]
            eval_s["cpu"] += m["eval_cpu_s"]
            curve.append({"step": ctx.step, **m, "train_s": train_s, "train_cpu_s": train_cpu_s})
            print(f"  [{name}] step {ctx.step}: held-out KL {_kl(m)}, top-1 {m['top1']:.3f}", flush=True)

    t0 = time.time()
    summary = run(config, on_step=on_step)
    wall = time.time() - t0 - eval_s["total"]
    cpu = time.process_time() - cpu0 - eval_s["cpu"]
    lines = [json.loads(x) for x in (work / "run" / "metrics.jsonl").read_text().splitlines()]
    refresh = [m for m in lines if m["kind"] == "refresh"]
    train = [m for m in lines if m["kind"] == "train"]
    gen_s = sum(m["gen_s"] for m in refresh)
    gen_cpu_s = sum(m["gen_cpu_s"] for m in refresh)
    return {
        "variant": name, "refresh_every": n, "fraction": config.on_policy_fraction,
        "round_prompts": config.refresh_prompts, "rounds": len(refresh),
        "student_tokens": base["student_tokens"] + sum(m["student_tokens"] for m in refresh),
        "teacher_tokens": base["teacher_tokens"] + sum(m["teacher_tokens"] for m in refresh),
        "refresh_student_tokens": sum(m["student_tokens"] for m in refresh),
        "refresh_teacher_tokens": sum(m["teacher_tokens"] for m in refresh),
        "gen_s": base["gen_s"] + gen_s, "refresh_gen_s": gen_s,
        "gen_cpu_s": base["gen_cpu_s"] + gen_cpu_s, "refresh_gen_cpu_s": gen_cpu_s,
        "train_wall_s": wall, "train_cpu_s": cpu, "trained_tokens": summary["tokens"],
        "trained_completion_tokens": sum(m["loss_positions"] for m in train),
        "mean_staleness": _mean([m["staleness"] for m in train if m["staleness"] is not None]),
        "final_loss": summary["final_loss"], "curve": curve,
    }


def _trl_arm(args, out: Path, name: str, train_prompts: Path, teacher_dir, student_dir, evaluator, kl0) -> dict:
    """A TRL peer, fully on-policy, evaluated like the kd variants; counts its trained completion tokens."""
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    import datasets
    from transformers import TrainerCallback

    from kd.stages import models

    rows = [json.loads(x)["prompt"] for x in train_prompts.read_text().splitlines()]
    tokenizer = models.load_tokenizer(teacher_dir)
    student = models.load_model(student_dir, device="cpu", dtype="float32").train()
    teacher = models.load_model(teacher_dir, device="cpu", dtype="float32")
    curve = [{"step": 0, **kl0, "train_s": 0.0, "train_cpu_s": 0.0}]
    clock = {"t0": time.time(), "cpu0": time.process_time(), "eval": 0.0, "eval_cpu": 0.0, "tokens": 0}

    class Eval(TrainerCallback):
        def on_step_end(self, targs, state, control, model=None, **kw):
            step = state.global_step
            if step % (args.peer_eval_every or args.eval_every) == 0 or step == args.steps:
                train_s = time.time() - clock["t0"] - clock["eval"]
                train_cpu_s = time.process_time() - clock["cpu0"] - clock["eval_cpu"]
                m = evaluator(model)
                clock["eval"] += m["eval_s"]
                clock["eval_cpu"] += m["eval_cpu_s"]
                curve.append({"step": step, **m, "train_s": train_s, "train_cpu_s": train_cpu_s})
                print(f"  [{name}] step {step}: held-out KL {_kl(m)}, top-1 {m['top1']:.3f}", flush=True)

    common = dict(
        output_dir=str(out / f"run-{name}"), per_device_train_batch_size=args.batch_seqs, max_steps=args.steps,
        learning_rate=args.lr, warmup_steps=max(1, args.steps // 10), lr_scheduler_type="cosine",
        beta=0.0, temperature=1.0, seed=args.seed, logging_steps=1, save_strategy="no", report_to=[],
        use_cpu=True, dataloader_num_workers=0, bf16=False, disable_tqdm=True,
    )
    if name == "trl":
        from trl import DistillationConfig, DistillationTrainer

        data = datasets.Dataset.from_list([{"prompt": [{"role": "user", "content": p}]} for p in rows])
        config = DistillationConfig(**common, max_completion_length=args.max_new_tokens, gradient_checkpointing=False)
        trainer_cls, note = DistillationTrainer, "TRL DistillationTrainer (on-policy every step), beta=0; no cache"
    else:
        from trl.experimental.gkd import GKDConfig, GKDTrainer

        data = datasets.Dataset.from_list([{"messages": [{"role": "user", "content": p},
                                                         {"role": "assistant", "content": "."}]} for p in rows])
        config = GKDConfig(**common, lmbda=1.0, max_new_tokens=args.max_new_tokens, max_length=512)
        trainer_cls, note = GKDTrainer, "TRL GKDTrainer, lambda=1, beta=0; no cache"

    class Counting(trainer_cls):
        def compute_loss(self, model, inputs, *a, **kw):
            if "completion_mask" in inputs:  # DistillationTrainer
                clock["tokens"] += int(inputs["completion_mask"].sum())
            elif "labels" in inputs:  # GKDTrainer: -100 outside the completion
                clock["tokens"] += int((inputs["labels"][:, 1:] != -100).sum())
            return super().compute_loss(model, inputs, *a, **kw)

    trainer = Counting(model=student, teacher_model=teacher, args=config, train_dataset=data,
                       processing_class=tokenizer, callbacks=[Eval()])
    clock["t0"], clock["cpu0"] = time.time(), time.process_time()
    trainer.train()
    wall = time.time() - clock["t0"] - clock["eval"]
    trainer.save_model(str(out / f"run-{name}" / "final"))  # to re-evaluate it later, like kd's last checkpoint
    cpu = time.process_time() - clock["cpu0"] - clock["eval_cpu"]
    return {"variant": name, "refresh_every": 1, "fraction": 1.0, "round_prompts": args.batch_seqs,
            "rounds": args.steps, "student_tokens": None, "teacher_tokens": None, "refresh_student_tokens": None,
            "refresh_teacher_tokens": None, "gen_s": 0.0, "gen_cpu_s": 0.0, "refresh_gen_s": None,
            "train_wall_s": wall, "train_cpu_s": cpu, "trained_tokens": None,
            "trained_completion_tokens": clock["tokens"], "mean_staleness": 0.0,
            "final_loss": None, "curve": curve, "note": note}


def _order(result: dict) -> tuple[int, ...]:
    """offline, then N from large to small (on-policy last), then the peer."""
    v = result["variant"]
    if v in ("offline", "trl", "trl-gkd"):
        return {"offline": (0, 0), "trl": (2, 0), "trl-gkd": (3, 0)}[v]
    n, m = (int(x) for x in v.split("x")) if "x" in v else (int(v), 0)
    return (1, -n, m)


def _refresh_shape(name: str, args) -> tuple[int, int]:
    """(N, M) of a variant: 'offline' -> no refresh; 'N' -> --round-prompts M (N = 1: one batch);
    'NxM' -> refresh every N steps with M prompts per round."""
    if name == "offline":
        return 0, args.round_prompts
    if "x" in name:
        n, m = (int(x) for x in name.split("x"))
        return n, m
    n = int(name)
    return n, args.batch_seqs if n == 1 else args.round_prompts


def _mean(xs):
    return sum(xs) / len(xs) if xs else None


def report(results: list[dict], base: dict, kl0: dict, args, out: Path, machine_info: str) -> str:
    by = {r["variant"]: r for r in results}
    ref = by.get("1")
    lines = [f"machine: {machine_info}", "",
             f"steps {args.steps}, ~{args.batch_seqs} sequences/step, max_new_tokens {args.max_new_tokens}, lr {args.lr}, "
             f"base cache: {args.base_prompts} prompts ({base['student_tokens']} student + {base['teacher_tokens']} "
             f"teacher tokens, {base['gen_s']:.1f}s); held-out: {args.eval_prompts} prompts x "
             f"{args.eval_samples} samples; start KL "
             f"{kl0['kl']:.3f}, top-1 {kl0['top1']:.3f}", "",
             "| variant | N | lambda | rounds | held-out KL | KL reduction | vs on-policy | top-1 | student tok | "
             "teacher tok | gen cost vs on-policy (refresh tokens) | gen s (cpu s) | run wall s (cpu s) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        final = final_point(r)
        red = kl0["kl"] - final["kl"]
        rel = red / (kl0["kl"] - final_point(ref)["kl"]) if ref else None
        cost = (r["refresh_student_tokens"] + r["refresh_teacher_tokens"]) / (
            ref["refresh_student_tokens"] + ref["refresh_teacher_tokens"]) if ref and r["student_tokens"] else None
        lines.append(
            f"| {r['variant']} | {r['refresh_every'] or '-'} | {r['fraction'] if r['refresh_every'] else '-'} | "
            f"{r['rounds']} | {_kl(final)} | {red:.3f} | {_pct(rel)} | {final['top1']:.3f} | "
            f"{r['student_tokens'] or '-'} | {r['teacher_tokens'] or '-'} | {_pct(cost)} | "
            f"{r['gen_s']:.0f} ({r['gen_cpu_s']:.0f}) | "
            f"{r['train_wall_s']:.0f} ({r['train_cpu_s']:.0f}) |")
    lines += ["", "gen: base cache + refresh rounds; run: training including refresh, excluding evaluation. "
              "cpu s = process CPU time (all threads), steadier than wall-clock on a shared machine."]
    off = by.get("offline")
    for r in results:
        if not ref or r["variant"] in ("offline", "1", "trl", "trl-gkd"):
            continue
        kl = final_point(r)["kl"]
        rel = (kl0["kl"] - kl) / (kl0["kl"] - final_point(ref)["kl"])
        cost = (r["refresh_student_tokens"] + r["refresh_teacher_tokens"]) / (
            ref["refresh_student_tokens"] + ref["refresh_teacher_tokens"])
        beats = None if off is None else kl < final_point(off)["kl"]
        lines.append(f"goal check N={r['variant']}: {100 * rel:.0f}% of the on-policy KL reduction (>= 90%: "
                     f"{rel >= 0.9}) at {100 * cost:.0f}% of its refresh tokens (<= 30%: {cost <= 0.3}); "
                     f"final KL below offline: {beats}")
    lines += peer_table(results, base)
    text = "\n".join(lines)
    (out / "results.md").write_text(text + "\n")
    return text


def _arm_wall(r: dict, base: dict) -> float:
    """Wall-clock of an arm, evaluation excluded: kd pays for its base cache, TRL generates live."""
    return r["train_wall_s"] + (0.0 if r["variant"].startswith("trl") else base["gen_s"])


def _kl_not_before(curve: list[dict], t: float) -> tuple[float, float] | None:
    """(held-out KL, wall-clock) of the first evaluation of ``curve`` at or after wall-clock ``t``
    (never the step-0 one); None when the curve ends before ``t``. Interpolating instead would
    draw a straight line from the start KL to the first evaluation, far above a curve that
    drops early, and flatter whoever finished before the peer's first evaluation."""
    for c in curve:
        if c["step"] and c["train_s"] >= t:
            return c["kl"], c["train_s"]
    return None


def peer_table(results: list[dict], base: dict) -> list[str]:
    """Trained completion tokens/s of every arm, and KL at equal wall-clock against each TRL peer."""
    peers = [r for r in results if r["variant"].startswith("trl")]
    lines = ["", "| arm | trained completion tokens | wall s | trained tok/s | vs "
             + " | vs ".join(p["variant"] for p in peers) + " | final held-out KL | "
             + " | ".join(f"{p['variant']} KL once it had trained as long (at s)" for p in peers) + " |",
             "|---|---|---|---|" + "---|" * len(peers) + "---|" + "---|" * len(peers)]
    for r in results:
        wall, n = _arm_wall(r, base), r.get("trained_completion_tokens")
        rate = n / wall if n else None
        ratios = [f"{rate / (p['trained_completion_tokens'] / _arm_wall(p, base)):.2f}x"
                  if rate and p.get("trained_completion_tokens") else "-" for p in peers]
        at = []
        for p in peers:
            k = None if r is p else _kl_not_before(p["curve"], wall)
            at.append("-" if k is None else f"{k[0]:.3f} ({k[1]:.0f})")
        lines.append(f"| {r['variant']} | {n or '-'} | {wall:.0f} | {'-' if rate is None else f'{rate:.1f}'} | "
                     + " | ".join(ratios) + f" | {_kl(final_point(r))} | " + " | ".join(at) + " |")
    lines.append("wall s: kd arms include the base cache; evaluation excluded everywhere. 'KL once it had "
                 "trained as long': the peer's first evaluation at or after the wall-clock the arm took. "
                 "'± x': one standard error over the held-out sequences; final KLs are pooled over "
                 + ", ".join(sorted({f"{final_point(r).get('evaluations', 1)}" for r in results}))
                 + " evaluation(s) of the final student (--final-eval-seeds).")
    return lines


def _kl(point: dict) -> str:
    """A held-out KL with its standard error when the evaluation recorded one."""
    se = point.get("kl_se")
    return f"{point['kl']:.3f}" + ("" if se is None else f" ± {se:.3f}")


def _pct(x):
    return "-" if x is None else f"{100 * x:.0f}%"


def _label(r: dict) -> str:
    named = {"offline": "offline", "1": "on-policy (N=1)", "trl": "TRL DistillationTrainer",
             "trl-gkd": "TRL GKDTrainer (lambda=1)"}
    if r["variant"] in named:
        return named[r["variant"]]
    return f"refresh N={r['refresh_every']}, M={r['round_prompts']}, lambda={r['fraction']}"


def plot(results: list[dict], base: dict, out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 3, figsize=(16, 8.4))
    later = [c["kl"] for r in results for c in r["curve"] if c["step"]]
    for row, zoom in enumerate((False, True)):
        a, b, c_ = axes[row]
        for r in results:
            steps = [c["step"] for c in r["curve"]]
            kls = [c["kl"] for c in r["curve"]]
            a.plot(steps, kls, marker="o", label=_label(r))
            start, start_cpu = (0.0, 0.0) if r["variant"].startswith("trl") else (base["gen_s"], base["gen_cpu_s"])
            b.plot([start + c["train_s"] for c in r["curve"]], kls, marker="o", label=_label(r))
            c_.plot([start_cpu + c["train_cpu_s"] for c in r["curve"]], kls, marker="o", label=_label(r))
        a.set_xlabel("optimizer steps")
        b.set_xlabel("wall-clock s (base cache + training + refresh)")
        c_.set_xlabel("process CPU s (same; all threads)")
        for ax in (a, b, c_):
            ax.set_ylabel("held-out KL(teacher || student), nats/token" + (" (zoom)" if zoom else ""))
            ax.grid(alpha=0.3)
            if zoom and later:
                pad = 0.1 * (max(later) - min(later)) + 1e-3
                ax.set_ylim(min(later) - pad, max(later) + pad)
        if not zoom:
            a.legend()
    fig.suptitle("kd train --refresh-every N: KL on student-generated held-out prompts (evaluation time excluded)")
    fig.tight_layout()
    path = out / "refresh.png"
    fig.savefig(path, dpi=120)
    return path


def main(argv=None) -> None:
    args = parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    from kd.stages import models

    out = Path(args.out)
    if args.report_only:
        saved = json.loads((out / "results.json").read_text())
        vars(args).update(saved["settings"])
        print(report(saved["results"], saved["base"], saved["start"], args, out, saved["machine"]))
        print(f"plot: {plot(saved['results'], saved['base'], out)}")
        return
    if args.final_eval_only:
        saved = json.loads((out / "results.json").read_text())
        vars(args).update(saved["settings"])
        tokenizer = models.load_tokenizer(models.default_teacher_dir())
        teacher = models.load_model(models.default_teacher_dir(), device="cpu", dtype="float32")
        wanted = {v.strip() for v in args.variants.split(",")}
        for r in saved["results"]:
            if r["variant"] in wanted:
                final_eval(args, out, r, teacher, tokenizer, out / "prompts-heldout.jsonl")
        (out / "results.json").write_text(json.dumps(saved, indent=2))
        print(report(saved["results"], saved["base"], saved["start"], args, out, saved["machine"]))
        return
    out.mkdir(parents=True, exist_ok=True)
    info = machine()
    print(f"machine: {info}", flush=True)
    teacher_dir, student_dir = models.default_teacher_dir(), models.default_student_dir()
    train_prompts, heldout_prompts = split_prompts(out)
    shared = {k: getattr(args, k) for k in ("steps", "batch_seqs", "round_prompts", "fraction", "max_staleness",
                                            "base_prompts", "max_new_tokens", "lr", "eval_prompts",
                                            "eval_samples", "eval_every", "peer_eval_every", "seed")}
    saved = json.loads((out / "results.json").read_text()) if (out / "results.json").exists() else {}
    if saved.get("settings") != shared:
        saved = {}
    tokenizer = models.load_tokenizer(teacher_dir)
    teacher = models.load_model(teacher_dir, device="cpu", dtype="float32")
    evaluator = HeldoutEval(teacher, tokenizer, heldout_prompts, args.eval_prompts, args.max_new_tokens, args.seed,
                            args.eval_samples)
    if saved:
        base, kl0 = saved["base"], saved["start"]
        print(f"reusing the base cache and step-0 evaluation of {out / 'results.json'}", flush=True)
    else:
        t = time.time()
        base = make_base_cache(args, out, train_prompts, teacher_dir, student_dir)
        print(f"base cache: {base} ({time.time() - t:.1f}s)", flush=True)
        kl0 = evaluator(models.load_model(student_dir, device="cpu", dtype="float32"))
        print(f"step 0: held-out KL {kl0['kl']:.3f}, top-1 {kl0['top1']:.3f} ({kl0['eval_s']:.1f}s)", flush=True)
    wanted = [v.strip() for v in args.variants.split(",")]
    results = [r for r in saved.get("results", []) if r["variant"] not in wanted]
    for name in wanted:
        t = time.time()
        if name in ("trl", "trl-gkd"):
            try:
                import trl  # noqa: F401
            except ImportError:
                print(f"{name}: skipped (not installed; `pip install --no-deps trl`)", flush=True)
                continue
            results.append(_trl_arm(args, out, name, train_prompts, teacher_dir, student_dir, evaluator, kl0))
        else:
            results.append(run_variant(args, name, out, base, train_prompts, student_dir, evaluator, kl0))
        print(f"{name}: {time.time() - t:.1f}s", flush=True)
        final_eval(args, out, results[-1], teacher, tokenizer, heldout_prompts)
        results.sort(key=_order)
        (out / "results.json").write_text(json.dumps(
            {"machine": info, "settings": shared, "base": base, "start": kl0, "results": results}, indent=2))
    print(report(results, base, kl0, args, out, info))
    print(f"plot: {plot(results, base, out)}")


if __name__ == "__main__":
    main()
