"""``kd train``: exact resume, atomic checkpoints, metrics, held-out eval, refusals, DDP on gloo.

Everything runs on CPU with the tiny random Llama pair of ``kd.stages.models``
(4-layer teacher, its 2-layer pruned student, byte-level tokenizer) and a cache
the test scores with the teacher itself (teacher forcing on random token
sequences, raw codec so the teacher data is exact).
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from kd.stages import models
from kd.stages.train import checkpoint as ckpt
from kd.stages.train.loader import CacheLoader
from kd.stages.train.losses import LossConfig
from kd.stages.train.run import DistillStep, TrainConfig, evaluate, lr_at, run
from kd.storage.batch import SequenceBatch
from kd.storage.cache import LogitCache
from kd.storage.errors import ConfigError, FingerprintMismatchError
from kd.storage.format import CacheFingerprint, CodecConfig, TeacherFingerprint

pytestmark = pytest.mark.usefixtures("one_thread")

K = 16


def _teacher_cache(url: str, teacher_dir: Path, num_sequences: int = 96, shards: int = 2) -> None:
    """Score random token sequences with the teacher: top-k, exact tail, target log-probs."""
    teacher = models.load_model(teacher_dir, device="cpu", dtype=torch.float32)
    tok_fp = models.tokenizer_fingerprint(models.load_tokenizer(teacher_dir), name="tiny",
                                          model_vocab_size=models.model_vocab_size(teacher_dir))
    cache = LogitCache.create(url, CacheFingerprint(TeacherFingerprint("tiny-teacher", "0" * 64), tok_fp, K,
                                                    CodecConfig(name="raw")))
    rng = np.random.default_rng(0)
    per = num_sequences // shards
    for s in range(shards):
        seqs = [rng.integers(4, 260, size=int(rng.integers(12, 40))) for _ in range(per)]
        starts = [int(rng.integers(1, len(x) // 2)) for x in seqs]
        padded = torch.zeros(per, max(map(len, seqs)), dtype=torch.long)  # right padding: causal, no mask needed
        for i, x in enumerate(seqs):
            padded[i, : len(x)] = torch.from_numpy(x)
        with torch.no_grad():
            logp_all = torch.log_softmax(teacher(padded).logits.double(), -1)  # (N, L, V)
        rows = [(i, t) for i, (x, c) in enumerate(zip(seqs, starts)) for t in range(c - 1, len(x) - 1)]
        logp = logp_all[[i for i, _ in rows], [t for _, t in rows]]  # (P, V), row j predicts token t + 1
        top = logp.topk(K, -1)
        tail = torch.logsumexp(logp.scatter(-1, top.indices, float("-inf")), -1)
        target_ids = padded[[i for i, _ in rows], [t + 1 for _, t in rows]]
        lengths = np.array([len(x) for x in seqs])
        cache.write_shard(f"r0000-s{s}", SequenceBatch(
            token_ids=np.concatenate(seqs).astype(np.int32),
            seq_offsets=np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
            completion_start=np.array(starts, np.int32),
            topk_ids=top.indices.numpy().astype(np.int32), topk_logprobs=top.values.numpy().astype(np.float32),
            tail_logprobs=tail.numpy().astype(np.float32),
            target_logprobs=logp.gather(-1, target_ids[:, None]).squeeze(-1).numpy().astype(np.float32),
            behaviour_logprobs=np.full(len(rows), np.nan, np.float32),
            source=np.full(per, 1, np.uint8), round=np.zeros(per, np.int32),
            prompt_index=np.arange(s * per, (s + 1) * per, dtype=np.int64), sample_index=np.zeros(per, np.int32),
        ), {"round": 0, "source": "teacher"})


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    teacher = models.tiny_model_pair(root / "pair").teacher
    student = models.tiny_model_pair(root / "other", seed=1).student  # same tokenizer, far from the teacher
    _teacher_cache(str(root / "cache"), teacher)
    base = TrainConfig(
        cache=str(root / "cache"), out=str(root / "run-a"), student=str(student), steps=20, lr=1e-2, warmup=2,
        batch_tokens=256, grad_accum=2, eval_every=10, eval_batches=2, save_every=5, keep=2,
        heldout_fraction=0.25, loader_workers=1, progress=False,
    )
    return {"root": root, "teacher": teacher, "student": student, "base": base}


@pytest.fixture(scope="module")
def straight(tiny):
    """20 steps without interruption (checkpoints every 5, keep 2)."""
    summary = run(tiny["base"])
    return {"config": tiny["base"], "summary": summary, "run_dir": Path(tiny["base"].out)}


def _metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


class _Crash(Exception):
    pass


def _crash_after(step: int):
    def hook(ctx):
        if ctx.step == step:
            raise _Crash(f"killed after step {step}")
    return hook


# ---------------------------------------------------------------- resume
def test_resume_is_bit_identical_to_an_uninterrupted_run(tiny, straight):
    config = replace(tiny["base"], out=str(tiny["root"] / "run-b"))
    with pytest.raises(_Crash):
        run(config, on_step=_crash_after(10))  # dies right after its step-10 checkpoint
    assert ckpt.latest_checkpoint(config.out).name == "step-00000010"
    summary = run(replace(config, resume=True))
    assert summary["resumed_from"] == 10 and summary["step"] == 20

    def losses(records):
        return [(r["kind"], r["step"], r.get("loss"), r.get("kl"), r.get("top1"), r.get("lr")) for r in records]

    a, b = _metrics(straight["run_dir"]), _metrics(Path(config.out))
    assert losses(a) == losses(b)  # exact float equality, step by step, eval included
    wa = load_file(straight["run_dir"] / "checkpoints/step-00000020/model.safetensors")
    wb = load_file(Path(config.out) / "checkpoints/step-00000020/model.safetensors")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    assert summary["weights_sha256"] == straight["summary"]["weights_sha256"]


def test_resume_refuses_changed_critical_options_and_names_them(straight):
    with pytest.raises(ConfigError) as err:
        run(replace(straight["config"], lr=1e-3, loss="reverse_kl", batch_tokens=512, steps=30, resume=True))
    message = str(err.value)
    for flag in ("--lr", "--loss", "--batch-tokens"):
        assert flag in message
    assert "--steps" not in message  # may change on resume
    with pytest.raises(ConfigError, match="--resume"):
        run(straight["config"])  # a fresh start into a run folder with checkpoints


# ---------------------------------------------------------------- checkpoints
def test_checkpoint_is_a_loadable_hf_folder_with_weights_only_trainer_state(straight):
    from transformers import AutoModelForCausalLM

    latest = ckpt.latest_checkpoint(straight["run_dir"])
    assert latest.name == "step-00000020"
    model = AutoModelForCausalLM.from_pretrained(latest, dtype=torch.float32)
    saved = load_file(latest / "model.safetensors")
    for name, tensor in model.state_dict().items():
        if name in saved:
            assert torch.equal(tensor, saved[name])
    assert models.load_tokenizer(latest) is not None
    state = torch.load(latest / ckpt.TRAINER_STATE, weights_only=True)  # no arbitrary unpickling
    assert state["step"] == 20 and state["config"]["lr"] == straight["config"].lr
    assert {"optimizer", "loader", "rng"} <= state.keys()
    assert json.loads((latest / ckpt.STATE_JSON).read_text())["global_step"] == 20


def test_keeps_only_the_last_k_checkpoints(straight):
    folder = straight["run_dir"] / "checkpoints"
    assert sorted(p.name for p in folder.iterdir()) == ["latest", "step-00000015", "step-00000020"]


def test_a_crash_while_writing_a_checkpoint_leaves_the_previous_one_latest(tiny, monkeypatch):
    config = replace(tiny["base"], out=str(tiny["root"] / "run-crash"), steps=3, save_every=1, keep=0,
                     eval_every=0)
    real_fsync, calls = ckpt._fsync_tree, []

    def dying_fsync(folder):  # files of the 2nd checkpoint are written, then the process "dies"
        calls.append(folder)
        if len(calls) == 2:
            raise _Crash("power cut while writing a checkpoint")
        real_fsync(folder)

    monkeypatch.setattr(ckpt, "_fsync_tree", dying_fsync)
    with pytest.raises(_Crash):
        run(config)
    folder = Path(config.out) / "checkpoints"
    assert ckpt.latest_checkpoint(config.out).name == "step-00000001"
    assert sorted(p.name for p in folder.iterdir() if not p.name.startswith(".")) == ["latest", "step-00000001"]

    # Dying after the rename but before `latest` moves: the orphan is never used, and is replaced.
    monkeypatch.setattr(ckpt, "_fsync_tree", real_fsync)
    real_pointer = ckpt._write_pointer
    monkeypatch.setattr(ckpt, "_write_pointer", lambda root, name: (_ for _ in ()).throw(_Crash("died")))
    with pytest.raises(_Crash):
        run(replace(config, resume=True))
    assert (folder / "step-00000002").is_dir() and ckpt.latest_checkpoint(config.out).name == "step-00000001"
    monkeypatch.setattr(ckpt, "_write_pointer", real_pointer)
    summary = run(replace(config, resume=True))
    assert summary["resumed_from"] == 1 and ckpt.latest_checkpoint(config.out).name == "step-00000003"
    assert [r["step"] for r in _metrics(Path(config.out))] == [1, 2, 3]  # lines of dead runs dropped


# ---------------------------------------------------------------- metrics and evaluation
def test_metrics_jsonl_has_one_line_per_step_and_per_eval(straight):
    records = _metrics(straight["run_dir"])
    train = [r for r in records if r["kind"] == "train"]
    assert [r["step"] for r in train] == list(range(1, 21))
    assert [r["step"] for r in records if r["kind"] == "eval"] == [0, 10, 20]
    config = straight["config"]
    for r in train:
        assert r["lr"] == pytest.approx(lr_at(r["step"] - 1, config))
        assert r["loss"] == pytest.approx(r["loss_divergence"])  # forward_kl, ce_weight 0
        assert r["tokens"] > 0 and r["tokens_per_s"] > 0 and r["grad_norm"] > 0 and r["data_wait_s"] >= 0
        assert r["staleness"] is None  # teacher data: no student_step in the provenance
        assert {"loss_ce", "step_s", "time", "elapsed_s", "loss_positions"} <= r.keys()


def test_training_brings_the_student_closer_to_the_teacher(straight):
    evals = [r for r in _metrics(straight["run_dir"]) if r["kind"] == "eval"]
    first, last = evals[0], evals[-1]
    assert first["positions"] == last["positions"] > 0  # the same held-out set each time
    assert last["kl"] < 0.9 * first["kl"]
    assert last["top1"] >= first["top1"]


def test_heldout_eval_matches_a_direct_computation(tiny):
    student = models.load_model(tiny["student"], device="cpu", dtype=torch.float32)
    loader = CacheLoader(tiny["base"].cache, tiny["base"].loader_config("heldout"))
    batches = list(loader.iter_epoch())
    loader.close()
    got = evaluate(DistillStep(student, LossConfig(), chunk_size=7), batches)

    kl = top1 = ce = n = 0.0
    with torch.no_grad():
        for b in batches:
            logits = student(input_ids=b.input_ids, attention_mask=b.attention_mask).logits[b.loss_rows, b.loss_cols]
            logq = torch.log_softmax(logits.double(), -1)  # (M, V)
            p, logp = b.topk_logprobs.double().exp(), b.topk_logprobs.double()
            q_top = logq.gather(-1, b.topk_ids).exp()
            p_tail, q_tail = 1 - p.sum(-1), 1 - q_top.sum(-1)
            kl += ((p * (logp - q_top.log())).sum(-1) + p_tail * (p_tail.log() - q_tail.log())).sum().item()
            top1 += (logits.argmax(-1) == b.topk_ids[torch.arange(len(p)), logp.argmax(-1)]).sum().item()
            ce += -logq.gather(-1, b.target_ids[:, None]).sum().item()
            n += len(p)
    assert got["positions"] == n > 0
    assert got["kl"] == pytest.approx(kl / n, rel=1e-4)
    assert got["top1"] == pytest.approx(top1 / n)
    assert got["ce"] == pytest.approx(ce / n, rel=1e-5)


def test_rng_states_round_trip_through_a_weights_only_load(tmp_path):
    import random

    ckpt.restore_rng_state(ckpt.capture_rng_state())  # restoring the current state changes nothing
    state = ckpt.capture_rng_state()
    torch.save(state, tmp_path / "rng.pt")
    first = (random.random(), np.random.rand(), torch.rand(3))
    ckpt.restore_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    again = (random.random(), np.random.rand(), torch.rand(3))
    assert first[:2] == again[:2] and torch.equal(first[2], again[2])


# ---------------------------------------------------------------- refusals and config
def test_a_cache_with_another_tokenizer_is_refused_before_any_compute(tiny, tmp_path, monkeypatch,
                                                                     make_batch, make_fingerprint):
    url = str(tmp_path / "other")
    LogitCache.create(url, make_fingerprint(tok="f" * 64)).write_shard(
        "s0", make_batch(np.random.default_rng(0)), {"round": 0})

    def no_compute(*args, **kwargs):
        raise AssertionError("the student was loaded before the tokenizer check")

    monkeypatch.setattr(models, "load_model", no_compute)
    with pytest.raises(FingerprintMismatchError) as err:
        run(replace(tiny["base"], cache=url, out=str(tmp_path / "run")))
    student_fp = models.tokenizer_fingerprint(models.load_tokenizer(tiny["student"]))
    message = str(err.value)
    assert "tiny-tok" in message and "ffffffffffff" in message  # the cache's tokenizer
    assert "student" in message and student_fp.sha256[:12] in message  # the student's
    assert not (tmp_path / "run").exists()


def test_config_validation_lists_every_problem_at_once(tmp_path):
    config = TrainConfig(cache="", out=str(tmp_path), steps=0, lr=-1.0, warmup=-1, grad_accum=0, clip=-1.0,
                         loss="nope", beta=2.0, heldout_fraction=1.5, device="tpu", dtype="fp8", keep=-1)
    with pytest.raises(ConfigError) as err:
        config.validate()
    for flag in ("--cache", "--steps", "--lr", "--warmup", "--grad-accum", "--clip", "--loss", "--beta",
                 "--heldout-fraction", "--device", "--dtype", "--keep"):
        assert flag in str(err.value), flag
    TrainConfig(cache="c", out="o").validate()  # the defaults are valid
    if importlib.util.find_spec("tensorboard") is None:
        with pytest.raises(ConfigError, match="pip install tensorboard"):
            TrainConfig(cache="c", out="o", tensorboard=True).validate()
    assert TrainConfig.from_dict(json.loads(TrainConfig(cache="c", out="o").to_json())) == TrainConfig(cache="c", out="o")


def test_cli_help_lists_every_option_and_a_cli_run_trains(tiny, tmp_path):
    from dataclasses import fields

    from kd.cli import app

    runner = CliRunner()
    result = runner.invoke(app, ["train", "--help"], env={"COLUMNS": "300"})
    assert result.exit_code == 0
    for f in fields(TrainConfig):
        assert f"--{f.name.replace('_', '-')}" in result.output, f.name
    b = tiny["base"]
    result = runner.invoke(app, ["train", "--cache", b.cache, "--out", str(tmp_path / "cli"), "--student",
                                 b.student, "--steps", "2", "--warmup", "0", "--batch-tokens", "256",
                                 "--heldout-fraction", "0.25", "--eval-every", "0", "--no-progress"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output[result.output.index("{"):])["step"] == 2
    result = runner.invoke(app, ["train", "--cache", b.cache, "--out", str(tmp_path / "x"), "--steps", "0"])
    assert result.exit_code == 2 and "--steps" in result.output


# ---------------------------------------------------------------- two processes
_WORKER = """
import json, os, sys
import torch.distributed as dist
from kd.stages.train.run import TrainConfig, run
dist.init_process_group("gloo")  # once for both runs (run() uses a group that is already up)
for name, config in json.loads(sys.argv[1]).items():
    summary = run(TrainConfig.from_dict(config))
    with open(os.path.join(sys.argv[2], f"{name}-rank{os.environ['RANK']}.json"), "w") as f:
        json.dump(summary, f)
