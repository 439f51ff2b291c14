"""``TrainBatch``: what the loader hands the training step (torch tensors, CPU, pinned when asked).

Sequences are right-padded into ``input_ids`` (B, L). Only completion positions
carry a loss: ``loss_rows``/``loss_cols`` (M,) index the (B, L) positions whose
logits predict a completion token, in the same order as every per-position
tensor below (M = number of loss positions in the batch).
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch


@dataclass
class TrainBatch:
    input_ids: torch.Tensor  # (B, L) int64, right-padded with 0
    attention_mask: torch.Tensor  # (B, L) int64, 1 on real tokens
    loss_rows: torch.Tensor  # (M,) int64 batch row of each loss position
    loss_cols: torch.Tensor  # (M,) int64 position t whose logits predict token t+1
    target_ids: torch.Tensor  # (M,) int64 the token that actually follows (input_ids[row, col+1])
    topk_ids: torch.Tensor  # (M, k) int64 teacher top-k ids
    topk_logprobs: torch.Tensor  # (M, k) float32 teacher log-probs (normalized with the tail)
    tail_logprobs: torch.Tensor  # (M,) float32 teacher log-mass outside the top-k
    target_logprobs: torch.Tensor  # (M,) float32 teacher log-prob of target_ids
    behaviour_logprobs: torch.Tensor  # (M,) float32 sampler's log-prob of target_ids, NaN if not sampled
    source: torch.Tensor  # (B,) uint8 per sequence (kd.storage.format.SOURCES)
    round: torch.Tensor  # (B,) int32 refresh round per sequence
    num_tokens: int  # real tokens in the batch (sum of attention_mask)

    def to(self, device: torch.device | str, non_blocking: bool = True) -> TrainBatch:
        moved = {}
        for f in fields(self):
            v = getattr(self, f.name)
            moved[f.name] = v.to(device, non_blocking=non_blocking) if isinstance(v, torch.Tensor) else v
        return TrainBatch(**moved)

    @property
    def num_loss_positions(self) -> int:
        return int(self.loss_rows.shape[0])


def concat_batches(batches: list[TrainBatch]) -> TrainBatch:
    """Stack the sequences of several batches into one, right-padding to the widest.

    The mixing loader uses it to join its on-policy and replay sub-batches; the
    per-position tensors keep their order (batch after batch), ``loss_rows`` are
    shifted by the rows of the batches before. One batch is returned as is.
    """
    if len(batches) == 1:
        return batches[0]
    width = max(b.input_ids.shape[1] for b in batches)

    def pad(t: torch.Tensor) -> torch.Tensor:  # (B, L) -> (B, width), zeros on the right
        return torch.nn.functional.pad(t, (0, width - t.shape[1]))

    row_offsets = [0]
    for b in batches[:-1]:
        row_offsets.append(row_offsets[-1] + b.input_ids.shape[0])
    cat = torch.cat
    return TrainBatch(
        input_ids=cat([pad(b.input_ids) for b in batches]),
        attention_mask=cat([pad(b.attention_mask) for b in batches]),
        loss_rows=cat([b.loss_rows + off for b, off in zip(batches, row_offsets)]),
        loss_cols=cat([b.loss_cols for b in batches]),
        target_ids=cat([b.target_ids for b in batches]),
        topk_ids=cat([b.topk_ids for b in batches]),
        topk_logprobs=cat([b.topk_logprobs for b in batches]),
        tail_logprobs=cat([b.tail_logprobs for b in batches]),
        target_logprobs=cat([b.target_logprobs for b in batches]),
        behaviour_logprobs=cat([b.behaviour_logprobs for b in batches]),
        source=cat([b.source for b in batches]),
        round=cat([b.round for b in batches]),
        num_tokens=sum(b.num_tokens for b in batches),
    )
