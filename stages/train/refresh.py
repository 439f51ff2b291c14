"""On-policy refresh: every N steps the current student samples new data, the teacher scores it,
and training continues on it (``kd train --refresh-every N``), in one process or with a worker.

Why. Offline KD trains on sequences written once, before training; the student
it produces then generates from its own, different distribution at inference
(exposure bias). GKD trains on the student's own samples instead, which costs
one generation per step. A refresh every N steps sits between the two: each
round is used for N steps, so generation costs about 1/N of fully on-policy
training, and a replay of older data fills the rest of each batch (GKD's lambda,
DistiLLM's replay buffer).

Rounds. Round 0 is the cache as ``kd generate`` made it (any source). Refresh
round r >= 1 is sampled by the student at step s_r and scored by the teacher:

- sync mode: round r = s / N + 1 is made at every step s = 0, N, 2N, ... < steps,
  so s_r = (r - 1) * N;
- async mode: a worker makes round r from the newest checkpoint it finds
  (the trainer saves one every N steps), so s_r is that checkpoint's step.

Prompt cursor. Round r samples the prompt rows [(r-1)*M, r*M) of ``--prompts``
modulo the data size n (at most two row ranges; M <= n). A round's rows are a
function of r alone, so a resumed or restarted run samples exactly the rows an
uninterrupted one would: no prompt is duplicated or skipped by a crash.

Shards and provenance. A round is written by ``generate.run.generate_shards``,
the loop of ``kd generate`` (same seeds ``derive_seed(seed, r, row, sample)``,
same sampler / scorer backends), as shards ``r<r:04d>-p<lo>-<hi>`` of at most
256 prompt rows in the training cache (sync under DDP: ceil(M / world_size) rows, so
that every rank samples a share; the grid is kept in ``RUN_DIR/refresh.json``).
Each shard's provenance holds ``source="student"``, ``round``, ``student_step``, the student it sampled
from (a checkpoint folder when one exists for that step), and
``refresh = {run_id, round, student_step, mode, per_round}``. A round
counts only when all its shards are committed. ``run_id`` (random, kept in the
checkpoints and in ``RUN_DIR/refresh.json``) tells a run's rounds apart:

- shards without ``refresh`` provenance are the cache's own data (the base);
- rounds of other runs are never read; writing over one is refused (give each
  refresh run a cache of its own, e.g. a copy of the base cache).

The mix (``select_mix``, evaluated before every step; ``kd.stages.train.mix``
does the batching). The freshest complete round is the on-policy stream: a
fraction lambda (``--on-policy-fraction``) of every micro-batch's token budget.
Replay is the rest: the base shards and this run's older rounds sampled at most
``--max-staleness`` steps ago. Without refresh there are no rounds, so all of
the budget goes to the base shards: plain offline KD through the same code.
lambda = 1 with N = 1 is fully on-policy (each step trains on samples of the
weights it updates). The held-out evaluation reads base shards only, so it
does not move as rounds arrive.

Sync mode, before the update at a refresh step s: sample with the in-memory
student (``HfSampler`` takes the model object; no save/reload; the vllm backend
takes its state dict in place), score with the teacher, commit, and switch the
mix. A checkpoint is written at step 0, before the first round; later refreshes
need none (see Resume). Training RNG
states are saved before and restored after, and the student goes back to train
mode. Memory: on CUDA with ``--refresh-offload on`` (``auto`` decides from the
free memory) the optimizer state moves to CPU during the refresh and the
teacher is loaded for it and freed after, so teacher, student and optimizer
never share the GPU; otherwise the teacher stays loaded between refreshes. Under
DDP each rank writes its share of the round's shards (``j % world_size``),
then all ranks switch together. FSDP needs async mode.

Async mode: ``kd generate --follow RUN_DIR`` (``follow``) reads the run's
config, waits for checkpoints and writes rounds into the run's cache, one per
new checkpoint, from the newest one. The trainer checks for complete rounds
before every step and uses the newest; it waits (up to ``--refresh-wait``
seconds) only when it has no round yet (lambda > 0) or the freshest round was
sampled more than ``--max-staleness`` steps ago. A worker killed in the middle
of a round completes the missing shards on restart (with the newest checkpoint,
recorded per shard).

Staleness (trainer step - sampling step, i.e. updates applied since the
sampled weights) is logged per train step in metrics.jsonl (mean over the
step's refresh sequences; 0 when fully on-policy), and every refresh writes a
``{"kind": "refresh"}`` line: round, student step, sequences, student tokens
sampled, teacher tokens scored, seconds.

Resume. Everything a refresh changes is a function of the step and of the
committed shards: round r's rows and seeds, and the mix (``select_mix``). A run
resumed from checkpoint c (step 0 at the latest: it is always written) replays
steps c, c+1, ... and meets every refresh step again: a complete round is not
sampled again, a half-written one gets only its missing shards (``generate_shards``
skips committed ones), sampled from the same weights with the same seeds, and
the mix is recomputed. Metrics lines written after the checkpoint (the refresh
line of step c too) are dropped and written again. A run killed at any moment,
also in the middle of a refresh, and resumed therefore reads the same rounds,
none twice and none skipped, and on CPU in sync mode ends with bit-identical
weights (on CUDA, where kernels may not be deterministic, a half-written round
can be completed from weights that differ in the last bits).

Off-policy correction. ``--importance-clip c`` with ``--token-reverse-kl-weight``
multiplies the sampled-token reverse-KL term by min(exp(log q_now(x) - log
q_behaviour(x)), c), where the behaviour log-prob is the one stored at sampling
time (``losses.importance_weights``). The full-distribution divergence at a
position is not reweighted: it depends on the sampled prefix, not on the token
sampled there, so the ratio of that token is not its correction.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from kd.stages.generate.backend import SamplingParams
from kd.stages.generate.run import ShardPlan, generate_shards, plan_shards
from kd.stages.train import checkpoint as ckpt
from kd.stages.train.config import TrainConfig
from kd.storage.cache import LogitCache
from kd.storage.errors import ConfigError, FingerprintMismatchError, KdError
from kd.storage.format import ShardRecord

REFRESH_FILE = "refresh.json"
"""In the run folder: the run id and the round settings, for ``kd generate --follow``."""
SHARD_ROWS = 256
"""Most prompt rows per refresh shard (the unit of commit and of resume)."""
POLL_S = 0.25


class RefreshError(KdError):
    """A refresh cannot go on: foreign rounds in the cache, no worker, too few prompts."""


# ---------------------------------------------------------------- rounds
def round_ranges(round_: int, per_round: int, num_rows: int) -> list[tuple[int, int]]:
    """Prompt rows of refresh round r >= 1: [(r-1)*M, r*M) modulo ``num_rows``, as one or two ranges."""
    if round_ < 1 or not (1 <= per_round <= num_rows):
        raise ValueError(f"round {round_} with {per_round} prompts per round of {num_rows} rows")
    start = ((round_ - 1) * per_round) % num_rows
    end = start + per_round
    return [(start, end)] if end <= num_rows else [(start, num_rows), (0, end - num_rows)]


def round_plans(round_: int, per_round: int, num_rows: int, shard_rows: int = SHARD_ROWS) -> list[ShardPlan]:
    """The shards of round r (``kd generate``'s grid of ``shard_rows`` rows over the round's ranges)."""
    return [p for lo, hi in round_ranges(round_, per_round, num_rows) for p in plan_shards(lo, hi, shard_rows, round_)]


def sync_shard_rows(per_round: int, world_size: int) -> int:
    """Rows per shard of a sync round: every DDP rank gets a share (each writes shards j % world_size),
    at most SHARD_ROWS. One process: SHARD_ROWS."""
    if world_size <= 1:
        return SHARD_ROWS
    return max(1, min(SHARD_ROWS, -(-per_round // world_size)))


def _ranges_of(plans: list[ShardPlan]) -> list[tuple[int, int]]:
    """Merge adjacent plans into row ranges; plan_shards over a range gives back the same plans."""
    out: list[list[int]] = []
    for p in sorted(plans, key=lambda p: p.row_start):
        if out and out[-1][1] == p.row_start:
            out[-1][1] = p.row_end
        else:
            out.append([p.row_start, p.row_end])
    return [(lo, hi) for lo, hi in out]


@dataclass(frozen=True)
class Round:
    """One refresh round of this run, as committed in the cache."""

    round: int
    student_step: int  # the oldest student step among its shards
    names: tuple[str, ...]
    complete: bool


def is_refresh_record(record: ShardRecord) -> bool:
    return isinstance(record.provenance.get("refresh"), dict)


class RoundIndex:
    """The cache's base shards and this run's rounds, from commit records (each read once)."""

    def __init__(self, cache: LogitCache, run_id: str, per_round: int, num_rows: int, shard_rows: int = SHARD_ROWS):
        self.cache, self.run_id, self.per_round, self.num_rows = cache, run_id, per_round, num_rows
        self.shard_rows = shard_rows
        self._records: dict[str, ShardRecord] = {}

    def record(self, name: str) -> ShardRecord:
        if name not in self._records:
            self._records[name] = self.cache.load_record(name)
        return self._records[name]

    def scan(self) -> tuple[list[str], dict[int, Round]]:
        """(base shard names, {round: Round}) of the committed shards now."""
        base, found = [], {}
        for name in self.cache.committed_shard_names():
            info = self.record(name).provenance.get("refresh")
            if not isinstance(info, dict):
                base.append(name)
            elif info.get("run_id") == self.run_id:
                step = int(self.record(name).provenance.get("student_step", info.get("student_step", 0)))
                found.setdefault(int(info["round"]), []).append((name, step))
        rounds = {}
        for r, items in found.items():
            expected = ({p.name for p in round_plans(r, self.per_round, self.num_rows, self.shard_rows)}
                        if self.num_rows else set())
            names = {n for n, _ in items}
            rounds[r] = Round(r, min(s for _, s in items), tuple(sorted(names)), expected <= names)
        return base, rounds

    def check_owned(self, plans: list[ShardPlan]) -> list[ShardPlan]:
        """The plans still to write; raise RefreshError when another run committed one of them."""
        todo = []
        for plan in plans:
            if not self.cache.is_committed(plan.name):
                todo.append(plan)
                continue
            info = self.record(plan.name).provenance.get("refresh")
            if not (isinstance(info, dict) and info.get("run_id") == self.run_id):
                owner = f"run {info.get('run_id')}" if isinstance(info, dict) else "kd generate (not a refresh)"
                raise RefreshError(
                    f"shard {plan.name} of refresh round {plan.round} is already committed in {self.cache.url} "
                    f"by {owner}, not by this run ({self.run_id}). Each refresh run needs a cache that no other "
                    "refresh run writes to: copy the base cache (cp -r) and pass the copy as --cache."
                )
        return todo


def select_mix(base: list[str], rounds: dict[int, Round], step: int, max_staleness: int | None,
               newest: int | None = None) -> tuple[list[str], list[str], Round | None]:
    """(on-policy shards, replay shards, freshest round) before the update made at ``step``.

    On-policy: the freshest complete round (up to round ``newest``). Replay: the base shards
    and the older complete rounds sampled at most ``max_staleness`` steps before ``step``.
    """
    usable = sorted((r for r in rounds.values() if r.complete and (newest is None or r.round <= newest)),
                    key=lambda r: r.round)
    fresh = usable[-1] if usable else None
    replay = list(base)
    for r in usable[:-1]:
        if max_staleness is None or step - r.student_step <= max_staleness:
            replay.extend(r.names)
    return (list(fresh.names) if fresh else []), replay, fresh


# ---------------------------------------------------------------- provenance
def round_provenance(*, run_id: str, round_: int, student_step: int, mode: str, student: str, teacher: str,
                     prompts, config: TrainConfig, backend: str) -> dict:
    """What every shard of a round records (the sync trainer and the async worker write the same keys)."""
    return {
        "teacher": teacher,
        "student": student,
        "student_step": int(student_step),
        "dataset": {"path": prompts.dataset_id, "split": prompts.split},
        "prompt_options": {"prompt_field": prompts.prompt_field, "completion_field": "",
                           "chat_template": prompts.use_chat_template,
                           "max_prompt_tokens": prompts.max_prompt_tokens, "long_prompts": prompts.long_prompts},
        "backend": backend,
        "refresh": {"run_id": run_id, "round": int(round_), "student_step": int(student_step), "mode": mode,
                    "per_round": config.refresh_prompts},
    }


def sampling_params(config: TrainConfig) -> SamplingParams:
    return SamplingParams(temperature=config.sample_temperature, top_p=config.sample_top_p,
                          max_new_tokens=config.max_new_tokens)


def write_round(index: RoundIndex, prompts, sampler, scorer, *, round_: int, provenance: dict,
                config: TrainConfig, worker: int = 0, num_workers: int = 1, offload: bool = False) -> dict:
    """Sample, score and commit this worker's missing shards of round ``round_``; return the summed stats.

    ``sampler`` / ``scorer`` are zero-argument factories (``generate_shards`` closes what they
    return after each call). Committed shards are skipped, so this also completes a round
    that a killed process left half written.
    """
    plans = [p for p in round_plans(round_, config.refresh_prompts, index.num_rows, index.shard_rows)
             if p.index % num_workers == worker]
    todo = index.check_owned(plans)
    totals = {"shards_written": 0, "sequences": 0, "tokens": 0, "completion_tokens": 0, "seconds": 0.0}
    for lo, hi in _ranges_of(todo):
        stats = generate_shards(
            prompts, sampler, scorer, index.cache, round=round_, rows=(lo, hi), shard_size=index.shard_rows,
            worker=worker, num_workers=num_workers, source="student", params=sampling_params(config),
            seed=config.seed, num_samples=1, offload=offload, offload_group=len(todo) or 1,
            provenance=provenance, progress=False,
        )
        for key in totals:
            totals[key] += stats[key]
    totals["shards_already_committed"] = len(plans) - len(todo)
    return totals


def open_prompts(config: TrainConfig, tokenizer):
    """The refresh's prompt source; RefreshError when it has fewer rows than one round needs."""
    from kd.stages.generate.prompts import PromptSource

    prompts = PromptSource(config.prompts, tokenizer)
    if len(prompts) < config.refresh_prompts:
        raise RefreshError(
            f"--refresh-prompts {config.refresh_prompts} is more than the {len(prompts)} rows of {prompts.where}; "
            "lower it (rounds cycle through the data) or give more prompts"
        )
    return prompts


