"""The vllm backend against a transformers fp32 forward of the same tiny model.

Runs only where vLLM imports: ``bash scripts/setup_vllm.sh``, then
``.venv-vllm/bin/python -m pytest tests/test_vllm_backend.py -m "vllm and not slow"``
(~2 min on 2 CPU cores; drop ``and not slow`` to add the multi-process engine
test, ~3 min more). One sampler and one scorer engine are shared by the module:
starting one costs ~10-20 s here even with ``enforce_eager=True``.

The model is a random 2-layer Llama (hidden 64, vocab 384, tied embeddings,
like SmolLM2) with weights scaled up so its next-token distributions are
peaked: near-uniform ones would make top-k order hinge on 1e-7 differences.
"""

from __future__ import annotations

import numpy as np
import pytest

from kd.stages.generate.backend import SamplingParams

pytestmark = pytest.mark.vllm

VOCAB = 384
EOS = 2
K = 8
ATOL = 1e-4
ENGINE = dict(
    dtype="float32", max_model_len=256, kv_cache_memory_bytes=64 << 20, enforce_eager=True, seed=0
)


def _save_tiny_llama(folder, seed: int = 0):
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        # vLLM's CPU attention supports head_dim 32, 64, 80, ...: not 16
        num_attention_heads=2, num_key_value_heads=1, head_dim=32,
        max_position_embeddings=256, tie_word_embeddings=True, bos_token_id=1, eos_token_id=EOS,
        initializer_range=0.2,
    )
    model = LlamaForCausalLM(config).float()
    model.save_pretrained(folder)
    vocab = {"<unk>": 0, "<s>": 1, "</s>": EOS, **{f"t{i}": i for i in range(3, VOCAB)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    fast.save_pretrained(folder)
    return folder


def _hf_logprobs(model, seq) -> np.ndarray:
    """(L, V) float64 log_softmax of a transformers fp32 forward; row i predicts seq[i+1]."""
    import torch

    with torch.no_grad():
        logits = model(torch.tensor([seq])).logits[0].double()
    return torch.log_softmax(logits, -1).numpy()


def _load_hf(folder):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        folder, dtype="float32", attn_implementation="eager"
    )
    return model.eval()


@pytest.fixture(scope="module")
def needs_vllm():
    """Every test but the install-hint one: skip cleanly where vLLM does not import."""
    pytest.importorskip("vllm", reason="vLLM not installed (bash scripts/setup_vllm.sh)")


@pytest.fixture(scope="module")
def model_dir(needs_vllm, tmp_path_factory):
    return _save_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="module")
def hf_model(model_dir):
    return _load_hf(model_dir)


@pytest.fixture(scope="module")
def sampler(model_dir):
    from kd.stages.generate.vllm_backend import VllmSampler

    s = VllmSampler(model_dir, **ENGINE)
    yield s
    s.close()


@pytest.fixture(scope="module")
def scorer(model_dir):
    from kd.stages.generate.vllm_backend import VllmScorer

    s = VllmScorer(model_dir, k=K, **ENGINE)
    yield s
    s.close()


def _prompts(n: int, seed: int = 1) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [[1, *rng.integers(3, VOCAB, size=int(rng.integers(3, 12))).tolist()] for _ in range(n)]


def _check_behaviour_logprobs(hf_model, prompts, completions):
    for prompt, c in zip(prompts, completions):
        seq = prompt + c.token_ids.tolist()
        ref = _hf_logprobs(hf_model, seq)[len(prompt) - 1 : -1]  # rows predicting the completion
        expected = ref[np.arange(len(c.token_ids)), c.token_ids]
        np.testing.assert_allclose(c.logprobs, expected, atol=ATOL, rtol=0)


def test_sample_shapes_and_determinism(sampler):
    prompts = _prompts(4)
    params = SamplingParams(temperature=1.0, max_new_tokens=16)
    a = sampler.sample(prompts, params, seeds=[10, 11, 12, 13])
    b = sampler.sample(prompts, params, seeds=[10, 11, 12, 13])
    assert len(a) == 4
    for c in a:
        assert c.token_ids.dtype == np.int32 and c.logprobs.dtype == np.float32
        assert c.token_ids.shape == c.logprobs.shape and 1 <= len(c.token_ids) <= 16
        assert np.all(c.logprobs <= 0) and np.all(np.isfinite(c.logprobs))
        # stops only at EOS (kept, last) or at max_new_tokens
        assert len(c.token_ids) == 16 or c.token_ids[-1] == EOS
        assert EOS not in c.token_ids[:-1]
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x.token_ids, y.token_ids)
        np.testing.assert_array_equal(x.logprobs, y.logprobs)
    other = sampler.sample(prompts, params, seeds=[20, 21, 22, 23])
    assert any(not np.array_equal(x.token_ids, y.token_ids) for x, y in zip(a, other))


