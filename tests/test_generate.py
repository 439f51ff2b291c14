"""`kd generate`: what lands in the cache, that it is reproducible and resumable, and every refusal.

Tiny random Llama teacher + depth-pruned student with a byte tokenizer
(``tiny_model_pair``), CPU only. References are dense fp32/fp64 forwards of the
same models; the cache is read back through ``LogitCache``.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import fields, replace
from pathlib import Path

import numpy as np
import pytest
import torch

from kd.stages import models
from kd.stages.generate.backend import SamplingParams
from kd.stages.generate.hf_backend import HfSampler, HfScorer, choose_tokens
from kd.stages.generate.prompts import PromptDataError, PromptSource
from kd.stages.generate.run import GenerateConfig, derive_seed, generate_shards, plan_shards, run
from kd.storage.batch import SequenceBatch
from kd.storage.cache import LogitCache
from kd.storage.errors import CacheError, ConfigError, FingerprintMismatchError
from kd.storage.format import SOURCE_CODE
from kd.storage.verify import verify_cache

pytestmark = pytest.mark.usefixtures("isolated_datasets_cache", "one_thread")

QUESTIONS = [
    "What is 2 + 2?", "Name a colour.", "Say hello.", "Count to three, please, slowly and clearly.",
    "Why is the sky blue?", "x", "Write one word.", "What is the capital of France?",
    "List two fruits and one vegetable.", "Is water wet?",
]


# ---------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """Plain prompts with reference completions, lengths varied so padding matters."""
    path = tmp_path_factory.mktemp("data") / "prompts.jsonl"
    rows = [{"prompt": q, "completion": f"Answer {i}: " + "ok " * (i % 4)} for i, q in enumerate(QUESTIONS)]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def make_config(pair, data, out, **kw) -> GenerateConfig:
    base = dict(data=str(data), out=str(out), student=str(pair.student), teacher=str(pair.teacher),
                k=8, shard_size=3, max_new_tokens=8, num_samples=2, progress=False)
    return GenerateConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def reference(pair, data, tmp_path_factory):
    """An uninterrupted single-worker run (default codec): what every other run must reproduce."""
    out = tmp_path_factory.mktemp("ref") / "cache"
    config = make_config(pair, data, out)
    summary = run(config)
    return config, read_all(out), summary


def read_all(url) -> SequenceBatch:
    cache = LogitCache.open(str(url))
    return SequenceBatch.concat([cache.read_shard(r).read() for r in cache.committed_shards()])


def shard_names(url) -> list[str]:
    return [r.name for r in LogitCache.open(str(url)).committed_shards()]


def assert_same_content(a: SequenceBatch, b: SequenceBatch) -> None:
    for f in fields(SequenceBatch):
        np.testing.assert_array_equal(getattr(a, f.name), getattr(b, f.name), err_msg=f.name)


@torch.no_grad()
def dense_logprobs(model, tokens) -> torch.Tensor:
    """(L, V) float64 log-softmax of one sequence, from a plain fp32 forward."""
    logits = model(torch.as_tensor(np.asarray(tokens, np.int64))[None]).logits[0]
    return torch.log_softmax(logits.double(), -1)


# ---------------------------------------------------------------- what lands in the cache
def test_student_samples_with_teacher_topk_match_dense_references(pair, data, tmp_path):
    out = tmp_path / "c"
    config = make_config(pair, data, out, codec="raw", limit=7, temperature=0.9, top_p=0.95)
    summary = run(config)
    assert shard_names(out) == ["r0000-p000000000-000000003", "r0000-p000000003-000000006",
                                "r0000-p000000006-000000007"]
    assert summary["sequences"] == 14 and summary["shards_written"] == 3
    b = read_all(out)
    np.testing.assert_array_equal(b.prompt_index, np.repeat(np.arange(7), 2))
    np.testing.assert_array_equal(b.sample_index, np.tile([0, 1], 7))
    assert (b.source == SOURCE_CODE["student"]).all() and (b.round == 0).all()

    tok = models.load_tokenizer(pair.teacher)
    prompts = PromptSource(str(data), tok).encode(0, 7)
    teacher_model = models.load_model(pair.teacher, device="cpu", dtype="float32")
    student_model = models.load_model(pair.student, device="cpu", dtype="float32")
    sampler = HfSampler(student_model, eos_token_ids=[tok.eos_token_id], pad_token_id=tok.pad_token_id)
    po = b.pos_offsets
    for i in range(b.num_sequences):
        seq, c = b.sequence_tokens(i), int(b.completion_start[i])
        row = prompts.rows[int(b.prompt_index[i])]
        np.testing.assert_array_equal(seq[:c], row.prompt_ids)  # loss mask starts after the prompt
        completion = seq[c:]
        assert 1 <= len(completion) <= 8 and po[i + 1] - po[i] == len(completion)
        assert tok.eos_token_id not in completion[:-1]
        assert len(completion) == 8 or completion[-1] == tok.eos_token_id
        # the completion is exactly what this row's own seed samples, alone in its batch
        alone = sampler.sample([row.prompt_ids], config.sampling(),
                               [derive_seed(0, 0, int(b.prompt_index[i]), int(b.sample_index[i]))])[0]
        np.testing.assert_array_equal(alone.token_ids, completion)

        rows = slice(po[i], po[i + 1])
        student_lp = dense_logprobs(student_model, seq)[c - 1 : -1]  # (P, V)
        targets = torch.as_tensor(completion.astype(np.int64))[:, None]
        np.testing.assert_allclose(b.behaviour_logprobs[rows], student_lp.gather(1, targets)[:, 0], atol=1e-4)

        teacher_lp = dense_logprobs(teacher_model, seq)[c - 1 : -1]
        top_lp, top_ids = teacher_lp.topk(config.k, -1)
        order = np.argsort(b.topk_ids[rows], 1)  # stored in any order
        np.testing.assert_array_equal(np.take_along_axis(b.topk_ids[rows], order, 1),
                                      np.sort(top_ids.numpy(), 1))
        stored = {(j, t): lp for j in range(len(completion))
                  for t, lp in zip(b.topk_ids[rows][j], b.topk_logprobs[rows][j])}
        for j in range(len(completion)):
            for t, lp in zip(top_ids[j].tolist(), top_lp[j].tolist()):
                assert abs(stored[(j, t)] - lp) < 1e-4
        tail = torch.log1p(-top_lp.exp().sum(-1))
        np.testing.assert_allclose(b.tail_logprobs[rows], tail.numpy(), atol=1e-4, rtol=1e-4)
        np.testing.assert_allclose(b.target_logprobs[rows], teacher_lp.gather(1, targets)[:, 0], atol=1e-4)

    prov = LogitCache.open(str(out)).committed_shards()[1].provenance
    assert prov["source"] == "student" and prov["round"] == 0 and prov["student_step"] == 0
    assert prov["sampling"] == {"temperature": 0.9, "top_p": 0.95, "max_new_tokens": 8, "seed": 0, "num_samples": 2}
    assert prov["dataset"] == {"path": str(data.resolve()), "split": "train", "rows": [3, 6]}
    assert prov["teacher"] == "teacher" and prov["student"] == str(pair.student)
    assert prov["backend"] == "hf" and prov["kd_version"] and prov["created_at"]


def test_teacher_source_greedy_samples_the_teacher_argmax(pair, data, tmp_path):
    student = tmp_path / "checkpoint"  # a trainer checkpoint: its step goes into the provenance
    shutil.copytree(pair.student, student)
    (student / "trainer_state.json").write_text(json.dumps({"global_step": 42}))
    out = tmp_path / "c"
    run(make_config(pair, data, out, source="teacher", temperature=0.0, num_samples=1, codec="raw",
                    student=str(student)))
    assert LogitCache.open(str(out)).committed_shards()[0].provenance["student_step"] == 42
    b = read_all(out)
    assert (b.source == SOURCE_CODE["teacher"]).all()
    assert np.isnan(b.behaviour_logprobs).all()  # only student samples carry a behaviour log-prob
    # Greedy teacher tokens are the teacher's own top-1 at every position.
    np.testing.assert_allclose(b.target_logprobs, b.topk_logprobs.max(1), atol=1e-6)


def test_dataset_source_scores_the_data_completions(pair, tmp_path):
    path = tmp_path / "chat.jsonl"
    rows = [
        {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi?"},
                      {"role": "assistant", "content": "Hello."}]},
        {"messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]},
    ]
    path.write_text("\n".join(json.dumps(r) for r in rows))
    out = tmp_path / "c"
    run(make_config(pair, path, out, source="dataset", num_samples=1))
    b = read_all(out)
    tok = models.load_tokenizer(pair.teacher)
    for i, row in enumerate(rows):
        prompt = tok.apply_chat_template(row["messages"][:-1], tokenize=False, add_generation_prompt=True)
        seq = b.sequence_tokens(i)
        assert tok.decode(seq[: b.completion_start[i]]) == prompt
        assert tok.decode(seq[b.completion_start[i]:]) == row["messages"][-1]["content"] + "<|im_end|>"
    assert (b.source == SOURCE_CODE["dataset"]).all() and np.isnan(b.behaviour_logprobs).all()
    assert np.isfinite(b.target_logprobs).all()


def test_rows_mix_plain_prompts_and_chat_messages(pair, tmp_path):
    path = _write(tmp_path / "mixed.jsonl", [
        {"prompt": "Hi?"},
        {"messages": [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hello."}]},
    ])
    tok = models.load_tokenizer(pair.teacher)
    a, b = PromptSource(str(path), tok).encode(0, 2).rows
    # a plain prompt is one user turn; a trailing assistant turn is not part of the prompt
    assert a.prompt_ids == b.prompt_ids == tok("<|im_start|>user\nHi?<|im_end|>\n<|im_start|>assistant\n")["input_ids"]


def test_plain_prompts_without_chat_template(pair, data, tmp_path):
    out = tmp_path / "c"
    run(make_config(pair, data, out, chat_template=False, limit=2, num_samples=1))
    b = read_all(out)
    tok = models.load_tokenizer(pair.teacher)
    assert tok.decode(b.sequence_tokens(0)[: b.completion_start[0]], skip_special_tokens=True) == QUESTIONS[0]


# ---------------------------------------------------------------- backend maths
def test_inverse_cdf_sampling_follows_the_distribution():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0, -30.0]]).repeat(4000, 1)
    logprobs = torch.log_softmax(logits, -1)
    u = (torch.arange(4000, dtype=torch.float64) + 0.5) / 4000  # a uniform grid: exact frequencies
    for params in (SamplingParams(temperature=1.0), SamplingParams(temperature=0.5, top_p=0.8)):
        freq = torch.bincount(choose_tokens(logprobs, params, u), minlength=5).double() / 4000
        want = torch.softmax(logits[0] / params.temperature, -1).double()
        if params.top_p < 1:
            keep = (want.cumsum(0) - want) < params.top_p
            want = want * keep / (want * keep).sum()
        np.testing.assert_allclose(freq.numpy(), want.numpy(), atol=1 / 4000 + 1e-9)
    assert choose_tokens(logprobs[:1], SamplingParams(temperature=0.0), u[:1]).item() == 0


def test_batched_equals_unbatched(pair):
    """Left-padded sampling and right-padded, length-bucketed scoring do not depend on batching."""
    tok = models.load_tokenizer(pair.teacher)
    student = models.load_model(pair.student, device="cpu", dtype="float32")
    teacher = models.load_model(pair.teacher, device="cpu", dtype="float32")
    prompts = [tok(q)["input_ids"] for q in QUESTIONS]  # 1 to 43 tokens
    seeds = list(range(100, 100 + len(prompts)))
    params = SamplingParams(temperature=1.0, top_p=0.9, max_new_tokens=12)
    runs = [HfSampler(student, eos_token_ids=[tok.eos_token_id], pad_token_id=tok.pad_token_id, batch_size=bs)
            .sample(prompts, params, seeds) for bs in (1, 4, 16)]
    for other in runs[1:]:
        for a, c in zip(runs[0], other):
            np.testing.assert_array_equal(a.token_ids, c.token_ids)
            np.testing.assert_allclose(a.logprobs, c.logprobs, rtol=1e-5, atol=1e-5)
    seqs = [p + c.token_ids.tolist() for p, c in zip(prompts, runs[0])]
    starts = [len(p) for p in prompts]
    one = HfScorer(teacher, batch_size=1).score(seqs, starts, 8)
    many = HfScorer(teacher, batch_size=64, max_batch_tokens=10_000).score(seqs, starts, 8)
    assert len(HfScorer(teacher, max_batch_tokens=100).buckets([len(s) for s in seqs])) > 1
    for a, c in zip(one, many):
        np.testing.assert_array_equal(a.topk_ids, c.topk_ids)
        for name in ("topk_logprobs", "tail_logprobs", "target_logprobs"):
            np.testing.assert_allclose(getattr(a, name), getattr(c, name), rtol=1e-5, atol=1e-5)


def test_tiny_tails_are_exact(pair):
    """k = V - 1 leaves one token in the tail: its log-prob, not log1p(-sum) rounding noise."""
    teacher = models.load_model(pair.teacher, device="cpu", dtype="float32")
    vocab = teacher.config.vocab_size
    seq = list(range(4, 24))
    got = HfScorer(teacher).score([seq], [10], vocab - 1)[0]
    lp = dense_logprobs(teacher, seq)[9:-1]
    np.testing.assert_allclose(got.tail_logprobs, lp.min(-1).values.numpy(), rtol=1e-5)
    assert (got.tail_logprobs < -5).all()
    full = HfScorer(teacher).score([seq], [10], vocab)[0]
    assert np.isneginf(full.tail_logprobs).all()


# ---------------------------------------------------------------- reproducibility
def test_same_seed_same_cache_and_batch_size_does_not_matter(pair, data, reference, tmp_path):
    config, ref, _ = reference
    run(replace(config, out=str(tmp_path / "again")))
    assert_same_content(read_all(tmp_path / "again"), ref)

    run(replace(config, out=str(tmp_path / "bs1"), batch_size=1, score_batch_tokens=32))
    other = read_all(tmp_path / "bs1")
    for name in ("token_ids", "seq_offsets", "completion_start", "topk_ids", "prompt_index", "sample_index"):
        np.testing.assert_array_equal(getattr(other, name), getattr(ref, name), err_msg=name)
    for name in ("topk_logprobs", "tail_logprobs", "target_logprobs", "behaviour_logprobs"):
        np.testing.assert_allclose(getattr(other, name), getattr(ref, name), atol=2e-2, err_msg=name)

    run(replace(config, out=str(tmp_path / "seed1"), seed=1))
    assert not np.array_equal(read_all(tmp_path / "seed1").token_ids, ref.token_ids)


def test_offload_mode_and_library_call_give_the_same_cache(pair, data, reference, tmp_path):
    config, ref, _ = reference
    summary = run(replace(config, out=str(tmp_path / "off"), offload="on", offload_group=2))
    assert summary["offload"] is True
    assert_same_content(read_all(tmp_path / "off"), ref)

    # the on-policy refresh path: in-memory models, no CLI config
    tok = models.load_tokenizer(pair.teacher)
    student = models.load_model(pair.student, device="cpu", dtype="float32").train()  # a live trainer model
    teacher = models.load_model(pair.teacher, device="cpu", dtype="float32")
    cache = LogitCache.create(str(tmp_path / "lib"), LogitCache.open(config.out).fingerprint)
    generate_shards(
        PromptSource(str(data), tok), HfSampler(student, eos_token_ids=[tok.eos_token_id], pad_token_id=tok.pad_token_id),
        HfScorer(teacher, batch_size=64, max_batch_tokens=config.score_batch_tokens, pad_token_id=tok.pad_token_id),
        cache, round=0, shard_size=3, params=config.sampling(), num_samples=2, progress=False,
    )
    assert_same_content(read_all(tmp_path / "lib"), ref)
    assert student.training  # sampled in eval mode, handed back in the mode it came in


def _cli_args(config: GenerateConfig) -> list[str]:
    return [sys.executable, "-m", "kd.cli", "generate", "--data", config.data, "--out", config.out,
            "--student", config.student, "--teacher", config.teacher, "--k", str(config.k),
            "--shard-size", str(config.shard_size), "--max-new-tokens", str(config.max_new_tokens),
            "--num-samples", str(config.num_samples), "--no-progress"]


def test_resume_after_sigkill_gives_the_uninterrupted_result(reference, tmp_path):
    config, ref, _ = reference
    total = len(shard_names(config.out))
    rng = np.random.default_rng(1234)
    partial = 0
    # trial 0 dies at a random moment early (start-up, cache creation); the others after a
    # random number of commits plus a random delay, often in the middle of writing a shard.
    for trial in range(3):
        out = tmp_path / f"t{trial}"
        cfg = replace(config, out=str(out))
        proc = subprocess.Popen(_cli_args(cfg), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                env={**os.environ, "OMP_NUM_THREADS": "1"})
        if trial == 0:
            time.sleep(rng.uniform(0.5, 4.0))
        else:
            wait_for = int(rng.integers(1, total))
            deadline = time.time() + 120
            while time.time() < deadline and proc.poll() is None:
                done = list((out / "commits").glob("*.json")) if (out / "commits").exists() else []
                if len(done) >= wait_for:
                    break
                time.sleep(0.02)
            time.sleep(rng.uniform(0.0, 0.3))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        committed = len(shard_names(out)) if (out / "zarr.json").exists() else 0
        partial += 0 < committed < total
        summary = run(cfg)  # rerun the same command
        assert summary["shards_already_committed"] == committed
        assert shard_names(out) == shard_names(config.out)
        assert_same_content(read_all(out), ref)
        assert verify_cache(str(out)).ok
    assert partial >= 1, "no trial was killed in the middle of a run"


def test_workers_split_shards_disjointly(reference, tmp_path, monkeypatch):
    config, ref, _ = reference
    out = tmp_path / "w"
    written = []
    for worker in range(3):
        summary = run(replace(config, out=str(out), worker=worker, num_workers=3))
        written.append(summary["shards_written"])
        names = shard_names(out)
    assert written == [len(plan_shards(0, 10, 3, 0, w, 3)) for w in range(3)] == [2, 1, 1]
    assert names == shard_names(config.out)
    assert_same_content(read_all(out), ref)
    monkeypatch.setenv("RANK", "2")
    monkeypatch.setenv("WORLD_SIZE", "3")
    assert config.workers() == (2, 3)
    assert [p.name for p in plan_shards(0, 10, 3, 0, 2, 3)] == ["r0000-p000000006-000000009"]


# ---------------------------------------------------------------- refusals
def test_tokenizer_mismatch_is_refused_before_anything(pair, data, tmp_path):
    other = tmp_path / "other-student"
    shutil.copytree(pair.student, other)
    tok = models.load_tokenizer(other)
    tok.chat_template = tok.chat_template.replace("<|im_start|>", "<|im_start|> ")
    tok.save_pretrained(other)
    with pytest.raises(FingerprintMismatchError) as err:
        run(make_config(pair, data, tmp_path / "c", student=str(other)))
    assert str(other) in str(err.value) and str(pair.teacher) in str(err.value)
    assert not (tmp_path / "c").exists()


def test_append_with_another_k_or_codec_is_refused_before_model_compute(pair, data, reference, monkeypatch):
    config, ref, _ = reference

    def no_models(*a, **kw):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(models, "load_model", no_models)
    with pytest.raises(FingerprintMismatchError, match="k: 8 vs 4"):
        run(replace(config, k=4))
    with pytest.raises(FingerprintMismatchError, match="codec"):
        run(replace(config, codec="raw"))
    # the same settings resume without loading anything: every shard is committed
    assert run(config)["shards_written"] == 0
    with pytest.raises(ConfigError, match="temperature"):
        run(replace(config, temperature=0.5))  # committed shards were sampled differently
    with pytest.raises(ConfigError, match="overlap"):
        run(replace(config, shard_size=4))
    assert_same_content(read_all(config.out), ref)


def test_config_lists_every_problem_at_once():
    bad = GenerateConfig(data="", out="", source="nobody", k=0, temperature=-1.0, top_p=1.5,
                         max_new_tokens=0, num_samples=0, shard_size=0, worker=3, num_workers=2,
                         long_prompts="chop", backend="tgi", codec="zip", offload="maybe")
    with pytest.raises(ConfigError) as err:
        bad.validate()
    for flag in ("--data", "--out", "--source", "--k", "--temperature", "--top-p", "--max-new-tokens",
                 "--num-samples", "--shard-size", "--worker", "--long-prompts", "--backend", "--codec",
                 "--offload"):
        assert flag in str(err.value), flag
    with pytest.raises(ConfigError, match="--num-samples"):
        GenerateConfig(data="d", out="o", source="dataset", num_samples=2).validate()


def _write(path: Path, rows) -> Path:
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


@pytest.mark.parametrize("bad_row, needle", [
    ({"prompt": "   "}, "row 4: the prompt in 'prompt' is empty"),
    ({"other": "no prompt here"}, "row 4: field 'prompt' is missing"),
])
def test_bad_rows_name_the_row_and_keep_committed_shards(pair, tmp_path, bad_row, needle):
    rows = [{"prompt": q} for q in QUESTIONS[:6]]
    rows[4] = bad_row
    data = _write(tmp_path / "p.jsonl", rows)
    out = tmp_path / "c"
    with pytest.raises(PromptDataError) as err:
        run(make_config(pair, data, out, num_samples=1))
    assert needle in str(err.value) and str(data) in str(err.value)
    assert shard_names(out) == ["r0000-p000000000-000000003"]  # rows 3-5 hold the bad row
    assert verify_cache(str(out)).ok and read_all(out).num_sequences == 3


def test_non_utf8_file_is_named_with_its_line(pair, tmp_path):
    data = tmp_path / "latin1.jsonl"
    data.write_bytes(b'{"prompt": "ok"}\n{"prompt": "fine"}\n{"prompt": "caf\xe9"}\n')
    with pytest.raises(PromptDataError, match=r"latin1.jsonl is not valid UTF-8 \(line 3"):
        run(make_config(pair, data, tmp_path / "c"))
    assert not (tmp_path / "c").exists()


def test_missing_inputs_are_clear(pair, data, tmp_path):
    with pytest.raises(ConfigError, match="no such folder"):
        run(make_config(pair, data, tmp_path / "c", teacher=str(tmp_path / "nope")))
    with pytest.raises(PromptDataError, match="does not exist"):
        run(make_config(pair, tmp_path / "missing.jsonl", tmp_path / "c"))
    with pytest.raises(PromptDataError, match="no column 'question'"):
        run(make_config(pair, data, tmp_path / "c", prompt_field="question"))
    t0 = time.time()
    with pytest.raises(PromptDataError, match="local Hugging Face cache"):
        run(make_config(pair, "nobody-kd/no-such-dataset", tmp_path / "c"))
    assert time.time() - t0 < 30  # offline: no network wait
    assert not (tmp_path / "c").exists()


def test_long_prompts_are_truncated_left_or_skipped_and_counted(pair, data, tmp_path):
    tok = models.load_tokenizer(pair.teacher)
    full = PromptSource(str(data), tok).encode(0, 10).rows
    limit = 40
    long_rows = [r.row for r in full if len(r.prompt_ids) > limit]
    assert 0 < len(long_rows) < 10
    summary = run(make_config(pair, data, tmp_path / "t", max_prompt_tokens=limit, num_samples=1))
    assert summary["prompts_truncated"] == len(long_rows)
    b = read_all(tmp_path / "t")
    for i in range(b.num_sequences):
        row = full[int(b.prompt_index[i])]
        np.testing.assert_array_equal(b.sequence_tokens(i)[: b.completion_start[i]], row.prompt_ids[-limit:])
    summary = run(make_config(pair, data, tmp_path / "s", max_prompt_tokens=limit, num_samples=1,
                              long_prompts="skip"))
    assert summary["prompts_skipped_too_long"] == len(long_rows)
    b = read_all(tmp_path / "s")
    assert sorted(set(b.prompt_index.tolist()) | set(long_rows)) == list(range(10))
    skipped = [r.provenance["prompts_skipped_too_long"] for r in LogitCache.open(str(tmp_path / "s")).committed_shards()]
    assert sorted(sum(skipped, [])) == long_rows


def test_full_disk_is_a_clear_error_and_the_rerun_completes(pair, data, reference, tmp_path, monkeypatch):
    import zarr.storage

    config, ref, _ = reference
    out = tmp_path / "full"
    real_set = zarr.storage.LocalStore.set

    async def full_disk(self, key, value):
        if "p000000003" in key:
            raise OSError(errno.ENOSPC, "No space left on device")
        return await real_set(self, key, value)

    monkeypatch.setattr(zarr.storage.LocalStore, "set", full_disk)
    with pytest.raises(CacheError, match="no space left .* shard r0000-p000000003-000000006"):
        run(replace(config, out=str(out)))
    assert shard_names(out) == ["r0000-p000000000-000000003"] and verify_cache(str(out)).ok
    monkeypatch.setattr(zarr.storage.LocalStore, "set", real_set)
    run(replace(config, out=str(out)))
    assert_same_content(read_all(out), ref)


# ---------------------------------------------------------------- CLI
def test_cli_has_one_flag_per_config_field_and_exits_2_on_bad_flags(tmp_path):
    from typer.testing import CliRunner

    from kd.cli import app

    runner = CliRunner()
    result = runner.invoke(app, ["generate", "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0
    for f in fields(GenerateConfig):
        assert f"--{f.name.replace('_', '-')}" in result.output, f.name
    result = runner.invoke(app, ["generate", "--data", "d", "--out", str(tmp_path / "c"), "--top-p", "0",
                                 "--k", "0"])
    assert result.exit_code == 2
    assert "--top-p" in result.output and "--k" in result.output


# ---------------------------------------------------------------- the real teacher
@pytest.mark.slow
def test_embedded_teacher_end_to_end(tmp_path):
    data = _write(tmp_path / "p.jsonl", [{"prompt": "What is the capital of France?"},
                                         {"messages": [{"role": "user", "content": "Say hi."}]}])
    out = tmp_path / "c"
    summary = run(GenerateConfig(data=str(data), out=str(out), source="teacher", temperature=0.0,
                                 max_new_tokens=12, k=16, progress=False))
    assert summary["sequences"] == 2
    b = read_all(out)
    tok = models.load_tokenizer(models.resolve_model_path("default", "teacher"))
    answer = tok.decode(b.sequence_tokens(0)[b.completion_start[0]:])
    assert "Paris" in answer
    np.testing.assert_allclose(b.target_logprobs, b.topk_logprobs.max(1), atol=2e-2)  # greedy = teacher top-1
    summary = run(GenerateConfig(data=str(data), out=str(out), max_new_tokens=12, k=16, round=1,
                                 progress=False))  # default student samples
    b = read_all(out)
    assert (b.round == 1).sum() == 2 and np.isfinite(b.behaviour_logprobs[b.pos_offsets[2]:]).all()


def test_a_split_column_partitions_a_single_file(tmp_path):
    """The shipped prompts carry a `split` column: generate/train/eval all see the same partition."""
    from kd.stages.generate.prompts import PromptDataError, open_dataset

    path = tmp_path / "p.jsonl"
    rows = [{"prompt": f"q{i}", "split": "heldout" if i % 3 == 0 else "train"} for i in range(9)]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    assert open_dataset(str(path), "train")["prompt"] == [r["prompt"] for r in rows if r["split"] == "train"]
    assert open_dataset(str(path), "heldout")["prompt"] == ["q0", "q3", "q6"]
    with pytest.raises(PromptDataError, match="values present are \\['heldout', 'train'\\]"):
        open_dataset(str(path), "test")


def test_vllm_options_are_parsed_and_bad_ones_refused_before_anything(tmp_path):
    """--vllm-options: kd's engine arguments by name, the rest for vllm.LLM; refusals name the flag."""
    from typer.testing import CliRunner

    from kd.cli import app
    from kd.stages.generate.vllm_backend import parse_engine_options

    assert parse_engine_options("") == {}
    assert parse_engine_options('{"enforce_eager": true, "kv_cache_memory_bytes": 1048576, "swap_space": 2}') == {
        "enforce_eager": True, "kv_cache_memory_bytes": 1048576, "engine_kwargs": {"swap_space": 2}}
    for text, needle in [('{"enforce_eager": tru}', "not valid JSON"), ("[1, 2]", "must be a JSON object"),
                         ('{"logprobs_mode": "processed_logprobs"}', "'logprobs_mode' is set by kd"),
                         ('{"enable_prefix_caching": true}', "cached prefixes get no prompt log-probs")]:
        with pytest.raises(ValueError, match=re.escape(needle)):
            parse_engine_options(text)
    out = tmp_path / "c"
    result = CliRunner().invoke(app, ["generate", "--data", "d", "--out", str(out), "--backend", "vllm",
                                      "--vllm-options", '{"seed": 3}'])
    assert result.exit_code == 2
    assert "--vllm-options: 'seed' is set by kd (use --seed)" in result.output
    assert not out.exists()
    result = CliRunner().invoke(app, ["generate", "--data", "d", "--out", str(out), "--vllm-options",
                                      '{"enforce_eager": true}'])  # with the default --backend hf
    assert result.exit_code == 2 and "--vllm-options: only applies to --backend vllm" in result.output
    result = CliRunner().invoke(app, ["train", "--cache", str(out), "--out", str(tmp_path / "r"),
                                      "--refresh-vllm-options", "{"])
    assert result.exit_code == 2 and "--refresh-vllm-options: not valid JSON" in result.output
    result = CliRunner().invoke(app, ["train", "--cache", str(out), "--out", str(tmp_path / "r"),
                                      "--refresh-vllm-options", '{"enforce_eager": true}'])
    assert result.exit_code == 2
    assert "--refresh-vllm-options: only applies to --refresh-backend vllm" in " ".join(result.output.split())
    assert not (tmp_path / "r").exists()
