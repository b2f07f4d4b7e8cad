#!/usr/bin/env bash
# One prepared GPU check for hf-llmc on a lent machine (no downloads: the ~1.1B Llama-shaped pair is
# built locally from a config). Prints one markdown table; details go to OUT/gpu_check.json.
# Sized to finish in <= 6 minutes on one H100/H200-class GPU; stopped at GPU_CHECK_TIMEOUT (360 s).
# Not yet run on a GPU: no GPU was lent to the session that wrote it.
#
#   bash benchmarks/gpu_check.sh --results benchmarks/results/gpu_check.json   # full size on the GPU, then
#   python benchmarks/harness.py --render                                      # puts the table in RESULTS.md
#   bash benchmarks/gpu_check.sh --smoke    # tiny sizes on CPU (< 1 minute; run by the tests)
#   PYTHON=/path/to/python bash benchmarks/gpu_check.sh --out /tmp/gpu-check
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(dirname "$here")"
PYTHON="${PYTHON:-python3}"
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
export TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
if [[ " $* " != *" --smoke "* ]] && command -v nvidia-smi >/dev/null 2>&1; then
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
fi
exec timeout "${GPU_CHECK_TIMEOUT:-360}" "$PYTHON" "$here/gpu_check.py" "$@"
