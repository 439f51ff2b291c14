"""Faults: kd generate and kd train killed with SIGKILL anywhere, full and read-only disks, racing writers.

Kills. Every run here is a real process (``tests/fault_child.py``, forked from a zygote that
imported kd once) running the ``kd`` CLI on tiny models. A reference run logs every change it
makes to the filesystem, each labelled by the kd function that made it (``shard data``,
``shard commit``, ``checkpoint write``, ``checkpoint pointer``, ``refresh/shard data``, ...).
A trial reruns the same command armed to SIGKILL itself just before one of those changes
(for writes, optionally after half of the bytes: a torn write), checks what the dead run
left visible, reruns the command (``--resume`` when a checkpoint exists, as a user would) and
checks the promises:

- nothing partial is visible: every shard that ``committed_shard_names`` lists reads and
  verifies, and the checkpoint that ``latest`` names is complete;
- the resumed cache equals the uninterrupted one, sequence by sequence;
- the resumed training ends with the uninterrupted run's weights, bit for bit (CPU), the same
  refresh rounds (content compared) and the same losses;
- no temporary leftovers remain after the successful rerun (and ``kd cache gc``).

``fault_child.py`` explains why kills at filesystem changes (and not at random times, and
not through hooks in kd) reach every state a SIGKILL can leave. The default sizes here take
a few kills per stage at the named points; ``benchmarks/bench_faults.py`` runs the same
trials at random points in the hundreds and prints the survival table of RELIABILITY.md.

Disk full and read-only destinations use a real tmpfs (mounted here when running as root;
those tests are skipped otherwise).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from contextlib import contextmanager
from dataclasses import dataclass, field, fields
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from kd.stages.train import checkpoint as ckpt
from kd.storage.batch import SequenceBatch
from kd.storage.cache import LogitCache
from kd.storage.errors import KdError
from kd.storage.verify import verify_cache

CHILD = Path(__file__).with_name("fault_child.py")
STEPS = 6


# ---------------------------------------------------------------- processes
class Zygote:
    """``fault_child.py --serve``: forks one kd process per job (see its docstring)."""

    def __init__(self, env: dict | None = None):
        self.proc = subprocess.Popen(
            [sys.executable, str(CHILD), "--serve"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
            env={**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", **(env or {})})
        line = self.proc.stdout.readline()
        if not line.startswith('{"ready"'):
            raise RuntimeError(f"fault zygote did not start: {line!r}")

    def run(self, *jobs: dict, timeout_s: float = 300) -> list:
        self.proc.stdin.write(json.dumps({"jobs": list(jobs), "timeout_s": timeout_s}) + "\n")
        self.proc.stdin.flush()
        return json.loads(self.proc.stdout.readline())["rc"]

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=30)


@dataclass
class World:
    """Tiny models, prompts and a base cache, built once (by kd generate in a zygote child)."""

    root: Path
    student: str
    teacher: str
    prompts: str
    base_cache: str


def build_world(zygote: Zygote, root: Path, rows: int = 12) -> World:
    from kd.stages import models

    pair = models.tiny_model_pair(root / "pair")
    prompts = root / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"Question {i}: what is {i} plus {3 * i}?"}) + "\n"
                               for i in range(rows)))
    world = World(root, str(pair.student), str(pair.teacher), str(prompts), str(root / "base-cache"))
    job = {"argv": generate_argv(world, world.base_cache) + ["--source", "teacher", "--codec", "raw"],
           "watch": [], "output": str(root / "base.out")}
    assert zygote.run(job) == [0], (root / "base.out").read_text()[-2000:]
    return world


def generate_argv(world: World, out: str) -> list[str]:
    return ["generate", "--data", world.prompts, "--out", out, "--student", world.student, "--teacher",
            world.teacher, "--k", "8", "--shard-size", "3", "--max-new-tokens", "8", "--num-samples", "2",
            "--no-progress"]


def train_argv(world: World, cache: str, out: str) -> list[str]:
    """Sync refresh every 2 of 6 steps (rounds at steps 0, 2, 4), checkpoints every 2, keep 2."""
    return ["train", "--cache", cache, "--out", out, "--student", world.student, "--steps", str(STEPS),
            "--lr", "0.01", "--warmup", "1", "--batch-tokens", "256", "--eval-every", "0",
            "--heldout-fraction", "0", "--save-every", "2", "--keep", "2", "--loader-workers", "0",
            "--no-progress", "--refresh-every", "2", "--refresh-prompts", "6", "--prompts", world.prompts,
            "--teacher", world.teacher, "--max-new-tokens", "8"]


# ---------------------------------------------------------------- one stage's folders and argv
@dataclass(frozen=True)
class KillPoint:
    """Die before the ``nth`` filesystem change (counting only changes with ``label`` and ``kind``, if given)."""

    nth: int | None
    label: str | None = None
    kind: str | None = None


@dataclass
class Target:
    """One run of a stage in ``folder``: its cache (and run dir), and how to (re)start it."""

    stage: str  # "generate" or "train"
    world: World
    folder: Path
    cache: str = ""
    run_dir: str = ""

    @classmethod
    def make(cls, stage: str, world: World, folder: Path) -> Target:
        folder.mkdir(parents=True, exist_ok=True)
        if stage == "generate":
            return cls(stage, world, folder, cache=str(folder / "cache"))
        cache = folder / "cache"
        shutil.copytree(world.base_cache, cache)  # refresh rounds are written into the training cache
        return cls(stage, world, folder, cache=str(cache), run_dir=str(folder / "run"))

    def argv(self) -> list[str]:
        if self.stage == "generate":
            return generate_argv(self.world, self.cache)
        argv = train_argv(self.world, self.cache, self.run_dir)
        has_checkpoint = (Path(self.run_dir) / ckpt.CHECKPOINTS_DIR / ckpt.LATEST).exists()
        return argv + (["--resume"] if has_checkpoint else [])  # what a user (or a scheduler) reruns

    def job(self, name: str, kill_at: KillPoint | int | None = None, tear: bool = False) -> dict:
        point = kill_at if isinstance(kill_at, KillPoint) else KillPoint(nth=kill_at)
        return {"argv": self.argv(), "watch": [self.cache] + ([self.run_dir] if self.run_dir else []),
                "kill_at": point.nth, "kill_label": point.label, "kill_kind": point.kind, "tear": tear,
                "log": str(self.folder / f"{name}.events.json"), "output": str(self.folder / f"{name}.out")}

    def output(self, name: str) -> str:
        return (self.folder / f"{name}.out").read_text()

    def events(self, name: str) -> list[dict]:
        return json.loads((self.folder / f"{name}.events.json").read_text())["events"]


# ---------------------------------------------------------------- what is visible, and what is left
def read_all(url: str) -> tuple[list[str], SequenceBatch | None]:
    cache = LogitCache.open(url)
    names = cache.committed_shard_names()
    batches = [cache.read_shard(n).read() for n in names]
    return names, (SequenceBatch.concat(batches) if batches else None)


def same_content(a: SequenceBatch, b: SequenceBatch) -> list[str]:
    """Fields that differ (empty when equal, sequence by sequence and position by position)."""
    return [f.name for f in fields(SequenceBatch)
            if not np.array_equal(getattr(a, f.name), getattr(b, f.name), equal_nan=True)]


def visible_problems(target: Target) -> list[str]:
    """What a reader would see of a dead run that is not complete (empty = nothing partial visible)."""
    problems = []
    if (Path(target.cache) / "zarr.json").exists():
        try:
            read_all(target.cache)
            report = verify_cache(target.cache)
            if not report.ok:
                problems.append(f"verify: {report.format()[:500]}")
        except KdError as err:
            problems.append(f"cache: {err}")
    if target.run_dir:
        try:
            latest = ckpt.latest_checkpoint(target.run_dir)
            if latest is not None:
                ckpt.load_trainer_state(latest)
                load_file(latest / "model.safetensors")
        except Exception as err:  # noqa: BLE001 (any failure to load is a visible partial checkpoint)
            problems.append(f"checkpoint: {type(err).__name__}: {err}")
    return problems


def cache_leftovers(url: str) -> list[str]:
    """Files and empty folders of the cache that no commit record accounts for."""
    root = Path(url)
    cache = LogitCache.open(url)
    keep = {"zarr.json", "shards/zarr.json"}
    for record in cache.committed_shards():
        keep.add(f"commits/{record.name}.json")
        keep.update(record.objects)
    out = []
    for p in root.rglob("*"):
        rel = p.relative_to(root).as_posix()
        if (p.is_file() and rel not in keep) or (p.is_dir() and not any(p.iterdir())):
            out.append(rel)
    return sorted(out)


def run_dir_leftovers(run_dir: str) -> list[str]:
    """Temporary files or incomplete checkpoint folders in a run folder."""
    root = Path(run_dir)
    out = [p.relative_to(root).as_posix() for p in root.rglob(".*")]
    for folder in ckpt.list_checkpoints(root):
        if not (folder / ckpt.TRAINER_STATE).is_file() or not (folder / "model.safetensors").is_file():
            out.append(folder.relative_to(root).as_posix())
    return sorted(out)


def gc_available() -> bool:
    """Whether this kd has ``kd cache gc`` (then trials run it before looking for leftovers)."""
    from kd.cli import cache_app

    return any(c.name == "gc" for c in cache_app.registered_commands)


# ---------------------------------------------------------------- references and trials
@dataclass
class Reference:
    target: Target
    events: list[dict]
    names: list[str] = field(default_factory=list)
    content: SequenceBatch | None = None
    weights: dict | None = None
    losses: list | None = None


def reference(zygote: Zygote, stage: str, world: World, folder: Path) -> Reference:
    target = Target.make(stage, world, folder)
    rc = zygote.run(target.job("ref"))
    assert rc == [0], target.output("ref")[-3000:]
    ref = Reference(target, target.events("ref"))
    ref.names, ref.content = read_all(target.cache)
    if stage == "train":
        ref.weights, ref.losses = final_weights(target), train_losses(target)
    return ref


def final_weights(target: Target) -> dict:
    folder = Path(target.run_dir) / ckpt.CHECKPOINTS_DIR / ckpt.checkpoint_name(STEPS)
    return load_file(folder / "model.safetensors")


def train_losses(target: Target) -> list:
    lines = (Path(target.run_dir) / "metrics.jsonl").read_text().splitlines()
    return [(r["step"], r["loss"]) for r in map(json.loads, lines) if r["kind"] == "train"]


@dataclass
class Trial:
    """One kill and what came of it: ``failures`` empty means survived with nothing lost."""

    stage: str
    label: str  # the kill point (the label of the event the process died at)
    kind: str
    torn: bool
    killed: bool
    failures: list[str]


def kill_and_resume(zygote: Zygote, ref: Reference, folder: Path, kill_at: list[KillPoint | int],
                    tear: bool = False, gc: bool = False) -> Trial:
    """Run ref's command killed before change ``kill_at[0]``, then (killed again at the next ones) rerun
    it to the end; check visibility after every kill and the final result against ``ref``."""
    target = Target.make(ref.target.stage, ref.target.world, folder)
    failures, label, kind, torn, killed = [], "not reached", "", False, False
    for n, at in enumerate(kill_at):
        rc = zygote.run(target.job(f"kill{n}", kill_at=at, tear=tear))
        if rc == [0]:
            break  # it finished before its ``at``-th change (runs differ by a few): nothing to kill
        if rc != [-9]:
            output = target.output(f"kill{n}")[-800:]
            failures.append(f"kill {n} at change {at}: exit {rc[0]} instead of SIGKILL: {output}")
            break
        if n == 0:
            event = target.events("kill0")[-1]
            label, kind, torn, killed = event["label"], event["kind"], bool(event.get("torn")), True
        failures += [f"after kill {n} ({label}): {p}" for p in visible_problems(target)]
    rc = zygote.run(target.job("resume"))
    if rc != [0]:
        return Trial(ref.target.stage, label, kind, torn, killed,
                     failures + [f"rerun exit {rc[0]}: {target.output('resume')[-1500:]}"])
    names, content = read_all(target.cache)
    if names != ref.names:
        failures.append(f"shards {sorted(set(names) ^ set(ref.names))} differ from the uninterrupted run")
    elif (diff := same_content(content, ref.content)):
        failures.append(f"cache content differs from the uninterrupted run in {diff}")
    if ref.weights is not None:
        weights = final_weights(target)
        want = ref.weights
        same = weights.keys() == want.keys() and all(torch.equal(weights[k], want[k]) for k in weights)
        if not same:
            failures.append("final weights differ from the uninterrupted run")
        if train_losses(target) != ref.losses:
            failures.append(f"losses differ: {train_losses(target)} vs {ref.losses}")
    if gc:
        rc = zygote.run({"argv": ["cache", "gc", target.cache, "--older-than", "0"], "watch": [],
                         "output": str(folder / "gc.out")})
        if rc != [0]:
            failures.append(f"kd cache gc exit {rc[0]}: {(folder / 'gc.out').read_text()[-800:]}")
    left = cache_leftovers(target.cache) + (run_dir_leftovers(target.run_dir) if target.run_dir else [])
    if left:
        failures.append(f"leftovers after the rerun{' and gc' if gc else ''}: {left[:5]}")
    return Trial(ref.target.stage, label, kind, torn, killed, failures)


def assert_survived(trials: list[Trial]) -> None:
    failed = [f"{t.stage} killed at {t.label} ({t.kind}{', torn' if t.torn else ''}):\n    "
              + "\n    ".join(t.failures) for t in trials if t.failures]
    assert not failed, "\n".join(failed)


def pick(events: list[dict], label: str, rng: np.random.Generator, kind: str | None = None) -> KillPoint:
    """A random one of the reference run's changes with this label (and kind)."""
    found = [e for e in events if e["label"] == label and (kind is None or e["kind"] == kind)]
    assert found, f"the reference run made no change labelled {label!r} ({kind}); labels: " \
                  f"{sorted({e['label'] for e in events})}"
    return KillPoint(int(rng.integers(1, len(found) + 1)), label, kind)


