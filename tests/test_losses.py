"""Distillation losses: dense references, limits, masking, chunked == dense, validation.

The references below are written independently of kd.stages.train.losses: float64
probabilities (not log-probs), buckets formed by summing full-vocabulary
probabilities through a one-hot bucket matrix, textbook divergence formulas.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from kd.stages.train.fused import chunked_distill_loss
from kd.stages.train.losses import (
    DIVERGENCES,
    TOPK_MODES,
    LossConfig,
    LossTargets,
    bucket_logprobs,
    distill_loss,
    forward_kl,
    generalized_jsd,
    importance_weights,
    reverse_kl,
)
from kd.storage.errors import ConfigError

F64 = torch.float64
# The tensors here are tiny: intra-op threads only add overhead (about half the CPU time).
pytestmark = pytest.mark.usefixtures("one_thread")


def make_case(m=9, vocab=23, k=5, seed=0, dtype=F64, scale=2.0):
    """Random student logits and a full teacher distribution with its top-k view."""
    g = torch.Generator().manual_seed(seed)
    student_logits = (torch.randn(m, vocab, generator=g, dtype=F64) * scale).to(dtype)
    teacher_logprobs = torch.log_softmax(torch.randn(m, vocab, generator=g, dtype=F64) * scale, -1)
    topk_logprobs, topk_ids = teacher_logprobs.topk(k, -1)
    if k < vocab:
        outside = teacher_logprobs.scatter(-1, topk_ids, -math.inf)
        tail = torch.logsumexp(outside, -1)  # exact, from the full distribution
    else:
        tail = torch.full((m,), -math.inf, dtype=F64)
    target_ids = torch.randint(0, vocab, (m,), generator=g)
    behaviour = torch.where(torch.rand(m, generator=g) < 0.6, -3 * torch.rand(m, generator=g), math.nan)
    targets = LossTargets(
        topk_ids=topk_ids,
        topk_logprobs=topk_logprobs.float(),
        tail_logprobs=tail.float(),
        target_ids=target_ids,
        target_logprobs=teacher_logprobs.gather(-1, target_ids[:, None])[:, 0].float(),
        behaviour_logprobs=behaviour.float(),
    )
    return student_logits, teacher_logprobs, targets


def reference_buckets(student_logits, teacher_logprobs, topk_ids, mode, temperature):
    """(p, q) over the buckets, in probability space, float64."""
    m, vocab = student_logits.shape
    k = topk_ids.shape[1]
    p_full = teacher_logprobs.double().exp()
    q_full = torch.softmax(student_logits.double(), -1)
    if mode == "renorm":
        # exact tempering over the top-k: softmax of (logits / T) restricted to the top-k
        p = torch.softmax(teacher_logprobs.double().gather(-1, topk_ids) / temperature, -1)
        q = torch.softmax(student_logits.double().gather(-1, topk_ids) / temperature, -1)
        return p, q
    num_buckets = k + 1 if k < vocab else k
    bucket_of = torch.full((m, vocab), k, dtype=torch.long)  # everything outside the top-k -> tail bucket
    bucket_of.scatter_(1, topk_ids, torch.arange(k).expand(m, k))
    onehot = F.one_hot(bucket_of, num_buckets).double()  # (m, V, B)
    p = torch.einsum("mv,mvb->mb", p_full, onehot)
    q = torch.einsum("mv,mvb->mb", q_full, onehot)
    p, q = p ** (1 / temperature), q ** (1 / temperature)  # each bucket tempered as one token
    return p / p.sum(-1, keepdim=True), q / q.sum(-1, keepdim=True)


def reference_divergence(p, q, name, beta=0.5, alpha=0.1):
    """Textbook formulas on probabilities; (m, B) -> (m,)."""
    def kl(a, b):
        return torch.where(a > 0, a * torch.log(a / b), torch.zeros_like(a)).sum(-1)

    if name == "forward_kl":
        return kl(p, q)
    if name == "reverse_kl":
        return kl(q, p)
    if name == "jsd":
        mix = beta * p + (1 - beta) * q
        return beta * kl(p, mix) + (1 - beta) * kl(q, mix)
    if name == "skew_kl":
        return kl(p, alpha * p + (1 - alpha) * q)
    if name == "skew_reverse_kl":
        return kl(q, alpha * q + (1 - alpha) * p)
    if name == "tv":
        return 0.5 * (p - q).abs().sum(-1)
    raise AssertionError(name)


def grad_of(total, x):
    return torch.autograd.grad(total, x)[0]


@pytest.mark.parametrize("temperature", [1.0, 2.5])
@pytest.mark.parametrize("k", [23, 5])  # k == V (top-k is everything) and k < V
@pytest.mark.parametrize("mode", TOPK_MODES)
@pytest.mark.parametrize("name", DIVERGENCES)
def test_divergence_matches_full_vocabulary_reference(name, mode, k, temperature):
    logits, teacher_logprobs, targets = make_case(k=k, seed=k + int(10 * temperature))
    logits.requires_grad_(True)
    config = LossConfig(divergence=name, topk_mode=mode, temperature=temperature, beta=0.3, alpha=0.2)
    got = distill_loss(logits, targets, config)
    p, q = reference_buckets(logits, teacher_logprobs, targets.topk_ids, mode, temperature)
    want = reference_divergence(p, q, name, beta=0.3, alpha=0.2).mean() * temperature**2
    # the teacher top-k are stored in fp32, hence the tolerance
    torch.testing.assert_close(got.total, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got.parts["divergence"], want.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad_of(got.total, logits), grad_of(want, logits), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("name", DIVERGENCES)
def test_k_equal_vocab_ignores_the_stored_tail(name):
    """With k == V there is no tail bucket: a tail of rounding noise must not change anything."""
    logits, _, targets = make_case(k=23)
    noisy = LossTargets(targets.topk_ids, targets.topk_logprobs, torch.full((9,), math.log(3e-8)))
    config = LossConfig(divergence=name)
    assert torch.equal(distill_loss(logits, targets, config).total,
                       distill_loss(logits, noisy, config).total)


def test_jsd_endpoints_are_forward_and_reverse_kl():
    logits, _, targets = make_case()
    for mode in TOPK_MODES:
        loss = {}
        for name, beta in [("jsd", 0.0), ("jsd", 1.0), ("forward_kl", 0.5), ("reverse_kl", 0.5)]:
            config = LossConfig(divergence=name, beta=beta, topk_mode=mode)
            loss[name, beta] = distill_loss(logits, targets, config).total
        assert torch.equal(loss["jsd", 0.0], loss["forward_kl", 0.5])
        assert torch.equal(loss["jsd", 1.0], loss["reverse_kl", 0.5])


def test_jsd_interior_tends_to_zero_like_beta_times_kl():
    """Documented discontinuity: JSD_beta ~ beta KL(p||q) near 0 and (1-beta) KL(q||p) near 1."""
    p = torch.log_softmax(torch.randn(4, 7, dtype=F64), -1)
    q = torch.log_softmax(torch.randn(4, 7, dtype=F64), -1)
    eps = 1e-5
    torch.testing.assert_close(generalized_jsd(p, q, eps) / eps, forward_kl(p, q), rtol=1e-3, atol=0)
    torch.testing.assert_close(generalized_jsd(p, q, 1 - eps) / eps, reverse_kl(p, q), rtol=1e-3, atol=0)


@pytest.mark.parametrize("temperature", [1.0, 0.7, 3.0])
@pytest.mark.parametrize("mode", TOPK_MODES)
@pytest.mark.parametrize("name", DIVERGENCES)
def test_identical_distributions_give_zero(name, mode, temperature):
    _, teacher_logprobs, targets = make_case(seed=3)
    logits = teacher_logprobs.clone().requires_grad_(True)  # student == teacher
    config = LossConfig(divergence=name, topk_mode=mode, temperature=temperature)
    total = distill_loss(logits, targets, config).total
    assert abs(total.item()) < 1e-6
    if name != "tv":  # |x| has no gradient at 0; the others are at their minimum
        assert grad_of(total, logits).abs().max().item() < 1e-6


@settings(max_examples=20, deadline=None, derandomize=True)
@given(seed=st.integers(0, 10_000), k=st.integers(1, 12), scale=st.floats(0.1, 8.0),
       name=st.sampled_from(DIVERGENCES), mode=st.sampled_from(TOPK_MODES))
def test_divergences_are_nonnegative_and_tv_at_most_one(seed, k, scale, name, mode):
    logits, _, targets = make_case(m=4, vocab=12, k=k, seed=seed, scale=scale)
    total = distill_loss(logits, targets, LossConfig(divergence=name, topk_mode=mode)).total.item()
    assert total >= -1e-6
    if name == "tv":
        assert total <= 1 + 1e-6


def test_student_tail_is_accurate_when_tiny():
    """log(1 - sum q_topk) would be log(0) in fp32; the masked logsumexp keeps full relative accuracy."""
    vocab, k = 40, 8
    logits = torch.zeros(3, vocab)
    logits[:, k:] = -30.0  # mass outside the top-k ~ 32 e^-30 / 8 ~ 4e-13
    ids = torch.arange(k).expand(3, k)
    targets = LossTargets(ids, torch.full((3, k), -math.log(k)), torch.full((3,), -math.inf))
    _, student = bucket_logprobs(logits, targets, LossConfig(tail_logprob_floor=-math.inf))
    want = torch.logsumexp(logits.double()[:, k:], -1) - torch.logsumexp(logits.double(), -1)
    torch.testing.assert_close(student[:, -1].double(), want, rtol=1e-6, atol=0)
    assert torch.isfinite(distill_loss(logits, targets, LossConfig()).total)


def test_teacher_tail_floor_keeps_reverse_kl_finite():
    logits, _, targets = make_case(k=5)
    zero_tail = LossTargets(targets.topk_ids, targets.topk_logprobs, torch.full((9,), -math.inf))
    assert torch.isfinite(distill_loss(logits, zero_tail, LossConfig(divergence="reverse_kl")).total)
    unfloored = LossConfig(divergence="reverse_kl", tail_logprob_floor=-math.inf)
    assert distill_loss(logits, zero_tail, unfloored).total.item() == math.inf


def test_cross_entropy_matches_torch():
    logits, _, targets = make_case()
    logits.requires_grad_(True)
    got = distill_loss(logits, targets, LossConfig(divergence_weight=0.0, ce_weight=1.0)).total
    want = F.cross_entropy(logits, targets.target_ids)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(grad_of(got, logits), grad_of(want, logits))


def test_token_reverse_kl_value_and_unbiased_gradient():
    """Value: mean(log q(x) - log p(x)). Gradient: its expectation over x ~ q is grad KL(q || p)."""
    vocab = 17
    g = torch.Generator().manual_seed(5)
    z = torch.randn(vocab, generator=g, dtype=F64).requires_grad_(True)
    log_p = torch.log_softmax(torch.randn(vocab, generator=g, dtype=F64), -1)
    log_q = torch.log_softmax(z, -1)
    # Enumerate every x as its own position, weighted by q(x): the weighted mean is E_q[.] / V.
    x = torch.arange(vocab)
    targets = LossTargets(
        topk_ids=x[:, None], topk_logprobs=torch.zeros(vocab, 1), tail_logprobs=torch.zeros(vocab),
        target_ids=x, target_logprobs=log_p.float(),
    )
    config = LossConfig(divergence_weight=0.0, token_reverse_kl_weight=1.0)
    out = distill_loss(z.expand(vocab, vocab), targets, config, token_weights=log_q.exp().detach())
    exact_kl = (log_q.exp() * (log_q - log_p)).sum()
    torch.testing.assert_close(out.total * vocab, exact_kl, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(grad_of(out.total, z) * vocab, grad_of(exact_kl, z), rtol=1e-6, atol=1e-7)
    # per sample, the documented estimator: (log q(x) - log p(x)) * grad log q(x), no "+1" term
    one = distill_loss(z[None], targets.slice(3, 4), config)
    want = (log_q[3] - log_p[3]).detach() * (F.one_hot(x[3], vocab) - log_q.exp()).detach()
    torch.testing.assert_close(grad_of(one.total, z), want, rtol=1e-6, atol=1e-7)

    # unweighted value on real positions, restricted to student-sampled ones (behaviour not NaN)
    logits, _, t = make_case()
    sampled = ~torch.isnan(t.behaviour_logprobs)
    got = distill_loss(logits, t, LossConfig(divergence_weight=0.0, token_reverse_kl_weight=1.0)).total
    log_q_x = torch.log_softmax(logits, -1).gather(-1, t.target_ids[:, None])[:, 0]
    want = (log_q_x - t.target_logprobs.double())[sampled].mean()
    torch.testing.assert_close(got, want)


def test_importance_weights():
    current = torch.tensor([-1.0, -2.0, -0.5, -3.0], requires_grad=True)
    behaviour = torch.tensor([-1.5, -1.0, math.nan, -10.0])
    w = importance_weights(current, behaviour, clip=2.0)
    torch.testing.assert_close(w, torch.tensor([math.exp(0.5), math.exp(-1.0), 1.0, 2.0]))
    assert not w.requires_grad
    assert importance_weights(current, behaviour, clip=None)[3].item() == pytest.approx(math.exp(7.0))


def test_importance_weighting_scales_token_reverse_kl_per_position():
    logits, _, t = make_case()
    logits.requires_grad_(True)
    plain = LossConfig(divergence_weight=0.0, token_reverse_kl_weight=1.0)
    weighted = LossConfig(divergence_weight=0.0, token_reverse_kl_weight=1.0, importance_clip=1.5)
    log_q_x = torch.log_softmax(logits, -1).gather(-1, t.target_ids[:, None])[:, 0]
    ratio = importance_weights(log_q_x, t.behaviour_logprobs, 1.5)
    for i in range(t.num_positions):  # one position at a time: weighted grad == ratio * plain grad
        mask = torch.zeros(t.num_positions, dtype=F64)
        mask[i] = 1.0
        a = grad_of(distill_loss(logits, t, weighted, mask).total, logits)
        b = grad_of(distill_loss(logits, t, plain, mask).total, logits)
        torch.testing.assert_close(a, ratio[i] * b)


def full_config(name, mode, **kw):
    return LossConfig(divergence=name, topk_mode=mode, temperature=1.7, ce_weight=0.3,
                      token_reverse_kl_weight=0.5, importance_clip=2.0, **kw)


@pytest.mark.parametrize("mode", TOPK_MODES)
@pytest.mark.parametrize("name", DIVERGENCES)
def test_zero_weight_positions_get_no_gradient(name, mode):
    logits, _, t = make_case()
    logits.requires_grad_(True)
    weights = torch.tensor([1, 0, 2, 0, 1, 1, 0, 1, 1], dtype=F64)
    config = full_config(name, mode)
    total = distill_loss(logits, t, config, weights).total
    grad = grad_of(total, logits)
    assert torch.all(grad[weights == 0] == 0)
    assert torch.all(grad[weights != 0].abs().sum(-1) > 0)
    # and the loss over the kept positions alone is the same
    keep = torch.nonzero(weights).squeeze(-1)
    sub = LossTargets(*(x[keep] for x in (t.topk_ids, t.topk_logprobs, t.tail_logprobs, t.target_ids,
                                           t.target_logprobs, t.behaviour_logprobs)))
    torch.testing.assert_close(total, distill_loss(logits[keep], sub, config, weights[keep]).total)


def lm_head_case(m=13, vocab=29, d=6, k=5, seed=1, dtype=F64, bias=True):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(m, d, generator=g, dtype=F64).to(dtype).requires_grad_(True)
    weight = torch.randn(vocab, d, generator=g, dtype=F64).to(dtype).requires_grad_(True)
    b = torch.randn(vocab, generator=g, dtype=F64).to(dtype).requires_grad_(True) if bias else None
    _, _, targets = make_case(m=m, vocab=vocab, k=k, seed=seed)
    weights = (torch.rand(m, generator=g) < 0.8).to(F64 if dtype == F64 else torch.float32) * 1.5
    return hidden, weight, b, targets, weights


@pytest.mark.parametrize("mode", TOPK_MODES)
@pytest.mark.parametrize("name", DIVERGENCES)
def test_chunked_matches_dense(name, mode):
    hidden, weight, bias, targets, weights = lm_head_case(bias=name != "tv")
    params = [x for x in (hidden, weight, bias) if x is not None]
    config = full_config(name, mode)
    dense = distill_loss(F.linear(hidden, weight, bias), targets, config, weights)
    dense_grads = torch.autograd.grad(dense.total, params)
    for chunk_size in (4, 13, 50):  # a non-divisor of M = 13, M itself, and > M (1 is tested below)
        chunked = chunked_distill_loss(hidden, weight, bias, targets, config, chunk_size, weights)
        torch.testing.assert_close(chunked.total, dense.total, rtol=1e-12, atol=1e-12)
        assert chunked.parts.keys() == dense.parts.keys()
        for key in dense.parts:
            torch.testing.assert_close(chunked.parts[key], dense.parts[key], rtol=1e-12, atol=1e-12)
        for got, want in zip(torch.autograd.grad(chunked.total, params), dense_grads):
            torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_chunked_scales_by_incoming_gradient_and_runs_without_grad():
    hidden, weight, bias, targets, _ = lm_head_case()
    config = LossConfig(divergence="jsd", ce_weight=0.1)
    dense = distill_loss(F.linear(hidden, weight, bias), targets, config)
    out = chunked_distill_loss(hidden, weight, bias, targets, config, 1)  # one position per chunk
    g1 = torch.autograd.grad(out.total, hidden)[0]
    torch.testing.assert_close(out.total, dense.total)
    torch.testing.assert_close(g1, torch.autograd.grad(dense.total, hidden)[0])
    out = chunked_distill_loss(hidden, weight, bias, targets, config, 4)
    g3 = torch.autograd.grad(3.0 * out.total, hidden)[0]
    torch.testing.assert_close(g3, 3.0 * g1)
    with torch.no_grad():
        again = chunked_distill_loss(hidden, weight, bias, targets, config, 4)
    torch.testing.assert_close(again.total, out.total)
    assert not again.total.requires_grad


def test_chunked_bf16_matches_dense_bf16():
    hidden, weight, bias, targets, weights = lm_head_case(m=40, vocab=64, d=16, dtype=torch.bfloat16)
    config = full_config("forward_kl", "tail")
    dense = distill_loss(F.linear(hidden, weight, bias).float(), targets, config, weights)
    dense_grads = torch.autograd.grad(dense.total, (hidden, weight, bias))
    chunked = chunked_distill_loss(hidden, weight, bias, targets, config, 7, weights)
    assert chunked.total.dtype == torch.float32
    torch.testing.assert_close(chunked.total, dense.total, rtol=1e-5, atol=1e-6)
    for got, want in zip(torch.autograd.grad(chunked.total, (hidden, weight, bias)), dense_grads):
        assert got.dtype == want.dtype == torch.bfloat16
        rel = (got.float() - want.float()).norm() / want.float().norm()
        assert rel < 1e-2  # bf16 rounding of per-chunk vs one-GEMM gradients


def test_no_positions_gives_zero_without_error():
    hidden, weight, bias, targets, _ = lm_head_case()
    empty = targets.slice(0, 0)
    config = full_config("jsd", "tail")
    dense_logits = F.linear(hidden[:0], weight, bias)
    dense = distill_loss(dense_logits, empty, config)
    assert dense.total.item() == 0.0 and all(v.item() == 0.0 for v in dense.parts.values())
    dense.total.backward()
    chunked = chunked_distill_loss(hidden[:0], weight, bias, empty, config, 4)
    assert chunked.total.item() == 0.0
    gh, gw = torch.autograd.grad(chunked.total, (hidden, weight))
    assert gh.abs().sum().item() == 0.0 and gw.abs().sum().item() == 0.0


def test_config_validation_names_every_bad_field():
    with pytest.raises(ConfigError) as err:
        LossConfig(divergence="kl", topk_mode="all", beta=1.5, alpha=1.0, temperature=0.0,
                   ce_weight=-1.0, importance_clip=0.0, tail_logprob_floor=3.0)
    message = str(err.value)
    for name in ("divergence", "topk_mode", "beta", "alpha", "temperature", "ce_weight",
                 "importance_clip", "tail_logprob_floor"):
        assert f"{name}:" in message, name
    assert "divergence_weight:" not in message and "token_reverse_kl_weight:" not in message
    with pytest.raises(ConfigError, match="all are 0"):
        LossConfig(divergence_weight=0.0)
    with pytest.raises(ConfigError, match="unknown field"):
        LossConfig.from_dict({"divergence": "tv", "temprature": 2.0})
    assert LossConfig.from_dict(LossConfig(divergence="tv").to_dict()) == LossConfig(divergence="tv")


def test_missing_inputs_are_reported():
    logits, _, t = make_case()
    bare = LossTargets(t.topk_ids, t.topk_logprobs, t.tail_logprobs)
    with pytest.raises(ValueError, match="ce_weight > 0 needs target_ids"):
        distill_loss(logits, bare, LossConfig(ce_weight=1.0))


# --------------------------------------------------------------------------- fused: analytic gradient
# chunked_distill_loss computes d loss / d logits in closed form from the gradients of a few
# student log-probs per position (top-k, tail, target). Checked against the dense path (autograd
# through full logits, itself checked against the references above) and the old per-chunk
# autograd path, in float64 so that any wrong term shows far above rounding.

PARTS = {
    "divergence": {},
    "+ce": {"ce_weight": 0.3},
    "+token_rkl+iw": {"token_reverse_kl_weight": 0.5, "importance_clip": 1.5},
    "all": {"ce_weight": 0.3, "token_reverse_kl_weight": 0.5, "importance_clip": 1.5},
    "ce only": {"divergence_weight": 0.0, "ce_weight": 1.0},
    "token_rkl only": {"divergence_weight": 0.0, "token_reverse_kl_weight": 1.0},
}


def fused_case(m=16, vocab=31, d=6, k=5, seed=0):
    """lm_head inputs in float64; even rows' targets inside the teacher top-k, odd rows' outside."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(m, d, generator=g, dtype=F64).requires_grad_(True)
    weight = torch.randn(vocab, d, generator=g, dtype=F64).requires_grad_(True)
    bias = torch.randn(vocab, generator=g, dtype=F64).requires_grad_(True)
    _, teacher_logprobs, t = make_case(m=m, vocab=vocab, k=k, seed=seed)
    outside = torch.ones(m, vocab, dtype=torch.bool).scatter(1, t.topk_ids, False)
    first_outside = outside.to(torch.int8).argmax(-1)  # (m,) an id outside the row's top-k
    inside = t.topk_ids[:, 2 % k]
    target_ids = torch.where(torch.arange(m) % 2 == 0, inside, first_outside if k < vocab else inside)
    targets = LossTargets(t.topk_ids, t.topk_logprobs, t.tail_logprobs, target_ids,
                          teacher_logprobs.gather(-1, target_ids[:, None])[:, 0].float(), t.behaviour_logprobs)
    weights = torch.tensor([1.0, 0.0, 2.0, 0.5] * (m // 4), dtype=F64)
    return hidden, weight, bias, targets, weights


def fused_and_dense(hidden, weight, bias, targets, config, weights, chunk_size=5):
    """{path: (LossParts, grads of total w.r.t. (hidden, weight, bias))} for the three paths."""
    params = (hidden, weight, bias)
    out = {"dense": distill_loss(F.linear(hidden, weight, bias), targets, config, weights)}
    for gradient in ("analytic", "autograd"):
        out[gradient] = chunked_distill_loss(hidden, weight, bias, targets, config, chunk_size, weights,
                                             gradient=gradient)
    return {path: (parts, torch.autograd.grad(parts.total, params)) for path, parts in out.items()}


@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("parts", PARTS)
@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("mode", TOPK_MODES)
@pytest.mark.parametrize("name", DIVERGENCES)
def test_analytic_gradient_matches_dense_and_autograd(name, mode, temperature, parts, weighted):
    hidden, weight, bias, targets, weights = fused_case(seed=len(name) + 7 * len(parts))
    in_topk = (targets.topk_ids == targets.target_ids[:, None]).any(-1)
    assert in_topk.any() and (~in_topk).any()  # both target cases are exercised
    config = LossConfig(divergence=name, topk_mode=mode, temperature=temperature, beta=0.3, alpha=0.2,
                        **PARTS[parts])
    weights = weights if weighted else None
    got = fused_and_dense(hidden, weight, bias, targets, config, weights)
    dense, dense_grads = got["dense"]
    for path in ("analytic", "autograd"):
        out, grads = got[path]
        torch.testing.assert_close(out.total, dense.total, rtol=1e-12, atol=1e-12)
        assert out.parts.keys() == dense.parts.keys()
        for key in dense.parts:
            torch.testing.assert_close(out.parts[key], dense.parts[key], rtol=1e-12, atol=1e-12)
        for what, g, want in zip(("hidden", "weight", "bias"), grads, dense_grads):
            assert want.abs().max() > 1e-3, what  # a gradient that is there to get wrong
            torch.testing.assert_close(g, want, rtol=1e-10, atol=1e-12, msg=f"{path} d/d{what}")
    if weighted:  # masked positions: exactly zero gradient, not just small
        grad_hidden = got["analytic"][1][0]
        assert torch.all(grad_hidden[weights == 0] == 0)
        if parts != "token_rkl only":  # (that one is also 0 where the target was not student-sampled)
            assert torch.all(grad_hidden[weights != 0].abs().sum(-1) > 0)


def tail_case(vocab, k, outside_logit, dtype, seed=3):
    """Every row's top-k = ids 0..k-1 (the teacher's and, through the bias, the student's); the
    student's logits elsewhere sit ``outside_logit`` lower, so its tail mass is ~e^outside_logit.
    With k == V (no tail) all the logits are shifted by ``outside_logit``."""
    m, d = 8, 4
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(m, d, generator=g, dtype=F64)
    weight = torch.randn(vocab, d, generator=g, dtype=F64) * 0.3
    bias = torch.full((vocab,), float(outside_logit), dtype=F64)
    bias[:k] = torch.randn(k, generator=g, dtype=F64) + (outside_logit if k == vocab else 0.0)
    teacher = torch.log_softmax(torch.randn(m, k + 1, generator=g, dtype=F64) * 2, -1)
    ids = torch.stack([torch.randperm(k, generator=g) for _ in range(m)])
    targets = LossTargets(ids, teacher[:, :k].float(), teacher[:, k].float() if k < vocab else
                          torch.full((m,), -math.inf), target_ids=torch.tensor([0, k - 1, 1, vocab - 1] * 2),
                          target_logprobs=teacher[:, 0].float())
    return [x.to(dtype).requires_grad_(True) for x in (hidden, weight, bias)], targets


@pytest.mark.parametrize("dtype", [torch.float32, F64])
@pytest.mark.parametrize("tail", ["k == V", "k == V, logits ~ -100", "tiny", "underflows in fp32",
                                  "exactly zero in fp32"])
@pytest.mark.parametrize("name", DIVERGENCES)
def test_analytic_gradient_with_zero_and_tiny_tails(name, tail, dtype):
    """Student tails of 0, ~1e-12 and far below fp32's range: both chunked paths match the dense
    float64 reference (a tail taken as 1 - sum over the top-k would be log(0) or off by orders)."""
    vocab, k = 24, 6
    outside_logit = {"k == V": 0.0, "k == V, logits ~ -100": -100.0, "tiny": -30.0,
                     "underflows in fp32": -200.0, "exactly zero in fp32": -1e4}[tail]
    params, targets = tail_case(vocab, vocab if tail.startswith("k == V") else k, outside_logit, dtype)
    config = LossConfig(divergence=name, temperature=2.0, ce_weight=0.3)
    ref_params = [p.detach().double().requires_grad_(True) for p in params]
    want = distill_loss(F.linear(*ref_params), targets, config)
    want_grads = torch.autograd.grad(want.total, ref_params)
    if not tail.startswith("k == V"):  # the student tail really is that small
        _, student = bucket_logprobs(F.linear(*ref_params), targets, LossConfig(temperature=1.0))
        assert student[:, -1].max() < outside_logit / 2
    # fp32: logits of -1e4 are rounded to ~1e-3, which moves gradients by ~1e-5 of their scale
    tol = {"rtol": 1e-10, "atol": 1e-12} if dtype == F64 else {"rtol": 1e-4, "atol": 1e-4}
    for gradient in ("analytic", "autograd"):
        out = chunked_distill_loss(*params, targets, config, 3, gradient=gradient)
        assert torch.isfinite(out.total)
        torch.testing.assert_close(out.total.double(), want.total, **tol)
        for g, w in zip(torch.autograd.grad(out.total, params), want_grads):
            scale = w.abs().max()
            torch.testing.assert_close(g.double() / scale, w / scale, **tol, msg=gradient)


def test_analytic_gradient_bf16_matches_autograd_path():
    """bf16 lm_head: same bf16 logits, fp32 loss, dlogits cast to bf16 for the GEMMs on both paths."""
    g = torch.Generator().manual_seed(4)
    m, vocab, d = 40, 64, 16
    params = [(torch.randn(*shape, generator=g) * s).to(torch.bfloat16).requires_grad_(True)
              for shape, s in (((m, d), 1.0), ((vocab, d), 1.0), ((vocab,), 1.0))]
    _, _, targets = make_case(m=m, vocab=vocab, k=8, seed=4)
    weights = (torch.rand(m, generator=g) < 0.8).float()
    config = LossConfig(divergence="jsd", temperature=2.0, ce_weight=0.3, token_reverse_kl_weight=0.5,
                        importance_clip=2.0)
    out = {gradient: chunked_distill_loss(*params, targets, config, 7, weights, gradient=gradient)
           for gradient in ("analytic", "autograd")}
    assert out["analytic"].total.dtype == torch.float32
    torch.testing.assert_close(out["analytic"].total, out["autograd"].total, rtol=1e-6, atol=1e-7)
    grads = {k: torch.autograd.grad(v.total, params) for k, v in out.items()}
    for a, b in zip(grads["analytic"], grads["autograd"]):
        assert a.dtype == b.dtype == torch.bfloat16
        # fp32 dlogits agree to ~1e-7; rounding them to bf16 can flip the odd last bit
        assert ((a.float() - b.float()).norm() / b.float().norm()).item() < 2e-3


@settings(max_examples=25, deadline=None, derandomize=True)
@given(seed=st.integers(0, 10_000), vocab=st.integers(2, 40), k_frac=st.floats(0, 1),
       scale=st.floats(0.1, 20.0), name=st.sampled_from(DIVERGENCES), mode=st.sampled_from(TOPK_MODES),
       temperature=st.sampled_from([0.5, 1.0, 2.0]), parts=st.sampled_from(list(PARTS)),
       chunk_size=st.integers(1, 9))
def test_analytic_gradient_matches_autograd_path_random(seed, vocab, k_frac, scale, name, mode, temperature,
                                                        parts, chunk_size):
    k = max(1, round(k_frac * vocab))
    g = torch.Generator().manual_seed(seed)
    params = [(torch.randn(*shape, generator=g, dtype=F64) * s).requires_grad_(True)
              for shape, s in (((7, 3), scale), ((vocab, 3), 1.0), ((vocab,), 1.0))]
    _, _, targets = make_case(m=7, vocab=vocab, k=k, seed=seed)
    config = LossConfig(divergence=name, topk_mode=mode, temperature=temperature, **PARTS[parts])
    got, want = (chunked_distill_loss(*params, targets, config, chunk_size, gradient=gradient)
                 for gradient in ("analytic", "autograd"))
    torch.testing.assert_close(got.total, want.total, rtol=1e-11, atol=1e-12)
    for a, b in zip(torch.autograd.grad(got.total, params), torch.autograd.grad(want.total, params)):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11 * (1 + b.abs().max().item()))


def test_unknown_gradient_method_is_reported():
    hidden, weight, bias, targets, _ = fused_case()
    with pytest.raises(ValueError, match=r"gradient must be one of \('analytic', 'autograd'\), got 'exact'"):
        chunked_distill_loss(hidden, weight, bias, targets, LossConfig(), gradient="exact")
