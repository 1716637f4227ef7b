#!/usr/bin/env bash
# The GPU check of ops/ in one command, for a machine with CUDA (about 2-4 minutes):
#   bash tests/gpu_check.sh
# 1. fails at once if torch sees no CUDA device; 2. builds the deformable-attention extension
# (compiler output shown; a failed build fails the check); 3. runs every `cuda`-marked test, and
# fails if any of them is skipped; 4. runs the benchmark on the GPU (kernel vs fallback vs baseline).
set -euo pipefail
cd "$(dirname "$0")/.."
start=$SECONDS

echo "== 1/4 CUDA device"
python - <<'PY'
import sys
import torch
if not torch.cuda.is_available():
    sys.exit(f"gpu_check: FAILED: torch {torch.__version__} sees no CUDA device "
             f"(CUDA build: {torch.version.cuda}); this check needs a GPU machine")
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, {torch.cuda.get_device_name(0)}")
PY
if [[ -n "${FD_MSDA_FALLBACK:-}" && "${FD_MSDA_FALLBACK}" != "0" ]]; then
    echo "gpu_check: FAILED: FD_MSDA_FALLBACK=${FD_MSDA_FALLBACK} would hide the kernel; unset it" >&2
    exit 1
fi

echo "== 2/4 build the extension"
python -m ops || { echo "gpu_check: FAILED: the CUDA extension did not build" >&2; exit 1; }

echo "== 3/4 cuda tests"
# -m cuda replaces pytest.ini's "not slow"; -rs lists skips, and any skip fails the check
log=$(mktemp)
set +e
python -m pytest -q -m cuda -rs tests/test_ops.py 2>&1 | tee "$log"
rc=${PIPESTATUS[0]}
set -e
if [[ $rc -ne 0 ]]; then echo "gpu_check: FAILED: cuda tests (pytest exit $rc)" >&2; exit 1; fi
if grep -q "skipped" "$log"; then echo "gpu_check: FAILED: some cuda tests were skipped" >&2; exit 1; fi

echo "== 4/4 benchmark"
python -m ops.bench --device cuda --runs 10
echo "gpu_check: OK in $((SECONDS - start)) s"
