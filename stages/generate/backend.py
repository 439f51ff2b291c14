"""The two jobs a generation backend does, and the data they hand back.

A backend has a *sampler* (a model that writes completions: the student, or the
teacher for sequence-level KD) and a *scorer* (the teacher, which gives its
top-k log-probs at every completion position). They are separate objects so a
GPU that cannot hold both can load one, run it over a shard's batch, free it and
load the other (``close()``). Backends: ``hf`` (transformers, CPU or CUDA) in
``kd.stages.generate.hf_backend`` and ``vllm`` in ``kd.stages.generate.vllm_backend``.

Log-probs are always those of the model's temperature-1 full-vocabulary
log-softmax, whatever temperature / top-p the sampling used: that is the
distribution the losses compare, and the behaviour policy for off-policy
correction is recorded on the same scale.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 128


@dataclass
class Completion:
    """One sampled completion (without the prompt)."""

    token_ids: np.ndarray  # (C,) int32, ends with EOS if the model stopped
    logprobs: np.ndarray  # (C,) float32 sampler's T=1 log-prob of each sampled token


@dataclass
class TeacherScores:
    """The teacher's view of one sequence's completion positions (P = L - completion_start rows).

    Row j is the teacher's distribution over token ``completion_start + j``.
    """

    topk_ids: np.ndarray  # (P, k) int32, rank order (descending log-prob)
    topk_logprobs: np.ndarray  # (P, k) float32
    tail_logprobs: np.ndarray  # (P,) float32 log of the mass outside the top-k
    target_logprobs: np.ndarray  # (P,) float32 log-prob of the actual next token


class Sampler(Protocol):
    def sample(
        self, prompts: list[list[int]], params: SamplingParams, seeds: list[int]
    ) -> list[Completion]:
        """One completion per prompt; prompt i is sampled with its own seed ``seeds[i]``
        so the result does not depend on batch composition (reruns and other
        machines reproduce it for the same backend)."""
        ...

    def close(self) -> None: ...


class Scorer(Protocol):
    def score(self, sequences: list[list[int]], completion_starts: list[int], k: int) -> list[TeacherScores]:
        """Teacher top-k at every completion position of each full sequence (prompt + completion)."""
        ...

    def close(self) -> None: ...