def test_sample_does_not_depend_on_batch_composition(sampler):
    prompts = _prompts(5, seed=2)
    params = SamplingParams(temperature=1.0, max_new_tokens=12)
    batch = sampler.sample(prompts, params, seeds=list(range(5)))
    alone = sampler.sample(prompts[3:4], params, seeds=[3])
    np.testing.assert_array_equal(batch[3].token_ids, alone[0].token_ids)
    np.testing.assert_allclose(batch[3].logprobs, alone[0].logprobs, atol=ATOL)


@pytest.mark.parametrize("temperature, top_p", [(1.0, 1.0), (0.7, 1.0), (0.7, 0.9)])
def test_behaviour_logprobs_are_t1_full_vocab(sampler, hf_model, temperature, top_p):
    prompts = _prompts(4, seed=3)
    params = SamplingParams(temperature, top_p, max_new_tokens=16)
    completions = sampler.sample(prompts, params, seeds=[1, 2, 3, 4])
    # the T=1 reference: were these temperature-scaled, they would differ by far more than ATOL
    _check_behaviour_logprobs(hf_model, prompts, completions)


def test_score_matches_full_log_softmax(scorer, hf_model):
    rng = np.random.default_rng(4)
    seqs = [[1, *rng.integers(3, VOCAB, size=n).tolist()] for n in (6, 20, 33)]
    starts = [1, 7, 30]
    scores = scorer.score(seqs, starts, K)
    outside = 0
    for seq, start, s in zip(seqs, starts, scores):
        P = len(seq) - start
        assert s.topk_ids.shape == (P, K) and s.topk_ids.dtype == np.int32
        assert s.topk_logprobs.shape == (P, K) and s.topk_logprobs.dtype == np.float32
        assert s.tail_logprobs.shape == (P,) and s.target_logprobs.shape == (P,)
        ref = _hf_logprobs(hf_model, seq)[start - 1 : -1]  # (P, V): row j predicts seq[start + j]
        ref_sorted = -np.sort(-ref, axis=1)[:, :K]
        # values in rank order, and each id's value, match (robust to near-ties swapping ids)
        np.testing.assert_allclose(s.topk_logprobs, ref_sorted, atol=ATOL, rtol=0)
        at_ids = np.take_along_axis(ref, s.topk_ids, 1)
        np.testing.assert_allclose(s.topk_logprobs, at_ids, atol=ATOL, rtol=0)
        assert np.all(np.diff(s.topk_logprobs, axis=1) <= 0)
        targets = np.asarray(seq[start:])
        np.testing.assert_allclose(s.target_logprobs, ref[np.arange(P), targets], atol=ATOL, rtol=0)
        outside += int((~(s.topk_ids == targets[:, None]).any(1)).sum())
        ref_tail = np.log1p(-np.exp(ref_sorted).sum(1))
        np.testing.assert_allclose(s.tail_logprobs, ref_tail, atol=1e-3, rtol=0)
        # the top-k and the tail partition the distribution
        mass = np.exp(s.topk_logprobs.astype(np.float64)).sum(1) + np.exp(s.tail_logprobs)
        np.testing.assert_allclose(mass, 1, atol=1e-5)
    assert outside > 10  # random targets: most lie outside the top-8, and they still come back


def test_score_smaller_k_and_errors(scorer):
    from kd.stages.generate.vllm_backend import VllmBackendError

    seq = _prompts(1, seed=5)[0]
    full = scorer.score([seq], [2], K)[0]
    small = scorer.score([seq], [2], 3)[0]
    np.testing.assert_array_equal(small.topk_ids, full.topk_ids[:, :3])
    np.testing.assert_allclose(small.target_logprobs, full.target_logprobs, atol=1e-6)
    with pytest.raises(VllmBackendError, match="k=9"):
        scorer.score([seq], [2], K + 1)
    with pytest.raises(VllmBackendError, match="completion_starts"):
        scorer.score([seq], [0], K)
    with pytest.raises(VllmBackendError, match="max_model_len"):
        scorer.score([[1] * 300], [1], K)
    assert scorer.score([seq], [len(seq)], K)[0].topk_ids.shape == (0, K)


