#!/usr/bin/env bash
# Idempotent installer for disalign-det.
#
#   bash scripts/install.sh            # creates ./.venv (if missing) and installs everything into it
#   DISALIGN_PYTHON=/path/to/python bash scripts/install.sh   # install into an existing environment
#
# Detectron2 comes from the best source available:
#   1. an already-importable detectron2 (e.g. the official build compiled from source on a GPU
#      machine) is used as is;
#   2. otherwise the pure-Python v0.6 sdist from PyPI (`pb1-detectron2==0.6`) is built with its C++
#      extension list emptied (its csrc/ sources are not in the sdist) and installed.
# Detectron2 is never listed in setup.py's install_requires: two distributions would own the
# `detectron2` import.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
TORCH_SPEC="${DISALIGN_TORCH_SPEC:-torch==2.14.1 torchvision==0.29.1}"
# setuptools >= 82 dropped pkg_resources (imported by detectron2); torch needs >= 77.0.3.
SETUPTOOLS_SPEC='setuptools>=77.0.3,<82'

log() { echo "[install] $*" >&2; }
# pip run quietly; the extra local indexes of some machines print one "is ignored" line per package.
pip_quiet() {
  local py="$1"; shift
  "$py" -m pip --disable-pip-version-check "$@" 2> >(grep -v "is ignored: it is neither" >&2)
}

if [[ -n "${DISALIGN_PYTHON:-}" ]]; then
  PY="$DISALIGN_PYTHON"
else
  VENV="${DISALIGN_VENV:-$ROOT/.venv}"
  if [[ ! -x "$VENV/bin/python" ]]; then
    log "creating virtual environment $VENV"
    python3 -m venv "$VENV"
  fi
  PY="$VENV/bin/python"
fi

STAMP_DIR="$("$PY" -c 'import sys; print(sys.prefix)')"
STAMP="$STAMP_DIR/.disalign_det_installed"
# The stamp records the inputs of the install; any change re-runs it.
FINGERPRINT="$(cat "$ROOT/setup.py" "$ROOT/scripts/install.sh" "$ROOT/scripts/fetch_detectron2.py" | sha256sum | cut -c1-16)"
if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$FINGERPRINT" ]] \
   && "$PY" -c 'import disalign_det, detectron2' 2>/dev/null; then
  log "up to date ($PY)"
  exit 0
fi

PIP=(pip_quiet "$PY")
log "python: $PY"
"${PIP[@]}" install -q --upgrade pip "$SETUPTOOLS_SPEC" wheel

if ! "$PY" -c 'import torch, torchvision' 2>/dev/null; then
  log "installing $TORCH_SPEC"
  # shellcheck disable=SC2086
  "${PIP[@]}" install -q $TORCH_SPEC
fi

# Runtime dependencies that detectron2 v0.6 needs (official builds already have them).
"${PIP[@]}" install -q "numpy<2.3" "Pillow" "fvcore>=0.1.5.post20221221" "iopath>=0.1.7,<0.1.10" \
  "pycocotools>=2.0.2" "lvis==0.5.3" "opencv-python-headless" "matplotlib" "tabulate" "termcolor" \
  "yacs" "cloudpickle" "tqdm" "omegaconf>=2.1" "hydra-core>=1.1" "black" "pydot" "tensorboard"

if "$PY" -c 'import detectron2, detectron2.config' 2>/dev/null; then
  log "using installed detectron2: $("$PY" -c 'import detectron2, os; print(os.path.dirname(detectron2.__file__))')"
else
  log "building pure-Python detectron2 v0.6 (pb1-detectron2==0.6, no C++ extension)"
  WORK="$(mktemp -d)"
  trap 'rm -rf "$WORK"' EXIT
  SRC="$("$PY" "$ROOT/scripts/fetch_detectron2.py" "$WORK")"
  "${PIP[@]}" install -q --no-build-isolation --no-deps "$SRC"
fi

log "installing disalign-det (editable)"
"${PIP[@]}" install -q --no-build-isolation --no-deps -e "$ROOT"
"${PIP[@]}" install -q pytest pytest-timeout flake8 isort
"$PY" -c 'import disalign_det, detectron2; print("[install] disalign_det OK, detectron2", detectron2.__version__, detectron2.__file__)'
echo "$FINGERPRINT" > "$STAMP"
