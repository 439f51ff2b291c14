"""``kd train``: stream a logit cache into the chunked distillation loss and train the student.

One optimizer step, top to bottom in ``train_loop`` (nanoGPT style):

    for each of grad_accum micro-batches:
        batch  = next(loader)                                # TrainBatch: (B, L) tokens, (M, k) teacher top-k
        hidden = decoder(input_ids)[loss_rows, loss_cols]    # (M, d): the student's base model only,
        loss   = chunked_distill_loss(hidden, lm_head.W, …)  #   logits made chunk by chunk, never (B, L, V)
        (loss / grad_accum).backward()                       # DDP all-reduces on the last micro-batch
    clip the gradient norm; lr = warmup + cosine(step); AdamW step
    log metrics; every eval_every: held-out eval; every save_every: checkpoint; on_step hook

and before every step ``Refresher.before_step`` (``kd.stages.train.refresh``): with
``--refresh-every N`` it writes (sync) or waits for (async) a round of student samples
scored by the teacher; in every run it points the mixing loader (``kd.stages.train.mix``)
at the shards of this step: a fraction lambda from the freshest round, the rest replay.
Without refresh that is every base shard, i.e. plain offline KD, through the same path.

The loss of a step is the mean over micro-batches (and processes) of each
micro-batch's per-position mean (``losses`` module docstring).

Exact resume: a checkpoint holds the model (HF folder), AdamW state, the loader
position (``CacheLoader.state_dict``), every process's python/numpy/torch/CUDA
RNG state and the step; the learning rate is a pure function of the step. So
``--steps 20`` straight and the same run killed after its step-10 checkpoint and
resumed give bit-identical losses and weights (on CPU; CUDA kernels may not be
deterministic). See ``kd.stages.train.checkpoint`` for the atomic layout and why
trainer state loads with ``weights_only=True``.

Distributed: under torchrun (RANK, WORLD_SIZE, LOCAL_RANK in the environment)
the process group is created here (nccl on CUDA, gloo on CPU); each rank reads
its disjoint piece of the cache; the student is wrapped in DDP, or sharded with
FSDP2 ``fully_shard`` (``--fsdp``). Only rank 0 writes checkpoints and metrics.

Hook: ``run(config, on_step=f)`` calls ``f(StepContext)`` on every rank after each
optimizer step (after eval and checkpoint), e.g. for custom evaluation.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import time
from contextlib import nullcontext
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from tqdm import tqdm

from kd.stages.train import checkpoint as ckpt
from kd.stages.train.batch import TrainBatch
from kd.stages.train.config import TrainConfig
from kd.stages.train.fused import LOGITS_BUDGET, chunked_distill_loss
from kd.stages.train.loader import CacheLoader
from kd.stages.train.losses import LossConfig, LossTargets, loss_sums
from kd.stages.train.mix import MixLoader
from kd.stages.train.refresh import Refresher, is_refresh_record
from kd.storage.cache import LogitCache
from kd.storage.errors import ConfigError, FingerprintMismatchError
from kd.storage.format import SOURCE_CODE

__all__ = ["TrainConfig", "StepContext", "DistillStep", "evaluate", "lr_at", "run"]

METRICS_FILE = "metrics.jsonl"
CONFIG_FILE = "config.json"

EVAL_LOSS = LossConfig(divergence="forward_kl", topk_mode="tail", temperature=1.0, ce_weight=1.0)
"""Held-out metrics use the forward KL over the top-k + tail buckets at T = 1, whatever the training loss."""


# ---------------------------------------------------------------- the model step
class DistillStep(nn.Module):
    """Student forward up to the loss as one module, so DDP / FSDP hooks see the whole step.

    ``forward`` returns the chunked loss (``losses.LossParts``); with ``evaluate=True``
    the held-out sums instead (no gradient). The lm_head weight is used directly by
    the fused loss, so the (M, V) logits never exist at once.
    """

    def __init__(self, student: nn.Module, loss_config: LossConfig, chunk_size: int | None):
        super().__init__()
        self.student = student
        self.loss_config = loss_config
        self.chunk_size = chunk_size

    def forward(self, batch: TrainBatch, evaluate: bool = False):
        decoder = self.student.get_decoder()
        out = decoder(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False)
        hidden = out.last_hidden_state[batch.loss_rows, batch.loss_cols]  # (M, d)
        head = self.student.get_output_embeddings()
        on_policy = self.loss_config.token_reverse_kl_weight > 0  # else skip (and do not log) that part
        targets = LossTargets(
            topk_ids=batch.topk_ids, topk_logprobs=batch.topk_logprobs, tail_logprobs=batch.tail_logprobs,
            target_ids=batch.target_ids, target_logprobs=batch.target_logprobs if on_policy else None,
            behaviour_logprobs=batch.behaviour_logprobs if on_policy else None,
        )
        if evaluate:
            return heldout_sums(hidden, head.weight, head.bias, targets,
                                self.chunk_size or max(1, LOGITS_BUDGET // head.weight.shape[0]))
        return chunked_distill_loss(hidden, head.weight, head.bias, targets, self.loss_config, self.chunk_size or None)


@torch.no_grad()
def heldout_sums(hidden, weight, bias, targets: LossTargets, chunk_size: int) -> torch.Tensor:
    """Sums over positions of (forward KL top-k + tail, top-1 agreement, CE on targets, count).

    hidden (M, d), weight (V, d) -> (4,) float64. KL and CE come from ``losses.loss_sums``
    with ``EVAL_LOSS``; top-1 agreement is student argmax == the teacher's most likely id.
    """
    sums = torch.zeros(4, dtype=torch.float64, device=hidden.device)
    teacher_top1 = targets.topk_ids.gather(-1, targets.topk_logprobs.argmax(-1, keepdim=True)).squeeze(-1)  # (M,)
    for start in range(0, hidden.shape[0], chunk_size):
        stop = min(start + chunk_size, hidden.shape[0])
        logits = nn.functional.linear(hidden[start:stop], weight, bias).float()  # (c, V)
        part = loss_sums(logits, targets.slice(start, stop), EVAL_LOSS)
        agree = (logits.argmax(-1) == teacher_top1[start:stop]).sum()
        sums += torch.stack([part["divergence"].double(), agree.double(), part["ce"].double(),
                             torch.tensor(stop - start, dtype=torch.float64, device=hidden.device)])
    return sums


def evaluate(model: nn.Module, batches: Iterable[TrainBatch], device: torch.device | str = "cpu",
             autocast_dtype: torch.dtype | None = None) -> dict:
    """Held-out metrics of a (possibly DDP/FSDP-wrapped) ``DistillStep`` over ``batches``.

    Returns {"kl": mean KL(teacher || student) over top-k + tail buckets, "top1": fraction of
    positions where the student's argmax is the teacher's top-1, "ce": mean -log q(target),
    "positions": count}, summed over all processes when a process group is up.
    """
    was_training = model.training
    model.eval()
    device = torch.device(device)
    sums = torch.zeros(4, dtype=torch.float64, device=device)
    with torch.no_grad():
        for batch in batches:
            with _autocast(device, autocast_dtype):
                sums += model(batch.to(device), evaluate=True)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(sums)
    model.train(was_training)
    kl, top1, ce, n = sums.tolist()
    n_safe = max(n, 1.0)
    return {"kl": kl / n_safe, "top1": top1 / n_safe, "ce": ce / n_safe, "positions": int(n)}


# ---------------------------------------------------------------- schedule and helpers
def lr_at(step: int, config: TrainConfig) -> float:
    """Learning rate of the update made at 0-based ``step``: linear warmup, then cosine to min_lr_ratio."""
    if step < config.warmup:
        return config.lr * (step + 1) / (config.warmup + 1)
    decay = min(1.0, (step - config.warmup) / max(1, config.steps - config.warmup))
    coeff = 0.5 * (1.0 + math.cos(math.pi * decay))  # 1 -> 0
    min_lr = config.lr * config.min_lr_ratio
    return min_lr + coeff * (config.lr - min_lr)


def _autocast(device: torch.device, dtype: torch.dtype | None):
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else nullcontext()


@dataclass
class StepContext:
    """What an ``on_step`` hook sees after each optimizer step (every rank)."""

    step: int
    student: nn.Module  # the unwrapped HF model (FSDP-sharded when --fsdp)
    loader: MixLoader
    config: TrainConfig
    run_dir: Path
    rank: int
    world_size: int
    metrics: dict  # this step's train metrics (reduced over ranks)


@dataclass
class _Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    owns_group: bool = False

    @property
    def main(self) -> bool:
        return self.rank == 0


def _init_distributed(config: TrainConfig) -> _Dist:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return _Dist()
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    owns = not dist.is_initialized()
    if owns:
        use_cuda = config.device != "cpu" and torch.cuda.is_available()
        if use_cuda:
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return _Dist(rank, world, local_rank, owns)


def _resolve_device_dtype(config: TrainConfig, d: _Dist) -> tuple[torch.device, torch.dtype | None]:
    name = config.device
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"--device {config.device}: CUDA is not available on this machine (use --device cpu)")
    if name == "cuda":
        name = f"cuda:{d.local_rank}"
    device = torch.device(name)
    dtype = config.dtype
    if dtype == "auto":
        dtype = "bfloat16" if device.type == "cuda" else "float32"
    return device, (None if dtype == "float32" else getattr(torch, dtype))


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _weights_sha256(state: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for name in sorted(state):
        h.update(name.encode())
        h.update(state[name].detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


class _MetricsLog:
    """metrics.jsonl (+ TensorBoard) on rank 0; a no-op elsewhere."""

    def __init__(self, run_dir: Path, enabled: bool, tensorboard: bool, truncate_after: int | None):
        self.enabled = enabled
        self.path = run_dir / METRICS_FILE
        self.tb = None
        if not enabled:
            return
        if truncate_after is None:
            self.path.write_text("")
        elif self.path.exists():  # resumed: drop lines a crashed run wrote after its checkpoint
            keep = [line for line in self.path.read_text().splitlines()
                    if _before_checkpoint(_parse_line(line), truncate_after)]
            tmp = self.path.with_name(f".{METRICS_FILE}.tmp")  # a kill while rewriting loses no line
            tmp.write_text("".join(line + "\n" for line in keep))
            os.replace(tmp, self.path)
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(run_dir / "tensorboard"))

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.tb is not None:
            for key, value in record.items():
                if isinstance(value, (int, float)) and key not in ("step", "time"):
                    self.tb.add_scalar(f"{record['kind']}/{key}", value, record["step"])

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def _parse_line(line: str) -> dict | None:
    """A metrics line, or None for a blank one or one a killed run left half written."""
    try:
        return json.loads(line) if line.strip() else None
    except ValueError:
        return None


def _before_checkpoint(record: dict | None, step: int) -> bool:
    """Whether a metrics line belongs before the checkpoint of ``step`` (a refresh at a step comes after it)."""
    if record is None:
        return False
    at = record.get("step", 0)
    return at < step or (at == step and record.get("kind") != "refresh")


# ---------------------------------------------------------------- run
def run(config: TrainConfig, on_step: Callable[[StepContext], None] | None = None) -> dict:
    """Train the student on the cache as ``config`` says; return a summary dict.

    Raises ConfigError (bad options, resume mismatch), FingerprintMismatchError (the
    student's tokenizer is not the cache's; checked before any model is loaded) or
    CheckpointError, all before any training compute.
    """
    config.validate()
    d = _init_distributed(config)
    try:
        return _run(config, d, on_step)
    except OSError as err:  # the run folder or the cache is full or not writable: one clear line
        problem = ckpt.disk_problem(err)
        if problem is None:
            raise
        raise ckpt.CheckpointError(
            f"{problem} at {err.filename or config.out} ({err.strerror}). Checkpoints and "
            "shards committed so far are intact; fix the destination and rerun (with --resume once "
            "the run has a checkpoint)."
        ) from None
    finally:
        if d.owns_group:
            dist.destroy_process_group()


def _run(config: TrainConfig, d: _Dist, on_step) -> dict:
    from kd.stages import models

    t_start = time.time()
    run_dir = Path(config.out)
    device, autocast_dtype = _resolve_device_dtype(config, d)
    if config.fsdp and d.world_size == 1:
        raise ConfigError("--fsdp: needs several processes (run under torchrun); drop --fsdp for one process")

    # ---- resume or fresh start: decide before loading anything heavy
    resume_dir = ckpt.latest_checkpoint(run_dir) if run_dir.exists() else None
    saved = None
    if config.resume:
        if resume_dir is None:
            raise ConfigError(f"--resume: {run_dir} has no checkpoint yet; drop --resume to start a new run")
        saved = ckpt.load_trainer_state(resume_dir)
        diffs = config.resume_differences(TrainConfig.from_dict(saved["config"]))
        if diffs:
            raise ConfigError(
                f"--resume: this run's options differ from the checkpoint {resume_dir}:\n  "
                + "\n  ".join(diffs) + "\nUse the checkpoint's values, or start a new run in another --out."
            )
        if saved["world_size"] != d.world_size:
            raise ConfigError(
                f"--resume: the checkpoint was written by {saved['world_size']} processes, this run has "
                f"{d.world_size}; exact resume needs the same number (the data is split per process)"
            )
    elif resume_dir is not None:
        raise ConfigError(f"--out {run_dir} already holds checkpoints; pass --resume to continue it or choose another --out")

    # ---- the student's tokenizer must be the cache's, before any compute
    cache = LogitCache.open(config.cache)
    student_path = resume_dir if saved is not None else models.resolve_model_path(config.student, role="student")
    tokenizer = models.load_tokenizer(student_path)
    student_tok = models.tokenizer_fingerprint(tokenizer, name=Path(student_path).name)
    cache_tok = cache.fingerprint.tokenizer
    if student_tok.sha256 != cache_tok.sha256:
        raise FingerprintMismatchError(
            f"the student's tokenizer differs from the cache's: student {config.student} ({student_path}) has "
            f"{student_tok.name or '?'} (vocab {student_tok.vocab_size}, {student_tok.sha256[:12]}), the cache "
            f"{config.cache} was made with {cache_tok.name or '?'} (vocab {cache_tok.vocab_size}, "
            f"{cache_tok.sha256[:12]}). Train a student with the teacher's tokenizer, or generate a cache "
            "with this student's tokenizer."
        )

    # ---- refresh settings (teacher, prompts, run id) are checked before any model loads
    refresher = Refresher(config, cache, run_dir, rank=d.rank, world_size=d.world_size, device=device,
                          tokenizer=tokenizer, saved_state=saved.get("refresh") if saved is not None else None)

    # ---- model, optimizer, data
    resolved = replace(config, device=str(device), dtype=str(autocast_dtype or torch.float32).removeprefix("torch."))
    if d.main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / CONFIG_FILE).write_text(resolved.to_json())
        if saved is None:  # folders a crashed earlier start renamed but never pointed `latest` at
            ckpt.discard_checkpoints_after(run_dir, 0)
        if refresher.enabled:
            refresher.write_run_file()
    _seed_everything(config.seed)
    student = models.load_model(student_path, device=device, dtype=torch.float32)
    if student.get_output_embeddings().weight.shape[0] < cache_tok.vocab_size:
        raise ConfigError(
            f"--student: its lm_head has {student.get_output_embeddings().weight.shape[0]} rows, fewer than the "
            f"cache's vocabulary ({cache_tok.vocab_size})"
        )
    student.config.use_cache = False
    student.train()
    if config.compile:
        student.get_decoder().compile()
    step_module = DistillStep(student, config.loss_config(), config.chunk_size)
    model = _wrap(step_module, config, d, device)
    optimizer = torch.optim.AdamW(student.parameters(), lr=config.lr, betas=(0.9, 0.95),
                                  weight_decay=config.weight_decay, eps=1e-8)
    loader = MixLoader(cache, config.loader_config("train"), config.on_policy_fraction,
                       rank=d.rank, world_size=d.world_size)
    refresher.attach(student, optimizer, loader)
    eval_loader = None
    if config.eval_every > 0:  # base shards only: refresh rounds must not move the held-out set
        eval_loader = CacheLoader(cache, config.loader_config("heldout"), rank=d.rank, world_size=d.world_size,
                                  shard_filter=lambda record: not is_refresh_record(record))
    step = 0
    if saved is not None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        set_optimizer_state_dict(student, optimizer, saved["optimizer"],
                                 options=StateDictOptions(full_state_dict=True))
        loader.load_state_dict(saved["loader"])
        step = int(saved["step"])
        if d.main:
            ckpt.discard_checkpoints_after(run_dir, step)
            # temp files and half-pruned folders of a run killed while saving; when it died in
            # its last save, no later save would clean them
            ckpt.prune_checkpoints(run_dir, config.keep)
        ckpt.restore_rng_state(saved["rng"][d.rank])
    log = _MetricsLog(run_dir, d.main, config.tensorboard, truncate_after=step if saved is not None else None)
    try:
        summary = train_loop(
            config=resolved, model=model, student=student, optimizer=optimizer, loader=loader,
            eval_loader=eval_loader, tokenizer=tokenizer, log=log, d=d, device=device,
            autocast_dtype=autocast_dtype, start_step=step, refresher=refresher,
            resumed=saved is not None, on_step=on_step,
        )
    finally:
        log.close()
        loader.close()
        if eval_loader is not None:
            eval_loader.close()
        refresher.close()
    summary.update(run_dir=str(run_dir), student_path=str(student_path),
                   resumed_from=None if saved is None else int(saved["step"]), wall_s=time.time() - t_start)
    return summary


def _wrap(step_module: DistillStep, config: TrainConfig, d: _Dist, device: torch.device) -> nn.Module:
    if d.world_size == 1:
        return step_module
    if config.fsdp:
        from torch.distributed.fsdp import fully_shard

        for layer in step_module.student.get_decoder().layers:
            fully_shard(layer)
        fully_shard(step_module)
        return step_module
    from torch.nn.parallel import DistributedDataParallel as DDP

    return DDP(step_module)  # batches are already on the device: no device_ids, no input scatter


def _set_grad_sync(model: nn.Module, enabled: bool) -> None:
    """Skip the gradient all-reduce on all but the last micro-batch of a step."""
    if hasattr(model, "require_backward_grad_sync"):  # DDP
        model.require_backward_grad_sync = enabled
    elif hasattr(model, "set_requires_gradient_sync"):  # FSDP2
        model.set_requires_gradient_sync(enabled)


def _full_states(student: nn.Module, optimizer) -> tuple[dict, dict]:
    """Full, CPU model and optimizer state dicts (gathers FSDP shards; collective under FSDP)."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    model_state = get_model_state_dict(student, options=options)
    # Gathering copies tied parameters (embeddings = lm_head) apart; point them at one tensor
    # again so save_pretrained writes the tied weight once, as transformers and vLLM expect.
    names_of: dict[int, list[str]] = {}
    for name, param in student.named_parameters(remove_duplicate=False):
        names_of.setdefault(id(param), []).append(name)
    for names in names_of.values():
        for name in names[1:]:
            if names[0] in model_state and name in model_state:
                model_state[name] = model_state[names[0]]
    return model_state, get_optimizer_state_dict(student, optimizer, options=options)