def _perturbed(model_dir, scale: float, seed: int):
    import torch

    model = _load_hf(model_dir)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():  # includes the tied embedding / lm_head
            p.add_(torch.randn(p.shape, generator=g) * scale)
    return model


def _check_sampler_matches(sampler, model, prompts):
    params = SamplingParams(temperature=1.0, max_new_tokens=10)
    completions = sampler.sample(prompts, params, seeds=[7] * len(prompts))
    _check_behaviour_logprobs(model, prompts, completions)


def test_update_weights_in_place_from_state_dict_and_path(sampler, model_dir, tmp_path):
    prompts = _prompts(3, seed=6)
    new = _perturbed(model_dir, scale=0.05, seed=1)
    before = sampler.sample(prompts, SamplingParams(max_new_tokens=10), seeds=[7, 7, 7])
    with pytest.raises(AssertionError):  # the update matters: old engine != new weights
        _check_behaviour_logprobs(new, prompts, before)
    sampler.update_weights(new.state_dict())
    _check_sampler_matches(sampler, new, prompts)

    newer = _perturbed(model_dir, scale=0.05, seed=2)
    newer.save_pretrained(tmp_path / "newer")
    sampler.update_weights(tmp_path / "newer")
    _check_sampler_matches(sampler, newer, prompts)

    # back to the original weights, so other tests see the model the fixtures describe
    sampler.update_weights(model_dir)
    _check_sampler_matches(sampler, _load_hf(model_dir), prompts)


def test_missing_vllm_says_how_to_install(monkeypatch, tmp_path):
    import sys

    from kd.stages.generate.vllm_backend import VllmNotInstalledError, VllmScorer
    from kd.storage.errors import KdError

    monkeypatch.setitem(sys.modules, "vllm", None)  # `import vllm` raises ImportError
    with pytest.raises(VllmNotInstalledError, match="setup_vllm.sh") as e:
        VllmScorer(tmp_path)
    assert isinstance(e.value, KdError)


def test_missing_model_folder_is_a_clear_error(needs_vllm, tmp_path):
    from kd.stages.generate.vllm_backend import VllmBackendError, VllmSampler

    with pytest.raises(VllmBackendError, match="config.json"):
        VllmSampler(tmp_path / "nowhere")


def test_close_frees_the_engine_and_is_idempotent(model_dir, sampler):
    import torch

    from kd.stages.generate.vllm_backend import VllmBackendError, VllmScorer

    # starting an in-process engine leaves the process's RNG streams and torch threading alone
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    s = VllmScorer(model_dir, k=2, **ENGINE)
    assert torch.equal(torch.rand(3), expected)
    assert torch.set_num_threads is torch._C.set_num_threads

    assert s.score([[1, 5, 6]], [1], 2)[0].topk_ids.shape == (2, 2)
    s.close()
    s.close()
    with pytest.raises(VllmBackendError, match="closed"):
        s.score([[1, 5, 6]], [1], 2)
    # closing one engine leaves another in the same process working (teacher/student alternate)
    assert len(sampler.sample([[1, 5, 6]], SamplingParams(max_new_tokens=4), seeds=[0])) == 1


@pytest.mark.slow
def test_multiprocess_engine_sample_update_score(model_dir, hf_model):
    """The engine core in a child process (~1 min to start here): weights travel through a file."""
    from kd.stages.generate.vllm_backend import VllmSampler, VllmScorer

    prompts = _prompts(3, seed=8)
    with VllmSampler(model_dir, **ENGINE, multiprocess=True) as s:
        completions = s.sample(prompts, SamplingParams(0.7, 0.9, max_new_tokens=8), seeds=[1, 2, 3])
        _check_behaviour_logprobs(hf_model, prompts, completions)
        new = _perturbed(model_dir, scale=0.05, seed=3)
        s.update_weights(new.state_dict())
        _check_sampler_matches(s, new, prompts)
    with VllmScorer(model_dir, k=K, **ENGINE, multiprocess=True) as scorer:
        got = scorer.score(prompts, [1, 1, 1], K)
    for seq, sc in zip(prompts, got):
        ref = _hf_logprobs(hf_model, seq)[:-1]
        np.testing.assert_allclose(sc.topk_logprobs, -np.sort(-ref, 1)[:, :K], atol=ATOL, rtol=0)
