"""``TrainConfig``: every option of ``kd train``, one field per flag, validated in one place.

Kept free of torch so ``kd --help`` stays fast; ``kd.stages.train.run`` re-exports it.
The resolved config is saved as ``RUN_DIR/config.json`` and inside every checkpoint;
a resumed run compares itself with the saved one (``resume_differences``).
"""

from __future__ import annotations

import importlib.util
import json
import math
from dataclasses import asdict, dataclass, fields

from kd.storage.errors import ConfigError

DTYPES = ("auto", "float32", "bfloat16")
REFRESH_MODES = ("sync", "async")
REFRESH_BACKENDS = ("hf", "vllm")
REFRESH_OFFLOAD = ("auto", "on", "off")

RESUME_MUST_MATCH = (
    "cache", "student", "loss", "topk_mode", "beta", "alpha", "temperature", "divergence_weight",
    "ce_weight", "token_reverse_kl_weight", "importance_clip", "tail_logprob_floor",
    "lr", "min_lr_ratio", "warmup", "weight_decay", "clip", "batch_tokens", "grad_accum",
    "heldout_fraction", "seed", "refresh_every", "refresh_prompts", "prompts", "teacher",
    "sample_temperature", "sample_top_p", "max_new_tokens", "on_policy_fraction", "max_staleness",
    "refresh_mode",
)
"""Fields a resumed run must share with its checkpoint: they define the experiment (data,
starting point, objective, optimizer, batch plan). Every other field may change on resume:
``steps`` (extend or shorten a run; the cosine schedule is recomputed for the new total, so
the learning rate jumps unless steps is unchanged), and the operational ones (eval / save
cadence, keep, device, dtype, compile, fsdp, chunk_size, loader_workers, logging, and the
refresh's backend, offload, batch size and wait)."""