def check_teacher(cache: LogitCache, teacher_path) -> str:
    """The teacher's name; FingerprintMismatchError when it is not the teacher the cache was scored with."""
    from kd.stages import models

    found = models.teacher_fingerprint(teacher_path)
    want = cache.fingerprint.teacher
    if found.weights_sha256 != want.weights_sha256:
        raise FingerprintMismatchError(
            f"--teacher {teacher_path} ({found.name}, weights {found.weights_sha256[:12]}) is not the teacher "
            f"the cache {cache.url} was scored with ({want.name}, weights {want.weights_sha256[:12]}); "
            "refresh rounds must be scored by the same teacher"
        )
    return want.name


# ---------------------------------------------------------------- the trainer's side
class Refresher:
    """Keeps the trainer's data mix current and, in sync mode, writes the rounds.

    Made once per run (before any model loads: its checks refuse bad settings early);
    ``attach`` hands it the student, optimizer and mix loader; ``before_step(step)`` runs
    before every optimizer step and returns a metrics record when it did something.
    """

    def __init__(self, config: TrainConfig, cache: LogitCache, run_dir: Path, *, rank: int, world_size: int,
                 device, tokenizer, saved_state: dict | None):
        self.config, self.cache, self.run_dir = config, cache, Path(run_dir)
        self.rank, self.world_size, self.device, self.tokenizer = rank, world_size, device, tokenizer
        self.enabled = config.refresh_every > 0
        self.run_id = (saved_state or {}).get("run_id") or self._decide(lambda: uuid.uuid4().hex[:16])
        self.round_steps: dict[int, int] = {}  # round -> student step, for the staleness metric
        self.prompts, self.teacher_path, self.teacher_name = None, None, ""
        num_rows = 0
        if self.enabled:
            from kd.stages import models

            self.teacher_path = models.resolve_model_path(config.teacher, role="teacher")
            self.teacher_name = check_teacher(cache, self.teacher_path)
            self.prompts = open_prompts(config, tokenizer)
            num_rows = len(self.prompts)
        self.index = RoundIndex(cache, self.run_id, config.refresh_prompts, num_rows, self._shard_rows(saved_state))
        base, self.rounds = self.index.scan()
        # the base shards are those of the run's start: shards added later do not change a run
        self.base = list((saved_state or {}).get("base", base))
        self._teacher = None  # resident teacher model (sync mode without offload)
        self._adopted = None  # async: the freshest round in use
        self.student = self.optimizer = self.loader = None

    def _shard_rows(self, saved_state: dict | None) -> int:
        """Sync: a share of each round per rank; async: SHARD_ROWS (the workers split the shards).
        A resumed run keeps the grid its refresh.json names (rounds already written follow it)."""
        if saved_state is not None:
            try:
                info = json.loads((self.run_dir / REFRESH_FILE).read_text())
                if info.get("run_id") == self.run_id and isinstance(info.get("shard_rows"), int):
                    return info["shard_rows"]
            except (OSError, ValueError):
                pass
        if self.config.refresh_mode == "async":
            return SHARD_ROWS
        return sync_shard_rows(self.config.refresh_prompts, self.world_size)

    def attach(self, student, optimizer, loader) -> None:
        self.student, self.optimizer, self.loader = student, optimizer, loader

    def state_dict(self) -> dict:
        return {"run_id": self.run_id, "base": list(self.base)}

    def write_run_file(self) -> None:
        """RUN_DIR/refresh.json: what ``kd generate --follow`` needs beyond config.json (rank 0)."""
        if self.rank == 0:
            info = {"run_id": self.run_id, "mode": self.config.refresh_mode, "shard_rows": self.index.shard_rows}
            tmp = self.run_dir / f".{REFRESH_FILE}.tmp"
            tmp.write_text(json.dumps(info, indent=2))
            tmp.replace(self.run_dir / REFRESH_FILE)

    def wants_checkpoint(self, step: int) -> bool:
        """Whether a checkpoint must be written after ``step`` (besides --save-every).

        Async: every refresh step (the worker samples these). Sync: step 0 only, so a run that
        dies in its first refresh can --resume (keeping its run id); later refreshes need none,
        because a resumed run replays the steps since its checkpoint and meets every refresh
        again (committed shards are skipped, missing ones sampled from the same weights).
        """
        if not self.enabled:
            return False
        if self.config.refresh_mode == "async":
            return step % self.config.refresh_every == 0
        return step == 0

    # ------------------------------------------------------------ every step
    def before_step(self, step: int) -> dict | None:
        """Make (sync) or wait for (async) this step's round, then point the mix at the right shards."""
        c, record = self.config, None
        if self.enabled and c.refresh_mode == "sync" and step % c.refresh_every == 0 and step < c.steps:
            record = self._sync_round(step)
        elif self.enabled and c.refresh_mode == "async":
            record = self._await_round(step)
        newest = step // c.refresh_every + 1 if self.enabled and c.refresh_mode == "sync" else None
        on, replay, fresh = self._decide(lambda: select_mix(self.base, self.rounds, step, c.max_staleness, newest))
        self.loader.set_shards(on, replay)
        self.round_steps.update({r.round: r.student_step for r in self.rounds.values()})
        if record is not None:
            record.update(fresh_round=fresh.round if fresh else None,
                          on_policy_shards=len(self.loader.shards["on_policy"]),
                          replay_shards=len(self.loader.shards["replay"]))
        return record

    def _decide(self, fn):
        """``fn()`` on rank 0, the same answer on every rank."""
        if self.world_size == 1:
            return fn()
        import torch.distributed as dist

        box = [fn() if self.rank == 0 else None]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def _barrier(self) -> None:
        if self.world_size > 1:
            import torch.distributed as dist

            dist.barrier()

    def _rescan(self) -> None:
        self.rounds = self._decide(lambda: self.index.scan()[1])

    # ------------------------------------------------------------ sync
    def _sync_round(self, step: int) -> dict:
        round_ = step // self.config.refresh_every + 1
        t0, cpu0 = time.time(), time.process_time()
        stats = {"shards_written": 0, "sequences": 0, "tokens": 0, "completion_tokens": 0}
        if not (round_ in self.rounds and self.rounds[round_].complete):
            stats = self._generate(round_, step)
        self._barrier()
        self._rescan()
        if not (round_ in self.rounds and self.rounds[round_].complete):
            raise RefreshError(f"refresh round {round_} is still incomplete after writing it; check {self.cache.url}")
        return {"kind": "refresh", "step": step, "round": round_, "student_step": self.rounds[round_].student_step,
                "mode": "sync", "shards_written": stats["shards_written"], "sequences": stats["sequences"],
                "student_tokens": stats["completion_tokens"], "teacher_tokens": stats["tokens"],
                "gen_s": time.time() - t0, "gen_cpu_s": time.process_time() - cpu0, "time": time.time()}

    def _generate(self, round_: int, step: int) -> dict:
        import torch

        checkpoint = self.run_dir / ckpt.CHECKPOINTS_DIR / ckpt.checkpoint_name(step)
        student = (str(checkpoint.resolve()) if checkpoint.is_dir()
                   else f"{self.run_dir.resolve()} (in memory at step {step})")
        provenance = round_provenance(
            run_id=self.run_id, round_=round_, student_step=step, mode="sync", student=student,
            teacher=self.teacher_name, prompts=self.prompts, config=self.config,
            backend=self.config.refresh_backend)
        offload = self._offload()
        rng = ckpt.capture_rng_state()
        moved = _move_optimizer_state(self.optimizer, "cpu") if offload else False
        was_training = self.student.training
        try:
            sampler, scorer = self._factories(offload)
            stats = write_round(self.index, self.prompts, sampler, scorer, round_=round_, provenance=provenance,
                                config=self.config, worker=self.rank, num_workers=self.world_size, offload=offload)
        finally:
            self.student.train(was_training)
            if moved:
                _move_optimizer_state(self.optimizer, self.device)
            if offload and torch.device(self.device).type == "cuda":
                torch.cuda.empty_cache()
            ckpt.restore_rng_state(rng)
        return stats

    def _offload(self) -> bool:
        import torch

        mode = self.config.refresh_offload
        if torch.device(self.device).type != "cuda" or mode == "off":
            return False
        if mode == "on":
            return True
        from kd.stages.generate.run import _weights_bytes

        free, _ = torch.cuda.mem_get_info(torch.device(self.device))
        return _weights_bytes(self.teacher_path) > free // 4

    def _factories(self, offload: bool):
        from kd.stages import models
        from kd.stages.generate.run import eos_token_ids

        tok, c = self.tokenizer, self.config
        pad = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
        if c.refresh_backend == "vllm":
            return self._vllm_factories()
        from kd.stages.generate.hf_backend import HfSampler, HfScorer

        def sampler():
            return HfSampler(self.student, eos_token_ids=eos_token_ids(tok, self.student), pad_token_id=pad,
                             batch_size=c.refresh_batch_size)

        def scorer():
            if offload:  # loaded for this refresh only; the scorer's close() frees it
                return HfScorer(models.load_model(self.teacher_path, device=str(self.device)),
                                batch_size=max(c.refresh_batch_size, 64), pad_token_id=pad)
            if self._teacher is None:
                self._teacher = models.load_model(self.teacher_path, device=str(self.device))
            return HfScorer(self._teacher, batch_size=max(c.refresh_batch_size, 64), pad_token_id=pad)

        return sampler, scorer

    def _vllm_factories(self):
        """vLLM engines start once and stay: the sampler takes each refresh's weights in place."""
        from kd.stages.generate import vllm_backend

        dtype = "bfloat16" if str(self.device).startswith("cuda") else "float32"
        if getattr(self, "_vllm", None) is None:
            folder = ckpt.latest_checkpoint(self.run_dir)  # any folder of this model: weights come next
            engine = vllm_backend.parse_engine_options(self.config.refresh_vllm_options, "--refresh-vllm-options")
            self._vllm = (vllm_backend.VllmSampler(folder, seed=self.config.seed, dtype=dtype, **engine),
                          vllm_backend.VllmScorer(self.teacher_path, k=self.cache.fingerprint.k,
                                                  seed=self.config.seed, dtype=dtype, **engine))
        self._vllm[0].update_weights(self.student.state_dict())
        return (lambda: _Unclosed(self._vllm[0])), (lambda: _Unclosed(self._vllm[1]))

    def close(self) -> None:
        """Shut down the vLLM engines kept between refreshes (the hf backend keeps none)."""
        engines, self._vllm = getattr(self, "_vllm", None), None
        for engine in engines or ():
            engine.close()

    # ------------------------------------------------------------ async
    def _await_round(self, step: int) -> dict | None:
        c = self.config
        t0 = time.time()
        deadline = t0 + c.refresh_wait
        while True:
            self._rescan()
            complete = [r for r in self.rounds.values() if r.complete]
            fresh = max(complete, key=lambda r: r.round) if complete else None
            stale = fresh is None or (c.max_staleness is not None and step - fresh.student_step > c.max_staleness)
            if c.on_policy_fraction == 0 or not stale:
                break
            if time.time() > deadline:
                have = "no round yet" if fresh is None else (
                    f"round {fresh.round} was sampled at step {fresh.student_step}, {step - fresh.student_step} steps ago")
                raise RefreshError(
                    f"waited {c.refresh_wait:.0f}s at step {step} for a refresh round ({have}; --max-staleness "
                    f"{c.max_staleness}). Is `kd generate --follow {self.run_dir}` running? Start it, or raise "
                    "--refresh-wait / --max-staleness."
                )
            time.sleep(POLL_S)
        newest = max((r.round for r in self.rounds.values() if r.complete), default=None)
        if newest is None or newest == self._adopted:
            return None
        self._adopted = newest
        r = self.rounds[newest]
        return {"kind": "refresh", "step": step, "round": newest, "student_step": r.student_step, "mode": "async",
                "wait_s": time.time() - t0, "time": time.time()}