def _save(config, d, run_dir, step, student, optimizer, loader, tokenizer, refresher) -> Path | None:
    model_state, optim_state = _full_states(student, optimizer)
    rng = ckpt.capture_rng_state()
    all_rng = [None] * d.world_size
    if d.world_size > 1:
        dist.all_gather_object(all_rng, rng)
    else:
        all_rng = [rng]
    path = None
    if d.main:
        trainer_state = {
            "step": step, "world_size": d.world_size, "optimizer": optim_state,
            "loader": loader.state_dict(), "rng": all_rng, "config": config.to_dict(),
            "refresh": refresher.state_dict(),
        }
        path = ckpt.save_checkpoint(run_dir, step, student, model_state, tokenizer, trainer_state,
                                    config.to_dict(), config.keep)
    if d.world_size > 1:
        dist.barrier()
    return path


def train_loop(*, config: TrainConfig, model, student, optimizer, loader: MixLoader, eval_loader,
               tokenizer, log: _MetricsLog, d: _Dist, device, autocast_dtype, start_step: int,
               refresher: Refresher, resumed: bool, on_step) -> dict:
    """The loop of the module docstring, from ``start_step`` to ``config.steps``."""
    run_dir = Path(config.out)
    eval_start = eval_loader.state_dict() if eval_loader is not None else None
    params = [p for p in student.parameters() if p.requires_grad]
    t_begin, tokens_seen = time.time(), 0
    last_eval, last_record = None, {}

    def run_eval(at: int) -> None:
        nonlocal last_eval
        eval_loader.load_state_dict(eval_start)  # the same held-out batches every time
        batches = (next(eval_loader) for _ in range(min(config.eval_batches, len(eval_loader))))
        last_eval = {"kind": "eval", "step": at, "split": "heldout",
                     **evaluate(model, batches, device, autocast_dtype), "time": time.time()}
        log.write(last_eval)

    if eval_loader is not None and start_step == 0:
        run_eval(0)
    if not resumed and refresher.wants_checkpoint(start_step):  # the first round samples these weights
        _save(config, d, run_dir, start_step, student, optimizer, loader, tokenizer, refresher)
    staleness = refresher.round_steps  # round -> student step of its samples; kept current by the refresher
    bar = tqdm(total=config.steps, initial=start_step, disable=not (config.progress and d.main),
               unit="step", dynamic_ncols=True)
    for step in range(start_step, config.steps):
        refresh_record = refresher.before_step(step)
        if refresh_record is not None:
            log.write(refresh_record)
        t0, wait0 = time.perf_counter(), loader.stats.wait_s
        lr = lr_at(step, config)
        for group in optimizer.param_groups:
            group["lr"] = lr
        # (loss, parts..., tokens, loss positions, staleness sum, staleness count), summed over micro-batches
        stats = None
        for micro in range(config.grad_accum):
            cpu_batch = next(loader)
            batch = cpu_batch.to(device)
            _set_grad_sync(model, micro == config.grad_accum - 1)
            with _autocast(device, autocast_dtype):
                out = model(batch)
            (out.total / config.grad_accum).backward()
            names = list(out.parts)
            known = [staleness[r] for r, s in zip(cpu_batch.round.tolist(), cpu_batch.source.tolist())
                     if s == SOURCE_CODE["student"] and r in staleness]
            extra = [cpu_batch.num_tokens, cpu_batch.num_loss_positions, sum(known), len(known)]
            row = torch.cat([torch.stack([out.total.detach(), *(out.parts[n] for n in names)]).double(),
                             torch.tensor(extra, dtype=torch.float64, device=device)])
            stats = row if stats is None else stats + row
        grad_norm = torch.nn.utils.clip_grad_norm_(params, config.clip if config.clip > 0 else float("inf"))
        if hasattr(grad_norm, "full_tensor"):  # FSDP2: a DTensor
            grad_norm = grad_norm.full_tensor()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if d.world_size > 1:
            dist.all_reduce(stats)
        values = stats.tolist()  # the step's one host sync, before the clock stops
        step_s = time.perf_counter() - t0
        n_micro = config.grad_accum * d.world_size
        tokens, positions, stale_sum, stale_n = values[-4:]
        tokens_seen += int(tokens)
        record = {
            "kind": "train", "step": step + 1, "loss": values[0] / n_micro,
            **{f"loss_{n}": v / n_micro for n, v in zip(names, values[1:-4])},
            "lr": lr, "grad_norm": float(grad_norm), "tokens": int(tokens), "loss_positions": int(positions),
            "tokens_per_s": tokens / step_s, "step_s": step_s, "data_wait_s": loader.stats.wait_s - wait0,
            "staleness": step - stale_sum / stale_n if stale_n else None,
            "time": time.time(), "elapsed_s": time.time() - t_begin,
        }
        log.write(record)
        last_record = record
        bar.set_postfix(loss=f"{record['loss']:.4f}", tok_s=f"{record['tokens_per_s']:.0f}", refresh=False)
        bar.update(1)
        done = step + 1
        if eval_loader is not None and (done % config.eval_every == 0 or done == config.steps):
            run_eval(done)
        if (config.save_every and done % config.save_every == 0) or done == config.steps \
                or refresher.wants_checkpoint(done):
            _save(config, d, run_dir, done, student, optimizer, loader, tokenizer, refresher)
        if on_step is not None:
            on_step(StepContext(done, student, loader, config, run_dir, d.rank, d.world_size, record))
    bar.close()
    elapsed = time.time() - t_begin
    return {
        "step": max(start_step, config.steps),
        "final_loss": last_record.get("loss"),
        "last_eval": {k: last_eval[k] for k in ("step", "kl", "top1", "ce", "positions")} if last_eval else None,
        "tokens": tokens_seen,
        "tokens_per_s": tokens_seen / elapsed if elapsed > 0 else None,
        "checkpoint": str(ckpt.latest_checkpoint(run_dir)) if d.main else None,
        # each process's replica (None under FSDP, where a process holds only shards)
        "weights_sha256": None if config.fsdp else _weights_sha256(student.state_dict()),
    }