@dataclass(frozen=True)
class TrainConfig:
    """Every option of ``kd train``: one field per flag, validated in ``validate``."""

    cache: str
    """The logit cache to train on: a local folder or an fsspec URL (written by kd generate)."""
    out: str
    """Run folder: config.json, metrics.jsonl, checkpoints/ (and tensorboard/)."""
    student: str = "default"
    """Student model: a Hugging Face folder, a hub name already cached, or 'default' (the
    embedded 6-layer student). Its tokenizer must be the one the cache was made with."""
    steps: int = 1000
    """Total optimizer steps (a resumed run continues up to this number)."""
    lr: float = 1e-4
    """Peak learning rate of AdamW, reached at the end of the warmup."""
    min_lr_ratio: float = 0.1
    """The cosine schedule decays the learning rate to lr * min_lr_ratio at the last step."""
    warmup: int = 100
    """Linear warmup, in optimizer steps."""
    weight_decay: float = 0.0
    """AdamW decoupled weight decay (applied to every parameter)."""
    batch_tokens: int = 16384
    """Padded tokens per micro-batch on each process: sequences are packed up to this budget
    (never truncated). Tokens per optimizer step ~ batch_tokens x grad_accum x processes."""
    grad_accum: int = 1
    """Micro-batches per optimizer step; the loss is the mean over them."""
    clip: float = 1.0
    """Clip the global gradient norm to this value; 0 disables clipping (the norm is still logged)."""
    loss: str = "forward_kl"
    """Divergence over the teacher's top-k buckets: forward_kl, reverse_kl, jsd, skew_kl,
    skew_reverse_kl or tv (see kd/stages/train/losses.py)."""
    topk_mode: str = "tail"
    """'tail': k + 1 buckets, the last one the mass outside the teacher top-k; 'renorm': both
    sides renormalized over the top-k."""
    beta: float = 0.5
    """jsd only: interpolation in [0, 1] (0 is forward KL, 1 reverse KL)."""
    alpha: float = 0.1
    """skew_kl / skew_reverse_kl only: skew in [0, 1)."""
    temperature: float = 1.0
    """Softens both distributions (log p / T renormalized); the divergence is scaled by T^2."""
    divergence_weight: float = 1.0
    """Weight of the divergence in the total loss."""
    ce_weight: float = 0.0
    """Weight of the cross-entropy on the target tokens in the total loss."""
    token_reverse_kl_weight: float = 0.0
    """Weight of the sampled-token reverse-KL estimator (on-policy data) in the total loss."""
    importance_clip: float | None = None
    """Importance-weight the token reverse-KL by min(q/behaviour, this); default: no weighting."""
    tail_logprob_floor: float = -16.0
    """Lower bound on the teacher's tail log-prob in 'tail' mode (see losses.LossConfig)."""
    chunk_size: int = 0
    """Loss positions per chunk of the fused lm_head + loss (memory vs speed); 0 = about
    2^24 logits per chunk. Does not change the result beyond float rounding."""
    heldout_fraction: float = 0.02
    """Fraction of prompts held out of training for evaluation (a fixed hash of the prompt index)."""
    eval_every: int = 100
    """Evaluate on the held-out split every this many steps, at the start and at the end; 0 = never."""
    eval_batches: int = 16
    """Held-out batches per evaluation (the same ones every time), per process."""
    save_every: int = 500
    """Write a checkpoint every this many steps; one is always written at the end. 0 = only at the end."""
    keep: int = 3
    """Keep the newest this many checkpoints; 0 keeps all."""
    resume: bool = False
    """Continue the run in --out from its latest checkpoint (exactly: same data order, RNG, optimizer)."""
    seed: int = 0
    """Seed of the data order and of every RNG."""
    device: str = "auto"
    """'auto' (cuda if available), 'cpu', 'cuda' or 'cuda:N' (under torchrun: cuda:LOCAL_RANK)."""
    dtype: str = "auto"
    """Autocast dtype: 'auto' (bfloat16 on CUDA, float32 on CPU), float32 or bfloat16.
    Weights and optimizer state stay float32."""
    compile: bool = False
    """torch.compile the student's decoder."""
    fsdp: bool = False
    """Shard the student with FSDP2 (fully_shard per decoder layer) instead of DDP replicas, for
    students that do not fit on one device. Only under torchrun."""
    loader_workers: int = 2
    """Decode threads of the data loader (0 = decode in the training thread)."""
    skip_bad_shards: bool = False
    """A corrupt cache shard (bad checksum, metadata, offsets, ids >= vocab, NaN or positive
    log-probs) stops training with an error naming it; with this flag it is skipped with a
    warning and training goes on with the other shards."""
    tensorboard: bool = False
    """Also log to TensorBoard in RUN_DIR/tensorboard (needs the tensorboard package)."""
    progress: bool = True
    """Show a progress bar with tokens/s on stderr."""

    # ---- on-policy refresh (kd/stages/train/refresh.py); refresh_every = 0 is plain offline KD
    refresh_every: int = 0
    """Every this many optimizer steps (and before the first), the current student samples completions
    for the next --refresh-prompts prompts of --prompts, the teacher scores them, and they join the
    cache as a new round that training continues on. 0 = no refresh (offline KD on the cache)."""
    refresh_prompts: int = 64
    """Prompts sampled per round (M): round r uses prompt rows [(r-1)*M, r*M) modulo the data size."""
    prompts: str = ""
    """Prompt data the refresh samples from (as kd generate --data: a .jsonl/.json/.parquet/.csv file,
    a folder, or a cached dataset name). Required with --refresh-every."""
    teacher: str = "default"
    """Teacher that scores refresh rounds: must be the one the cache was made with (checked)."""
    sample_temperature: float = 1.0
    """Sampling temperature of refresh rounds (0 = greedy). Stored log-probs are always at T = 1."""
    sample_top_p: float = 1.0
    """Nucleus sampling of refresh rounds."""
    max_new_tokens: int = 256
    """Longest completion a refresh samples, in tokens."""
    on_policy_fraction: float = 0.5
    """Lambda: the share of every micro-batch's --batch-tokens budget filled from the freshest round;
    the rest comes from replay (older rounds within --max-staleness and the cache's own shards).
    1 with --refresh-every 1 is fully on-policy (GKD)."""
    max_staleness: int | None = None
    """Rounds sampled more than this many steps ago leave the replay mix; async mode also waits for a
    new round when the freshest one is older than this. Default: no limit."""
    refresh_mode: str = "sync"
    """'sync': training pauses while this process samples and scores (same device). 'async': a separate
    `kd generate --follow RUN_DIR` worker writes rounds from the checkpoints saved every
    --refresh-every steps; training uses the newest complete round."""
    refresh_backend: str = "hf"
    """Sync mode: backend of the teacher scorer (and student sampler), 'hf' or 'vllm' (vLLM takes the
    in-memory student's weights in place)."""
    refresh_vllm_options: str = ""
    """--refresh-backend vllm: engine settings as a JSON object, as `kd generate --vllm-options`
    (e.g. '{"enforce_eager": true, "gpu_memory_utilization": 0.3}'; each of the two engines,
    student sampler and teacher scorer, takes them)."""
    refresh_offload: str = "auto"
    """Sync mode on CUDA: 'on' moves the optimizer state to CPU and loads the teacher only for the
    refresh, so teacher, student and optimizer never share the GPU; 'off' keeps the teacher resident;
    'auto' is off on CPU and on CUDA unless the teacher fits in a quarter of the free memory."""
    refresh_batch_size: int = 16
    """Prompts the refresh samples together in one batch."""
    refresh_wait: float = 600.0
    """Async mode: seconds to wait for a fresh-enough round before giving up with an error."""

    # ------------------------------------------------------------ derived values
    def loss_config(self):
        """The ``kd.stages.train.losses.LossConfig`` these fields describe (raises ConfigError)."""
        from kd.stages.train.losses import LossConfig

        return LossConfig(
            divergence=self.loss, topk_mode=self.topk_mode, beta=self.beta, alpha=self.alpha,
            temperature=self.temperature, divergence_weight=self.divergence_weight,
            ce_weight=self.ce_weight, token_reverse_kl_weight=self.token_reverse_kl_weight,
            importance_clip=self.importance_clip, tail_logprob_floor=self.tail_logprob_floor,
        )

    def loader_config(self, split: str = "train"):
        """The ``kd.stages.train.loader.LoaderConfig`` of the train or held-out stream."""
        from kd.stages.train.loader import LoaderConfig

        return LoaderConfig(
            max_tokens_per_batch=self.batch_tokens, seed=self.seed, split=split,
            heldout_fraction=self.heldout_fraction, num_workers=self.loader_workers,
            skip_bad_shards=self.skip_bad_shards,
        )

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"train config: unknown field(s) {unknown}; known: {sorted(known)}")
        return cls(**d)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def resume_differences(self, saved: TrainConfig) -> list[str]:
        """Fields in ``RESUME_MUST_MATCH`` that differ from a checkpoint's config, naming both values."""
        return [
            f"{_flag(name)}: checkpoint has {getattr(saved, name)!r}, this run {getattr(self, name)!r}"
            for name in RESUME_MUST_MATCH
            if getattr(saved, name) != getattr(self, name)
        ]

    # ------------------------------------------------------------ validation
    def validate(self) -> None:
        """Raise ConfigError listing every invalid option at once."""
        problems = []

        def need(ok: bool, name: str, msg: str) -> None:
            if not ok:
                problems.append(f"{_flag(name)}: {msg}")

        def integer(name: str, low: int) -> None:
            v = getattr(self, name)
            need(isinstance(v, int) and not isinstance(v, bool) and v >= low, name,
                 f"must be an integer >= {low}, got {v!r}")

        def number(name: str, ok, want: str) -> None:
            v = getattr(self, name)
            need(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and ok(v),
                 name, f"must be {want}, got {v!r}")

        need(isinstance(self.cache, str) and bool(self.cache.strip()), "cache",
             "is required (the logit cache folder or URL written by kd generate)")
        need(isinstance(self.out, str) and bool(self.out.strip()), "out", "is required (the run folder)")
        need(isinstance(self.student, str) and bool(self.student.strip()), "student",
             "must name a model folder or 'default'")
        for name in ("steps", "batch_tokens", "grad_accum", "eval_batches"):
            integer(name, 1)
        for name in ("warmup", "chunk_size", "eval_every", "save_every", "keep", "seed", "loader_workers"):
            integer(name, 0)
        if isinstance(self.warmup, int) and isinstance(self.steps, int) and self.warmup >= self.steps >= 1:
            need(False, "warmup", f"must be smaller than --steps ({self.steps}), got {self.warmup}")
        number("lr", lambda v: v > 0, "a finite number > 0")
        number("min_lr_ratio", lambda v: 0 <= v <= 1, "a number in [0, 1]")
        number("weight_decay", lambda v: v >= 0, "a finite number >= 0")
        number("clip", lambda v: v >= 0, "a finite number >= 0 (0 disables clipping)")
        number("heldout_fraction", lambda v: 0 <= v < 1, "a number in [0, 1)")
        if isinstance(self.eval_every, int) and self.eval_every > 0 and self.heldout_fraction == 0:
            need(False, "eval_every", "needs --heldout-fraction > 0 (or set --eval-every 0)")
        try:
            self.loss_config()
        except ConfigError as err:  # one line per problem, "  - field[, field]: message"
            for line in str(err).splitlines()[1:]:
                head, _, message = line.strip(" -").partition(":")
                flags = ", ".join(_flag("loss" if n.strip() == "divergence" else n.strip()) for n in head.split(","))
                problems.append(f"{flags}:{message}")
        need(self.device in ("auto", "cpu", "cuda") or str(self.device).startswith("cuda:"), "device",
             f"must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {self.device!r}")
        need(self.dtype in DTYPES, "dtype", f"must be one of {list(DTYPES)}, got {self.dtype!r}")
        for name in ("resume", "compile", "fsdp", "tensorboard", "progress", "skip_bad_shards"):
            need(isinstance(getattr(self, name), bool), name, f"must be true or false, got {getattr(self, name)!r}")
        if self.importance_clip is not None and self.token_reverse_kl_weight == 0:
            need(False, "importance_clip", "weights only the sampled-token reverse-KL term (the full-distribution "
                 "divergence depends on the sampled prefix, not on one token's ratio): set "
                 "--token-reverse-kl-weight > 0, or drop --importance-clip")
        integer("refresh_every", 0)
        integer("refresh_prompts", 1)
        integer("max_new_tokens", 1)
        integer("refresh_batch_size", 1)
        if self.max_staleness is not None:
            integer("max_staleness", 0)
        number("on_policy_fraction", lambda v: 0 <= v <= 1, "a number in [0, 1]")
        number("sample_temperature", lambda v: v >= 0, "a finite number >= 0")
        number("sample_top_p", lambda v: 0 < v <= 1, "a number in (0, 1]")
        number("refresh_wait", lambda v: v > 0, "a finite number of seconds > 0")
        need(self.refresh_mode in REFRESH_MODES, "refresh_mode",
             f"must be one of {list(REFRESH_MODES)}, got {self.refresh_mode!r}")
        from kd.stages.generate.vllm_backend import engine_option_problems

        problems += engine_option_problems(
            self.refresh_vllm_options, "--refresh-vllm-options",
            "" if self.refresh_backend == "vllm" and self.refresh_mode == "sync" else
            "only applies to --refresh-backend vllm in --refresh-mode sync (async workers take `kd generate "
            f"--follow ... --vllm-options`); this run has --refresh-backend {self.refresh_backend}, "
            f"--refresh-mode {self.refresh_mode}")
        need(self.refresh_backend in REFRESH_BACKENDS, "refresh_backend",
             f"must be one of {list(REFRESH_BACKENDS)}, got {self.refresh_backend!r}")
        need(self.refresh_offload in REFRESH_OFFLOAD, "refresh_offload",
             f"must be one of {list(REFRESH_OFFLOAD)}, got {self.refresh_offload!r}")
        if isinstance(self.refresh_every, int) and self.refresh_every > 0:
            need(isinstance(self.prompts, str) and bool(self.prompts.strip()), "prompts",
                 "is required with --refresh-every (the prompt data the student samples from)")
            need(isinstance(self.teacher, str) and bool(self.teacher.strip()), "teacher",
                 "must name the cache's teacher or 'default'")
            if self.refresh_mode == "sync" and self.fsdp is True:
                need(False, "fsdp", "cannot sample from an FSDP-sharded student in --refresh-mode sync "
                     "(ranks would decode different lengths); use --refresh-mode async")
            if (self.refresh_mode == "async" and isinstance(self.max_staleness, int)
                    and not isinstance(self.max_staleness, bool) and self.max_staleness < self.refresh_every):
                need(False, "max_staleness", f"must be >= --refresh-every ({self.refresh_every}) in async mode "
                     "(the worker samples the checkpoints written every --refresh-every steps), "
                     f"got {self.max_staleness}")
        if self.tensorboard is True and importlib.util.find_spec("tensorboard") is None:
            need(False, "tensorboard", "needs the tensorboard package: pip install tensorboard")
        if problems:
            raise ConfigError("invalid train options:\n  " + "\n  ".join(problems))


def _flag(name: str) -> str:
    """The command-line flag of a config field: ``batch_tokens`` -> ``--batch-tokens``."""
    return "--" + name.replace("_", "-")
