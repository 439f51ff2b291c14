"""``kd generate``: prompts -> completions -> teacher top-k -> committed cache shards.

The algorithm, per shard of prompt rows:

1. encode the rows (``prompts.PromptSource``): chat template, length policy;
2. completions: sampled from the student (``--source student``, on-policy data),
   from the teacher (``--source teacher``, sequence-level KD), or taken from the
   data (``--source dataset``); sample s of prompt row r draws from its own RNG
   seeded by ``derive_seed(seed, round, r, s)``, so content does not depend on
   batching, on which worker ran the shard, or on a restart;
3. the teacher scores prompt + completion (``Scorer.score``): top-k ids and
   log-probs, target and tail log-probs at every completion position;
4. the shard is written and committed atomically (``LogitCache.write_shard``).

Work is cut deterministically: shard j holds prompt rows
``[j * shard_size, (j + 1) * shard_size)`` clipped to the requested range, is
named ``r<round:04d>-p<first:09d>-<end:09d>``, and belongs to worker
``j % num_workers``. A rerun skips committed shards and redoes the rest, so a run
killed at any moment and rerun ends with exactly the sequences of an
uninterrupted run. A committed shard whose provenance disagrees with this run's
sampling settings is refused rather than silently kept.

Model residency (``--offload``):

- ``off``: sampler and scorer stay loaded for the whole run (one model object
  when the teacher also samples). The default on CPU.
- ``on``: per group of ``--offload-group`` shards, load the sampler, sample the
  group's prompts, close it; load the scorer, score, write the shards, close it.
  For GPUs that cannot hold student and teacher together.
- ``auto``: ``off`` on CPU; on CUDA ``off`` when the two models' weights fit in
  half of the free GPU memory, else ``on``.

``generate_shards`` is the same loop as a library call (the trainer's
on-policy refresh passes an in-memory student's sampler).
"""

from __future__ import annotations

import errno
import hashlib
import os
import time
from dataclasses import dataclass, fields
from datetime import datetime, timezone
from typing import Callable

import numpy as np

from kd import __version__
from kd.stages.generate import prompts as prompts_mod
from kd.stages.generate.backend import Completion, Sampler, SamplingParams, Scorer
from kd.storage.batch import SequenceBatch
from kd.storage.errors import CacheError, ConfigError, FingerprintMismatchError, ShardExistsError
from kd.storage.format import SOURCE_CODE, SOURCES, CacheFingerprint, CodecConfig

BACKENDS = ("hf", "vllm")
OFFLOAD_MODES = ("auto", "on", "off")
DTYPES = ("auto", "float32", "bfloat16", "float16")
# Provenance keys that decide a shard's content: a committed shard must agree on them to be reused.
CONTENT_KEYS = ("source", "round", "student_step", "sampling", "prompt_options")


