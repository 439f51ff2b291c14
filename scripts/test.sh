#!/usr/bin/env bash
# Set up .venv (scripts/setup.sh) and run the test suite; extra arguments go to pytest.
# Then, unless KD_SKIP_VLLM=1, set up .venv-vllm (scripts/setup_vllm.sh, ~3 min the
# first time) and run the tests marked `vllm` there: real vLLM on this CPU.
# GPU tests (marker `gpu`) run where CUDA is present and skip elsewhere.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
run_pytest() {  # pytest's exit 5 (no tests collected) is a failure here
  set +e
  "$@"
  local rc=$?
  set -e
  if [ "$rc" -eq 5 ]; then echo "pytest collected no tests: failing" >&2; return 1; fi
  return "$rc"
}
run_pytest .venv/bin/python -m pytest "$@"
if [ "${KD_SKIP_VLLM:-0}" != "1" ] && [ "$#" -eq 0 ]; then
  bash scripts/setup_vllm.sh
  run_pytest .venv-vllm/bin/python -m pytest -m vllm tests/test_vllm_backend.py tests/test_vllm_stages.py
fi
