"""Distillation losses on cached teacher top-k log-probs: pure functions, fp32 (or wider) inside.

The cache holds, per predicted position, the teacher's top-k ids and log-probs
(temperature 1, full-vocabulary log-softmax) and its tail log-prob
``log(1 - sum exp(topk))``. We never see the rest of the teacher distribution,
so the full-distribution divergences are taken between two distributions over
B buckets built from the teacher's top-k ids S (|S| = k, ids distinct):

* ``topk_mode="tail"`` (default), B = k + 1:
  p = [p_i for i in S, p_tail],    q = [q_i for i in S, 1 - sum_{i in S} q_i].
  The last bucket compares the teacher's tail mass with the student's mass
  outside S. The student's tail is computed as
  ``logsumexp(z_j for j not in S) - logsumexp(z)``: exact in relative terms even
  when the tail is 1e-12, where ``log1p(-sum q_i)`` cancels catastrophically
  (fp32 resolves 1 - sum to ~1e-7 and returns log(0) or NaN below that). If
  k == V the tail bucket is empty on both sides and is dropped (the stored
  teacher tail is then rounding noise). The teacher tail is clamped below at
  ``LossConfig.tail_logprob_floor`` (see there) and p renormalized.
* ``topk_mode="renorm"``, B = k: both sides renormalized over S only,
  p_i / sum_S p, q_i / sum_S q. The tail is dropped: mass the student puts
  outside S is neither rewarded nor penalized.

Temperature T acts on both bucket distributions the same way:
log p_T = log p / T - logsumexp(log p / T) over the B buckets (same for q), and
divergences are multiplied by T^2. Over S this is exactly softmax(logits / T)
restricted to S; in ``renorm`` mode it is exact. In ``tail`` mode the tail bucket
is tempered as if it were ONE token, (sum_{j not in S} p_j)^(1/T) instead of
sum_{j not in S} p_j^(1/T): an approximation (too little tail mass for T > 1,
too much for T < 1) forced by the cache, which does not have the tail's shape.
Applying the same map to the student (rather than the student's exact
softmax(z / T)) keeps the loss a divergence between two well-defined
distributions that vanishes exactly when the T=1 buckets agree.

Divergences (per position, over buckets b; p teacher, q student):

    forward_kl       KL(p || q) = sum_b p_b (log p_b - log q_b)
    reverse_kl       KL(q || p)
    jsd (beta)       beta KL(p || m) + (1 - beta) KL(q || m),  m = beta p + (1 - beta) q
                     (GKD, arXiv 2306.13649 eq. 1, as TRL's GKDTrainer); beta = 0 IS forward
                     KL and beta = 1 IS reverse KL (explicit cases, as in TRL). The interior
                     formula itself tends to 0 at both ends (~beta KL(p||q) near 0), so the
                     family is discontinuous at the endpoints.
    skew_kl (alpha)          KL(p || alpha p + (1 - alpha) q)   (DistiLLM), alpha in [0, 1)
    skew_reverse_kl (alpha)  KL(q || alpha q + (1 - alpha) p)   (DistiLLM), alpha in [0, 1)
    tv               0.5 sum_b |p_b - q_b|

Sampled-token terms use the ``target`` token x (the one that actually follows)
at T = 1 over the full vocabulary (no buckets):

    ce               -log q(x)
    token_reverse_kl value log q(x) - log p(x), p(x) the stored teacher log-prob of x.
        Surrogate with gradient (log q(x) - log p(x)) * grad log q(x): the score-function
        (REINFORCE) estimate of grad KL(q || p) at x ~ q. The exact gradient is
        E_q[(log q - log p) grad log q] + E_q[grad log q]; the second term is 0 in
        expectation and is left out (it only adds variance). Unbiased only where x was
        sampled from the current student: it is averaged over student-sampled positions
        (behaviour log-prob not NaN) when behaviour log-probs are given, and optionally
        multiplied by a detached, clipped importance ratio min(exp(log q(x) - log
        q_behaviour(x)), clip) to correct for a student that moved since sampling.

Reduction: with mask weights w (``token_weights``, default 1), each part is
sum_i w_i * loss_i / max(#{i: w_i != 0}, 1) (token_reverse_kl: over student-sampled
positions), computed without host syncs; positions with w_i = 0 get exactly zero
gradient. ``total = divergence_weight * divergence + ce_weight * ce +
token_reverse_kl_weight * token_reverse_kl``.

``kd.stages.train.fused.chunked_distill_loss`` computes the same thing from
hidden states and the lm_head weight without materializing (M, V) logits.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Callable

import torch

from kd.storage.errors import ConfigError

DIVERGENCES = ("forward_kl", "reverse_kl", "jsd", "skew_kl", "skew_reverse_kl", "tv")
TOPK_MODES = ("tail", "renorm")
PART_WEIGHT_FIELDS = {
    "divergence": "divergence_weight",
    "ce": "ce_weight",
    "token_reverse_kl": "token_reverse_kl_weight",
}
"""Loss parts that enter ``total`` and the config field weighting each; other parts are logged only."""

NEG_INF = float("-inf")
Tensor = torch.Tensor


@dataclass(frozen=True)
class LossConfig:
    """Which divergence, how the top-k is used, and how the parts are mixed. Validated on construction."""

    divergence: str = "forward_kl"
    """Full-distribution divergence over the teacher's top-k buckets: one of DIVERGENCES."""
    topk_mode: str = "tail"
    """"tail": k + 1 buckets, the last one the mass outside the teacher top-k (teacher tail vs
    student mass outside the top-k). "renorm": both sides renormalized over the top-k, tail dropped."""
    beta: float = 0.5
    """Generalized JSD interpolation (divergence="jsd"), in [0, 1]: 0 is forward KL, 1 reverse KL."""
    alpha: float = 0.1
    """Skew of skew_kl / skew_reverse_kl, in [0, 1): 0 is plain forward / reverse KL."""
    temperature: float = 1.0
    """Softens both bucket distributions (log p / T renormalized); the divergence is scaled by T^2.
    In "tail" mode the tail bucket is tempered as a single token (an approximation)."""
    divergence_weight: float = 1.0
    """Weight of the divergence part in ``total``; 0 skips computing it."""
    ce_weight: float = 0.0
    """Weight of the cross-entropy on the target token (T = 1) in ``total``."""
    token_reverse_kl_weight: float = 0.0
    """Weight of the sampled-token reverse-KL estimator (on-policy distillation) in ``total``."""
    importance_clip: float | None = None
    """If set, the token_reverse_kl term of student-sampled positions is multiplied by the detached
    ratio min(exp(log q(x) - behaviour log-prob), importance_clip). None: no importance weighting;
    float("inf"): unclipped ratio."""
    tail_logprob_floor: float = -16.0
    """Lower bound on the teacher tail log-prob ("tail" mode). A stored tail of -inf (the top-k
    summed to 1 in fp32) makes reverse-KL-type divergences infinite as soon as the student puts any
    mass outside the top-k; tails below ~1e-7 (log ~ -16, the fp32 resolution of 1 - sum) are not
    trustworthy anyway. float("-inf") disables the floor."""

    def __post_init__(self):
        problems = []

        def number(name, ok, want, optional=False):
            v = getattr(self, name)
            if optional and v is None:
                return
            is_number = isinstance(v, (int, float)) and not isinstance(v, bool) and not math.isnan(v)
            if not (is_number and ok(v)):
                problems.append(f"{name}: must be {want}{' or None' if optional else ''}, got {v!r}")

        if self.divergence not in DIVERGENCES:
            problems.append(f"divergence: must be one of {DIVERGENCES}, got {self.divergence!r}")
        if self.topk_mode not in TOPK_MODES:
            problems.append(f"topk_mode: must be one of {TOPK_MODES}, got {self.topk_mode!r}")
        number("beta", lambda v: 0.0 <= v <= 1.0, "a number in [0, 1]")
        number("alpha", lambda v: 0.0 <= v < 1.0, "a number in [0, 1) (alpha = 1 makes the loss 0)")
        number("temperature", lambda v: 0.0 < v < math.inf, "a finite number > 0")
        for name in PART_WEIGHT_FIELDS.values():
            number(name, lambda v: 0.0 <= v < math.inf, "a finite number >= 0")
        number("importance_clip", lambda v: v > 0.0, "a number > 0 (float('inf'): no clipping)",
               optional=True)
        number("tail_logprob_floor", lambda v: v <= 0.0, "a log-prob <= 0 (float('-inf') to disable)")
        weights = [getattr(self, n) for n in PART_WEIGHT_FIELDS.values()]
        if all(isinstance(w, (int, float)) and w == 0 for w in weights):
            problems.append(
                f"{', '.join(PART_WEIGHT_FIELDS.values())}: all are 0, nothing to train on; set one > 0"
            )
        if problems:
            raise ConfigError("invalid loss config:\n  - " + "\n  - ".join(problems))

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> LossConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"loss config: unknown field(s) {unknown}; known: {sorted(known)}")
        return cls(**d)


