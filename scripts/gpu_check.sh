#!/usr/bin/env bash
# One command on a CUDA machine, at most 8 minutes: the CUDA tests, compiled vs eager predictions of a
# random-init MDEQ, bench_gpu.py on MDEQ-LARGE and MDEQ-SMALL, and bench_certify.py --random-init (MDEQ-30A,
# SRS-1A fixed K, default SRS; one image, N 10000).  Writes reports/gpu/<device name>.md (docs/gpu.md).
#   bash scripts/gpu_check.sh            (exit 0: every step ok; 1: a step failed; 2: no CUDA GPU here)
# Python: $VENV/bin/python (default .venv, made by scripts/setup_env.sh) when present, else python3 with torch.
# It installs nothing and needs no internet: random-init weights and synthetic images only.
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${VENV:-$ROOT/.venv}"
if [ -x "$VENV/bin/python" ]; then
  PY="$VENV/bin/python"
else
  PY="$(command -v python3 || command -v python || true)"
fi
if [ -z "$PY" ] || ! "$PY" -c "import torch" >/dev/null 2>&1; then
  echo "error: no python with torch here (tried $VENV/bin/python, then python3): create it with scripts/setup_env.sh" >&2
  exit 2
fi
cd "$ROOT"
PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" exec "$PY" -m DEQ.gpu_check "$@"