@dataclass(frozen=True)
class GenerateConfig:
    """Every option of ``kd generate``: one field per flag, validated in ``validate``."""

    data: str = ""
    """Prompt data: a local .jsonl/.json/.parquet/.csv file, a folder of them, or a dataset
    name already in the local Hugging Face cache (kd does not download). Required unless --follow."""
    out: str = ""
    """The logit cache to write: a local folder or an fsspec URL. Created when missing; an
    existing cache is appended to only if its teacher, tokenizer, k and codec match. Required
    unless --follow."""
    student: str = "default"
    """Student model: a Hugging Face folder, a hub name already cached, or 'default'."""
    teacher: str = "default"
    """Teacher model: a Hugging Face folder, a hub name already cached, or 'default' (the embedded one)."""
    source: str = "student"
    """Who writes the completions: 'student' (on-policy samples), 'teacher' (sequence-level KD)
    or 'dataset' (score the completions already in the data)."""
    split: str = "train"
    """Split of the prompt data (a single local file has only 'train')."""
    prompt_field: str = ""
    """Column holding a plain prompt or a chat 'messages' list; default: per row, 'messages' when
    it is set, else 'prompt'."""
    completion_field: str = ""
    """With --source dataset: column holding the completion text; default: 'completion' or
    'response' if present, else the final assistant turn of 'messages'."""
    row_start: int = 0
    """First prompt row (index in the split) to use."""
    row_end: int | None = None
    """End (exclusive) of the prompt rows to use; default: the end of the split."""
    limit: int | None = None
    """Use at most this many prompt rows from --row-start."""
    chat_template: bool = True
    """Wrap plain prompts as one user message through the tokenizer's chat template (when it has one)."""
    max_prompt_tokens: int = 1024
    """Prompts longer than this many tokens are truncated or skipped (see --long-prompts)."""
    long_prompts: str = "truncate-left"
    """What to do with a prompt over --max-prompt-tokens: 'truncate-left' (keep its end) or 'skip'."""
    k: int = 64
    """How many teacher log-probs to keep per position (the top-k)."""
    codec: str = "sqrtq"
    """Top-k codec: 'sqrtq' (compact, documented error) or 'raw' (lossless fp32)."""
    codec_levels: int = 255
    """sqrtq codec only: sqrt(probability) is rounded to a multiple of 1/levels."""
    zstd_level: int = 5
    """Compression level of the zstd codec on every array."""
    temperature: float = 1.0
    """Sampling temperature (0 = greedy). Recorded log-probs are always at temperature 1."""
    top_p: float = 1.0
    """Nucleus sampling: sample among the most likely tokens holding this much probability."""
    max_new_tokens: int = 256
    """Longest completion to sample, in tokens."""
    num_samples: int = 1
    """Completions sampled per prompt."""
    seed: int = 0
    """Base seed; each (round, prompt row, sample) gets its own seed derived from it."""
    round: int = 0
    """Refresh round written into the shards (0 = initial data); part of the shard names."""
    student_step: int | None = None
    """Training step of the student, for provenance; default: from its trainer_state.json, else 0."""
    backend: str = "hf"
    """Generation backend: 'hf' (transformers, CPU or CUDA) or 'vllm'."""
    vllm_options: str = ""
    """--backend vllm: engine settings as a JSON object, e.g. '{"enforce_eager": true,
    "gpu_memory_utilization": 0.5}': kd's max_model_len, gpu_memory_utilization (on CPU: of RAM),
    kv_cache_memory_bytes, enforce_eager (skip compilation: starts in seconds instead of minutes on
    CPU, samples slower), multiprocess; any other key goes to vllm.LLM unchanged."""
    device: str = "auto"
    """Device for the hf backend: 'auto' (cuda if available), 'cpu', 'cuda' or 'cuda:N'."""
    dtype: str = "auto"
    """Model weights dtype: 'auto' (bfloat16 on CUDA, float32 on CPU), float32, bfloat16, float16."""
    batch_size: int = 16
    """Prompts sampled together in one batch."""
    score_batch_tokens: int = 8192
    """Teacher scoring: padded tokens per batch (sequences are bucketed by length)."""
    offload: str = "auto"
    """Model residency: 'off' keeps sampler and teacher loaded, 'on' swaps them per shard group
    (for a GPU that cannot hold both), 'auto' decides from free GPU memory (off on CPU)."""
    offload_group: int = 1
    """With --offload on: shards sampled per model swap (more = fewer reloads, more lost on a kill)."""
    shard_size: int = 256
    """Prompt rows per shard: the unit of commit, resume and worker assignment."""
    worker: int | None = None
    """This worker's index; default: $RANK, else 0. Worker i runs shards j with j % N == i."""
    num_workers: int | None = None
    """Number of workers sharing the run; default: $WORLD_SIZE, else 1."""
    progress: bool = True
    """Show a progress bar on stderr."""
    follow: str = ""
    """Async refresh worker: follow the kd train run folder RUN_DIR (--refresh-mode async) and write a
    round of student samples from each new checkpoint until the run ends. The run's config gives
    data, cache, teacher, prompts per round and sampling; --device, --dtype, --backend and
    --batch-size apply. See kd/stages/train/refresh.py."""

    # ------------------------------------------------------------ derived values
    def workers(self) -> tuple[int, int]:
        """(worker, num_workers), falling back to torchrun's RANK / WORLD_SIZE."""
        worker = self.worker if self.worker is not None else int(os.environ.get("RANK", "0") or 0)
        num = self.num_workers if self.num_workers is not None else int(os.environ.get("WORLD_SIZE", "1") or 1)
        return worker, num

    def sampling(self) -> SamplingParams:
        return SamplingParams(temperature=self.temperature, top_p=self.top_p, max_new_tokens=self.max_new_tokens)

    def codec_config(self) -> CodecConfig:
        return CodecConfig(name=self.codec, levels=self.codec_levels, zstd_level=self.zstd_level)

    def validate(self) -> None:
        """Raise ConfigError listing every invalid option at once."""
        problems = []

        def need(ok: bool, flag: str, msg: str) -> None:
            if not ok:
                problems.append(f"--{flag.replace('_', '-')}: {msg}")

        need(bool(self.data.strip()) or bool(self.follow), "data", "is required (a file, folder or dataset name)")
        need(bool(self.out.strip()) or bool(self.follow), "out", "is required (the cache folder or URL)")
        need(bool(self.student.strip()), "student", "must name a model or 'default'")
        need(bool(self.teacher.strip()), "teacher", "must name a model or 'default'")
        need(self.source in SOURCES, "source", f"must be one of {list(SOURCES)}, got {self.source!r}")
        from kd.stages.generate.vllm_backend import engine_option_problems

        problems += engine_option_problems(
            self.vllm_options, "--vllm-options",
            "" if self.backend == "vllm" else f"only applies to --backend vllm (this run uses --backend {self.backend})")
        need(self.row_start >= 0, "row_start", f"must be >= 0, got {self.row_start}")
        need(self.row_end is None or self.row_end > self.row_start, "row_end",
             f"must be > --row-start ({self.row_start}), got {self.row_end}")
        need(self.limit is None or self.limit >= 1, "limit", f"must be >= 1, got {self.limit}")
        need(self.max_prompt_tokens >= 1, "max_prompt_tokens", f"must be >= 1, got {self.max_prompt_tokens}")
        need(self.long_prompts in prompts_mod.LONG_PROMPT_POLICIES, "long_prompts",
             f"must be one of {list(prompts_mod.LONG_PROMPT_POLICIES)}, got {self.long_prompts!r}")
        need(self.k >= 1, "k", f"must be >= 1, got {self.k}")
        try:
            self.codec_config()
        except CacheError as err:
            problems.append(f"--codec/--codec-levels/--zstd-level: {err}")
        need(self.temperature >= 0 and np.isfinite(self.temperature), "temperature",
             f"must be a finite number >= 0, got {self.temperature}")
        need(0 < self.top_p <= 1, "top_p", f"must be in (0, 1], got {self.top_p}")
        need(self.max_new_tokens >= 1, "max_new_tokens", f"must be >= 1, got {self.max_new_tokens}")
        need(self.num_samples >= 1, "num_samples", f"must be >= 1, got {self.num_samples}")
        need(self.source != "dataset" or self.num_samples == 1, "num_samples",
             "must be 1 with --source dataset (the data holds one completion per row)")
        need(0 <= self.seed < 2**63, "seed", f"must be in [0, 2^63), got {self.seed}")
        need(0 <= self.round <= 9999, "round", f"must be in [0, 9999], got {self.round}")
        need(self.student_step is None or self.student_step >= 0, "student_step",
             f"must be >= 0, got {self.student_step}")
        need(self.backend in BACKENDS, "backend", f"must be one of {list(BACKENDS)}, got {self.backend!r}")
        need(self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:"), "device",
             f"must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {self.device!r}")
        need(self.dtype in DTYPES, "dtype", f"must be one of {list(DTYPES)}, got {self.dtype!r}")
        need(self.batch_size >= 1, "batch_size", f"must be >= 1, got {self.batch_size}")
        need(self.score_batch_tokens >= 1, "score_batch_tokens", f"must be >= 1, got {self.score_batch_tokens}")
        need(self.offload in OFFLOAD_MODES, "offload", f"must be one of {list(OFFLOAD_MODES)}, got {self.offload!r}")
        need(self.offload_group >= 1, "offload_group", f"must be >= 1, got {self.offload_group}")
        need(self.shard_size >= 1, "shard_size", f"must be >= 1, got {self.shard_size}")
        try:
            worker, num = self.workers()
        except ValueError:
            problems.append("$RANK / $WORLD_SIZE: must be integers (or pass --worker / --num-workers)")
        else:
            need(num >= 1, "num_workers", f"must be >= 1, got {num}")
            need(0 <= worker < max(num, 1), "worker", f"must be in [0, num_workers={num}), got {worker}")
        if problems:
            raise ConfigError("invalid generate options:\n  " + "\n  ".join(problems))


