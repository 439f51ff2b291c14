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