@dataclass(frozen=True, eq=False)  # holds tensors: no elementwise ==
class LossTargets:
    """What the loss compares the student with, per loss position (M of them).

    Field names match ``kd.stages.train.batch.TrainBatch``. Only the first three are needed
    for the divergence; ``target_ids`` for ce; ``target_ids`` + ``target_logprobs`` for
    token_reverse_kl; ``behaviour_logprobs`` for importance weighting and to restrict
    token_reverse_kl to student-sampled positions.
    """

    topk_ids: torch.Tensor  # (M, k) int teacher top-k ids, distinct within a row
    topk_logprobs: torch.Tensor  # (M, k) float teacher log-probs (T=1, full-vocabulary)
    tail_logprobs: torch.Tensor  # (M,) float log(1 - sum exp(topk_logprobs)), may be -inf
    target_ids: torch.Tensor | None = None  # (M,) int the token that actually follows
    target_logprobs: torch.Tensor | None = None  # (M,) float teacher log-prob of target_ids
    behaviour_logprobs: torch.Tensor | None = None  # (M,) float student log-prob at sampling, NaN if none

    @property
    def num_positions(self) -> int:
        return int(self.topk_ids.shape[0])

    def slice(self, start: int, stop: int) -> LossTargets:
        """Positions start:stop (views, no copy)."""
        return LossTargets(*(None if t is None else t[start:stop] for t in self._tensors()))

    def _tensors(self) -> tuple:
        return tuple(getattr(self, f.name) for f in fields(self))

    def check(self, vocab_size: int, config: LossConfig) -> None:
        """Shape checks (no device syncs) and that ``config`` has the inputs it needs."""
        m, problems = self.topk_ids.shape[0], []
        if self.topk_ids.ndim != 2 or self.topk_logprobs.shape != self.topk_ids.shape:
            problems.append(f"topk_ids {tuple(self.topk_ids.shape)} and topk_logprobs "
                            f"{tuple(self.topk_logprobs.shape)} must both be (M, k)")
        elif self.topk_ids.shape[1] > vocab_size:
            problems.append(f"k={self.topk_ids.shape[1]} exceeds the student vocabulary {vocab_size}")
        for f in fields(self)[2:]:
            t = getattr(self, f.name)
            if t is not None and tuple(t.shape) != (m,):
                problems.append(f"{f.name} has shape {tuple(t.shape)}, expected ({m},)")
        if config.ce_weight > 0 and self.target_ids is None:
            problems.append("ce_weight > 0 needs target_ids")
        if config.token_reverse_kl_weight > 0 and (self.target_ids is None or self.target_logprobs is None):
            problems.append("token_reverse_kl_weight > 0 needs target_ids and target_logprobs")
        if problems:
            raise ValueError("loss inputs do not fit together: " + "; ".join(problems))