# ---------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def zygote():
    z = Zygote()
    yield z
    z.close()


@pytest.fixture(scope="module")
def world(zygote, tmp_path_factory):
    return build_world(zygote, tmp_path_factory.mktemp("faults-world"))


@pytest.fixture(scope="module")
def refs(zygote, world, tmp_path_factory):
    root = tmp_path_factory.mktemp("faults-refs")
    return {stage: reference(zygote, stage, world, root / stage) for stage in ("generate", "train")}


@pytest.fixture(scope="module")
def use_gc():
    return gc_available()


# ---------------------------------------------------------------- kills
GENERATE_POINTS = [("cache create", None, False), ("shard data", "write", True), ("shard data", "rename", False),
                   ("shard commit", None, False)]
TRAIN_POINTS = [("checkpoint write", None, False), ("checkpoint pointer", None, True),
                ("checkpoint cleanup", None, False), ("refresh/shard data", "write", True),
                ("refresh/shard commit", None, False), ("metrics", "write", True)]


@pytest.mark.parametrize("stage,points", [("generate", GENERATE_POINTS), ("train", TRAIN_POINTS)])
def test_a_kill_at_any_named_point_is_survived_with_nothing_lost(zygote, refs, use_gc, tmp_path, stage, points):
    ref = refs[stage]
    rng = np.random.default_rng(9)
    trials = []
    for n, (label, kind, tear) in enumerate(points):
        trials.append(kill_and_resume(zygote, ref, tmp_path / f"t{n}", [pick(ref.events, label, rng, kind)],
                                      tear=tear, gc=use_gc))
    for trial, (label, _, _) in zip(trials, points):
        assert trial.killed and trial.label == label, trial
    assert_survived(trials)


