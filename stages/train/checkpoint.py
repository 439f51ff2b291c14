"""Training checkpoints: a normal Hugging Face folder plus the trainer state, written atomically.

Layout of a run folder (``--out RUN_DIR``)::

    RUN_DIR/
      config.json               resolved TrainConfig of the latest start
      metrics.jsonl             one JSON object per step / evaluation
      checkpoints/
        step-00000500/          a complete HF model folder (loadable by transformers and vLLM):
          config.json  model.safetensors  tokenizer files  generation_config.json
          trainer_state.pt      optimizer, step, RNG states, loader position, config (see below)
          trainer_state.json    {"global_step", "config"}: human-readable (HF Trainer's key, which
                                kd generate reads as the student's step for provenance)
        step-00001000/
        latest                  text file naming the newest complete checkpoint folder

Atomicity: a checkpoint is written into a hidden temp folder
(``checkpoints/.tmp-step-…``), fsynced, then renamed to ``step-NNNNNNNN`` in one
``os.replace``; the ``latest`` pointer is written last (temp file + ``os.replace``).
A crash at any point leaves ``latest`` naming the previous complete checkpoint;
leftover temp folders are ignored and removed by the next save.

Trainer state is saved with ``torch.save`` and loaded with
``torch.load(..., weights_only=True)``: it holds only tensors, dicts, lists,
tuples, numbers, strings and None (RNG states are stored as tensors), so loading
a checkpoint from someone else never unpickles arbitrary objects.
"""

from __future__ import annotations

import errno
import json
import os
import random
import shutil
import uuid
from pathlib import Path

import numpy as np
import torch

from kd.storage.errors import KdError

CHECKPOINTS_DIR = "checkpoints"
LATEST = "latest"
TRAINER_STATE = "trainer_state.pt"
STATE_JSON = "trainer_state.json"
_PREFIX = "step-"


class CheckpointError(KdError):
    """A checkpoint is missing, incomplete or does not belong to this run."""


DISK_ERRNOS = {errno.ENOSPC: "no space left on the device", errno.EDQUOT: "disk quota exceeded",
               errno.EROFS: "read-only file system", errno.EACCES: "permission denied",
               errno.EPERM: "permission denied"}


def disk_problem(err: BaseException, folder: Path | None = None) -> str | None:
    """'no space left on the device', 'read-only file system', ... when ``err`` is one; else None.

    safetensors and torch.save report a full disk in their own exception types, without
    errno: their text, or ``folder`` having (almost) no free space left, tells.
    """
    if isinstance(err, OSError) and err.errno in DISK_ERRNOS:
        return DISK_ERRNOS[err.errno]
    text = str(err)
    if "No space left" in text or "os error 28" in text:
        return DISK_ERRNOS[errno.ENOSPC]
    if "Read-only file system" in text or "os error 30" in text:
        return DISK_ERRNOS[errno.EROFS]
    if folder is not None:
        try:
            if shutil.disk_usage(folder).free < 64 * 1024:
                return DISK_ERRNOS[errno.ENOSPC]
        except OSError:
            pass
    return None


def checkpoint_name(step: int) -> str:
    return f"{_PREFIX}{step:08d}"


def _step_of(name: str) -> int | None:
    if name.startswith(_PREFIX) and name[len(_PREFIX):].isdigit():
        return int(name[len(_PREFIX):])
    return None


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoint folders of a run, oldest step first."""
    root = Path(run_dir) / CHECKPOINTS_DIR
    if not root.is_dir():
        return []
    found = [(s, p) for p in root.iterdir() if p.is_dir() and (s := _step_of(p.name)) is not None]
    return [p for _, p in sorted(found)]


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The folder ``checkpoints/latest`` names, or None when the run has no checkpoint yet."""
    root = Path(run_dir) / CHECKPOINTS_DIR
    pointer = root / LATEST
    if not pointer.exists():
        return None
    name = pointer.read_text().strip()
    folder = root / name
    if _step_of(name) is None or not (folder / TRAINER_STATE).is_file():
        raise CheckpointError(
            f"{pointer} names {name!r}, which is not a complete checkpoint folder; "
            "point it at an existing checkpoints/step-NNNNNNNN folder or start a new run"
        )
    return folder