# ---------------------------------------------------------------- work units
@dataclass(frozen=True)
class ShardPlan:
    """One unit of work: prompt rows [row_start, row_end) of one round."""

    index: int  # j: the shard's position in the grid of shard_size rows
    round: int
    row_start: int
    row_end: int

    @property
    def name(self) -> str:
        return f"r{self.round:04d}-p{self.row_start:09d}-{self.row_end:09d}"


def plan_shards(row_start: int, row_end: int, shard_size: int, round: int = 0,
                worker: int = 0, num_workers: int = 1) -> list[ShardPlan]:
    """This worker's shards of rows [row_start, row_end): grid cells of ``shard_size`` rows, j % N == worker."""
    plans = []
    for j in range(row_start // shard_size, -(-row_end // shard_size)):
        lo, hi = max(row_start, j * shard_size), min(row_end, (j + 1) * shard_size)
        if lo < hi and j % num_workers == worker:
            plans.append(ShardPlan(index=j, round=round, row_start=lo, row_end=hi))
    return plans


def derive_seed(seed: int, round: int, row: int, sample: int) -> int:
    """A 63-bit seed for one (round, prompt row, sample): the same on every machine and Python."""
    digest = hashlib.sha256(f"kd-generate:{seed}:{round}:{row}:{sample}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def _parse_shard_rows(name: str) -> tuple[int, int, int] | None:
    try:
        r, p, end = name.split("-")
        return int(r[1:]), int(p[1:]), int(end)
    except ValueError:
        return None


# ---------------------------------------------------------------- the loop
@dataclass
class _Pending:
    plan: ShardPlan
    encoded: prompts_mod.EncodedRows
    items: list[tuple[int, int, list[int]]]  # (row, sample index, prompt ids)
    completions: list[Completion] | None = None


def _resolve(obj_or_factory):
    return obj_or_factory if hasattr(obj_or_factory, "sample") or hasattr(obj_or_factory, "score") \
        else obj_or_factory()


def generate_shards(
    prompts: prompts_mod.PromptSource,
    sampler: Sampler | Callable[[], Sampler] | None,
    scorer: Scorer | Callable[[], Scorer],
    cache,
    *,
    round: int = 0,
    rows: tuple[int, int] | None = None,
    shard_size: int = 256,
    worker: int = 0,
    num_workers: int = 1,
    source: str = "student",
    params: SamplingParams = SamplingParams(),
    seed: int = 0,
    num_samples: int = 1,
    offload: bool = False,
    offload_group: int = 1,
    provenance: dict | None = None,
    progress: bool = True,
    sample_chunk: int = 256,
) -> dict:
    """Sample, score and commit this worker's uncommitted shards of ``rows``; return a summary.

    ``sampler`` / ``scorer`` are backend objects or zero-argument factories; with
    ``offload`` they are created and closed around every group of shards,
    otherwise created once (and both closed at the end). ``sampler`` is unused
    (may be None) with ``source='dataset'``. ``provenance`` is merged into each
    shard's provenance (teacher, student, dataset, ...). ``sample_chunk``
    sequences go to ``sampler.sample`` per call (the progress bar moves per call).
    """
    from tqdm.auto import tqdm

    if offload and any(hasattr(x, "sample") or hasattr(x, "score") for x in (sampler, scorer)):
        raise TypeError("offload=True reloads models per shard group: pass sampler and scorer factories")
    t0 = time.time()
    start, end = rows if rows is not None else (0, len(prompts))
    plans = plan_shards(start, end, shard_size, round, worker, num_workers)
    base = dict(provenance or {})
    base.update(source=source, round=round, kd_version=__version__,
                sampling={**params.__dict__, "seed": seed, "num_samples": num_samples})
    todo = []
    for plan in plans:
        if cache.is_committed(plan.name):
            _check_reusable(cache, plan, base)
        else:
            todo.append(plan)
    _check_overlaps(cache, todo)
    if todo:
        _check_writable(cache)

    stats = dict(shards_planned=len(plans), shards_written=0, shards_already_committed=len(plans) - len(todo),
                 sequences=0, tokens=0, completion_tokens=0, bytes=0, prompts_skipped_too_long=0,
                 prompts_truncated=0)
    bar = tqdm(total=sum(p.row_end - p.row_start for p in todo), unit="prompt", desc="generate",
               disable=not progress, dynamic_ncols=True)
    sampler_obj = scorer_obj = None
    sampled = 0  # completion tokens sampled so far, for the tokens/s display
    k = cache.fingerprint.k
    try:
        group = offload_group if offload else 1
        for g in range(0, len(todo), group):
            pending = [_encode(prompts, plan, source, num_samples) for plan in todo[g : g + group]]
            if source != "dataset":
                if sampler_obj is None:
                    sampler_obj = _resolve(sampler)
                for p in pending:
                    p.completions = []
                    for c0 in range(0, len(p.items), sample_chunk):
                        chunk = p.items[c0 : c0 + sample_chunk]
                        done = sampler_obj.sample([ids for _, _, ids in chunk], params,
                                                  [derive_seed(seed, round, r, s) for r, s, _ in chunk])
                        p.completions += done
                        sampled += sum(len(c.token_ids) for c in done)
                        bar.update((c0 + len(chunk)) // num_samples - c0 // num_samples)  # prompts done
                        bar.set_postfix(tok_s=f"{sampled / max(time.time() - t0, 1e-9):.0f}")
                    bar.update(len(p.encoded.skipped_long))
                if offload:
                    sampler_obj.close()
                    sampler_obj = None
            if scorer_obj is None:
                scorer_obj = _resolve(scorer)
            for p in pending:
                batch = _score(p, scorer_obj, source, k, round)
                record = _write(cache, p, batch, base)
                if record is None:  # another writer committed it meanwhile (and its settings agree)
                    stats["shards_already_committed"] += 1
                    continue
                stats["shards_written"] += 1
                stats["sequences"] += batch.num_sequences
                stats["tokens"] += batch.num_tokens
                stats["completion_tokens"] += batch.num_positions
                stats["bytes"] += sum(o["size"] for o in record.objects.values())
                stats["prompts_skipped_too_long"] += len(p.encoded.skipped_long)
                stats["prompts_truncated"] += len(p.encoded.truncated)
                if source == "dataset":
                    bar.update(p.plan.row_end - p.plan.row_start)
                    bar.set_postfix(tok_s=f"{stats['completion_tokens'] / max(time.time() - t0, 1e-9):.0f}")
            if offload:
                scorer_obj.close()
                scorer_obj = None
    finally:
        bar.close()
        for obj in (sampler_obj, scorer_obj):
            if obj is not None:
                obj.close()
    seconds = time.time() - t0
    stats.update(
        seconds=round_(seconds, 3),
        bytes_per_token=round_(stats["bytes"] / stats["completion_tokens"], 2) if stats["completion_tokens"] else None,
        completion_tokens_per_s=round_(stats["completion_tokens"] / seconds, 1) if seconds > 0 else None,
        cache=cache.url,
    )
    return stats


def round_(x: float, digits: int) -> float:
    return float(f"{x:.{digits}f}")


def _encode(prompts, plan: ShardPlan, source: str, num_samples: int) -> _Pending:
    encoded = prompts.encode(plan.row_start, plan.row_end)
    items = [(r.row, s, r.prompt_ids) for r in encoded.rows for s in range(num_samples)]
    pending = _Pending(plan=plan, encoded=encoded, items=items)
    if source == "dataset":
        pending.completions = [
            Completion(token_ids=np.asarray(r.completion_ids, np.int32),
                       logprobs=np.full(len(r.completion_ids), np.nan, np.float32))
            for r in encoded.rows
        ]
    return pending


def _score(p: _Pending, scorer, source: str, k: int, round: int) -> SequenceBatch:
    seqs = [list(ids) + c.token_ids.tolist() for (_, _, ids), c in zip(p.items, p.completions)]
    starts = [len(ids) for _, _, ids in p.items]
    scores = scorer.score(seqs, starts, k) if seqs else []
    n = len(seqs)
    lengths = np.array([len(s) for s in seqs], dtype=np.int64)

    def cat(arrays, dtype, shape=(0,)):
        return np.concatenate(arrays).astype(dtype) if arrays else np.zeros(shape, dtype)

    behaviour = [c.logprobs if source == "student" else np.full(len(c.token_ids), np.nan, np.float32)
                 for c in p.completions]
    return SequenceBatch(
        token_ids=cat([np.asarray(s, np.int32) for s in seqs], np.int32),
        seq_offsets=np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
        completion_start=np.asarray(starts, np.int32),
        topk_ids=cat([s.topk_ids for s in scores], np.int32, (0, k)),
        topk_logprobs=cat([s.topk_logprobs for s in scores], np.float32, (0, k)),
        tail_logprobs=cat([s.tail_logprobs for s in scores], np.float32),
        target_logprobs=cat([s.target_logprobs for s in scores], np.float32),
        behaviour_logprobs=cat(behaviour, np.float32),
        source=np.full(n, SOURCE_CODE[source], np.uint8),
        round=np.full(n, round, np.int32),
        prompt_index=np.asarray([r for r, _, _ in p.items], np.int64),
        sample_index=np.asarray([s for _, s, _ in p.items], np.int32),
    )


def _write(cache, p: _Pending, batch: SequenceBatch, base: dict):
    provenance = {
        **base,
        "dataset": {**base.get("dataset", {}), "rows": [p.plan.row_start, p.plan.row_end]},
        "prompts_skipped_too_long": p.encoded.skipped_long,
        "prompts_truncated": len(p.encoded.truncated),
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    try:
        return cache.write_shard(p.plan.name, batch, provenance)
    except ShardExistsError:
        _check_reusable(cache, p.plan, base)
        return None
    except OSError as err:
        if err.errno == errno.ENOSPC:
            raise CacheError(
                f"no space left on the device while writing shard {p.plan.name} to {cache.url}. "
                "Shards committed so far are intact and the partial one is ignored; free space "
                "(or choose another --out) and rerun the same command to resume."
            ) from None
        raise CacheError(f"cannot write shard {p.plan.name} to {cache.url}: {err}") from None


def _check_writable(cache) -> None:
    """Refuse a read-only local cache folder before any model runs (object stores tell on the first write)."""
    from kd.storage import remote

    if remote.is_local(cache._fs) and not os.access(cache._root, os.W_OK):
        raise CacheError(
            f"cannot write to the cache {cache.url}: {cache._root} is read-only (read-only file system or "
            "no write permission). Make it writable or choose another --out; nothing was computed."
        )


def _check_reusable(cache, plan: ShardPlan, base: dict) -> None:
    committed = cache.load_record(plan.name).provenance
    diffs = [f"{key}: cache has {committed.get(key)!r}, this run {base.get(key)!r}"
             for key in CONTENT_KEYS if key in base and committed.get(key) != base.get(key)]
    if diffs:
        raise ConfigError(
            f"shard {plan.name} is already committed in {cache.url} with other settings ("
            + "; ".join(diffs) + "). Rerun with the same settings to resume, or use another --round or --out."
        )


def _check_overlaps(cache, todo: list[ShardPlan]) -> None:
    """Refuse shards whose rows overlap a committed shard of another name (a changed --shard-size)."""
    if not todo:
        return
    committed = [(n, rows) for n in (r.name for r in cache.committed_shards())
                 if (rows := _parse_shard_rows(n)) is not None]
    for plan in todo:
        for name, (rnd, lo, hi) in committed:
            if rnd == plan.round and lo < plan.row_end and plan.row_start < hi:
                raise ConfigError(
                    f"shard {plan.name} would overlap the committed shard {name} (same round, rows "
                    f"{lo}-{hi}): the cache was written with another --shard-size or row range. "
                    "Use the same --shard-size as before, another --round, or another --out."
                )


# ---------------------------------------------------------------- kd generate
def run(config: GenerateConfig) -> dict:
    """Validate ``config``, check models and cache, generate this worker's shards; return the summary.

    Everything that can refuse the run (options, model paths, tokenizer mismatch,
    prompt file and columns, cache fingerprint) is checked before any model is
    loaded; the cache is created only once the prompts can be read.
    """
    config.validate()
    prompts_mod.ensure_offline()
    if config.follow:  # the async refresh worker: everything else comes from the run's config
        from kd.stages.train.refresh import follow

        return follow(config.follow, device=config.device, dtype=config.dtype, backend=config.backend,
                      batch_size=config.batch_size, vllm_options=config.vllm_options)
    import transformers

    from kd.stages import models
    from kd.storage.cache import LogitCache

    transformers.utils.logging.disable_progress_bar()  # per-file loading bars drown ours

    t0 = time.time()
    worker, num_workers = config.workers()
    teacher_path = models.resolve_model_path(config.teacher, role="teacher")
    student_path = models.resolve_model_path(config.student, role="student")
    teacher_tok = models.load_tokenizer(teacher_path)
    teacher_tok_fp = models.tokenizer_fingerprint(
        teacher_tok, name=teacher_path.name, model_vocab_size=models.model_vocab_size(teacher_path))
    student_tok_fp = models.tokenizer_fingerprint(models.load_tokenizer(student_path), name=student_path.name)
    if teacher_tok_fp.sha256 != student_tok_fp.sha256:
        raise FingerprintMismatchError(
            f"the student ({config.student}) and the teacher ({config.teacher}) do not share a tokenizer "
            f"(student: {student_path}, vocab {student_tok_fp.vocab_size}, {student_tok_fp.sha256[:12]}; "
            f"teacher: {teacher_path}, vocab {teacher_tok_fp.vocab_size}, {teacher_tok_fp.sha256[:12]}). "
            "Distillation through cached top-k ids needs one vocabulary: pick a student built on "
            "the teacher's tokenizer."
        )
    fingerprint = CacheFingerprint(
        teacher=models.teacher_fingerprint(teacher_path), tokenizer=teacher_tok_fp,
        k=config.k, codec=config.codec_config(),
    )
    source = prompts_mod.PromptSource(
        config.data, teacher_tok, split=config.split, prompt_field=config.prompt_field,
        completion_field=config.completion_field, need_completion=config.source == "dataset",
        use_chat_template=config.chat_template, max_prompt_tokens=config.max_prompt_tokens,
        long_prompts=config.long_prompts,
    )
    start = config.row_start
    end = len(source) if config.row_end is None else min(config.row_end, len(source))
    if config.limit is not None:
        end = min(end, start + config.limit)
    if start >= end:
        raise ConfigError(f"--row-start {start} leaves no rows: {source.where} has {len(source)} rows")
    device, dtype = _device_dtype(config)
    try:
        cache = LogitCache.create(config.out, fingerprint)
    except OSError as err:
        raise CacheError(f"cannot create the cache at {config.out}: {err}") from None

    provenance = {
        "teacher": fingerprint.teacher.name,
        "student": str(student_path),
        "student_step": config.student_step if config.student_step is not None else student_step_of(student_path),
        "dataset": {"path": source.dataset_id, "split": config.split},
        "prompt_options": {
            "prompt_field": source.prompt_field, "completion_field": source.completion_field or "",
            "chat_template": source.use_chat_template, "max_prompt_tokens": config.max_prompt_tokens,
            "long_prompts": config.long_prompts,
        },
        "backend": config.backend,
        "generate_config": {f.name: getattr(config, f.name) for f in fields(config)},
    }
    offload = _decide_offload(config, device, [student_path, teacher_path])
    if config.backend == "hf":
        sampler, scorer = _hf_backend(config, models, teacher_tok, student_path, teacher_path, device, dtype)
    else:
        sampler, scorer = _vllm_backend(config, teacher_tok, student_path, teacher_path, dtype)
    summary = generate_shards(
        source, sampler, scorer, cache, round=config.round, rows=(start, end),
        shard_size=config.shard_size, worker=worker, num_workers=num_workers, source=config.source,
        params=config.sampling(), seed=config.seed, num_samples=config.num_samples,
        offload=offload, offload_group=config.offload_group, provenance=provenance,
        progress=config.progress, sample_chunk=8 * config.batch_size if config.backend == "hf" else 1024,
    )
    summary.update(worker=worker, num_workers=num_workers, offload=offload, device=str(device),
                   total_seconds=round_(time.time() - t0, 3))
    return summary


def student_step_of(path) -> int:
    """``global_step`` from a trainer_state.json in the student folder, else 0."""
    import json
    from pathlib import Path

    state = Path(str(path)) / "trainer_state.json"
    try:
        return int(json.loads(state.read_text()).get("global_step", 0))
    except (OSError, ValueError, TypeError, AttributeError):
        return 0


def _device_dtype(config: GenerateConfig):
    import importlib.util

    import torch

    if config.backend == "vllm" and importlib.util.find_spec("vllm") is None:
        raise ConfigError("--backend vllm: vLLM is not installed here (scripts/setup_vllm.sh on CPU, "
                          "pip install 'kd[vllm]' on CUDA), or use --backend hf")

    device = config.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"--device {device}: CUDA is not available on this machine (use --device cpu)")
    dtype = config.dtype
    if dtype == "auto":
        dtype = "bfloat16" if device.startswith("cuda") else "float32"
    return device, dtype


def _weights_bytes(path) -> int:
    from pathlib import Path

    folder = Path(str(path))
    if not folder.is_dir():
        return 0
    return sum(f.stat().st_size for f in folder.iterdir() if f.suffix in (".safetensors", ".bin", ".pt", ".gguf"))


def _decide_offload(config: GenerateConfig, device: str, paths) -> bool:
    if config.source != "student":
        return False  # one model only (the teacher samples or nothing does)
    if config.offload != "auto":
        return config.offload == "on"
    if not device.startswith("cuda"):
        return False
    import torch

    free, _ = torch.cuda.mem_get_info(torch.device(device))
    return sum(_weights_bytes(p) for p in paths) > free // 2


def eos_token_ids(tokenizer, model) -> list[int]:
    """Every id that ends a completion: the tokenizer's EOS and the model's generation config EOS."""
    ids = set()
    for value in (tokenizer.eos_token_id, getattr(getattr(model, "generation_config", None), "eos_token_id", None)):
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(int(v) for v in value)
    return sorted(ids)


def _hf_backend(config, models, tokenizer, student_path, teacher_path, device, dtype):
    from kd.stages.generate.hf_backend import HfSampler, HfScorer

    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    shared = {}

    def teacher_model():
        if config.source != "teacher":  # loaded per scorer, so offload frees it
            return models.load_model(teacher_path, device=device, dtype=dtype)
        if "teacher" not in shared:
            shared["teacher"] = models.load_model(teacher_path, device=device, dtype=dtype)
        return shared["teacher"]

    def make_sampler():
        model = teacher_model() if config.source == "teacher" else models.load_model(
            student_path, device=device, dtype=dtype)
        return HfSampler(model, eos_token_ids=eos_token_ids(tokenizer, model), pad_token_id=pad,
                         batch_size=config.batch_size)

    def make_scorer():
        return HfScorer(teacher_model(), batch_size=max(config.batch_size, 64),
                        max_batch_tokens=config.score_batch_tokens, pad_token_id=pad)

    return (make_sampler if config.source != "dataset" else None), make_scorer


def _vllm_backend(config, tokenizer, student_path, teacher_path, dtype):
    from kd.stages.generate import vllm_backend

    sampler_path = teacher_path if config.source == "teacher" else student_path

    options = vllm_backend.parse_engine_options(config.vllm_options)

    def make_sampler():
        return vllm_backend.VllmSampler(sampler_path, seed=config.seed, dtype=dtype, **options)

    def make_scorer():
        return vllm_backend.VllmScorer(teacher_path, k=config.k, seed=config.seed, dtype=dtype, **options)

    return (make_sampler if config.source != "dataset" else None), make_scorer