def test_kills_during_recovery_and_at_random_changes(zygote, refs, use_gc, tmp_path):
    """Training killed three times in a row (each rerun dies too); generate torn at a random change."""
    rng = np.random.default_rng(11)
    train, generate = refs["train"], refs["generate"]
    chain = sorted(rng.integers(1, len(train.events) // 2, size=3).tolist())  # reruns make fewer changes
    trials = [kill_and_resume(zygote, train, tmp_path / "train-chain", chain, gc=use_gc),
              kill_and_resume(zygote, generate, tmp_path / "generate-random",
                              [int(rng.integers(1, len(generate.events)))], tear=True, gc=use_gc)]
    assert all(t.killed for t in trials), trials
    assert_survived(trials)


def test_the_next_train_run_removes_checkpoint_temporaries_without_gc(zygote, refs, tmp_path):
    """A torn write of the ``latest`` pointer's temp file: the resumed run removes it (gc is for caches)."""
    rng = np.random.default_rng(5)
    ref = refs["train"]
    trial = kill_and_resume(zygote, ref, tmp_path / "p", [pick(ref.events, "checkpoint pointer", rng, "write")],
                            tear=True)
    assert trial.killed
    run_dir = tmp_path / "p" / "run"
    assert run_dir_leftovers(str(run_dir)) == []


# ---------------------------------------------------------------- full and read-only disks
@contextmanager
def tmpfs(path: Path, size_kib: int, read_only: bool = False):
    """A real size-limited (or read-only) file system at ``path``; skips the test where it cannot mount."""
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("needs root to mount a tmpfs")
    path.mkdir(parents=True, exist_ok=True)
    opts = f"size={size_kib}k" + (",ro" if read_only else "")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(path)], capture_output=True, text=True)
    if done.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def remount(path: Path, opts: str) -> None:
    subprocess.run(["mount", "-o", f"remount,{opts}", str(path)], check=True)


