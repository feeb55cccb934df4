#!/usr/bin/env bash
# The wheel folder of the prepared GPU run (scripts/gpu_check.sh, docs/gpu.md), built on a machine
# with network (any Python >= 3.8 with pip, setuptools and wheel): everything the GPU tier and the
# measurement need besides torch and torchvision (and numpy and Pillow, which torchvision
# requires), for CPython 3.12 on x86-64 Linux, plus a pure-Python wheel of detectron2 main (its
# Python package without the compiled _C: disalign_det's shim stands in for it, Mask R-CNN uses
# torchvision's ops). OpenCV (a 50 MB wheel) and matplotlib do not fit the 64 MiB budget of wheels
# plus checkout: gpu_check.sh writes import-only stand-ins for them (tools/gpu_check.py).
#
#   bash scripts/prepare_gpu_wheels.sh [DIR]       # default ./gpu_wheels (git-ignored)
#
# env: DISALIGN_PYTHON (default python3), DISALIGN_DETECTRON2_ARCHIVE (default
# ../shared/detectron2-main/detectron2-main-02b5c4e2.tar.gz).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DIR="$(mkdir -p "${1:-$ROOT/gpu_wheels}" && cd "${1:-$ROOT/gpu_wheels}" && pwd)"
PY="${DISALIGN_PYTHON:-python3}"
D2_ARCHIVE="${DISALIGN_DETECTRON2_ARCHIVE:-$ROOT/../shared/detectron2-main/detectron2-main-02b5c4e2.tar.gz}"
PIP=("$PY" -m pip --disable-pip-version-check)
log() { echo "[prepare_gpu_wheels] $*" >&2; }

# Wheels from PyPI for CPython 3.12, manylinux x86-64 (binary ones) or any platform (pure ones).
TARGET=(--only-binary=:all: --python-version 3.12 --implementation cp --abi cp312 --abi abi3
        --abi none --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64
        --platform manylinux_2_28_x86_64 --platform any)
WHEELS=(pycocotools pyyaml "iopath>=0.1.7,<0.1.10" "lvis==0.5.3" yacs termcolor tabulate
        cloudpickle tqdm portalocker "omegaconf>=2.1,<2.4" "hydra-core>=1.1" packaging
        pytest pytest-timeout pluggy iniconfig pygments)
# Published as source only (pure Python): built into wheels here.
SDISTS=("fvcore>=0.1.5.post20221221,<0.1.6" "antlr4-python3-runtime==4.9.3")

log "downloading ${#WHEELS[@]} wheels into $DIR"
"${PIP[@]}" download -q --no-deps "${TARGET[@]}" -d "$DIR" "${WHEELS[@]}"
log "building ${SDISTS[*]}"
"${PIP[@]}" wheel -q --no-deps -w "$DIR" "${SDISTS[@]}"

log "building a pure-Python wheel of detectron2 main from $D2_ARCHIVE"
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
tar xzf "$D2_ARCHIVE" -C "$WORK"
SRC="$(find "$WORK" -mindepth 2 -maxdepth 2 -type d -name detectron2 | head -n1)"
mkdir -p "$WORK/pkg"
cp -r "$SRC" "$WORK/pkg/detectron2"
cat > "$WORK/pkg/setup.py" <<'PYEOF'
# detectron2's Python package without its C++ extension (its own setup.py compiles _C).
from setuptools import find_packages, setup

setup(name="detectron2", version="0.6", packages=find_packages(include=("detectron2*",)),
      python_requires=">=3.8")
PYEOF
"${PIP[@]}" wheel -q --no-deps --no-build-isolation -w "$DIR" "$WORK/pkg"

# What gpu_check.sh installs (pip resolves the dependencies among them, offline); lvis goes in
# with --no-deps (it lists opencv-python and matplotlib, only used by its visualiser).
(cd "$DIR" && ls -1 *.whl | sed 's/-.*//' | tr '_' '-' | grep -vx lvis | sort -u) \
  > "$DIR/requirements.txt"

wheels_kb=$(du -sk "$DIR" | cut -f1)
checkout_kb=$(cd "$ROOT" && git ls-files -z | du -ck --files0-from=- | tail -n1 | cut -f1)
log "wheel folder: $((wheels_kb / 1024)) MiB ($DIR); checkout: $((checkout_kb / 1024)) MiB;" \
    "together $(((wheels_kb + checkout_kb) / 1024)) MiB (budget 64 MiB)"
if (( wheels_kb + checkout_kb > 64 * 1024 )); then
  log "over the 64 MiB budget"
  exit 1
fi
