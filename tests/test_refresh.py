"""On-policy refresh (``kd train --refresh-every N``): rounds, provenance, the lambda mix, sync and
async modes, and resume in the middle of a refresh.

Everything runs on CPU with the tiny random Llama pair of ``kd.stages.models`` and a base cache
of teacher-written completions (source "teacher"), so every sequence a refresh adds is told
apart by its source ("student") and round. The raw codec keeps behaviour log-probs exact.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from kd.stages import models
from kd.stages.generate.run import GenerateConfig
from kd.stages.generate.run import run as generate
from kd.stages.train import refresh as refresh_mod
from kd.stages.train.loader import CacheLoader, LoaderConfig
from kd.stages.train.mix import MixLoader, split_budget
from kd.stages.train.refresh import Round, RefreshError, round_plans, round_ranges, select_mix, sync_shard_rows
from kd.stages.train.run import TrainConfig, run
from kd.storage.batch import SequenceBatch
from kd.storage.cache import LogitCache
from kd.storage.format import SOURCE_CODE, CacheFingerprint, CodecConfig, TeacherFingerprint, TokenizerFingerprint
from kd.storage.verify import verify_cache

pytestmark = pytest.mark.usefixtures("isolated_datasets_cache", "one_thread")

STUDENT, TEACHER = SOURCE_CODE["student"], SOURCE_CODE["teacher"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """Tiny pair, 20 prompts, a base cache of teacher completions, and a config to copy."""
    root = tmp_path_factory.mktemp("refresh")
    pair = models.tiny_model_pair(root / "pair")
    prompts = root / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"Question {i}: what is {i} plus {3 * i}?"}) + "\n"
                               for i in range(20)))
    generate(GenerateConfig(data=str(prompts), out=str(root / "base"), student=str(pair.student),
                            teacher=str(pair.teacher), source="teacher", k=8, max_new_tokens=8, shard_size=5,
                            codec="raw", progress=False))
    config = TrainConfig(
        cache="", out="", student=str(pair.student), steps=6, lr=1e-2, warmup=1, batch_tokens=256,
        eval_every=0, heldout_fraction=0.0, save_every=0, keep=0, loader_workers=0, progress=False,
        refresh_every=2, refresh_prompts=6, prompts=str(prompts), teacher=str(pair.teacher), max_new_tokens=8,
        on_policy_fraction=0.5,
    )
    return {"root": root, "pair": pair, "prompts": prompts, "config": config}


def fresh(setup, tmp_path, name="run", **changes) -> TrainConfig:
    """The base config on a private copy of the base cache (refresh rounds are written into it)."""
    cache = tmp_path / f"{name}-cache"
    shutil.copytree(setup["root"] / "base", cache)
    return replace(setup["config"], cache=str(cache), out=str(tmp_path / name), **changes)


def metrics(run_dir) -> list[dict]:
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def refresh_records(cache_url) -> dict[str, dict]:
    cache = LogitCache.open(cache_url)
    return {r.name: r.provenance for r in cache.committed_shards() if "refresh" in r.provenance}


# ---------------------------------------------------------------- pure parts
def test_round_rows_cycle_through_the_data_without_gaps_or_repeats():
    n, m = 20, 6
    rows = [row for r in range(1, 11) for lo, hi in round_ranges(r, m, n) for row in range(lo, hi)]
    assert rows == [i % n for i in range(10 * m)]  # round r: rows [(r-1)M, rM) mod n
    assert round_ranges(4, 6, 20) == [(18, 20), (0, 4)]
    plans = round_plans(4, 6, 20)
    assert [p.name for p in plans] == ["r0004-p000000018-000000020", "r0004-p000000000-000000004"]
    with pytest.raises(ValueError):
        round_ranges(1, 21, 20)


@pytest.mark.parametrize("m,world,rows", [(4, 1, 256), (4, 2, 2), (6, 4, 2), (512, 8, 64), (4096, 8, 256)])
def test_sync_rounds_give_every_rank_a_share(m, world, rows):
    """Under DDP a round of M prompts is cut so that no rank samples more than ceil(M / ranks) rows."""
    assert sync_shard_rows(m, world) == rows
    plans = round_plans(1, m, 10_000, rows)
    assert sum(p.row_end - p.row_start for p in plans) == m
    load = [sum(p.row_end - p.row_start for p in plans if p.index % world == rank) for rank in range(world)]
    assert max(load) == -(-m // world)


def test_select_mix_puts_the_freshest_round_on_policy_and_drops_stale_rounds():
    rounds = {1: Round(1, 0, ("a1",), True), 2: Round(2, 4, ("a2",), True), 3: Round(3, 8, ("a3",), True),
              4: Round(4, 12, ("a4",), False)}  # round 4 is not complete yet
    on, replay, fresh = select_mix(["b0"], rounds, step=9, max_staleness=None)
    assert (on, replay, fresh.round) == (["a3"], ["b0", "a1", "a2"], 3)
    on, replay, _ = select_mix(["b0"], rounds, step=9, max_staleness=5)
    assert (on, replay) == (["a3"], ["b0", "a2"])  # round 1 is 9 steps old
    on, replay, fresh = select_mix(["b0"], rounds, step=9, max_staleness=None, newest=2)
    assert (on, replay, fresh.round) == (["a2"], ["b0", "a1"], 2)
    assert select_mix(["b0"], {}, step=0, max_staleness=None) == ([], ["b0"], None)


def test_split_budget():
    assert split_budget(256, 0.25, True, True) == {"on_policy": 64, "replay": 192}
    assert split_budget(256, 0.25, False, True) == {"on_policy": 0, "replay": 256}  # no round yet
    assert split_budget(256, 0.25, True, False) == {"on_policy": 256, "replay": 0}
    assert split_budget(256, 1.0, True, True) == {"on_policy": 256, "replay": 0}


# ---------------------------------------------------------------- the mix
def _uniform_cache(url: str, length: int = 16) -> LogitCache:
    """2 base shards (teacher, round 0) and 2 rounds (student) of equal-length sequences."""
    rng = np.random.default_rng(0)
    fp = CacheFingerprint(TeacherFingerprint("t", "0" * 64), TokenizerFingerprint("a" * 64, 64), 4,
                          CodecConfig(name="raw"))
    cache = LogitCache.create(url, fp)
    for name, source, round_ in (("b0", TEACHER, 0), ("b1", TEACHER, 0), ("r1", STUDENT, 1), ("r2", STUDENT, 2)):
        n, c = 48, 6
        p = n * (length - c)
        lp = np.log(np.full((p, 4), 0.2, np.float32))
        cache.write_shard(name, SequenceBatch(
            token_ids=rng.integers(0, 64, n * length).astype(np.int32),
            seq_offsets=np.arange(n + 1, dtype=np.int64) * length, completion_start=np.full(n, c, np.int32),
            topk_ids=np.tile(np.arange(4, dtype=np.int32), (p, 1)), topk_logprobs=lp,
            tail_logprobs=np.full(p, np.log(0.2), np.float32), target_logprobs=np.full(p, -1.0, np.float32),
            behaviour_logprobs=np.full(p, np.nan, np.float32), source=np.full(n, source, np.uint8),
            round=np.full(n, round_, np.int32), prompt_index=np.arange(n, dtype=np.int64),
            sample_index=np.zeros(n, np.int32)), {"round": round_})
    return cache


@pytest.mark.parametrize("fraction,per_batch", [(0.25, (4, 12)), (0.5, (8, 8)), (1.0, (16, 0))])
def test_every_batch_holds_the_lambda_share_of_on_policy_sequences(tmp_path, fraction, per_batch):
    cache = _uniform_cache(str(tmp_path / "c"))
    loader = MixLoader(cache, LoaderConfig(max_tokens_per_batch=256, num_workers=0), fraction)
    loader.set_shards(on_policy=["r2"], replay=["b0", "b1", "r1"])
    sources = set()
    for _ in range(24):  # two epochs of the on-policy stream
        batch = next(loader)
        on = int((batch.round == 2).sum())
        assert (on, batch.input_ids.shape[0] - on) == per_batch
        assert set(batch.round[:on].tolist()) <= {2} and 2 not in batch.round[on:].tolist()
        sources |= set(batch.source[on:].tolist())
    assert sources == ({TEACHER, STUDENT} if fraction < 1 else set())  # replay: base and the older round
    loader.close()


def test_lambda_zero_reads_every_shard_as_replay(tmp_path):
    cache = _uniform_cache(str(tmp_path / "c"))
    loader = MixLoader(cache, LoaderConfig(max_tokens_per_batch=256, num_workers=0), 0.0)
    loader.set_shards(on_policy=["r2"], replay=["b0", "b1", "r1"])
    assert loader.shards == {"on_policy": [], "replay": ["b0", "b1", "r1", "r2"]}
    rounds = torch.cat([next(loader).round for _ in range(12)])  # one epoch: 192 sequences
    assert torch.bincount(rounds).tolist() == [96, 48, 48]
    loader.close()


def test_mix_state_resumes_to_the_same_batches(tmp_path):
    cache = _uniform_cache(str(tmp_path / "c"))
    config = LoaderConfig(max_tokens_per_batch=256, num_workers=1)
    a = MixLoader(cache, config, 0.25)
    a.set_shards(["r2"], ["b0", "b1", "r1"])
    for _ in range(7):
        next(a)
    state = json.loads(json.dumps(a.state_dict()))  # it must survive a checkpoint round trip
    expected = [next(a) for _ in range(8)]
    b = MixLoader(cache, config, 0.25)
    b.load_state_dict(state)
    for want, got in zip(expected, (next(b) for _ in range(8))):
        assert torch.equal(want.input_ids, got.input_ids) and torch.equal(want.round, got.round)
    a.close()
    b.close()


def test_without_rounds_the_mix_reads_exactly_a_plain_cache_loader(tmp_path):
    cache = _uniform_cache(str(tmp_path / "c"))
    config = LoaderConfig(max_tokens_per_batch=256, num_workers=0)
    mix = MixLoader(cache, config, 0.5)
    mix.set_shards([], cache.committed_shard_names())
    plain = CacheLoader(cache, config)
    for _ in range(10):
        assert torch.equal(next(mix).input_ids, next(plain).input_ids)


# ---------------------------------------------------------------- sync refresh
def test_sync_refresh_writes_rounds_with_provenance_and_trains_on_them(setup, tmp_path):
    config = fresh(setup, tmp_path)
    summary = run(config)
    assert summary["step"] == 6
    records = refresh_records(config.cache)
    run_id = json.loads((Path(config.out) / "refresh.json").read_text())["run_id"]
    by_round = {p["round"]: p for p in records.values()}
    assert sorted(by_round) == [1, 2, 3]  # refreshes at steps 0, 2, 4
    for r, p in by_round.items():
        assert p["student_step"] == p["refresh"]["student_step"] == 2 * (r - 1)
        assert p["source"] == "student" and p["refresh"]["run_id"] == run_id and p["refresh"]["mode"] == "sync"
        assert p["dataset"]["rows"] == [6 * (r - 1), 6 * r]
        if r > 1:  # no checkpoint at steps 2 and 4 (--save-every 0)
            assert p["student"].endswith(f"(in memory at step {2 * (r - 1)})")
    assert by_round[1]["student"].endswith("step-00000000") and Path(by_round[1]["student"]).is_dir()
    cache = LogitCache.open(config.cache)
    for name in records:
        batch = cache.read_shard(name).read()
        assert (batch.source == STUDENT).all() and not np.isnan(batch.behaviour_logprobs).any()
    assert verify_cache(config.cache).ok
    lines = metrics(config.out)
    assert [(m["step"], m["round"]) for m in lines if m["kind"] == "refresh"] == [(0, 1), (2, 2), (4, 3)]
    stale = [m["staleness"] for m in lines if m["kind"] == "train"]
    assert stale[0] == 0 and all(s is not None and 0 <= s <= 3 for s in stale)


def test_fully_on_policy_trains_each_step_on_samples_of_the_weights_it_updates(setup, tmp_path):
    config = fresh(setup, tmp_path, refresh_every=1, on_policy_fraction=1.0, steps=4, refresh_prompts=4,
                   token_reverse_kl_weight=0.5, importance_clip=2.0)
    run(config)
    lines = metrics(config.out)
    assert [m["round"] for m in lines if m["kind"] == "refresh"] == [1, 2, 3, 4]
    train = [m for m in lines if m["kind"] == "train"]
    assert [m["staleness"] for m in train] == [0.0] * 4
    # off-policy correction is wired: fresh samples have ratio q_now / q_behaviour = 1
    assert all(m["loss_importance_weight"] == pytest.approx(1.0, abs=1e-4) for m in train)


def test_importance_ratios_move_away_from_one_on_stale_samples(setup, tmp_path):
    config = fresh(setup, tmp_path, refresh_every=4, on_policy_fraction=1.0, steps=4, refresh_prompts=4,
                   token_reverse_kl_weight=0.5, importance_clip=3.0)
    run(config)
    weights = [m["loss_importance_weight"] for m in metrics(config.out) if m["kind"] == "train"]
    assert weights[0] == pytest.approx(1.0, abs=1e-4) and abs(weights[-1] - 1.0) > 1e-3
    assert all(0 < w <= 3.0 for w in weights)


def test_offline_and_on_policy_runs_share_one_path(setup, tmp_path, monkeypatch):
    """No refresh: the Refresher and MixLoader still run, and read what a plain CacheLoader reads."""
    seen = {"before_step": 0}
    original = refresh_mod.Refresher.before_step

    def counting(self, step):
        seen["before_step"] += 1
        return original(self, step)

    monkeypatch.setattr(refresh_mod.Refresher, "before_step", counting)
    batches = []
    original_next = MixLoader.__next__
    monkeypatch.setattr(MixLoader, "__next__", lambda self: batches.append(original_next(self)) or batches[-1])
    config = fresh(setup, tmp_path, refresh_every=0, steps=5)
    run(config)
    assert seen["before_step"] == 5
    assert not refresh_records(config.cache) and all(m["kind"] == "train" for m in metrics(config.out))
    plain = CacheLoader(config.cache, config.loader_config("train"))
    for got in batches:
        assert torch.equal(got.input_ids, next(plain).input_ids)
    plain.close()


def test_a_foreign_round_is_refused(setup, tmp_path):
    config = fresh(setup, tmp_path, steps=2)
    run(config)
    other = replace(config, out=str(tmp_path / "other"))  # another run on the same cache
    with pytest.raises(RefreshError, match="another run|by run"):
        run(other)


# ---------------------------------------------------------------- resume
class _Crash(Exception):
    pass


@pytest.fixture(scope="module")
def straight(setup, tmp_path_factory):
    """An uninterrupted run with rounds of 3 shards (2 prompt rows each)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(refresh_mod, "SHARD_ROWS", 2)
        config = fresh(setup, tmp_path_factory.mktemp("straight"), name="straight")
        return config, run(config)


