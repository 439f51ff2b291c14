"""The ``hf`` generation backend: transformers models on CPU or CUDA, batched.

``HfSampler`` writes completions with its own decode loop rather than
``model.generate`` because every prompt must draw from its *own* random stream
(a CPU ``torch.Generator`` seeded per row): that makes a completion independent of
which other prompts share its batch, of the batch size and of the worker.
Each step draws one uniform per active row and inverts the CDF of the
(temperature, top-p) sampling distribution on the device; the recorded log-prob
is the temperature-1 full-vocabulary log-softmax of the sampled token (see
backend.py). Prompts are left-padded with attention masks and explicit position
ids; rows that finished are dropped from the batch and its KV cache.

``HfScorer`` runs the teacher over prompt + completion, right-padded (causal
attention never lets a real token see the padding after it), in length-bucketed
batches (sequences sorted by length, filled up to a padded-token budget). It runs
the decoder body on every token but the LM head only on the completion positions,
in fp32 (an fp32 copy of the head weight when the model is bf16, because bf16
logits are off by ~0.05 nats), then on the device: ``torch.topk``, a fused
softmax for the normalizer, the target log-prob, and the tail as the direct sum
of the probabilities outside the top-k (no ``log1p(-sum)`` cancellation, so a
tail of 1e-12 is exact to fp32 precision). Only (P, k) results are copied back.
``HfScorer.logprobs`` returns the full (P, V) log-softmax instead, on the device (exact
full-vocabulary evaluation in ``kd eval``).

Bit-for-bit reproducibility holds for the same inputs, seed, batch settings and
machine. Another batch size changes the floating-point reduction order of the
matmuls, so log-probs can differ in the last bits (~1e-6) and, with a chance of
that order per sampled token, a token whose uniform draw sits on a CDF boundary.
"""

from __future__ import annotations

import contextlib

import numpy as np
import torch
import torch.nn.functional as F

from kd.stages.generate.backend import Completion, SamplingParams, TeacherScores

_SPECIAL_HEAD_ATTRS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale")


