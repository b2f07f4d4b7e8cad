#!/usr/bin/env bash
# One prepared GPU check for hf-llmc on a lent machine (no downloads: the ~1B Llama-shaped pair is
# built locally from a config). Prints one markdown table; details go to OUT/gpu_check.json.
#
#   benchmarks/gpu_check.sh                 # full size on the GPU (< 8 minutes on one H100)
#   benchmarks/gpu_check.sh --smoke         # tiny sizes on CPU (< 1 minute; run by the tests)
#   PYTHON=/path/to/python benchmarks/gpu_check.sh --out /tmp/gpu-check
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(dirname "$here")"
PYTHON="${PYTHON:-python3}"
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
export TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
if [[ " $* " != *" --smoke "* ]] && command -v nvidia-smi >/dev/null 2>&1; then
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
fi
exec timeout "${GPU_CHECK_TIMEOUT:-470}" "$PYTHON" "$here/gpu_check.py" "$@"