@pytest.mark.parametrize("crash,save_every,resumed_from",
                         [("commit-1", 2, 0), ("commit-5", 2, 2), ("step-3", 2, 2), ("commit-5", 4, 0)])
def test_resume_after_a_crash_in_or_after_a_refresh_is_exact(setup, straight, tmp_path, monkeypatch, crash,
                                                             save_every, resumed_from):
    """Rounds of 3 shards (refreshes at steps 0, 2, 4). The run dies while committing the 2nd shard of
    round 1 or of round 2, or after step 3 (round 2 complete and logged), and resumes from its latest
    checkpoint (step 0 is always written; the last case replays two steps and a complete round):
    the same rounds, each once, the same losses and bit-identical weights."""
    straight, summary = straight
    monkeypatch.setattr(refresh_mod, "SHARD_ROWS", 2)
    crashed = fresh(setup, tmp_path, name="crashed", save_every=save_every)
    kind, at = crash.split("-")
    commits = {"n": 0}
    original = LogitCache.write_shard

    def dying(self, name, batch, provenance):
        if "refresh" in provenance:
            commits["n"] += 1
            if kind == "commit" and commits["n"] == int(at) + 1:  # dies before this shard is committed
                raise _Crash(f"killed while writing {name}")
        return original(self, name, batch, provenance)

    def dying_step(ctx):
        if kind == "step" and ctx.step == int(at):
            raise _Crash(f"killed after step {ctx.step}")

    monkeypatch.setattr(LogitCache, "write_shard", dying)
    with pytest.raises(_Crash):
        run(crashed, on_step=dying_step)
    monkeypatch.setattr(LogitCache, "write_shard", original)
    partial = refresh_records(crashed.cache)
    assert len(partial) == (int(at) if kind == "commit" else 6)
    resumed = run(replace(crashed, resume=True))

    assert resumed["resumed_from"] == resumed_from
    assert resumed["weights_sha256"] == summary["weights_sha256"]
    a, b = refresh_records(straight.cache), refresh_records(crashed.cache)
    assert sorted(a) == sorted(b) and len(a) == 9  # 3 rounds x 3 shards, none twice, none missing
    ca, cb = LogitCache.open(straight.cache), LogitCache.open(crashed.cache)
    for name in a:
        x, y = ca.read_shard(name).read(), cb.read_shard(name).read()
        np.testing.assert_array_equal(x.token_ids, y.token_ids)
        np.testing.assert_array_equal(x.topk_logprobs, y.topk_logprobs)
    rounds = [m["round"] for m in metrics(crashed.out) if m["kind"] == "refresh"]
    assert rounds == [1, 2, 3]
    assert [m["loss"] for m in metrics(crashed.out) if m["kind"] == "train"] == \
        [m["loss"] for m in metrics(straight.out) if m["kind"] == "train"]


