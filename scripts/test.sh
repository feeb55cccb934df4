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
# ViTDet's LazyConfig files are not installed with the detectron2 package: on detectron2 main the
# tests read them from the source archive the environment was built from (unpacked once, cached).
if [[ "${DISALIGN_DETECTRON2:-}" == main && -z "${DETECTRON2_ROOT:-}" ]]; then
  ARCHIVE="${DISALIGN_DETECTRON2_ARCHIVE:-$ROOT/../shared/detectron2-main/detectron2-main-02b5c4e2.tar.gz}"
  if [[ -f "$ARCHIVE" ]]; then
    SRC_CACHE="${DISALIGN_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/disalign-det}/d2main-src-$(sha256sum "$ARCHIVE" | cut -c1-16)"
    if [[ ! -d "$SRC_CACHE" ]]; then
      mkdir -p "$SRC_CACHE.tmp.$$" && tar -xzf "$ARCHIVE" -C "$SRC_CACHE.tmp.$$"
      mv -T "$SRC_CACHE.tmp.$$" "$SRC_CACHE" 2>/dev/null || rm -rf "$SRC_CACHE.tmp.$$"
    fi
    DETECTRON2_ROOT="$(dirname "$(ls "$SRC_CACHE"/*/setup.py | head -n1)")"
    export DETECTRON2_ROOT
  fi
fi
# The clone must win over any other disalign_det installed in that environment.
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
exec "$PY" -m pytest -q "$@" tests