def _device_of(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


@contextlib.contextmanager
def _eval_mode(model: torch.nn.Module):
    """Eval mode (no dropout) for the duration, then the mode the caller had."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def left_pad(prompts: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, L) ids and attention mask, prompts aligned to the right edge."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        if p:
            ids[i, width - len(p) :] = torch.as_tensor(p, dtype=torch.long)
            mask[i, width - len(p) :] = 1
    return ids.to(device), mask.to(device)


def choose_tokens(logprobs: torch.Tensor, params: SamplingParams, uniforms: torch.Tensor) -> torch.Tensor:
    """Sample one token per row by inverting the sampling CDF at ``uniforms``.

    logprobs: (B, V) fp32 temperature-1 log-softmax; uniforms: (B,) float64 in [0, 1).
    Temperature 0 is greedy.
    Top-p keeps the smallest set of most likely tokens whose mass reaches ``top_p``
    (the most likely token always). Inverse CDF with ``right=True`` never lands on a
    zero-probability token.
    """
    if params.temperature == 0:
        return logprobs.argmax(-1)
    if params.temperature == 1:
        probs = logprobs.exp()  # (B, V)
    else:
        probs = torch.softmax(logprobs / params.temperature, dim=-1)
    if params.top_p < 1.0:
        probs, order = torch.sort(probs, dim=-1, descending=True, stable=True)
        mass_before = probs.cumsum(-1) - probs
        probs = probs * (mass_before < params.top_p)
    else:
        order = None
    cdf = probs.double().cumsum(-1)  # (B, V)
    u = uniforms.to(cdf.device, torch.float64)[:, None] * cdf[:, -1:]
    idx = torch.searchsorted(cdf, u, right=True).clamp_(max=cdf.shape[-1] - 1)  # (B, 1)
    return (order.gather(-1, idx) if order is not None else idx).squeeze(-1)


class HfSampler:
    """Completions from a transformers causal LM (the student, or the teacher for sequence-level KD)."""

    def __init__(self, model, *, eos_token_ids, pad_token_id: int, batch_size: int = 16):
        self.model = model  # may be a trainer's live model: put in eval mode only while sampling
        self.eos_token_ids = sorted({int(t) for t in eos_token_ids})
        if not self.eos_token_ids:
            raise ValueError("HfSampler needs at least one EOS token id")
        self.pad_token_id = int(pad_token_id)
        self.batch_size = int(batch_size)

    def sample(self, prompts: list[list[int]], params: SamplingParams, seeds: list[int]) -> list[Completion]:
        if len(prompts) != len(seeds):
            raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds")
        out: list[Completion | None] = [None] * len(prompts)
        # Length buckets cut padding; order does not change results (per-row RNG).
        order = sorted(range(len(prompts)), key=lambda i: (len(prompts[i]), i))
        with _eval_mode(self.model):
            for b in range(0, len(order), self.batch_size):
                idx = order[b : b + self.batch_size]
                done = self._sample_batch([prompts[i] for i in idx], params, [seeds[i] for i in idx])
                for i, c in zip(idx, done):
                    out[i] = c
        return out  # type: ignore[return-value]

    @torch.inference_mode()
    def _sample_batch(self, prompts, params: SamplingParams, seeds) -> list[Completion]:
        from transformers import DynamicCache

        device = _device_of(self.model)
        n = len(prompts)
        gens = [torch.Generator().manual_seed(int(s)) for s in seeds]
        ids, mask = left_pad(prompts, self.pad_token_id, device)  # (B, L)
        positions = (mask.cumsum(-1) - 1).clamp_min(0)
        cache = DynamicCache()
        logits = self.model(
            input_ids=ids, attention_mask=mask, position_ids=positions,
            past_key_values=cache, use_cache=True, logits_to_keep=1,
        ).logits[:, -1, :].float()  # (B, V)
        next_pos = positions[:, -1] + 1  # (B,)
        eos = torch.tensor(self.eos_token_ids, device=device)
        active = list(range(n))  # original row of each batch row
        tokens: list[list[int]] = [[] for _ in range(n)]
        token_logprobs: list[list[float]] = [[] for _ in range(n)]
        for step in range(params.max_new_tokens):
            uniforms = torch.stack([torch.rand((), generator=gens[r], dtype=torch.float64) for r in active])
            logprobs = torch.log_softmax(logits, -1)  # (B, V) T=1, what gets recorded
            tok = choose_tokens(logprobs, params, uniforms)  # (B,)
            tok_logprob = logprobs.gather(-1, tok[:, None]).squeeze(-1)
            finished = torch.isin(tok, eos)
            tok_cpu, lp_cpu, fin_cpu = tok.tolist(), tok_logprob.tolist(), finished.tolist()
            for j, r in enumerate(active):
                tokens[r].append(tok_cpu[j])
                token_logprobs[r].append(lp_cpu[j])
            if step + 1 == params.max_new_tokens:
                break
            keep = [j for j, f in enumerate(fin_cpu) if not f]
            if not keep:
                break
            if len(keep) < len(active):
                keep_t = torch.tensor(keep, device=device)
                cache.batch_select_indices(keep_t)
                mask, next_pos, tok = mask[keep_t], next_pos[keep_t], tok[keep_t]
                active = [active[j] for j in keep]
            mask = torch.cat([mask, mask.new_ones((len(active), 1))], dim=-1)
            logits = self.model(
                input_ids=tok[:, None], attention_mask=mask, position_ids=next_pos[:, None],
                past_key_values=cache, use_cache=True,
            ).logits[:, -1, :].float()
            next_pos = next_pos + 1
        return [
            Completion(token_ids=np.asarray(t, dtype=np.int32), logprobs=np.asarray(lp, dtype=np.float32))
            for t, lp in zip(tokens, token_logprobs)
        ]

    def close(self) -> None:
        _release(self)


class HfScorer:
    """Teacher top-k, target and tail log-probs at the completion positions of full sequences."""

    def __init__(self, model, *, batch_size: int = 16, max_batch_tokens: int = 16384,
                 pad_token_id: int = 0, head_rows: int = 1024):
        self.model = model
        self.batch_size = int(batch_size)
        self.max_batch_tokens = int(max_batch_tokens)
        self.pad_token_id = int(pad_token_id)
        self.head_rows = int(head_rows)  # rows of (rows, V) fp32 logits alive at once
        cfg = model.config
        special = any(getattr(cfg, a, None) not in (None, 1.0) for a in _SPECIAL_HEAD_ATTRS)
        head = model.get_output_embeddings()
        self._split = (not special) and isinstance(head, torch.nn.Linear) and hasattr(model, "get_decoder")
        if self._split:
            self._body = model.get_decoder()
            w = head.weight
            self._head_weight = w if w.dtype == torch.float32 else w.detach().float()
            self._head_bias = None if head.bias is None else head.bias.detach().float()

    def buckets(self, lengths: list[int]) -> list[list[int]]:
        """Indices grouped into batches of similar length (longest first), within both budgets."""
        order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
        batches, cur = [], []
        for i in order:
            width = lengths[cur[0]] if cur else lengths[i]
            if cur and (len(cur) >= self.batch_size or (len(cur) + 1) * width > self.max_batch_tokens):
                batches.append(cur)
                cur = []
            cur.append(i)
        if cur:
            batches.append(cur)
        return batches

    def score(self, sequences: list[list[int]], completion_starts: list[int], k: int) -> list[TeacherScores]:
        if len(sequences) != len(completion_starts):
            raise ValueError(f"{len(sequences)} sequences but {len(completion_starts)} completion starts")
        out: list[TeacherScores | None] = [None] * len(sequences)
        with _eval_mode(self.model):
            for idx in self.buckets([len(s) for s in sequences]):
                scores = self._score_batch([sequences[i] for i in idx], [completion_starts[i] for i in idx], k)
                for i, s in zip(idx, scores):
                    out[i] = s
        return out  # type: ignore[return-value]

    def logprobs(self, sequences: list[list[int]], completion_starts: list[int]) -> list[torch.Tensor]:
        """Full-vocabulary T=1 log-probs at the completion positions: one (P_i, V) fp32 tensor per
        sequence, on the model's device (row j predicts token ``completion_starts[i] + j``).

        The same batching and fp32 head as ``score``, without the top-k: for exact evaluation
        (``kd eval``). The caller bounds memory by passing few sequences at a time.
        """
        if len(sequences) != len(completion_starts):
            raise ValueError(f"{len(sequences)} sequences but {len(completion_starts)} completion starts")
        out: list[torch.Tensor | None] = [None] * len(sequences)
        with _eval_mode(self.model), torch.inference_mode():
            for idx in self.buckets([len(s) for s in sequences]):
                seqs, starts = [sequences[i] for i in idx], [completion_starts[i] for i in idx]
                selected, _ = self._completion_rows(seqs, starts)  # (P, H) or (P, V)
                rows = torch.cat([torch.log_softmax(self._head_logits(selected[i : i + self.head_rows]), -1)
                                  for i in range(0, selected.shape[0], self.head_rows)])  # (P, V)
                for i, part in zip(idx, rows.split([len(s) - c for s, c in zip(seqs, starts)])):
                    out[i] = part
        return out  # type: ignore[return-value]

    def _completion_rows(self, sequences, starts) -> tuple[torch.Tensor, torch.Tensor]:
        """Right-padded forward: (P, H) hidden states (or (P, V) logits) at the positions that
        predict each completion token, and the (P,) target ids."""
        device = _device_of(self.model)
        lengths = [len(s) for s in sequences]
        width = max(lengths)
        ids = torch.full((len(sequences), width), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        rows_b, rows_t = [], []  # (P,) batch row and position predicting each completion token
        for b, (s, c) in enumerate(zip(sequences, starts)):
            ids[b, : len(s)] = torch.as_tensor(s, dtype=torch.long)
            mask[b, : len(s)] = 1
            rows_b.append(np.full(len(s) - c, b))
            rows_t.append(np.arange(c - 1, len(s) - 1))
        ids, mask = ids.to(device), mask.to(device)
        rb = torch.as_tensor(np.concatenate(rows_b), device=device)
        rt = torch.as_tensor(np.concatenate(rows_t), device=device)
        targets = ids[rb, rt + 1]  # (P,)
        if self._split:
            hidden = self._body(input_ids=ids, attention_mask=mask).last_hidden_state  # (B, L, H)
            selected = hidden[rb, rt]  # (P, H)
        else:
            logits_all = self.model(input_ids=ids, attention_mask=mask).logits  # (B, L, V)
            selected = logits_all[rb, rt]  # (P, V)
        return selected, targets

    @torch.inference_mode()
    def _score_batch(self, sequences, starts, k: int) -> list[TeacherScores]:
        selected, targets = self._completion_rows(sequences, starts)
        parts = [self._topk_rows(selected[i : i + self.head_rows], targets[i : i + self.head_rows], k)
                 for i in range(0, selected.shape[0], self.head_rows)]
        top_ids, top_lp, tail, target_lp = (torch.cat(x).cpu().numpy() for x in zip(*parts))
        out, p0 = [], 0
        for s, c in zip(sequences, starts):
            p1 = p0 + len(s) - c
            out.append(TeacherScores(
                topk_ids=top_ids[p0:p1].astype(np.int32), topk_logprobs=top_lp[p0:p1],
                tail_logprobs=tail[p0:p1], target_logprobs=target_lp[p0:p1],
            ))
            p0 = p1
        return out

    def _topk_rows(self, rows: torch.Tensor, targets: torch.Tensor, k: int):
        """(R, H) hidden or (R, V) logits -> top-k ids/log-probs, tail and target log-probs (fp32).

        Three passes over the (R, V) logits: topk, a fused softmax, one sum. With
        p = softmax(logits), the top-1 probability gives the normalizer
        (log Z = top1 logit - log p_top1) and the tail is the sum of p outside the
        top-k, summed directly rather than as 1 - sum(top-k): exact to fp32
        relative precision for any tail above ~1e-38.
        """
        logits = self._head_logits(rows)
        top_val, top_ids = torch.topk(logits, k, dim=-1)  # (R, k), descending
        target_logit = logits.gather(-1, targets[:, None]).squeeze(-1)  # (R,)
        probs = torch.softmax(logits, dim=-1)  # (R, V)
        del logits
        log_z = top_val[:, 0] - torch.log(probs.gather(-1, top_ids[:, :1]).squeeze(-1))  # (R,)
        probs.scatter_(-1, top_ids, 0.0)
        tail = torch.log(probs.sum(-1))  # -inf when k == V
        return top_ids.int(), (top_val - log_z[:, None]).clamp_(max=0.0), tail, target_logit - log_z

    def _head_logits(self, rows: torch.Tensor) -> torch.Tensor:
        """(R, H) hidden or (R, V) logits -> (R, V) fp32 logits."""
        if self._split:
            return F.linear(rows.float(), self._head_weight, self._head_bias)
        return rows.float()

    def close(self) -> None:
        _release(self)


def _release(obj) -> None:
    """Drop the model so its memory can go back (the caller must hold no other reference)."""
    on_cuda = obj.model is not None and _device_of(obj.model).type == "cuda"
    for name in ("model", "_body", "_head_weight", "_head_bias"):
        if hasattr(obj, name):
            setattr(obj, name, None)
    if on_cuda:  # a full collection costs ~0.5 s; only worth it to hand GPU memory back
        import gc

        gc.collect()
        torch.cuda.empty_cache()
