"""`kd eval` (exact held-out KL, top-1, perplexity on fresh samples) and `kd report` (plots + report.md).

Eval runs on the tiny random Llama pair (``tiny_model_pair``: 4-layer teacher,
2-layer pruned student, byte tokenizer) on CPU. Its numbers are checked against
plain transformers forward passes in float64, one unpadded sequence at a time;
the samples are reproduced with the generate stage's sampler (tested in
test_generate.py) and the seed rule ``eval_seed``, and the greedy --show answers
with ``model.generate``. Report runs on a synthetic metrics.jsonl and on a real
tiny generate -> train -> eval run.
"""

from __future__ import annotations

import json
import math
import random
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from kd.cli import app
from kd.stages import models
from kd.stages.eval import (
    EvalConfig,
    eval_seed,
    format_results,
    position_sums,
    run,
    shared_vocabulary,
)
from kd.stages.generate.backend import SamplingParams
from kd.stages.generate.hf_backend import HfSampler
from kd.stages.report import ReportConfig, ReportError
from kd.stages.report import run as report
from kd.storage.errors import ConfigError, KdError
from typer.testing import CliRunner

pytestmark = pytest.mark.usefixtures("isolated_datasets_cache", "one_thread")

runner = CliRunner()
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
# (prompt, split): the held-out rows are not a prefix of the file; rows (and seeds) are indexed
# within their split, as generate and train index them
PROMPTS = [
    ("What is 2 + 2?", "train"), ("Name a colour, and say why you like it.", "heldout"),
    ("Say hello.", "train"), ("Why is the sky blue?", "heldout"), ("x", "heldout"),
    ("Count to three.", "train"), ("Write one word about the sea and the sky.", "heldout"),
]
HELDOUT_ROWS = [i for i, (_, s) in enumerate(PROMPTS) if s == "heldout"]


# ---------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "prompts.jsonl"
    path.write_text("".join(json.dumps({"prompt": p, "split": s}) + "\n" for p, s in PROMPTS))
    return path


def eval_config(pair, data, **kw) -> EvalConfig:
    base = {"student": str(pair.student), "teacher": str(pair.teacher), "data": str(data), "max_new_tokens": 12,
            "seed": 3, "batch_size": 2, "score_batch_tokens": 64, "device": "cpu", "progress": False}
    return EvalConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def evaluated(pair, data, tmp_path_factory):
    out = tmp_path_factory.mktemp("eval-out")
    return run(eval_config(pair, data, show=2, out=str(out))), out


# ---------------------------------------------------------------- the reference
@torch.no_grad()
def dense_logprobs(model, tokens) -> torch.Tensor:
    """(L, V) float64 log-softmax of one unpadded sequence, from a plain forward."""
    return torch.log_softmax(model(torch.tensor([tokens])).logits[0].double(), -1)


def direct_metrics(teacher, student, prompts, completions) -> dict:
    """KL(p || q), top-1 agreement and NLLs by plain forwards, token-weighted over all positions."""
    kl = agree = s_nll = t_nll = n = 0.0
    for prompt, completion in zip(prompts, completions):
        seq, c = prompt + completion, len(prompt)
        t = dense_logprobs(teacher, seq)[c - 1 : -1]  # (P, V): row j predicts seq[c + j]
        s = dense_logprobs(student, seq)[c - 1 : -1]
        target = torch.tensor(completion)[:, None]
        kl += float((t.exp() * (t - s)).sum())
        agree += float((t.argmax(-1) == s.argmax(-1)).sum())
        s_nll -= float(s.gather(-1, target).sum())
        t_nll -= float(t.gather(-1, target).sum())
        n += len(completion)
    return {"kl": kl / n, "top1": agree / n, "student_nll": s_nll / n, "teacher_nll": t_nll / n,
            "student_ppl": math.exp(s_nll / n), "teacher_ppl": math.exp(t_nll / n), "positions": int(n)}


def encode(tokenizer, text: str) -> list[int]:
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                             add_generation_prompt=True)
    return tokenizer(rendered, add_special_tokens=False)["input_ids"]