class _Unclosed:
    """A backend object whose close() is a no-op (engines kept between refreshes)."""

    def __init__(self, inner):
        self._inner = inner

    def __getattr__(self, name):
        return getattr(self._inner, name)

    def close(self) -> None:
        pass


def _move_optimizer_state(optimizer, device) -> bool:
    """Move every tensor of the optimizer state to ``device`` (in place); True if any moved."""
    moved = False
    for state in optimizer.state.values():
        for key, value in state.items():
            if hasattr(value, "to") and getattr(value, "device", None) is not None and value.dim() > 0:
                state[key] = value.to(device, non_blocking=True)
                moved = True
    return moved


# ---------------------------------------------------------------- the async worker
def follow(run_dir: str | Path, *, device: str = "auto", dtype: str = "auto", backend: str = "hf",
           batch_size: int = 16, vllm_options: str = "", poll_s: float = 1.0, idle_timeout_s: float | None = 3600.0,
           max_rounds: int | None = None, log=print) -> dict:
    """``kd generate --follow RUN_DIR``: write refresh rounds for an async training run until it ends.

    Loop: wait for the run's refresh.json and config.json; then, whenever the run has a
    checkpoint newer than the student step of its newest round, write the next round from
    the newest checkpoint (a half-written round is completed first). Stops when the run's
    final checkpoint exists (step >= --steps), after ``max_rounds`` rounds, or after
    ``idle_timeout_s`` seconds without a new checkpoint. Returns a summary.
    """
    from kd.stages import models
    from kd.stages.generate.run import eos_token_ids

    run_dir = Path(run_dir)
    t0 = last_progress = time.time()
    while not ((run_dir / REFRESH_FILE).is_file() and (run_dir / "config.json").is_file()):
        if idle_timeout_s is not None and time.time() - t0 > idle_timeout_s:
            raise RefreshError(f"{run_dir} has no {REFRESH_FILE} after {idle_timeout_s:.0f}s: start "
                               "`kd train --refresh-mode async --refresh-every N ...` with that --out")
        time.sleep(poll_s)
    config = TrainConfig.from_dict(json.loads((run_dir / "config.json").read_text()))
    if config.refresh_mode != "async" or config.refresh_every <= 0:
        raise ConfigError(f"{run_dir} is not an async refresh run (--refresh-mode {config.refresh_mode}, "
                          f"--refresh-every {config.refresh_every}); its trainer makes its own rounds")
    device = ("cuda" if _cuda() else "cpu") if device == "auto" else device
    cache = LogitCache.open(config.cache)
    teacher_path = models.resolve_model_path(config.teacher, role="teacher")
    teacher_name = check_teacher(cache, teacher_path)
    tok = models.load_tokenizer(teacher_path)
    prompts = open_prompts(config, tok)
    pad = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
    model_dtype = None if dtype == "auto" else dtype
    if backend == "vllm":
        from kd.stages.generate import vllm_backend

        vdtype = "bfloat16" if device.startswith("cuda") else "float32"
        engine = vllm_backend.parse_engine_options(vllm_options)
        scorer_obj = vllm_backend.VllmScorer(teacher_path, k=cache.fingerprint.k, seed=config.seed, dtype=vdtype,
                                             **engine)
    else:
        from kd.stages.generate.hf_backend import HfSampler, HfScorer

        teacher = models.load_model(teacher_path, device=device, dtype=model_dtype)
        scorer_obj = HfScorer(teacher, batch_size=max(batch_size, 64), pad_token_id=pad)
    sampler_obj, sampled_from = None, None
    summary = {"rounds_written": 0, "sequences": 0, "student_tokens": 0, "teacher_tokens": 0, "gen_s": 0.0}
    index = None
    try:
        while True:
            info = json.loads((run_dir / REFRESH_FILE).read_text())
            run_id = info["run_id"]
            config = TrainConfig.from_dict(json.loads((run_dir / "config.json").read_text()))  # --steps may grow
            if index is None or index.run_id != run_id:
                index = RoundIndex(cache, run_id, config.refresh_prompts, len(prompts),
                                   int(info.get("shard_rows", SHARD_ROWS)))
            latest = _latest_step(run_dir)
            if latest is not None and latest[0] >= config.steps:
                break
            if max_rounds is not None and summary["rounds_written"] >= max_rounds:
                break
            _, rounds = index.scan()
            newest = max(rounds.values(), key=lambda r: r.round) if rounds else None
            if newest is not None and not newest.complete:
                round_ = newest.round  # a killed worker left it half written
            elif latest is not None and (newest is None or latest[0] > newest.student_step):
                round_ = (newest.round + 1) if newest else 1
            else:
                if idle_timeout_s is not None and time.time() - last_progress > idle_timeout_s:
                    log(f"no new checkpoint in {run_dir} for {idle_timeout_s:.0f}s: stopping")
                    break
                time.sleep(poll_s)
                continue
            if latest is None:
                time.sleep(poll_s)
                continue
            step, folder = latest
            t = time.time()
            try:
                if backend == "vllm":
                    from kd.stages.generate import vllm_backend

                    if sampler_obj is None:
                        sampler_obj = vllm_backend.VllmSampler(folder, seed=config.seed, dtype=vdtype, **engine)
                    elif sampled_from != folder:
                        sampler_obj.update_weights(folder)
                else:
                    if sampled_from != folder:
                        student = models.load_model(folder, device=device, dtype=model_dtype)
                        sampler_obj = HfSampler(student, eos_token_ids=eos_token_ids(tok, student),
                                                pad_token_id=pad, batch_size=batch_size)
                sampled_from = folder
            except (OSError, KdError, ValueError) as err:  # pruned by the trainer while we loaded it
                log(f"cannot load {folder} ({err}); trying the newest checkpoint again")
                sampled_from = None
                time.sleep(poll_s)
                continue
            provenance = round_provenance(run_id=run_id, round_=round_, student_step=step, mode="async",
                                          student=str(folder.resolve()), teacher=teacher_name, prompts=prompts,
                                          config=config, backend=backend)
            stats = write_round(index, prompts, lambda: _Unclosed(sampler_obj), lambda: _Unclosed(scorer_obj),
                                round_=round_, provenance=provenance, config=config)
            summary["rounds_written"] += 1
            summary["sequences"] += stats["sequences"]
            summary["student_tokens"] += stats["completion_tokens"]
            summary["teacher_tokens"] += stats["tokens"]
            summary["gen_s"] += time.time() - t
            last_progress = time.time()
            log(f"round {round_}: {stats['sequences']} sequences from step {step} ({time.time() - t:.1f}s)")
    finally:
        for obj in (sampler_obj, scorer_obj):
            if obj is not None:
                obj.close()
    summary["total_s"] = round(time.time() - t0, 3)
    summary["gen_s"] = round(summary["gen_s"], 3)
    return summary


def _latest_step(run_dir: Path) -> tuple[int, Path] | None:
    try:
        folder = ckpt.latest_checkpoint(run_dir)
    except (ckpt.CheckpointError, OSError):
        return None
    if folder is None:
        return None
    return int(folder.name.split("-")[-1]), folder


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


__all__ = ["Refresher", "RoundIndex", "Round", "RefreshError", "follow", "round_ranges", "round_plans",
           "select_mix", "write_round", "round_provenance"]
