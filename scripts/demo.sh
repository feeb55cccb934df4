#!/usr/bin/env bash
# The main job on the embedded default (the generated long-tail LVIS-format dataset, no download):
# stage one Mask R-CNN, then DisAlign stage two, each evaluated with LVIS metrics.
# Installs what it needs into ./.venv on first use; finished stages are reused on a re-run.
#   bash scripts/demo.sh [--out DIR] [--quick] [--classification-digits]
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
bash scripts/install.sh
PY="${DISALIGN_PYTHON:-$ROOT/.venv/bin/python}"
exec "$PY" tools/demo.py "$@"
