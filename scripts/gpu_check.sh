#!/usr/bin/env bash
# The prepared GPU run (docs/gpu.md), one command, under 8 minutes on one H100/H200 (the tier is
# capped at 180 s and the measurement at 270 s; a killed tier does not stop the measurement):
#   1. installs detectron2 (main's Python package) and the other dependencies from the wheel folder
#      made by scripts/prepare_gpu_wheels.sh (offline; torch and torchvision must be installed),
#   2. runs the `gpu` test tier (tests/test_gpu.py) on CUDA,
#   3. times stage one / stage two / inference of the LVIS R50-FPN config in fp32 and under
#      autocast (tools/gpu_check.py) and writes gpu_check.json (the docs/gpu.md table is made from
#      it: python tools/gpu_check.py --render gpu_check.json).
#
#   bash scripts/gpu_check.sh                  # on the GPU machine
#   bash scripts/gpu_check.sh --cpu-dry-run    # the same code paths, tiny sizes, on the CPU (CI):
#                                              # no install; the gpu tier is only collected
#
# env: DISALIGN_PYTHON (default python3), DISALIGN_GPU_WHEELS (default ./gpu_wheels),
#      DISALIGN_GPU_CHECK_OUT (default ./output/gpu_check: logs, gpu_check.json, stand-ins).
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY="${DISALIGN_PYTHON:-python3}"
WHEELS="${DISALIGN_GPU_WHEELS:-$ROOT/gpu_wheels}"
OUTDIR="${DISALIGN_GPU_CHECK_OUT:-$ROOT/output/gpu_check}"
DRY=()
[[ "${1:-}" == "--cpu-dry-run" ]] && DRY=(--cpu-dry-run)
mkdir -p "$OUTDIR"
log() { echo "[gpu_check] $*"; }
status=0

if [[ ${#DRY[@]} -eq 0 ]] && ! "$PY" -m pip show -q detectron2 fvcore pytest-timeout 2>/dev/null; then
  if [[ ! -f "$WHEELS/requirements.txt" ]]; then
    log "no wheel folder at $WHEELS: build it with scripts/prepare_gpu_wheels.sh (docs/gpu.md)"
    exit 2
  fi
  log "installing from $WHEELS (offline)"
  "$PY" -m pip install -q --disable-pip-version-check --no-index --find-links "$WHEELS" \
    -r "$WHEELS/requirements.txt" || exit 2
  "$PY" -m pip install -q --disable-pip-version-check --no-index --no-deps \
    --find-links "$WHEELS" lvis || exit 2
fi

# Import-only stand-ins for OpenCV / matplotlib where they are missing (see tools/gpu_check.py).
STANDINS="$OUTDIR/standins"
written="$("$PY" tools/gpu_check.py --write-standins "$STANDINS")" || exit 2
[[ -n "$written" ]] && log "import-only stand-ins for: $written"
export PYTHONPATH="$ROOT${written:+:$STANDINS}${PYTHONPATH:+:$PYTHONPATH}"
"$PY" -c 'import torch, disalign_det, detectron2; print("[gpu_check] torch", torch.__version__,
"CUDA", torch.version.cuda, "available", torch.cuda.is_available(), "| detectron2",
detectron2.__file__)' || exit 2

start=$SECONDS
if [[ ${#DRY[@]} -eq 0 ]]; then
  log "gpu test tier"
  timeout 180 "$PY" -m pytest -q -m gpu -p no:cacheprovider tests/test_gpu.py 2>&1 \
    | tee "$OUTDIR/gpu_tier.log" | tail -n 15
  status=${PIPESTATUS[0]}
else
  timeout 270 "$PY" -m pytest -q -m gpu -p no:cacheprovider --collect-only tests/test_gpu.py 2>&1 \
    | tail -n 1
  status=${PIPESTATUS[0]}
fi
log "gpu tier: exit $status in $((SECONDS - start)) s"

start=$SECONDS
timeout 270 "$PY" tools/gpu_check.py "${DRY[@]}" --out "$OUTDIR/gpu_check.json" 2>&1 \
  | tee "$OUTDIR/gpu_check.log" | grep -v -i warn
bench=${PIPESTATUS[0]}
log "measurement: exit $bench in $((SECONDS - start)) s; $OUTDIR/gpu_check.json"
(( status == 0 )) && status=$bench
exit "$status"
