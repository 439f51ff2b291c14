"""Fused lm_head projection + distillation loss, chunk by chunk: never (M, V) logits at once.

The dense path (``losses.distill_loss``) needs the student's logits at all M loss
positions: M x V fp32 values, plus as many again for the softmax, the tail mask and
their gradients. At M = 8192, V = 49152 that is 1.6 GB per copy. Here, as in Liger's
fused linear losses and Cut Cross-Entropy, the forward pass walks the positions in
chunks of ``chunk_size`` rows:

    for each chunk c:
        logits_c = lm_head(hidden_c).float()                 # (c, V), same op as the dense path
        sums_c   = losses.loss_sums(logits_c, targets_c)     # per-part sums over the chunk
        loss_c   = sum_parts weight * sums_c / denominator   # denominators are global, known upfront
        dlogits  = d loss_c / d logits_c                     # autograd on the chunk only
        grad_hidden_c  = dlogits @ W
        grad_W        += dlogits^T @ hidden_c                # fp32 accumulator
        grad_b        += dlogits.sum(0)

Because every part is a sum over positions divided by a count computed beforehand,
sum_c loss_c is the dense total and the per-chunk gradients add up to the dense
gradients. The gradients are produced during the forward pass and only scaled by the
incoming gradient in backward, so nothing of size (M, V) is kept: peak memory is a few
(chunk, V) fp32 buffers plus grad_W in fp32 (V x d) and grad_hidden (M x d).

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
    LossConfig,
    LossParts,
    LossTargets,
    loss_denominators,
    loss_sums,
    weighted_total,
)

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


class _FusedLinearDistill(torch.autograd.Function):
    """total = distill_loss(lm_head(hidden)) with gradients computed chunk-wise in forward."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, token_weights, targets, config, chunk_size, names, need):
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
            logits = logits.to(torch.promote_types(logits.dtype, torch.float32)).requires_grad_(any(need))
            w_c = None if token_weights is None else token_weights[start:stop]
            with torch.enable_grad():
                chunk_sums = loss_sums(logits, targets.slice(start, stop), config, w_c)
                chunk_total = weighted_total(chunk_sums, dens, config)
            if any(need):
                (dlogits,) = torch.autograd.grad(chunk_total, logits)  # (c, V)
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
        return (*out, None, None, None, None, None, None)


def chunked_distill_loss(
    hidden: torch.Tensor,
    lm_head_weight: torch.Tensor,
    lm_head_bias: torch.Tensor | None,
    targets: LossTargets,
    config: LossConfig,
    chunk_size: int | None = None,
    token_weights: torch.Tensor | None = None,
) -> LossParts:
    """``losses.distill_loss(F.linear(hidden, lm_head_weight, lm_head_bias), ...)`` without (M, V) logits.

    hidden: (M, d) student final hidden states at the M loss positions (fp32 or bf16/fp16).
    lm_head_weight: (V, d), same dtype as hidden; lm_head_bias: (V,) or None.
    targets, config, token_weights: as in ``losses.distill_loss``.
    chunk_size: positions per chunk; default ``max(1, 2**24 // V)``. Any value >= 1 gives the same
    result up to float summation order; smaller chunks lower peak memory and GEMM efficiency.
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
    grad_on = torch.is_grad_enabled()
    need = (
        grad_on and hidden.requires_grad,
        grad_on and lm_head_weight.requires_grad,
        grad_on and lm_head_bias is not None and lm_head_bias.requires_grad,
    )
    names = _part_names(targets, config)
    total, parts = _FusedLinearDistill.apply(
        hidden, lm_head_weight, lm_head_bias, token_weights, targets, config, chunk_size, names, need
    )
    return LossParts(total=total, parts=dict(zip(names, parts.unbind())))