# ------------------------------------------------------------------ RNG states as tensors
def capture_rng_state() -> dict:
    """Python, NumPy (global), torch CPU and CUDA RNG states, as weights_only-loadable tensors."""
    version, internal, gauss_next = random.getstate()
    _, keys, pos, has_gauss, cached_gaussian = np.random.get_state(legacy=True)
    return {
        "python": {"version": version, "internal": torch.tensor(internal, dtype=torch.int64),
                   "gauss_next": gauss_next},
        "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached_gaussian)},
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def restore_rng_state(state: dict) -> None:
    py = state["python"]
    random.setstate((py["version"], tuple(int(x) for x in py["internal"].tolist()), py["gauss_next"]))
    npy = state["numpy"]
    np.random.set_state(
        ("MT19937", npy["keys"].numpy().astype(np.uint32), npy["pos"], npy["has_gauss"], npy["cached_gaussian"])
    )
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ------------------------------------------------------------------ save
def _fsync_tree(folder: Path) -> None:
    for path in folder.rglob("*"):
        if path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())
    _fsync_dir(folder)


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(
    run_dir: str | Path,
    step: int,
    student,
    model_state: dict[str, torch.Tensor],
    tokenizer,
    trainer_state: dict,
    config_dict: dict,
    keep: int,
) -> Path:
    """Write ``checkpoints/step-NNNNNNNN`` atomically, point ``latest`` at it, keep the last ``keep``.

    ``student`` is the unwrapped HF model (its config and generation config are
    saved); ``model_state`` its full, CPU state dict (what gets written, so FSDP
    shards gathered by the caller land in one file). ``keep=0`` keeps every checkpoint.
    Call on one process only (rank 0).
    """
    root = Path(run_dir) / CHECKPOINTS_DIR
    root.mkdir(parents=True, exist_ok=True)
    name = checkpoint_name(step)
    tmp = root / f".tmp-{name}-{uuid.uuid4().hex[:8]}"
    try:
        student.save_pretrained(tmp, state_dict=model_state, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        torch.save(trainer_state, tmp / TRAINER_STATE)
        (tmp / STATE_JSON).write_text(json.dumps({"global_step": step, "config": config_dict}, indent=2))
        _fsync_tree(tmp)
    except BaseException as err:
        problem = disk_problem(err, root) if isinstance(err, Exception) else None
        shutil.rmtree(tmp, ignore_errors=True)
        if problem is None:
            raise
        latest = latest_checkpoint(run_dir)
        raise CheckpointError(
            f"{problem} while writing checkpoint {name} in {root} ({type(err).__name__}: {err}). "
            + (f"The latest complete checkpoint ({latest.name}) is intact; free space (or lower --keep) and "
               "rerun with --resume." if latest else "Free space (or choose another --out) and rerun.")
        ) from None
    final = root / name
    if final.exists():  # left by a crashed run after its last `latest`: this one replaces it
        stale = root / f".tmp-stale-{name}-{uuid.uuid4().hex[:8]}"
        os.replace(final, stale)
        shutil.rmtree(stale, ignore_errors=True)
    os.replace(tmp, final)
    _write_pointer(root, name)
    _fsync_dir(root)
    prune_checkpoints(run_dir, keep)
    return final


def _write_pointer(root: Path, name: str) -> None:
    tmp = root / f".{LATEST}.{uuid.uuid4().hex[:8]}.tmp"
    with open(tmp, "w") as f:
        f.write(name + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, root / LATEST)


def prune_checkpoints(run_dir: str | Path, keep: int) -> None:
    """Delete all but the newest ``keep`` checkpoints (never the one ``latest`` names) and temp leftovers."""
    root = Path(run_dir) / CHECKPOINTS_DIR
    for leftover in root.glob(".tmp-*"):
        shutil.rmtree(leftover, ignore_errors=True)
    for leftover in root.glob(f".{LATEST}.*.tmp"):  # a pointer write killed before its rename
        leftover.unlink(missing_ok=True)
    if keep <= 0:
        return
    latest = latest_checkpoint(run_dir)
    for folder in list_checkpoints(run_dir)[:-keep]:
        if folder != latest:
            shutil.rmtree(folder)


def discard_checkpoints_after(run_dir: str | Path, step: int) -> None:
    """Remove checkpoints newer than ``step``: written by a run that crashed before moving ``latest``.

    A resumed run re-creates them; left in place they would confuse keep-last-K.
    """
    for folder in list_checkpoints(run_dir):
        if _step_of(folder.name) > step:
            shutil.rmtree(folder)


# ------------------------------------------------------------------ load
def load_trainer_state(checkpoint_dir: str | Path) -> dict:
    """The trainer state of a checkpoint, loaded with ``weights_only=True`` (no arbitrary unpickling)."""
    path = Path(checkpoint_dir) / TRAINER_STATE
    if not path.is_file():
        raise CheckpointError(f"{checkpoint_dir} has no {TRAINER_STATE}; it is not a kd training checkpoint")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises UnpicklingError, RuntimeError, EOFError, ...
        raise CheckpointError(
            f"cannot load {path} with weights_only=True ({type(err).__name__}: {err}); "
            "the file is damaged or was not written by kd train"
        ) from None
