"""Fused lm_head projection + distillation loss, chunk by chunk: never (M, V) logits at once.

The dense path (``losses.distill_loss``) needs the student's logits at all M loss
positions: M x V fp32 values, plus as many again for the softmax, the tail mask and
their gradients. At M = 8192, V = 49152 that is 1.6 GB per copy. Here, as in Liger's
fused linear losses and Cut Cross-Entropy, the forward pass walks the positions in
chunks of ``chunk_size`` rows:

    for each chunk c:
        logits_c = lm_head(hidden_c).float()                 # (c, V), same op as the dense path
        s_c      = student log-probs at top-k, tail, target  # (c, k), (c,), (c,): all the loss uses
        sums_c   = losses.loss_sums_from_logprobs(s_c, ...)  # per-part sums over the chunk
        loss_c   = sum_parts weight * sums_c / denominator   # denominators are global, known upfront
        dlogits  = d loss_c / d logits_c                     # closed form from d loss_c / d s_c
        grad_hidden_c  = dlogits @ W
        grad_W        += dlogits^T @ hidden_c                # fp32 accumulator
        grad_b        += dlogits.sum(0)

Because every part is a sum over positions divided by a count computed beforehand,
sum_c loss_c is the dense total and the per-chunk gradients add up to the dense
gradients. The gradients are produced during the forward pass and only scaled by the
incoming gradient in backward, so nothing of size (M, V) is kept: peak memory is a few
(chunk, V) fp32 buffers plus grad_W in fp32 (V x d) and grad_hidden (M x d).

Analytic gradient (``gradient="analytic"``, the default). Every part depends on a row z of
logits only through the student's T = 1 log-probs ``losses.StudentLogprobs``: s_K = z_K - lse
at the teacher's top-k ids K, s_tail = lse_O - lse over the rest O (tail mode, k < V) and
s_t = z_t - lse at the target id (temperature acts on the buckets later, inside the shared
``loss_sums_from_logprobs``). So per chunk, with no autograd graph over (c, V):

    z[K] = -inf;  m = max_O z;  e = exp(z - m) in place     # e_v = 0 on K; m = max over O
    S_O = sum_v e_v;  lse_O = m + log S_O                   # exact sum over O: no 1 - sum q cancellation
    lse = logaddexp(lse_O, logsumexp(z_K))
    g_K, g_tail, g_t = autograd of loss_c w.r.t. the small leaves s_K, s_tail, s_t
    G = sum g_K + g_tail + g_t;  q_v = exp(z_v - lse)
    dloss/dz_v = -G q_v + [v in O] g_tail e_v / S_O + [v in K] g_v + [v = t] g_t
               = e_v (-G exp(m - lse) + g_tail / S_O)  on O,   g_v - G exp(s_v)  on K,   (+ g_t at t)

written over the logits buffer: a max, an exp, a sum and a scale over (c, V), against a dozen
passes and (c, V) temporaries for autograd through logsumexp / scatter. S_O >= 1 whenever O is
non-empty (it holds exp(0) for the max); O is empty only for k == V, where there is no tail
bucket and g_tail is not used. The floor on the teacher tail, the tempering, the detached
importance ratio and the token reverse-KL surrogate all act on the small leaves, so autograd
handles them exactly as in the dense path. ``gradient="autograd"`` instead runs autograd through
``losses.loss_sums`` on each chunk's logits: the reference the tests compare against.
Ids must be distinct within a row of ``topk_ids`` (as ``LossTargets`` requires).

Precision: logits are ``F.linear(hidden, W, b).float()``, exactly what the dense path
sees from a bf16 lm_head (the GEMM accumulates in fp32, its output is rounded to the
weight dtype); the loss runs in fp32; dlogits are cast to the weight dtype for the
two gradient GEMMs (as autograd does through ``.float()``), and grad_W / grad_b are
accumulated across chunks in fp32 and cast back to the parameter dtype at the end.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kd.stages.train.losses import (
    NEG_INF,
    LossConfig,
    LossParts,
    LossTargets,
    StudentLogprobs,
    has_tail_bucket,
    loss_denominators,
    loss_sums,
    loss_sums_from_logprobs,
    weighted_total,
)

Tensor = torch.Tensor

LOGITS_BUDGET = 2**24
"""Default chunk: about this many logits per chunk (64 MiB in fp32), i.e. chunk_size = 2**24 // V."""


def _part_names(targets: LossTargets, config: LossConfig) -> list[str]:
    """The parts ``loss_sums`` returns for these inputs, in a fixed order."""
    names = ["divergence"] if config.divergence_weight > 0 else []
    if targets.target_ids is not None:
        names.append("ce")
        if targets.target_logprobs is not None:
            if config.importance_clip is not None and targets.behaviour_logprobs is not None:
                names.append("importance_weight")
            names.append("token_reverse_kl")
    return names