# ---------------------------------------------------------------- async
def test_async_worker_and_trainer_in_two_processes(setup, tmp_path):
    config = fresh(setup, tmp_path, refresh_mode="async", refresh_every=2, max_staleness=3, steps=8,
                   refresh_wait=90.0)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_DATASETS_CACHE": str(tmp_path / "hf")}
    trainer = subprocess.Popen(
        [sys.executable, "-m", "kd.cli", "train", "--cache", config.cache, "--out", config.out,
         "--student", config.student, "--steps", "8", "--lr", "0.01", "--warmup", "1", "--batch-tokens", "256",
         "--eval-every", "0", "--heldout-fraction", "0", "--save-every", "0", "--keep", "0",
         "--loader-workers", "0", "--no-progress", "--refresh-every", "2", "--refresh-prompts", "6",
         "--prompts", config.prompts, "--teacher", config.teacher, "--max-new-tokens", "8",
         "--refresh-mode", "async", "--max-staleness", "3", "--refresh-wait", "90"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, text=True)
    worker = subprocess.Popen(
        [sys.executable, "-m", "kd.cli", "generate", "--follow", config.out, "--device", "cpu", "--no-progress"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, text=True)
    try:
        out_t, _ = trainer.communicate(timeout=150)
        out_w, _ = worker.communicate(timeout=60)  # exits once the final checkpoint exists
    finally:
        for proc in (trainer, worker):
            if proc.poll() is None:
                proc.kill()
    assert trainer.returncode == 0, out_t[-3000:]
    assert worker.returncode == 0, out_w[-3000:]
    lines = metrics(config.out)
    train = [m for m in lines if m["kind"] == "train"]
    assert len(train) == 8
    assert all(m["staleness"] is not None and 0 <= m["staleness"] <= 3 for m in train)  # the limit held
    records = refresh_records(config.cache)
    steps = sorted({p["student_step"] for p in records.values()})
    assert steps[0] == 0 and set(steps) <= {0, 2, 4, 6}
    assert all(p["refresh"]["mode"] == "async" for p in records.values())
    rounds = sorted({p["round"] for p in records.values()})
    assert rounds == list(range(1, len(rounds) + 1))  # consecutive: no round skipped
    used = [m["round"] for m in lines if m["kind"] == "refresh"]
    assert used == sorted(used) and len(set(used)) == len(used)


def test_async_trainer_without_worker_fails_clearly(setup, tmp_path):
    config = fresh(setup, tmp_path, refresh_mode="async", refresh_every=2, steps=4, refresh_wait=1.0)
    with pytest.raises(RefreshError, match="kd generate --follow"):
        run(config)


def test_refresh_options_are_validated_together(setup, tmp_path):
    from kd.storage.errors import ConfigError

    bad = replace(setup["config"], cache="c", out="o", prompts="", on_policy_fraction=1.5, refresh_mode="later",
                  refresh_every=4, max_staleness=2)
    with pytest.raises(ConfigError) as err:
        bad.validate()
    for flag in ("--prompts", "--on-policy-fraction", "--refresh-mode"):
        assert flag in str(err.value)
    async_bad = replace(setup["config"], cache="c", out="o", refresh_mode="async", refresh_every=4, max_staleness=2)
    with pytest.raises(ConfigError, match="--max-staleness"):
        async_bad.validate()
    with pytest.raises(ConfigError, match="--importance-clip"):  # it would silently do nothing
        replace(setup["config"], cache="c", out="o", importance_clip=2.0).validate()
