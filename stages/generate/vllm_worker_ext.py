"""vLLM worker extension: in-place weight updates for the on-policy refresh loop.

vLLM mixes this class into its worker (``LLM(worker_extension_cls=...)``), so
its methods run where the model lives and are called through
``LLM.collective_rpc("kd_load_weights", kwargs=...)``. This module must not
import vllm or torch at module level: vLLM imports it by name inside its
worker processes, and kd imports nothing heavy at import time.

Why a worker method and not ``model.load_weights``: on CPU, vLLM prepacks every
linear layer's weight into a oneDNN handle and empties ``.weight``, so a bare
``load_weights`` fails (and leaves the model half-written). ``reload_weights``
undoes and redoes that processing layer by layer. What it misses is a tied
``lm_head``: the embedding it shares is updated in place, but the lm_head's
prepacked GEMM handle still holds the old matrix, which skews every logprob by
up to ~1 nat after an update. ``_kd_refresh_lm_head`` rebuilds that handle.
On CUDA there is no prepacking and the refresh is a no-op.
"""

from __future__ import annotations

from pathlib import Path


def iter_safetensors(path: str):
    """(name, tensor) pairs of a ``*.safetensors`` file or of every one in a folder."""
    from safetensors import safe_open

    p = Path(path)
    files = [p] if p.is_file() else sorted(p.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors file in {str(p)!r}")
    for f in files:
        with safe_open(str(f), framework="pt") as sf:
            for name in sf.keys():
                yield name, sf.get_tensor(name)


class KdWorkerExtension:
    """Methods added to each vLLM worker (``self`` is the worker)."""

    def kd_load_weights(self, weights=None, path: str | None = None) -> int:
        """Load new weights in place, from (name, tensor) pairs or a safetensors path.

        Tensor pairs only work in the in-process engine (in the multi-process
        one they arrive as nested lists): send ``path`` there. Returns the
        number of tensors read, so the caller can check something was loaded.
        """
        if (weights is None) == (path is None):
            raise ValueError("give exactly one of weights= or path=")
        count = 0

        def counted(pairs):
            nonlocal count
            for pair in pairs:
                count += 1
                yield pair

        source = iter_safetensors(path) if path is not None else weights
        # Not weights_path=: that would re-point model_config.model at `path`.
        self.reload_weights(weights_iterator=counted(source))
        self._kd_refresh_lm_head()
        return count

    def _kd_refresh_lm_head(self) -> None:
        model = self.model_runner.get_model()
        lm_head = getattr(model, "lm_head", None)
        if lm_head is not None and hasattr(lm_head, "cpu_linear"):
            from vllm.model_executor.layers.utils import dispatch_cpu_unquantized_gemm

            dispatch_cpu_unquantized_gemm(lm_head, remove_weight=False)
