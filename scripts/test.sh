#!/usr/bin/env bash
# The whole test suite (installs what it needs into ./.venv on first use; idempotent).
#   bash scripts/test.sh [pytest args...]
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
bash scripts/install.sh
PY="${DISALIGN_PYTHON:-$ROOT/.venv/bin/python}"
exec "$PY" -m pytest -q "$@" tests
