#!/usr/bin/env bash
# Create (or reuse) the project's virtual environment and install the toolkit into it.
# Usage: source scripts/setup_env.sh   (sets $PY to the environment's python)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${VENV:-$ROOT/.venv}"
if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating $VENV"
  python3 -m venv "$VENV"
fi
if ! "$VENV/bin/python" -c "import DEQ, SRS, torch, torchdeq, yacs, statsmodels, sklearn, pytest" 2>/dev/null; then
  echo "[setup] installing requirements (torch is large: a few minutes on first run)"
  "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check -e "$ROOT[test]"
fi
PY="$VENV/bin/python"
export PY
