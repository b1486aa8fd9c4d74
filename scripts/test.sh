#!/usr/bin/env bash
# The test command: set up the environment if needed, then run the test suite.
#   bash scripts/test.sh            fast suite (what CI runs)
#   bash scripts/test.sh -m slow    the slow tests too
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/scripts/setup_env.sh"
cd "$ROOT"
exec "$PY" -m pytest -q "$@"