def _autograd_chunk(
    logits: Tensor, targets: LossTargets, config: LossConfig, token_weights: Tensor | None,
    dens: dict[str, Tensor], need_grad: bool,
) -> tuple[dict[str, Tensor], Tensor, Tensor | None]:
    """Reference chunk: autograd through ``losses.loss_sums``. -> (sums, total, d total / d logits)."""
    logits.requires_grad_(need_grad)
    with torch.enable_grad():
        sums = loss_sums(logits, targets, config, token_weights)
        total = weighted_total(sums, dens, config)
    dlogits = torch.autograd.grad(total, logits)[0] if need_grad else None  # (c, V)
    return sums, total, dlogits


def _analytic_chunk(
    logits: Tensor, targets: LossTargets, config: LossConfig, token_weights: Tensor | None,
    dens: dict[str, Tensor], need_grad: bool,
) -> tuple[dict[str, Tensor], Tensor, Tensor | None]:
    """Same as ``_autograd_chunk``, gradient in closed form (module docstring), OVERWRITING ``logits``.

    logits: (c, V) fp32 or wider, a buffer the caller gives away. Returns (sums, total, dlogits),
    dlogits (c, V) being that same buffer, or None when need_grad is False.
    """
    num_rows, vocab_size = logits.shape
    use_topk = config.divergence_weight > 0
    ids = targets.topk_ids.long()  # (c, k); (c, 0) below when no divergence needs the top-k
    ids = ids if use_topk else ids[:, :0]
    with_tail = use_topk and has_tail_bucket(config, ids.shape[-1], vocab_size)
    target_ids = None if targets.target_ids is None else targets.target_ids.long()[:, None]  # (c, 1)
    topk_logits = logits.gather(-1, ids)  # (c, k)
    target_logits = None if target_ids is None else logits.gather(-1, target_ids)  # (c, 1)

    e = logits.scatter_(-1, ids, NEG_INF)  # (c, V) from here on the buffer holds e, then dlogits
    out_max = e.amax(-1, keepdim=True)  # (c, 1) max outside the top-k, -inf if k == V
    shift = torch.where(out_max > NEG_INF, out_max, 0.0)  # k == V: 0, not -inf - -inf = NaN
    e.sub_(shift).exp_()  # e_v = exp(z_v - out_max) outside the top-k, exactly 0 on it
    out_sum = e.sum(-1, keepdim=True)  # (c, 1), >= 1 unless k == V (then 0)
    out_lse = shift + out_sum.log()  # (c, 1) logsumexp outside the top-k (-inf if k == V)
    lse = torch.logaddexp(out_lse, torch.logsumexp(topk_logits, -1, keepdim=True))  # (c, 1)

    student = StudentLogprobs(  # small leaves: autograd runs on these only
        topk=(topk_logits - lse).requires_grad_(need_grad) if use_topk else None,
        tail=(out_lse - lse)[:, 0].requires_grad_(need_grad) if with_tail else None,
        target=None if target_ids is None else (target_logits - lse)[:, 0].requires_grad_(need_grad),
    )
    with torch.enable_grad():
        sums = loss_sums_from_logprobs(student, targets, config, token_weights)
        total = weighted_total(sums, dens, config)
    if not need_grad:
        return sums, total, None
    leaves = {"topk": student.topk, "tail": student.tail, "target": student.target}
    leaves = {name: x for name, x in leaves.items() if x is not None}
    grads = dict(zip(leaves, torch.autograd.grad(total, list(leaves.values()), materialize_grads=True)))

    grad_sum = lse.new_zeros(num_rows, 1)  # G = sum of d total / d (every log-prob), (c, 1)
    for g in grads.values():
        grad_sum += g.reshape(num_rows, -1).sum(-1, keepdim=True)
    coef = -grad_sum * (out_max - lse).exp()  # (c, 1): -G q_v = -G e_v exp(out_max - lse); 0 if k == V
    if with_tail:
        coef += grads["tail"][:, None] / out_sum  # + g_tail q_v / q_tail; out_sum >= 1 here
    dlogits = e.mul_(coef)  # (c, V), still exactly 0 on the top-k
    if use_topk:
        dlogits.scatter_(-1, ids, grads["topk"] - grad_sum * student.topk.detach().exp())
    if target_ids is not None:
        dlogits.scatter_add_(-1, target_ids, grads["target"][:, None])
    return sums, total, dlogits


CHUNK_GRADIENTS = {"analytic": _analytic_chunk, "autograd": _autograd_chunk}