# ---------------------------------------------------------------- kd eval
def test_eval_matches_a_direct_computation(pair, evaluated):
    result, _ = evaluated
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(pair.teacher)
    teacher = AutoModelForCausalLM.from_pretrained(pair.teacher, dtype=torch.float32).eval()
    student = AutoModelForCausalLM.from_pretrained(pair.student, dtype=torch.float32).eval()
    prompts = [encode(tokenizer, PROMPTS[r][0]) for r in HELDOUT_ROWS]
    seeds = [eval_seed(3, i) for i in range(len(HELDOUT_ROWS))]  # seeded by the row's index in its split
    params = SamplingParams(temperature=1.0, top_p=1.0, max_new_tokens=12)
    assert result["prompts"] == len(HELDOUT_ROWS)
    for name, model in (("student", student), ("teacher", teacher)):
        # the batches eval used (batch_size 2): another batch size may flip a token that sits on a
        # CDF boundary in the last float bit (hf_backend docstring), which is not what is tested here
        sampler = HfSampler(model, eos_token_ids=[tokenizer.eos_token_id], pad_token_id=tokenizer.pad_token_id,
                            batch_size=2)
        completions = [c.token_ids.tolist() for c in sampler.sample(prompts, params, seeds)]
        want = direct_metrics(teacher, student, prompts, completions)
        got = result[f"{name}_samples"]
        for key in ("kl", "top1", "student_nll", "teacher_nll", "student_ppl", "teacher_ppl"):
            assert got[key] == pytest.approx(want[key], rel=2e-5, abs=2e-5), (name, key)
        assert got["positions"] == want["positions"] and got["sequences"] == len(prompts)
        assert got["mean_completion_tokens"] == pytest.approx(want["positions"] / len(prompts))
    # a random pruned student is far from its teacher: the numbers are not trivially 0 / 1
    assert result["student_samples"]["kl"] > 1.0 and result["student_samples"]["top1"] < 0.5

    # --show: greedy answers, checked against transformers' own greedy decoding
    assert [e["row"] for e in result["examples"]] == [0, 1]  # rows are indexed within the split
    for example, prompt in zip(result["examples"], prompts):
        assert example["prompt"] == PROMPTS[HELDOUT_ROWS[example["row"]]][0]
        for name, model in (("student", student), ("teacher", teacher)):
            ids = model.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=12,
                                 eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
            answer = tokenizer.decode(ids[0, len(prompt):].tolist(), skip_special_tokens=True).strip()
            assert example[name] == answer, name


def test_eval_is_deterministic_for_a_seed_and_writes_its_json(pair, data, evaluated):
    first, out = evaluated
    again = run(eval_config(pair, data, show=2))
    other = run(eval_config(pair, data, seed=4))
    for key in ("student_samples", "teacher_samples", "examples"):
        assert again[key] == first[key], key
    assert other["student_samples"]["kl"] != first["student_samples"]["kl"]
    written = Path(first["out"])
    assert written == out / f"eval_{Path(pair.student).name}.json"
    assert json.loads(written.read_text()) == json.loads(json.dumps(first))
    text = format_results(first, width=100)
    assert "KL(teacher || student)" in text and f"{first['student_samples']['kl']:.4f}" in text
    assert "student (greedy)" in text and PROMPTS[HELDOUT_ROWS[0]][0] in text


def test_position_sums_properties():
    g = torch.Generator().manual_seed(0)
    t = torch.log_softmax(torch.randn(7, 11, generator=g, dtype=torch.float64) * 3, -1)
    s = torch.log_softmax(torch.randn(7, 11, generator=g, dtype=torch.float64) * 3, -1)
    targets = torch.randint(0, 11, (7,), generator=g)
    same = position_sums(t, t, targets)
    assert same[0].item() == pytest.approx(0.0, abs=1e-6) and same[1].item() == 7 and same[4].item() == 7
    kl, _, s_nll, t_nll, _ = position_sums(t, s, targets).tolist()
    assert kl == pytest.approx(float((t.exp() * (t - s)).sum()), rel=1e-5)
    assert s_nll == pytest.approx(-float(s[torch.arange(7), targets].sum()), rel=1e-5)
    assert t_nll == pytest.approx(-float(t[torch.arange(7), targets].sum()), rel=1e-5)
    # a zero teacher probability contributes nothing (0 log 0 = 0), even where the student has -inf
    t0 = t.clone()
    t0[:, -1] = float("-inf")
    t0 = torch.log_softmax(t0, -1)
    s0 = s.clone()
    s0[:, -1] = float("-inf")
    assert math.isfinite(position_sums(t0, s0, targets)[0].item())
    # heads of different sizes: compared over the shared ids, renormalized
    tt, ss = shared_vocabulary(t, torch.log_softmax(torch.cat([s, s[:, :3]], -1), -1))
    assert tt.shape == ss.shape == (7, 11)
    torch.testing.assert_close(ss.exp().sum(-1), torch.ones(7, dtype=torch.float64))


