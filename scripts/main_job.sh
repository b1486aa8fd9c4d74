#!/usr/bin/env bash
# The main job on the embedded digits data: set up, train an MDEQ at sigma 0.25 (or reuse it),
# certify a subset of the test set with standard randomized smoothing (MDEQ-30A) and SRS
# (SRS-MDEQ-1A, -3A), print the comparison table and save the plot to reports/quick/.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/scripts/setup_env.sh"
cd "$ROOT"
exec "$PY" scripts/reproduce.py --quick "$@"