@dataclass(frozen=True, eq=False)  # holds tensors: no elementwise ==
class LossParts:
    """``total`` (0-dim, differentiable) and the named parts for logging (0-dim, detached).

    Parts: "divergence" (already x T^2), "ce", "token_reverse_kl", and "importance_weight" (mean
    ratio over student-sampled positions; logged only), each present when computable.
    """

    total: torch.Tensor
    parts: dict[str, torch.Tensor]


def _upcast(x: torch.Tensor) -> torch.Tensor:
    """At least fp32 (fp64 stays fp64, so tests can compare tightly)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


# --------------------------------------------------------------------------- divergences
# All take bucket log-probs, teacher_logprobs (M, B) and student_logprobs (M, B), each row
# normalized, and return (M,). Teacher entries may be -inf (0 mass); 0 * log 0 is taken as 0.


def _kl(a_logprobs: Tensor, b_logprobs: Tensor) -> Tensor:
    """KL(a || b) = sum_b a_b (log a_b - log b_b), with terms where a_b = 0 set to 0 (NaN-free grads)."""
    present = a_logprobs > NEG_INF
    a_safe = torch.where(present, a_logprobs, 0.0)
    return torch.where(present, a_safe.exp() * (a_safe - b_logprobs), 0.0).sum(-1)


def _mix(a_logprobs: Tensor, b_logprobs: Tensor, weight_a: float) -> Tensor:
    """log(weight_a * a + (1 - weight_a) * b) for 0 < weight_a < 1."""
    return torch.logaddexp(a_logprobs + math.log(weight_a), b_logprobs + math.log1p(-weight_a))


def forward_kl(teacher_logprobs: Tensor, student_logprobs: Tensor) -> Tensor:
    """KL(p || q) = sum_b p_b (log p_b - log q_b). (M, B), (M, B) -> (M,)."""
    return _kl(teacher_logprobs, student_logprobs)


def reverse_kl(teacher_logprobs: Tensor, student_logprobs: Tensor) -> Tensor:
    """KL(q || p) = sum_b q_b (log q_b - log p_b). (M, B), (M, B) -> (M,)."""
    return _kl(student_logprobs, teacher_logprobs)


def generalized_jsd(teacher_logprobs: Tensor, student_logprobs: Tensor, beta: float) -> Tensor:
    """beta KL(p || m) + (1 - beta) KL(q || m), m = beta p + (1 - beta) q. (M, B), (M, B) -> (M,).

    beta = 0 returns forward KL(p || q) and beta = 1 reverse KL(q || p), exactly (GKD/TRL). The
    formula itself vanishes at both ends, so these are explicit cases, not limits.
    """
    if beta == 0.0:
        return forward_kl(teacher_logprobs, student_logprobs)
    if beta == 1.0:
        return reverse_kl(teacher_logprobs, student_logprobs)
    m = _mix(teacher_logprobs, student_logprobs, beta)
    return beta * _kl(teacher_logprobs, m) + (1.0 - beta) * _kl(student_logprobs, m)


def skew_kl(teacher_logprobs: Tensor, student_logprobs: Tensor, alpha: float) -> Tensor:
    """KL(p || alpha p + (1 - alpha) q), alpha in [0, 1) (DistiLLM). (M, B), (M, B) -> (M,)."""
    if alpha == 0.0:
        return forward_kl(teacher_logprobs, student_logprobs)
    return _kl(teacher_logprobs, _mix(teacher_logprobs, student_logprobs, alpha))


def skew_reverse_kl(teacher_logprobs: Tensor, student_logprobs: Tensor, alpha: float) -> Tensor:
    """KL(q || alpha q + (1 - alpha) p), alpha in [0, 1) (DistiLLM). (M, B), (M, B) -> (M,)."""
    if alpha == 0.0:
        return reverse_kl(teacher_logprobs, student_logprobs)
    return _kl(student_logprobs, _mix(student_logprobs, teacher_logprobs, alpha))


def total_variation(teacher_logprobs: Tensor, student_logprobs: Tensor) -> Tensor:
    """0.5 sum_b |p_b - q_b|, in [0, 1]. (M, B), (M, B) -> (M,)."""
    return 0.5 * (teacher_logprobs.exp() - student_logprobs.exp()).abs().sum(-1)


def divergence(teacher_logprobs: Tensor, student_logprobs: Tensor, config: LossConfig) -> Tensor:
    """The divergence ``config.divergence`` names, with its beta/alpha. (M, B), (M, B) -> (M,)."""
    fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = {
        "forward_kl": forward_kl,
        "reverse_kl": reverse_kl,
        "jsd": lambda p, q: generalized_jsd(p, q, config.beta),
        "skew_kl": lambda p, q: skew_kl(p, q, config.alpha),
        "skew_reverse_kl": lambda p, q: skew_reverse_kl(p, q, config.alpha),
        "tv": total_variation,
    }[config.divergence]
    return fn(teacher_logprobs, student_logprobs)


# --------------------------------------------------------------------------- student log-probs


@dataclass(frozen=True, eq=False)  # holds tensors: no elementwise ==
class StudentLogprobs:
    """All that the loss uses of the student: full-vocabulary log-probs at T = 1, per position.

    Every part depends on the student logits z (M, V) only through these few numbers (the
    temperature acts on the buckets afterwards). ``student_logprobs`` computes them from z;
    ``fused`` computes them chunk by chunk and writes the gradient w.r.t. z in closed form.
    """

    topk: Tensor | None  # (M, k) log q at the teacher's top-k ids; None when divergence_weight == 0
    tail: Tensor | None  # (M,) log q(outside the top-k); None when there is no tail bucket
    target: Tensor | None  # (M,) log q(target_ids); None without target_ids


def has_tail_bucket(config: LossConfig, k: int, vocab_size: int) -> bool:
    """Whether the divergence has a tail bucket: "tail" mode and a top-k smaller than the vocabulary."""
    return config.topk_mode == "tail" and k < vocab_size


def _student_buckets(
    z: Tensor, lse: Tensor, targets: LossTargets, config: LossConfig
) -> tuple[Tensor, Tensor | None]:
    """z (M, V) upcast logits, lse (M, 1) their logsumexp -> (log q top-k (M, k), log q tail (M,) or None)."""
    ids = targets.topk_ids.long()  # (M, k)
    topk = z.gather(-1, ids) - lse  # (M, k)
    if not has_tail_bucket(config, ids.shape[-1], z.shape[-1]):
        return topk, None
    outside = z.scatter(-1, ids, NEG_INF)  # (M, V) logits outside the top-k
    return topk, (torch.logsumexp(outside, -1, keepdim=True) - lse).squeeze(-1)


def student_logprobs(student_logits: Tensor, targets: LossTargets, config: LossConfig) -> StudentLogprobs:
    """The ``StudentLogprobs`` the parts of ``config`` need, from logits (M, V) (dense, differentiable)."""
    z = _upcast(student_logits)  # (M, V)
    lse = torch.logsumexp(z, -1, keepdim=True)  # (M, 1)
    topk = tail = target = None
    if config.divergence_weight > 0:
        topk, tail = _student_buckets(z, lse, targets, config)
    if targets.target_ids is not None:
        target = (z.gather(-1, targets.target_ids.long()[:, None]) - lse).squeeze(-1)  # (M,)
    return StudentLogprobs(topk=topk, tail=tail, target=target)


# --------------------------------------------------------------------------- buckets


def _bucket_logprobs(
    student_topk: Tensor,  # (M, k) student log-probs (T = 1) at the teacher's top-k ids
    student_tail: Tensor | None,  # (M,) student log-prob outside the top-k, None: no tail bucket
    targets: LossTargets,
    config: LossConfig,
) -> tuple[torch.Tensor, torch.Tensor]:
    teacher = _upcast(targets.topk_logprobs)  # (M, k)
    student = student_topk  # (M, k)
    if student_tail is not None:
        teacher_tail = _upcast(targets.tail_logprobs).clamp_min(config.tail_logprob_floor)  # (M,)
        teacher = torch.cat([teacher, teacher_tail[:, None]], -1)  # (M, k+1)
        student = torch.cat([student, student_tail[:, None]], -1)  # (M, k+1)
    # Renormalize over the buckets: a no-op for complete "tail" buckets at T = 1 (up to rounding),
    # the renormalization of "renorm" mode, and the 1/T tempering otherwise.
    t = config.temperature
    return torch.log_softmax(teacher / t, -1), torch.log_softmax(student / t, -1)


def bucket_logprobs(
    student_logits: torch.Tensor, targets: LossTargets, config: LossConfig
) -> tuple[torch.Tensor, torch.Tensor]:
    """Teacher and student log-probs over the buckets of ``config.topk_mode``, tempered.

    student_logits (M, V) -> (teacher_logprobs (M, B), student_logprobs (M, B)), B = k + 1 in
    "tail" mode with k < V, else k. See the module docstring for the definitions.
    """
    z = _upcast(student_logits)
    topk, tail = _student_buckets(z, torch.logsumexp(z, -1, keepdim=True), targets, config)
    return _bucket_logprobs(topk, tail, targets, config)


# --------------------------------------------------------------------------- sampled-token terms


def token_reverse_kl(student_target_logprobs: Tensor, teacher_target_logprobs: Tensor) -> Tensor:
    """Per-token reverse-KL estimator at the sampled token x. (M,), (M,) -> (M,).

    Value: a = log q(x) - log p(x) (detached). Gradient: a * grad log q(x), the score-function
    estimate of grad KL(q || p) for x ~ q (the zero-mean E_q[grad log q] term is dropped).
    """
    log_q = _upcast(student_target_logprobs)
    advantage = (log_q - _upcast(teacher_target_logprobs)).detach()
    return advantage + advantage * (log_q - log_q.detach())


def importance_weights(
    student_target_logprobs: torch.Tensor, behaviour_logprobs: torch.Tensor, clip: float | None
) -> torch.Tensor:
    """min(exp(log q(x) - behaviour log-prob), clip), detached; 1 where behaviour is NaN.

    (M,), (M,) -> (M,).

    ``clip=None`` leaves the ratio unclipped.
    """
    ratio = torch.exp(_upcast(student_target_logprobs).detach() - _upcast(behaviour_logprobs))
    if clip is not None:
        ratio = ratio.clamp_max(clip)
    return torch.where(torch.isnan(behaviour_logprobs), 1.0, ratio)


# --------------------------------------------------------------------------- reduction


def _weighted_sum(values: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
    if weights is None:
        return values.sum()
    # where, not a bare product: an inf/NaN at a zero-weight position must not leak into the sum
    return torch.where(weights != 0, weights * values, 0.0).sum()


def _sampled_weights(targets: LossTargets, token_weights: torch.Tensor | None) -> torch.Tensor | None:
    """Mask weights of the positions token_reverse_kl averages over."""
    if targets.behaviour_logprobs is None:
        return token_weights
    sampled = (~torch.isnan(targets.behaviour_logprobs)).to(_upcast(targets.topk_logprobs).dtype)
    return sampled if token_weights is None else sampled * token_weights


def loss_denominators(
    targets: LossTargets, config: LossConfig, token_weights: torch.Tensor | None = None
) -> dict[str, torch.Tensor]:
    """Per part, the number of positions it averages over, clamped to >= 1 (0-dim, on device)."""
    ref = targets.topk_logprobs
    all_positions = torch.full((), max(targets.num_positions, 1), dtype=_upcast(ref).dtype,
                               device=ref.device)

    def count(w):
        return all_positions if w is None else (w != 0).sum().to(all_positions.dtype).clamp_min(1)

    n = count(token_weights)
    n_sampled = count(_sampled_weights(targets, token_weights))
    return {"divergence": n, "ce": n, "token_reverse_kl": n_sampled, "importance_weight": n_sampled}


def loss_sums(
    student_logits: torch.Tensor,
    targets: LossTargets,
    config: LossConfig,
    token_weights: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """Per part, sum over positions of weight * per-position loss (0-dim, differentiable).

    student_logits (M, V), any float dtype (upcast to >= fp32 here); token_weights (M,) or None.
    Summing these over chunks of positions and dividing by ``loss_denominators`` gives the same
    parts as the whole batch at once: the basis of the chunked path.
    """
    student = student_logprobs(student_logits, targets, config)
    return loss_sums_from_logprobs(student, targets, config, token_weights)


def loss_sums_from_logprobs(
    student: StudentLogprobs,
    targets: LossTargets,
    config: LossConfig,
    token_weights: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """``loss_sums`` from the student's ``StudentLogprobs`` instead of its logits (same maths).

    Differentiable w.r.t. the fields of ``student``; the dense path and the fused path share it.
    """
    w = None if token_weights is None else _upcast(token_weights)
    sums = {}
    if config.divergence_weight > 0:
        teacher, student_buckets = _bucket_logprobs(student.topk, student.tail, targets, config)
        d = divergence(teacher, student_buckets, config) * config.temperature**2  # (M,)
        sums["divergence"] = _weighted_sum(d, w)
    if student.target is not None:
        target_logprobs = student.target  # (M,)
        sums["ce"] = _weighted_sum(-target_logprobs, w)
        if targets.target_logprobs is not None:
            w_sampled = _sampled_weights(targets, w)
            per_token = token_reverse_kl(target_logprobs, targets.target_logprobs)  # (M,)
            if config.importance_clip is not None and targets.behaviour_logprobs is not None:
                ratio = importance_weights(
                    target_logprobs, targets.behaviour_logprobs, config.importance_clip
                )
                sums["importance_weight"] = _weighted_sum(ratio, w_sampled)
                per_token = ratio * per_token
            sums["token_reverse_kl"] = _weighted_sum(per_token, w_sampled)
    return sums


def weighted_total(sums: dict[str, Tensor], denominators: dict[str, Tensor], config: LossConfig) -> Tensor:
    """sum over parts of config weight * sum / denominator (0-dim)."""
    total = None
    for name, field_name in PART_WEIGHT_FIELDS.items():
        weight = getattr(config, field_name)
        if weight > 0 and name in sums:
            term = weight * sums[name] / denominators[name]
            total = term if total is None else total + term
    return total


def distill_loss(
    student_logits: torch.Tensor,
    targets: LossTargets,
    config: LossConfig,
    token_weights: torch.Tensor | None = None,
) -> LossParts:
    """The distillation loss from full student logits (the dense reference path).

    student_logits: (M, V) logits at the M loss positions (any float dtype; fp32 or wider inside).
    targets: per-position teacher data, see ``LossTargets``.
    token_weights: optional (M,) mask weights >= 0 (0 = no loss and no gradient at that position).
    Returns ``LossParts``; see the module docstring for the formulas and the reduction.
    Materializes several (M, V) fp32 tensors: use ``fused.chunked_distill_loss`` for large M x V.
    """
    targets.check(student_logits.shape[-1], config)
    sums = loss_sums(student_logits, targets, config, token_weights)
    dens = loss_denominators(targets, config, token_weights)
    total = weighted_total(sums, dens, config)
    return LossParts(total=total, parts={k: (v / dens[k]).detach() for k, v in sums.items()})
