#!/usr/bin/env bash
# The whole test suite (installs what it needs on first use; idempotent).
#   bash scripts/test.sh [pytest args...]                        # ./.venv (detectron2 v0.6 or found)
#   DISALIGN_DETECTRON2=main bash scripts/test.sh [pytest args]  # ./.venv-main (detectron2 main)
#   DISALIGN_VENV=DIR / DISALIGN_PYTHON=PY bash scripts/test.sh  # another environment
# Exits with pytest's status (non-zero on any failure, error or empty collection).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
bash scripts/install.sh
if [[ -n "${DISALIGN_PYTHON:-}" ]]; then
  PY="$DISALIGN_PYTHON"
elif [[ "${DISALIGN_DETECTRON2:-}" == main ]]; then
  PY="${DISALIGN_VENV:-$ROOT/.venv-main}/bin/python"
else
  PY="${DISALIGN_VENV:-$ROOT/.venv}/bin/python"
fi
# The clone must win over any other disalign_det installed in that environment.
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
exec "$PY" -m pytest -q "$@" tests
