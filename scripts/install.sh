#!/usr/bin/env bash
# Idempotent installer for disalign-det.
#
#   bash scripts/install.sh            # creates ./.venv (if missing) and installs everything into it
#   DISALIGN_PYTHON=/path/to/python bash scripts/install.sh   # install into an existing environment
#   DISALIGN_DETECTRON2=main bash scripts/install.sh          # ./.venv-main with detectron2 main
#   DISALIGN_VENV=DIR bash scripts/install.sh                 # another virtual environment
#
# Detectron2 comes from the best source available:
#   1. an already-importable detectron2 (e.g. the official build compiled from source on a GPU
#      machine) is used as is (with DISALIGN_DETECTRON2=main: only if it has its compiled _C);
#   2. DISALIGN_DETECTRON2=main: detectron2 main built from the source archive
#      $DISALIGN_DETECTRON2_ARCHIVE (default ../shared/detectron2-main/detectron2-main-02b5c4e2.tar.gz,
#      sha256-checked) with its compiled _C (6-11 min on 2 cores). The wheel is cached outside the
#      clone, in $DISALIGN_CACHE_DIR (default ${XDG_CACHE_HOME:-~/.cache}/disalign-det), under a
#      folder named by the archive's sha256, the torch version and the Python tag: a second
#      install on the same machine reuses it;
#   3. otherwise the pure-Python v0.6 sdist (`pb1-detectron2==0.6`, sha256-checked) is fetched with
#      `pip download` (so the user's pip configuration applies: index, mirror, proxy, certificates),
#      built with its C++ extension list emptied (its csrc/ sources are not in the sdist;
#      scripts/fetch_detectron2.py patches its setup.py) and installed.
# Detectron2 is never listed in setup.py's install_requires: two distributions would own the
# `detectron2` import.
set -euo pipefail
shopt -s inherit_errexit

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
MODE="${DISALIGN_DETECTRON2:-auto}"
case "$MODE" in
  auto | main) ;;
  *) echo "[install] DISALIGN_DETECTRON2 must be 'main' or unset (auto), got '$MODE'" >&2; exit 2 ;;
esac
D2_ARCHIVE="${DISALIGN_DETECTRON2_ARCHIVE:-$ROOT/../shared/detectron2-main/detectron2-main-02b5c4e2.tar.gz}"
D2_SHA256="${DISALIGN_DETECTRON2_SHA256:-3b4de1c6e81399865df362b40900e55e45cbcf734f1f5f545ce636cb9bcb37ff}"
CACHE_ROOT="${DISALIGN_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/disalign-det}"
TORCH_SPEC="${DISALIGN_TORCH_SPEC:-torch==2.14.1 torchvision==0.29.1}"
# setuptools >= 82 dropped pkg_resources (imported by detectron2); torch needs >= 77.0.3.
SETUPTOOLS_SPEC='setuptools>=77.0.3,<82'
D2_V06_SHA256="5d2e9e51e523ec72f6a31cca04b0a515492e9514b773a3d134cedc0677170b29"
# pip >= 26 refuses to download a PyPI sdist whose metadata names a direct URL, and v0.6's `all`
# extra names panopticapi by URL: the download runs with this pip, in a temporary folder.
D2_V06_PIP_SPEC='pip>=23,<26'

log() { echo "[install] $*" >&2; }
# pip run quietly; the extra local indexes of some machines print one "is ignored" line per package.
pip_quiet() {
  local py="$1"; shift
  "$py" -m pip --disable-pip-version-check "$@" 2> >(grep -v "is ignored: it is neither" >&2)
}

if [[ -n "${DISALIGN_PYTHON:-}" ]]; then
  PY="$DISALIGN_PYTHON"
else
  if [[ "$MODE" == main ]]; then
    VENV="${DISALIGN_VENV:-$ROOT/.venv-main}"
  else
    VENV="${DISALIGN_VENV:-$ROOT/.venv}"
  fi
  if [[ ! -x "$VENV/bin/python" ]]; then
    log "creating virtual environment $VENV"
    python3 -m venv "$VENV"
  fi
  PY="$VENV/bin/python"
fi

STAMP_DIR="$("$PY" -c 'import sys; print(sys.prefix)')"
STAMP="$STAMP_DIR/.disalign_det_installed"
# The stamp records the inputs of the install; any change re-runs it.
FINGERPRINT="$( (cat "$ROOT/setup.py" "$ROOT/scripts/install.sh" "$ROOT/scripts/fetch_detectron2.py" \
  "$ROOT"/disalign_det/csrc/*.cpp "$ROOT/disalign_det/modeling/cpu_kernel.py"
  echo "$MODE $D2_SHA256") | sha256sum | cut -c1-16)"
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

# Runtime dependencies of detectron2 (v0.6 and main's install_requires, by name; official builds
# already have them), plus lvis for the evaluation and scikit-learn (its digits: the CPU
# classification benchmark and demo).
"${PIP[@]}" install -q "numpy<2.3" "Pillow" "fvcore>=0.1.5.post20221221,<0.1.6" \
  "iopath>=0.1.7,<0.1.10" "pycocotools>=2.0.2" "lvis==0.5.3" "opencv-python-headless" "matplotlib" \
  "tabulate" "termcolor" "yacs" "cloudpickle" "tqdm" "omegaconf>=2.1,<2.4" "hydra-core>=1.1" "black" \
  "packaging" "pydot" "tensorboard" "scikit-learn"