def test_cli_eval_json_parses_and_matches_the_file(pair, data, tmp_path):
    out = tmp_path / "results.json"
    result = runner.invoke(app, ["eval", "--student", str(pair.student), "--teacher", str(pair.teacher),
                                 "--data", str(data), "--samples", "student", "--max-new-tokens", "5",
                                 "--limit", "2", "--device", "cpu", "--no-progress", "--json", "--out", str(out)])
    assert result.exit_code == 0, result.output
    printed = json.loads(result.stdout)
    assert printed == json.loads(out.read_text())
    assert printed["prompts"] == 2 and "teacher_samples" not in printed
    assert printed["kl_over"] == "full vocabulary (exact)"
    assert set(printed["student_samples"]) >= {"kl", "top1", "student_ppl", "teacher_ppl", "positions"}


def test_eval_refusals_are_clear(pair, data):
    with pytest.raises(ConfigError) as err:
        EvalConfig(student=" ", limit=0, samples="all", temperature=-1.0, top_p=0.0, device="tpu",
                   dtype="fp8", show=-1).validate()
    for flag in ("--student", "--limit", "--samples", "--temperature", "--top-p", "--device", "--dtype", "--show"):
        assert flag in str(err.value)
    with pytest.raises(ConfigError, match="--samples: 'none' scores nothing"):
        EvalConfig(student="default", samples="none").validate()
    result = runner.invoke(app, ["eval", "--student", str(pair.student), "--teacher", str(pair.teacher),
                                 "--data", str(data), "--split", "test", "--no-progress"])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "no row has 'split' == 'test'" in result.output and "['heldout', 'train']" in result.output
    result = runner.invoke(app, ["eval", "--student", str(pair.teacher.parent), "--no-progress"])
    assert result.exit_code == 2 and "error:" in result.output and "config.json" in result.output