def kib_in_pages(files) -> int:
    """What ``files`` take on a tmpfs: whole 4 KiB pages."""
    return sum(-(-f.stat().st_size // 4096) * 4 for f in files if f.is_file())


def one_line_error(output: str) -> str:
    errors = [line for line in output.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in output, output[-3000:]
    return errors[0]


def test_full_disk_while_generating_keeps_committed_shards_and_the_rerun_completes(zygote, refs, tmp_path):
    ref = refs["generate"]
    root = Path(ref.target.cache)
    shard_kib = [kib_in_pages(list((root / "shards").glob(f"{n}.*/**/*")) + [root / "commits" / f"{n}.json"])
                 for n in ref.names]
    metadata = kib_in_pages([root / "zarr.json", root / "shards" / "zarr.json"])
    size = metadata + sum(shard_kib[:2]) + shard_kib[2] // 2  # room for two shards and a half
    with tmpfs(tmp_path / "small", size) as mount:
        target = Target.make("generate", ref.target.world, tmp_path)
        target.cache = str(mount / "cache")
        assert zygote.run(target.job("full")) == [2]
        line = one_line_error(target.output("full"))
        assert "no space left" in line.lower() and target.cache in line, line
        names, content = read_all(target.cache)
        assert 1 <= len(names) < len(ref.names) and verify_cache(target.cache).ok
        assert names == ref.names[: len(names)]
        kept = SequenceBatch.concat([LogitCache.open(ref.target.cache).read_shard(n).read() for n in names])
        assert same_content(content, kept) == []  # what was committed is intact

        remount(mount, "size=16m")  # space freed: the same command resumes
        assert zygote.run(target.job("rerun")) == [0], target.output("rerun")[-2000:]
        names, content = read_all(target.cache)
        assert names == ref.names and same_content(content, ref.content) == []
        assert zygote.run({"argv": ["cache", "gc", target.cache, "--older-than", "0"], "watch": [],
                           "output": str(tmp_path / "gc.out")}) == [0]
        assert cache_leftovers(target.cache) == []


def test_full_disk_while_checkpointing_is_one_clear_line_and_resume_is_exact(zygote, world, tmp_path):
    plain = ["--refresh-every", "0"]  # checkpoints only: the cache stays on the big disk
    ref = Target.make("train", world, tmp_path / "ref")
    job = ref.job("ref")
    job["argv"] += plain
    assert zygote.run(job) == [0], ref.output("ref")[-2000:]
    run_dir = Path(ref.run_dir)
    one = kib_in_pages((run_dir / "checkpoints" / "step-00000006").rglob("*"))  # (--keep 2 pruned step 2)
    size = kib_in_pages([run_dir / "config.json", run_dir / "metrics.jsonl"]) + one + one // 2
    with tmpfs(tmp_path / "small", size) as mount:
        target = Target.make("train", world, tmp_path / "t")
        target.run_dir = str(mount / "run")
        job = target.job("full")
        job["argv"] += plain
        assert zygote.run(job) == [2]
        line = one_line_error(target.output("full"))
        assert "no space left" in line and "step-00000004" in line and str(mount) in line, line
        assert ckpt.latest_checkpoint(target.run_dir).name == "step-00000002"
        assert run_dir_leftovers(target.run_dir) == []

        remount(mount, "size=16m")
        job = target.job("resume")
        job["argv"] += plain
        assert "--resume" in job["argv"] and zygote.run(job) == [0], target.output("resume")[-2000:]
        want, got = final_weights(ref), final_weights(target)
        assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)


def test_read_only_destinations_are_refused_before_any_model_loads(zygote, refs, world, tmp_path):
    ref = refs["generate"]
    with tmpfs(tmp_path / "ro", 1024, read_only=True) as mount:
        # a new cache on a read-only file system
        target = Target.make("generate", world, tmp_path / "new")
        target.cache = str(mount / "cache")
        assert zygote.run(target.job("new")) == [2]
        line = one_line_error(target.output("new"))
        assert "read-only file system" in line.lower() and target.cache in line, line
        # a training run folder on it
        train = Target.make("train", world, tmp_path / "train")
        train.run_dir = str(mount / "run")
        assert zygote.run(train.job("ro")) == [2]
        line = one_line_error(train.output("ro"))
        assert "read-only file system" in line and train.run_dir in line, line
        assert "Loading weights" not in train.output("ro")

    # a half-made cache whose disk became read-only: refused before sampling, nothing lost
    with tmpfs(tmp_path / "half", 16 * 1024) as mount:
        target = Target.make("generate", world, tmp_path / "half-run")
        target.cache = str(mount / "cache")
        assert zygote.run(target.job("kill", KillPoint(2, "shard commit", "link"))) == [-9]
        before = read_all(target.cache)[0]
        remount(mount, "ro")
        assert zygote.run(target.job("ro")) == [2]
        line = one_line_error(target.output("ro"))
        assert "read-only" in line and target.cache in line and "nothing was computed" in line, line
        assert "Loading weights" not in target.output("ro")
        assert read_all(target.cache)[0] == before == ref.names[:1] and verify_cache(target.cache).ok


# ---------------------------------------------------------------- racing writers
def test_four_generate_processes_on_one_cache_lose_and_clobber_nothing(zygote, refs, tmp_path):
    """Four copies of one command started together (a retried job, a double submit): every shard is
    written by whoever commits first, the others skip it; the cache equals one uninterrupted run."""
    ref = refs["generate"]
    target = Target.make("generate", ref.target.world, tmp_path)
    jobs = [target.job(f"w{i}") for i in range(4)]
    assert zygote.run(*jobs) == [0, 0, 0, 0], [target.output(f"w{i}")[-1500:] for i in range(4)]
    written = [int(line.split()[1]) for i in range(4) for line in target.output(f"w{i}").splitlines()
               if line.startswith("shards_written ")]
    assert len(written) == 4 and sum(written) == len(ref.names)  # each shard committed by exactly one
    names, content = read_all(target.cache)
    assert names == ref.names and same_content(content, ref.content) == []
    assert verify_cache(target.cache).ok
    assert zygote.run({"argv": ["cache", "gc", target.cache, "--older-than", "0"], "watch": [],
                       "output": str(tmp_path / "gc.out")}) == [0]
    assert cache_leftovers(target.cache) == []