# Build detectron2 main from the source archive, or take its wheel from the cache. Prints the wheel.
d2_main_wheel() {
  if [[ ! -f "$D2_ARCHIVE" ]]; then
    log "detectron2 main source archive not found: $D2_ARCHIVE (set DISALIGN_DETECTRON2_ARCHIVE)"
    return 1
  fi
  local sha
  sha="$(sha256sum "$D2_ARCHIVE" | cut -d' ' -f1)"
  if [[ "$sha" != "$D2_SHA256" ]]; then
    log "$D2_ARCHIVE has sha256 $sha, expected $D2_SHA256 (set DISALIGN_DETECTRON2_SHA256 for another archive)"
    return 1
  fi
  local key cache wheel
  # The compiled _C is tied to the torch it was built against and to the Python ABI.
  key="$("$PY" -c 'import sys, torch; print(f"torch{torch.__version__}-py{sys.version_info[0]}{sys.version_info[1]}")')"
  cache="$CACHE_ROOT/d2main-${sha:0:16}-${key//[^A-Za-z0-9._-]/_}"
  wheel="$(ls "$cache"/detectron2-*.whl 2>/dev/null | head -n1 || true)"
  if [[ -n "$wheel" ]]; then
    log "detectron2 main: cached wheel $wheel"
  else
    local work src start
    work="$(mktemp -d)"
    # This function runs in a subshell: the trap cleans up on failure too. It fires when the
    # subshell exits, after the function has returned and its local `work` is gone: hence the
    # default (set -u would make the trap, and so the install, fail).
    trap 'rm -rf "${work:-}"' EXIT
    tar -xzf "$D2_ARCHIVE" -C "$work"
    src="$(dirname "$(ls "$work"/*/setup.py | head -n1)")"
    log "detectron2 main: compiling $src with its C++ ops (MAX_JOBS=${MAX_JOBS:-2}; 6-11 min on 2 cores)"
    start=$SECONDS
    # No build isolation: setup.py imports the torch of this environment (an isolated build has
    # none); hence no editable install either (setuptools' develop re-runs pip isolated).
    MAX_JOBS="${MAX_JOBS:-2}" "${PIP[@]}" wheel -q --no-build-isolation --no-deps -w "$work/wheel" "$src" >&2
    log "detectron2 main: compiled in $((SECONDS - start)) s"
    # Publish the cache folder atomically: a killed build never leaves a half-written wheel.
    mkdir -p "$CACHE_ROOT"
    local tmp="$cache.tmp.$$"
    rm -rf "$tmp" && mkdir -p "$tmp"
    cp "$work"/wheel/detectron2-*.whl "$tmp"/
    if ! mv -T "$tmp" "$cache" 2>/dev/null; then  # another install published it meanwhile
      rm -rf "$tmp"
    fi
    rm -rf "$work"
    wheel="$(ls "$cache"/detectron2-*.whl | head -n1)"
  fi
  echo "$wheel"
}

if [[ "$MODE" == main ]]; then
  # ViTDet backbones need timm (and fairscale for activation checkpointing).
  "${PIP[@]}" install -q "timm" "fairscale"
fi
if [[ "$MODE" == main ]] && ! "$PY" -c 'import detectron2._C' 2>/dev/null; then
  WHEEL="$(d2_main_wheel)"
  if "$PY" -m pip show -q pb1-detectron2 2>/dev/null; then
    log "removing the pure-Python pb1-detectron2 (two distributions would own 'detectron2')"
    "${PIP[@]}" uninstall -q -y pb1-detectron2
  fi
  "${PIP[@]}" install -q --no-deps --force-reinstall "$WHEEL"
  "$PY" -c 'import detectron2._C'
  log "installed detectron2 main with its compiled ops"
elif "$PY" -c 'import detectron2, detectron2.config' 2>/dev/null; then
  log "using installed detectron2: $("$PY" -c 'import detectron2, os; print(os.path.dirname(detectron2.__file__))')"
else
  log "building pure-Python detectron2 v0.6 (pb1-detectron2==0.6, no C++ extension)"
  WORK="$(mktemp -d)"
  trap 'rm -rf "$WORK"' EXIT
  "${PIP[@]}" install -q --target "$WORK/pip" "$D2_V06_PIP_SPEC"
  echo "pb1-detectron2==0.6 --hash=sha256:$D2_V06_SHA256" > "$WORK/requirements.txt"
  # No build isolation: pip reads the sdist's metadata by running its setup.py, which imports torch.
  PYTHONPATH="$WORK/pip" pip_quiet "$PY" download -q --no-deps --no-binary pb1-detectron2 \
    --no-build-isolation -r "$WORK/requirements.txt" -d "$WORK/sdist"
  SRC="$("$PY" "$ROOT/scripts/fetch_detectron2.py" "$WORK/sdist/pb1-detectron2-0.6.tar.gz" "$WORK")"
  "${PIP[@]}" install -q --no-build-isolation --no-deps "$SRC"
fi

log "installing disalign-det (editable)"
"${PIP[@]}" install -q --no-build-isolation --no-deps -e "$ROOT"
"${PIP[@]}" install -q pytest pytest-timeout flake8 isort
# Optional: the opt-in TEST.LVIS_EVAL.BACKEND "faster_coco_eval" (its tests compare it with the LVIS API).
"${PIP[@]}" install -q "faster-coco-eval==1.8.0"
"$PY" -c 'import disalign_det, detectron2; print("[install] disalign_det OK, detectron2", detectron2.__version__, detectron2.__file__)'
# The C++ CPU kernel of the segmentation loss's backward, compiled now (about 40 s) and cached, not
# in a first training step; optional: without a compiler the loss uses PyTorch ops.
log "building the CPU kernel (disalign_det/csrc/)"
"$PY" -c 'from disalign_det.modeling.cpu_kernel import load_cpu_kernel as load; m = load()
print("[install] CPU kernel:", m.__file__ if m else "not built, PyTorch ops will be used")' \
  || log "CPU kernel not built (optional)"
echo "$FINGERPRINT" > "$STAMP"