dist.destroy_process_group()
"""


@pytest.mark.distributed
def test_two_gloo_processes_ddp_and_fsdp_agree_and_match_one_process(tiny, tmp_path):
    ddp = replace(tiny["base"], out=str(tmp_path / "ddp"), steps=4, grad_accum=1, eval_every=2, save_every=2,
                  loader_workers=0)
    fsdp = replace(ddp, out=str(tmp_path / "fsdp"), fsdp=True)
    worker = tmp_path / "worker.py"
    worker.write_text(_WORKER)
    configs = json.dumps({"ddp": ddp.to_dict(), "fsdp": fsdp.to_dict()})
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           str(worker), configs, str(tmp_path)]
    out = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-4000:]
    run(replace(ddp, out=str(tmp_path / "single"), grad_accum=2))  # one process, the same global batch size

    summaries = {(n, r): json.loads((tmp_path / f"{n}-rank{r}.json").read_text()) for n in ("ddp", "fsdp") for r in (0, 1)}
    assert summaries["ddp", 0]["weights_sha256"] == summaries["ddp", 1]["weights_sha256"]
    ddp_records, fsdp_records = _metrics(tmp_path / "ddp"), _metrics(tmp_path / "fsdp")
    assert [r["step"] for r in ddp_records if r["kind"] == "train"] == [1, 2, 3, 4]  # rank 0 writes alone
    assert ckpt.latest_checkpoint(tmp_path / "ddp").name == "step-00000004"
    # FSDP2 shards what DDP replicates: the same maths, up to float reduction order
    for a, b in zip(ddp_records, fsdp_records):
        assert a.get("loss", a.get("kl")) == pytest.approx(b.get("loss", b.get("kl")), rel=1e-5)
    w_ddp = load_file(tmp_path / "ddp/checkpoints/step-00000004/model.safetensors")
    w_fsdp = load_file(tmp_path / "fsdp/checkpoints/step-00000004/model.safetensors")
    assert w_ddp.keys() == w_fsdp.keys()  # tied embeddings written once, as by DDP
    assert all(torch.allclose(w_ddp[k], w_fsdp[k], rtol=1e-4, atol=1e-4) for k in w_ddp)
    # one process with grad_accum 2 sees other sequences per step (ranks read contiguous pieces)
    ddp_loss = np.mean([r["loss"] for r in ddp_records if r["kind"] == "train"])
    one_loss = np.mean([r["loss"] for r in _metrics(tmp_path / "single") if r["kind"] == "train"])
    assert ddp_loss == pytest.approx(one_loss, rel=0.15)