class _FusedLinearDistill(torch.autograd.Function):
    """total = distill_loss(lm_head(hidden)) with gradients computed chunk-wise in forward."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, token_weights, targets, config, chunk_size, names, need,
                gradient):
        # hidden (M, d), weight (V, d), bias (V,) or None, token_weights (M,) or None
        need_hidden, need_weight, need_bias = need
        num_positions = hidden.shape[0]
        dens = loss_denominators(targets, config, token_weights)
        acc_dtype = torch.promote_types(weight.dtype, torch.float32)
        sums = torch.zeros(len(names), dtype=acc_dtype, device=hidden.device)
        total = torch.zeros((), dtype=acc_dtype, device=hidden.device)
        grad_hidden = torch.empty_like(hidden) if need_hidden else None
        grad_weight = torch.zeros_like(weight, dtype=acc_dtype) if need_weight else None
        grad_bias = torch.zeros_like(bias, dtype=acc_dtype) if need_bias else None
        for start in range(0, num_positions, chunk_size):
            stop = min(start + chunk_size, num_positions)
            hidden_c = hidden[start:stop]  # (c, d)
            logits = F.linear(hidden_c, weight, bias)  # (c, V), no graph back to hidden/weight
            logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # a fresh buffer
            w_c = None if token_weights is None else token_weights[start:stop]
            chunk_sums, chunk_total, dlogits = CHUNK_GRADIENTS[gradient](
                logits, targets.slice(start, stop), config, w_c, dens, any(need)
            )
            if dlogits is not None:
                dlogits_lp = dlogits.to(weight.dtype)
                if need_hidden:
                    grad_hidden[start:stop] = dlogits_lp @ weight
                if need_weight:
                    if grad_weight.dtype == weight.dtype:
                        grad_weight.addmm_(dlogits_lp.t(), hidden_c)  # in place: no (V, d) temporary
                    else:
                        grad_weight.add_(dlogits_lp.t() @ hidden_c)
                if need_bias:
                    grad_bias.add_(dlogits.sum(0))
            total += chunk_total.detach()
            sums += torch.stack([chunk_sums[n].detach() for n in names]) if names else 0
        ctx.save_for_backward(grad_hidden, grad_weight, grad_bias)
        ctx.dtypes = (hidden.dtype, weight.dtype, None if bias is None else bias.dtype)
        parts = sums / torch.stack([dens[n] for n in names]) if names else sums
        ctx.mark_non_differentiable(parts)
        return total, parts

    @staticmethod
    def backward(ctx, grad_total, grad_parts):
        grad_hidden, grad_weight, grad_bias = ctx.saved_tensors
        hidden_dtype, weight_dtype, bias_dtype = ctx.dtypes
        out = [None, None, None]
        if grad_hidden is not None:
            out[0] = (grad_hidden * grad_total).to(hidden_dtype)
        if grad_weight is not None:
            out[1] = (grad_weight * grad_total).to(weight_dtype)
        if grad_bias is not None:
            out[2] = (grad_bias * grad_total).to(bias_dtype)
        return (*out, None, None, None, None, None, None, None)


def chunked_distill_loss(
    hidden: torch.Tensor,
    lm_head_weight: torch.Tensor,
    lm_head_bias: torch.Tensor | None,
    targets: LossTargets,
    config: LossConfig,
    chunk_size: int | None = None,
    token_weights: torch.Tensor | None = None,
    gradient: str = "analytic",
) -> LossParts:
    """``losses.distill_loss(F.linear(hidden, lm_head_weight, lm_head_bias), ...)`` without (M, V) logits.

    hidden: (M, d) student final hidden states at the M loss positions (fp32 or bf16/fp16).
    lm_head_weight: (V, d), same dtype as hidden; lm_head_bias: (V,) or None.
    targets, config, token_weights: as in ``losses.distill_loss``.
    chunk_size: positions per chunk; default ``max(1, 2**24 // V)``. Any value >= 1 gives the same
    result up to float summation order; smaller chunks lower peak memory and GEMM efficiency.
    gradient: "analytic" (default) computes d loss / d logits in closed form from the gradients of
    a few student log-probs per position; "autograd" runs autograd through ``losses.loss_sums`` on
    each chunk's logits (the slower reference; same result up to float rounding).
    Returns ``LossParts``; gradients flow to hidden, weight and bias (not to targets/token_weights).
    Gradients are computed during the forward pass, so call it only when you mean to backward
    through it (under torch.no_grad() it skips them).
    """
    if hidden.ndim != 2 or lm_head_weight.ndim != 2 or hidden.shape[1] != lm_head_weight.shape[1]:
        raise ValueError(
            f"hidden {tuple(hidden.shape)} must be (M, d) and lm_head_weight "
            f"{tuple(lm_head_weight.shape)} (V, d)"
        )
    if hidden.shape[0] != targets.num_positions:
        raise ValueError(f"hidden has {hidden.shape[0]} positions, targets {targets.num_positions}")
    vocab_size = lm_head_weight.shape[0]
    targets.check(vocab_size, config)
    if chunk_size is None:
        chunk_size = max(1, LOGITS_BUDGET // vocab_size)
    if not (isinstance(chunk_size, int) and chunk_size >= 1):
        raise ValueError(f"chunk_size must be an integer >= 1, got {chunk_size!r}")
    if gradient not in CHUNK_GRADIENTS:
        raise ValueError(f"gradient must be one of {tuple(CHUNK_GRADIENTS)}, got {gradient!r}")
    grad_on = torch.is_grad_enabled()
    need = (
        grad_on and hidden.requires_grad,
        grad_on and lm_head_weight.requires_grad,
        grad_on and lm_head_bias is not None and lm_head_bias.requires_grad,
    )
    names = _part_names(targets, config)
    total, parts = _FusedLinearDistill.apply(
        hidden, lm_head_weight, lm_head_bias, token_weights, targets, config, chunk_size, names, need,
        gradient,
    )
    return LossParts(total=total, parts=dict(zip(names, parts.unbind())))