# ---------------------------------------------------------------- kd report
def synthetic_metrics(path: Path, steps: int = 300, eval_every: int = 50, staleness: bool = True) -> list[dict]:
    """A metrics.jsonl shaped like kd train's: decaying losses with noise, a resume pause at 2/3."""
    rng = random.Random(0)
    t, records = 1.7e9, []

    def heldout(step):
        kl = 3.0 * math.exp(-step / 120) + 0.6
        records.append({"kind": "eval", "step": step, "split": "heldout", "kl": kl, "top1": 0.9 - kl / 10,
                        "ce": 2.0 + kl / 3, "positions": 4096, "time": t})

    heldout(0)
    for step in range(1, steps + 1):
        t += 0.8 + 0.1 * rng.random() + (300.0 if step == 2 * steps // 3 else 0.0)
        div = 3.0 * math.exp(-step / 120) + 0.6 + rng.gauss(0, 0.1)
        records.append({
            "kind": "train", "step": step, "loss": div + 0.24, "loss_divergence": div,
            "loss_ce": 2.4 + rng.gauss(0, 0.1), "lr": 1e-4 * min(1.0, step / 30), "grad_norm": 1 + rng.random(),
            "tokens": 16384, "loss_positions": 12000, "tokens_per_s": 20000 + rng.gauss(0, 900),
            "step_s": 0.8, "data_wait_s": 0.01 * rng.random(),
            "staleness": (step % 50) + 1 if staleness else None, "time": t, "elapsed_s": 0.0,
        })
        if step % eval_every == 0:
            heldout(step)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return records


def assert_valid_png(path: Path, min_bytes: int = 10_000) -> None:
    import matplotlib.image

    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC, path
    assert len(data) > min_bytes, (path, len(data))
    pixels = matplotlib.image.imread(path)
    assert pixels.ndim == 3 and pixels.shape[0] >= 400 and pixels.shape[1] >= 600, pixels.shape
    assert float(np.std(pixels)) > 0.05, path  # something is drawn, not a blank canvas


def markdown_images(report_md: Path) -> list[str]:
    import re

    return re.findall(r"!\[[^\]]*\]\(([^)]+)\)", report_md.read_text())


def test_report_draws_valid_pngs_and_a_markdown_summary(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    records = synthetic_metrics(run_dir / "metrics.jsonl")
    (run_dir / "eval_step-00000300.json").write_text(json.dumps({
        "kind": "kd-eval", "student_step": 300, "prompts": 54,
        "student_samples": {"kl": 1.23456, "top1": 0.61, "student_ppl": 3.2},
        "teacher_samples": {"kl": 1.5, "top1": 0.58, "student_ppl": 4.75}}))
    summary = report(ReportConfig(run_dir=str(run_dir)))
    out = run_dir / "report"
    names = {Path(p).name for p in summary["plots"]}
    assert names == {"loss.png", "heldout.png", "throughput.png", "optimizer.png", "staleness.png", "eval.png"}
    for name in names:
        assert_valid_png(out / name)
    md = out / "report.md"
    assert sorted(markdown_images(md)) == sorted(names)
    text = md.read_text()
    evals = [r for r in records if r["kind"] == "eval"]
    assert f"| step {evals[0]['step']} | step {evals[-1]['step']} |" in text
    assert f"{evals[0]['kl']:.4f}" in text and f"{evals[-1]['kl']:.4f}" in text
    assert f"{evals[-1]['kl'] - evals[0]['kl']:+.4f}" in text
    assert "1.2346" in text and "4.75" in text  # the eval_*.json row


def test_report_skips_what_a_run_did_not_log(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    synthetic_metrics(run_dir / "metrics.jsonl", steps=20, eval_every=10, staleness=False)
    summary = report(ReportConfig(run_dir=str(run_dir), out=str(tmp_path / "elsewhere")))
    names = {Path(p).name for p in summary["plots"]}
    assert "staleness.png" not in names and "eval.png" not in names and "loss.png" in names
    text = (tmp_path / "elsewhere" / "report.md").read_text()
    assert "_Not drawn: no such data in this run._" in text
    assert "None in the run folder" in text
    for name in names:
        assert_valid_png(tmp_path / "elsewhere" / name)


def test_report_errors_are_clear(tmp_path, monkeypatch):
    empty = tmp_path / "empty"
    empty.mkdir()
    result = runner.invoke(app, ["report", str(empty)])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "no metrics.jsonl" in result.output and "kd train --out" in result.output
    result = runner.invoke(app, ["report", str(tmp_path / "missing")])
    assert result.exit_code == 2 and "is not a folder" in result.output
    (empty / "metrics.jsonl").write_text('{"kind": "train", "step": 1, "loss": 2.0}\n{"kind": "tra')
    with pytest.raises(ReportError, match="line 2: not valid JSON"):
        report(ReportConfig(run_dir=str(empty)))
    (empty / "metrics.jsonl").write_text('{"kind": "train", "step": 1, "loss": 2.0}\n')
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if the 'plot' extra were not installed
    with pytest.raises(KdError, match=r"pip install 'kd\[plot\]'"):
        report(ReportConfig(run_dir=str(empty)))


def test_generate_train_eval_report_end_to_end(pair, data, tmp_path):
    """The real metrics.jsonl and eval JSON formats, through the CLI."""
    from kd.stages.generate.run import GenerateConfig
    from kd.stages.generate.run import run as generate
    from kd.stages.train.run import TrainConfig
    from kd.stages.train.run import run as train

    generate(GenerateConfig(data=str(data), out=str(tmp_path / "cache"), student=str(pair.student),
                            teacher=str(pair.teacher), k=16, max_new_tokens=10, num_samples=2, shard_size=4,
                            progress=False))
    run_dir = tmp_path / "run"
    train(TrainConfig(cache=str(tmp_path / "cache"), out=str(run_dir), student=str(pair.student), steps=6,
                      lr=1e-2, warmup=1, batch_tokens=256, eval_every=3, eval_batches=1, save_every=6,
                      # the 3 train-split prompts: 0.6 holds out prompts 1 and 2 (by hash)
                      heldout_fraction=0.6, loader_workers=1, progress=False))
    result = runner.invoke(app, ["eval", "--student", str(run_dir), "--teacher", str(pair.teacher),
                                 "--data", str(data), "--max-new-tokens", "6", "--device", "cpu",
                                 "--no-progress", "--out", str(run_dir)])
    assert result.exit_code == 0, result.output
    written = run_dir / "eval_step-00000006.json"
    assert json.loads(written.read_text())["student_step"] == 6
    result = runner.invoke(app, ["report", str(run_dir)])
    assert result.exit_code == 0, result.output
    out = run_dir / "report"
    for name in ("loss.png", "heldout.png", "throughput.png", "optimizer.png", "eval.png"):
        assert_valid_png(out / name, min_bytes=5_000)
    text = (out / "report.md").read_text()
    assert "| step 0 | step 6 |" in text and "`eval_step-00000006.json` | 6 |" in text


def test_cli_help_lists_eval_and_report():
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for command in ("eval", "report"):
        assert command in result.output
    result = runner.invoke(app, ["eval", "--help"], terminal_width=200)
    for flag in ("--student", "--teacher", "--data", "--split", "--limit", "--json", "--show", "--out", "--seed"):
        assert flag in result.output, flag
    result = runner.invoke(app, ["report", "--help"], terminal_width=200)
    usage = next(line for line in result.output.splitlines() if "Usage:" in line)
    assert result.exit_code == 0 and "RUN_DIR" in usage and "metrics.jsonl" in result.output
