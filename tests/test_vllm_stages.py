"""The vllm backend through kd's stages: `kd generate --backend vllm` and the trainer's sync
refresh with `--refresh-backend vllm`, in one process and under torchrun (two gloo ranks).

Runs where vLLM imports (``.venv-vllm``, see tests/test_vllm_backend.py). Engines start eager
with a small KV cache (``--vllm-options``), so each start costs seconds, not minutes. The
reference is always a transformers fp32 forward of the same weights.
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

from kd.stages import models
from kd.stages.generate.run import GenerateConfig
from kd.stages.generate.run import run as generate
from kd.stages.train.run import TrainConfig, run
from kd.storage.cache import LogitCache
from kd.storage.format import SOURCE_CODE
from kd.storage.verify import verify_cache

pytestmark = [pytest.mark.vllm, pytest.mark.usefixtures("isolated_datasets_cache")]

ENGINE = json.dumps({"enforce_eager": True, "kv_cache_memory_bytes": 32 << 20, "max_model_len": 512})
ATOL = 2e-4


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    pytest.importorskip("vllm", reason="vLLM not installed (bash scripts/setup_vllm.sh)")
    root = tmp_path_factory.mktemp("vllm-stages")
    pair = models.tiny_model_pair(root / "pair")
    prompts = root / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"Question {i}: what is {i} plus {3 * i}?"}) + "\n"
                               for i in range(12)))
    return {"root": root, "pair": pair, "prompts": prompts}


def _hf_logprobs(folder, seq: list[int]) -> np.ndarray:
    """(L, V) float64 log-softmax of a transformers fp32 forward; row i predicts seq[i + 1]."""
    import torch

    model = models.load_model(folder, device="cpu", dtype="float32").eval()
    with torch.no_grad():
        logits = model(torch.tensor([seq])).logits[0].double()
    return torch.log_softmax(logits, -1).numpy()


def test_generate_with_the_vllm_backend_matches_a_transformers_forward(setup, tmp_path):
    pair, out = setup["pair"], tmp_path / "cache"
    summary = generate(GenerateConfig(
        data=str(setup["prompts"]), out=str(out), student=str(pair.student), teacher=str(pair.teacher),
        source="student", k=8, max_new_tokens=6, shard_size=4, limit=8, codec="raw", backend="vllm",
        vllm_options=ENGINE, progress=False))
    assert summary["sequences"] == 8
    assert verify_cache(str(out)).ok
    cache = LogitCache.open(str(out))
    checked = 0
    for record in cache.committed_shards():
        batch = cache.read_shard(record.name).read()
        assert (batch.source == SOURCE_CODE["student"]).all()
        for i in range(len(batch.completion_start)):
            seq = batch.sequence_tokens(i).tolist()
            start = int(batch.completion_start[i])
            rows = slice(int(batch.pos_offsets[i]), int(batch.pos_offsets[i + 1]))
            completion = np.asarray(seq[start:])
            teacher = _hf_logprobs(pair.teacher, seq)[start - 1:-1]
            student = _hf_logprobs(pair.student, seq)[start - 1:-1]
            at = np.arange(len(completion))
            np.testing.assert_allclose(batch.topk_logprobs[rows], -np.sort(-teacher, 1)[:, :8], atol=ATOL)
            np.testing.assert_allclose(batch.target_logprobs[rows], teacher[at, completion], atol=ATOL)
            np.testing.assert_allclose(batch.behaviour_logprobs[rows], student[at, completion], atol=ATOL)
            checked += 1
    assert checked == 8


def _train_config(setup, tmp_path, name: str, **changes) -> TrainConfig:
    """A base cache of teacher completions (hf backend) and a sync vllm refresh run on a copy of it."""
    base = setup["root"] / "base"
    if not base.exists():
        pair = setup["pair"]
        generate(GenerateConfig(data=str(setup["prompts"]), out=str(base), student=str(pair.student),
                                teacher=str(pair.teacher), source="teacher", k=8, max_new_tokens=6,
                                shard_size=4, codec="raw", progress=False))
    cache = tmp_path / f"{name}-cache"
    shutil.copytree(base, cache)
    config = TrainConfig(
        cache=str(cache), out=str(tmp_path / name), student=str(setup["pair"].student),
        teacher=str(setup["pair"].teacher), steps=3, lr=1e-2, warmup=1, batch_tokens=256, eval_every=0,
        heldout_fraction=0.0, save_every=0, keep=0, loader_workers=0, progress=False,
        refresh_every=1, refresh_prompts=4, on_policy_fraction=1.0, prompts=str(setup["prompts"]),
        max_new_tokens=6, token_reverse_kl_weight=0.5, importance_clip=2.0, refresh_backend="vllm",
        refresh_vllm_options=ENGINE,
    )
    return replace(config, **changes)


def _metrics(run_dir) -> list[dict]:
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def test_sync_refresh_with_vllm_samples_from_the_weights_being_trained(setup, tmp_path):
    """Fully on-policy (N=1, lambda=1): every step trains on samples of the weights it updates, so the
    stored behaviour log-probs (vLLM) equal the trainer's own log-probs: importance ratio 1. A sampler
    left on stale weights moves the ratio from step 2 on (the hf backend test shows by how much)."""
    config = _train_config(setup, tmp_path, "vllm")
    summary = run(config)
    assert summary["step"] == 3
    lines = _metrics(config.out)
    refresh = [m for m in lines if m["kind"] == "refresh"]
    assert [(m["step"], m["round"], m["student_step"]) for m in refresh] == [(0, 1, 0), (1, 2, 1), (2, 3, 2)]
    train = [m for m in lines if m["kind"] == "train"]
    assert [m["staleness"] for m in train] == [0.0] * 3
    assert all(abs(m["loss_importance_weight"] - 1.0) < 1e-3 for m in train), \
        [m["loss_importance_weight"] for m in train]
    # the same run with a sampler frozen at the initial weights does drift: the check above can fail
    stale = _train_config(setup, tmp_path, "stale", refresh_backend="hf", refresh_vllm_options="",
                          refresh_every=3, steps=3, on_policy_fraction=1.0)
    run(stale)
    weights = [m["loss_importance_weight"] for m in _metrics(stale.out) if m["kind"] == "train"]
    assert max(abs(w - 1.0) for w in weights[1:]) > 1e-2, weights
    assert verify_cache(config.cache).ok
    provenance = [r.provenance for r in LogitCache.open(config.cache).committed_shards() if "refresh" in r.provenance]
    assert {p["backend"] for p in provenance} == {"vllm"}


_WORKER = """
import json, os, sys
import torch.distributed as dist
from kd.stages.train.run import TrainConfig, run
dist.init_process_group("gloo")
summary = run(TrainConfig.from_dict(json.loads(sys.argv[1])))
with open(os.path.join(sys.argv[2], f"rank{os.environ['RANK']}.json"), "w") as f:
    json.dump(summary, f)
dist.destroy_process_group()
"""


@pytest.mark.distributed
@pytest.mark.slow
def test_sync_vllm_refresh_under_torchrun_two_ranks(setup, tmp_path):
    """Each DDP rank keeps its own two engines; the trainer's process group survives them."""
    config = _train_config(setup, tmp_path, "ddp", steps=2, refresh_every=1, refresh_prompts=4)
    worker = tmp_path / "worker.py"
    worker.write_text(_WORKER)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           str(worker), json.dumps(config.to_dict()), str(tmp_path)]
    out = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                         timeout=900)
    assert out.returncode == 0, out.stderr[-6000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["weights_sha256"] == ranks[1]["weights_sha256"]
    train = [m for m in _metrics(config.out) if m["kind"] == "train"]
    assert len(train) == 2 and all(abs(m["loss_importance_weight"] - 1.0) < 1e-3 for m in train)
    shards = [r.provenance["round"] for r in LogitCache.open(config.cache).committed_shards()
              if "refresh" in r.provenance]
    assert sorted(shards) == [1, 1, 2, 2]  # 4 prompts a round, a shard of 2 rows per rank
    assert verify_cache(config.cache).ok
