#!/usr/bin/env python
"""The prepared GPU measurement (run by ``scripts/gpu_check.sh``; see docs/gpu.md).

    python tools/gpu_check.py [--out output/gpu_check/gpu_check.json] [--iters 10] [--warmup 3]
    python tools/gpu_check.py --cpu-dry-run        # the same code paths, tiny sizes, on the CPU
    python tools/gpu_check.py --render FILE.json   # the docs/gpu.md table of a result

Times, in ONE run on one device, for configs/LVIS/mask_rcnn_R_50_FPN_2x.yaml (R50-FPN, 1203
classes) and its DisAlign stage two (configs/LVIS/disalign_mask_rcnn.yaml), on a batch of 16
random-content images at LVIS training size (800 x 1067: the largest scale of the config's
multi-scale range, so an upper bound) with random boxes, masks and classes (no dataset):

* ``s1_iter``: a stage-one training iteration (detectron2's ``SimpleTrainer.run_step``: forward,
  backward, metrics, optimizer step; no data loading);
* ``s2_iter``: a stage-two training iteration (frozen model, only the calibration trains);
* ``s2_forward``: the stage-two forward pass of the same batch in training mode without gradients
  (the physical limit of stage two: the frozen model must be run once per iteration);
* ``infer_plain`` / ``infer_disalign``: inference per image (batch 1) of the plain Mask R-CNN and
  of the DisAlign model, same weights;

each in float32 and under autocast (``--amp-dtype``; "auto" = float16 on CUDA, bfloat16 on the
CPU, as ``SOLVER.AMP.PRECISION: auto``). Training iterations run the project's training loop
(``disalign_det.engine.loop.build_train_loop``: detectron2's AMPTrainer with its grad scaler for
float16, autocast without a scaler for bfloat16); the no-grad forward and inference run the model
under ``torch.autocast``. Prints and writes seconds per call, the ratios, the peak GPU memory of
each measurement (``torch.cuda.max_memory_allocated``) and the extrapolated wall time of the
official stage two (9000 iterations of 16 images) on this one device. Models are randomly
initialised (seed 0, box regressions zeroed, see tools/benchmark_speed.py) and the LR is 0: every
iteration does the same work.

``--write-standins DIR`` writes import-only stand-ins for OpenCV (``cv2``) and matplotlib into
DIR when they are not installed: the prepared run's wheel folder has no room for them (OpenCV alone
is a 50 MB wheel), and ``lvis`` (evaluation) and the synthetic-data module import them at import
time without using them in the GPU tier. Any use of a stand-in raises an error naming it.
"""

import argparse
import copy
import importlib.util
import itertools
import json
import logging
import os
import platform
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

logger = logging.getLogger("disalign_det.gpu_check")

MEASURES = ("s1_iter", "s2_iter", "s2_forward", "infer_plain", "infer_disalign")
OFFICIAL_STAGE_TWO_ITERS = 9000  # configs/LVIS/disalign_mask_rcnn.yaml, 16 images per iteration
GOALS = {"s2_iter_over_s2_forward": 1.1, "stage_two_hours": 1.0}
# (batch, (height, width), objects per image, iterations, warm-up)
GPU_SIZES = (16, (800, 1067), 12, 8, 2)
DRY_RUN_SIZES = (2, (96, 128), 3, 1, 1)
AMP_DTYPES = {"bf16": "bfloat16", "fp16": "float16"}  # "auto": fp16 on CUDA, bf16 on the CPU
# The dry run also shrinks the per-image work (proposals, sampled RoIs, detections); the code
# paths are the same.
DRY_RUN_OPTS = [
    "MODEL.RPN.PRE_NMS_TOPK_TRAIN", "200", "MODEL.RPN.POST_NMS_TOPK_TRAIN", "64",
    "MODEL.RPN.PRE_NMS_TOPK_TEST", "200", "MODEL.RPN.POST_NMS_TOPK_TEST", "32",
    "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", "32", "TEST.DETECTIONS_PER_IMAGE", "10",
]  # fmt: skip

_STANDIN = '''"""Import-only stand-in for {name} (tools/gpu_check.py): {top} is not installed."""
__version__ = "0.0.0"
__standin__ = True


class _Missing:
    def __init__(self, name):
        self._name = name

    def __call__(self, *args, **kwargs):
        raise RuntimeError(f"{{self._name}}: {top} is not installed (import-only stand-in)")

    def __getattr__(self, attr):
        return _Missing(f"{{self._name}}.{{attr}}")


def __getattr__(attr):
    if attr.startswith("__"):
        raise AttributeError(attr)
    return _Missing(f"{name}.{{attr}}")
'''
_STANDIN_MODULES = {
    "cv2": ["cv2"],
    "matplotlib": [
        "matplotlib",
        "matplotlib.pyplot",
        "matplotlib.patches",
        "matplotlib.colors",
        "matplotlib.figure",
        "matplotlib.backends",
        "matplotlib.backends.backend_agg",
    ],
}


def write_standins(folder):
    """Stand-ins for the packages of ``_STANDIN_MODULES`` that are not importable; returns their
    names (empty when everything is installed: nothing is written then)."""
    written = []
    for top, modules in _STANDIN_MODULES.items():
        if importlib.util.find_spec(top) is not None:
            continue
        for name in modules:
            path = os.path.join(folder, *name.split("."))
            os.makedirs(path, exist_ok=True)
            with open(os.path.join(path, "__init__.py"), "w") as f:
                f.write(_STANDIN.format(name=name, top=top))
        written.append(top)
    return written


# --------------------------------------------------------------------------------------------------
# Measurement
# --------------------------------------------------------------------------------------------------


class _Autocast:
    """``model`` with its forward under ``torch.autocast``; everything else is the model's."""

    def __init__(self, model, device_type, dtype):
        self.model, self.device_type, self.dtype = model, device_type, dtype

    def __call__(self, *args, **kwargs):
        import torch

        with torch.autocast(device_type=self.device_type, dtype=self.dtype):
            return self.model(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self.model, name)


def _sync(device):
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _cfgs(device, workdir, opts=()):
    bs = _benchmark_speed()
    cfgs = []
    for stage in ("one", "two"):
        cfg = bs.make_cfg("lvis", stage, workdir).clone()
        cfg.defrost()
        cfg.MODEL.DEVICE = device
        cfg.merge_from_list(list(opts))
        cfg.freeze()
        cfgs.append(cfg)
    return cfgs


def _benchmark_speed():
    from tools import benchmark_speed

    return benchmark_speed


class Check:
    """The callables of every measure, for one precision (``amp`` None: float32)."""

    def __init__(self, device, sizes, workdir, amp=None, opts=()):
        import torch

        bs = _benchmark_speed()
        batch, hw, num_obj = sizes[:3]
        one, two = bs.CONFIG_SETS["lvis"][:2]
        bs.CONFIG_SETS["lvis"] = (one, two, batch, hw, num_obj)
        self.device = device
        self.cfg1, self.cfg2 = _cfgs(device, workdir, opts)
        state = bs.stage_one_state(self.cfg1)
        self.batch = bs.make_batch("lvis", self.cfg1.MODEL.ROI_HEADS.NUM_CLASSES)
        self.images = [{k: v for k, v in d.items() if k != "instances"} for d in self.batch]
        m1, m2 = bs.build_model(self.cfg1, state), bs.build_model(self.cfg2, state)
        del state
        self.inf1, self.inf2 = copy.deepcopy(m1).eval(), copy.deepcopy(m2).eval()
        m1.train(), m2.train()
        self.m2 = m2
        dtype = None if amp is None else getattr(torch, amp)
        if dtype is not None:
            device_type = torch.device(device).type
            self.inf1, self.inf2, self.m2 = (_Autocast(m, device_type, dtype)
                                             for m in (self.inf1, self.inf2, m2))  # fmt: skip
        # The training loop both entry points run (disalign_det.engine.loop): float32, bfloat16
        # autocast, or float16 autocast with detectron2's AMPTrainer and its grad scaler.
        from disalign_det.engine import Trainer
        from disalign_det.engine.loop import build_train_loop

        self.t1, self.t2 = (
            build_train_loop(m, itertools.repeat(self.batch), Trainer.build_optimizer(c, m), dtype)
            for m, c in ((m1, self.cfg1), (m2, self.cfg2))
        )
        self.detections = None

    def s1_iter(self):
        self.t1.run_step()

    def s2_iter(self):
        self.t2.run_step()

    def s2_forward(self):
        import torch

        with torch.no_grad():
            self.m2(self.batch)

    def infer_plain(self):
        import torch

        with torch.no_grad():
            self.detections = [len(self.inf1([im])[0]["instances"]) for im in self.images]

    def infer_disalign(self):
        import torch

        with torch.no_grad():
            for im in self.images:
                self.inf2([im])


def time_measures(check, iters, warmup, log=print):
    """{measure: {"seconds": median seconds per call (per image for inference), "peak_memory_gb"}}
    with each measure run alone (so that its peak GPU memory is its own)."""
    import torch
    from detectron2.utils.events import EventStorage

    from lab.stats import median

    cuda = check.device.startswith("cuda")
    out = {}
    with EventStorage(0):
        for m in MEASURES:
            fn = getattr(check, m)
            for _ in range(warmup):
                fn()
            _sync(check.device)
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            times = []
            for _ in range(iters):
                start = time.perf_counter()
                fn()
                _sync(check.device)
                times.append(time.perf_counter() - start)
            per = len(check.images) if m.startswith("infer") else 1
            out[m] = {
                "seconds": median(times) / per,
                "peak_memory_gb": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
            }
            log(f"[gpu_check] {m}: {out[m]['seconds']:.4f} s" + (" per image" if per > 1 else ""))
    return out


def ratios(t):
    """The ratios of one precision's times ``t`` ({measure: {"seconds": ...}})."""
    s = {m: v["seconds"] for m, v in t.items()}
    return {
        "s2_iter_over_s2_forward": s["s2_iter"] / s["s2_forward"],
        "s2_iter_over_s1_iter": s["s2_iter"] / s["s1_iter"],
        "infer_disalign_over_plain": s["infer_disalign"] / s["infer_plain"],
        "stage_two_hours": OFFICIAL_STAGE_TWO_ITERS * s["s2_iter"] / 3600.0,
    }


def device_name(device):
    import torch

    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def run(device, sizes, amp_dtype="bfloat16", workdir=None, log=print, opts=(), partial=None):
    """Measure everything; returns the result dict (see the module docstring). ``partial``: a
    json path where the result so far is written after each precision (a run killed by its time
    limit still leaves the float32 numbers)."""
    import torch

    from disalign_det.compat.shims import has_compiled_ops

    batch, hw, num_obj, iters, warmup = sizes
    own = workdir is None
    workdir = workdir or tempfile.mkdtemp(prefix="gpu_check_")
    result = {
        "device": device_name(device),
        "device_type": torch.device(device).type,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "detectron2_compiled_ops": has_compiled_ops(),
        "config": "configs/LVIS/mask_rcnn_R_50_FPN_2x.yaml + disalign_mask_rcnn.yaml",
        "batch": batch,
        "image_size": list(hw),
        "objects_per_image": num_obj,
        "iters": iters,
        "warmup": warmup,
        "amp_dtype": amp_dtype,
        "config_overrides": list(opts),
        "precisions": {},
        "ratios": {},
    }
    try:
        for name, amp in (("fp32", None), ("amp", amp_dtype)):
            log(f"[gpu_check] {name}: building the models ({result['device']})")
            check = Check(device, sizes, workdir, amp, opts)
            result["num_classes"] = check.cfg1.MODEL.ROI_HEADS.NUM_CLASSES
            result["precisions"][name] = time_measures(check, iters, warmup, log)
            result["ratios"][name] = ratios(result["precisions"][name])
            result["detections_per_image"] = check.detections
            del check
            if partial:
                with open(partial, "w") as f:
                    json.dump({**result, "complete": False}, f, indent=2)
            if device.startswith("cuda"):
                torch.cuda.empty_cache()
    finally:
        if own:
            import shutil

            shutil.rmtree(workdir, ignore_errors=True)
    fp32, amp = (result["precisions"][k] for k in ("fp32", "amp"))
    result["ratios"]["amp_over_fp32"] = {m: amp[m]["seconds"] / fp32[m]["seconds"] for m in fp32}
    result["goals"] = dict(GOALS)
    return result


# --------------------------------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------------------------------


def _fmt(v, spec):
    return "n/a" if v is None else format(v, spec)


def render_table(result):
    """The docs/gpu.md table (markdown) of a result dict."""
    p, r = result["precisions"], result["ratios"]
    lines = [
        f"Device: {result['device']} (torch {result['torch']}, CUDA {result['cuda']}); batch "
        f"{result['batch']} at {result['image_size'][0]} x {result['image_size'][1]}, "
        f"{result['num_classes']} classes; median of {result['iters']} after {result['warmup']} "
        f"warm-up; AMP = autocast {result['amp_dtype']}.",
        "",
        "| measure | fp32 s | AMP s | AMP / fp32 | fp32 peak GiB | AMP peak GiB |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for m in MEASURES:
        a, b = p["fp32"][m], p["amp"][m]
        unit = " (per image)" if m.startswith("infer") else ""
        lines.append(
            f"| {m}{unit} | {a['seconds']:.4f} | {b['seconds']:.4f} | "
            f"{r['amp_over_fp32'][m]:.2f} | {_fmt(a['peak_memory_gb'], '.1f')} | "
            f"{_fmt(b['peak_memory_gb'], '.1f')} |"
        )
    lines += [
        "",
        "| ratio (goal) | fp32 | AMP |",
        "|---|---:|---:|",
    ]
    for key, goal in (
        ("s2_iter_over_s2_forward", f"<= {GOALS['s2_iter_over_s2_forward']}"),
        ("s2_iter_over_s1_iter", "-"),
        ("infer_disalign_over_plain", "-"),
        ("stage_two_hours", f"< {GOALS['stage_two_hours']} h"),
    ):
        lines.append(f"| {key} ({goal}) | {r['fp32'][key]:.3f} | {r['amp'][key]:.3f} |")
    return "\n".join(lines)


def get_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--cpu-dry-run", action="store_true", help="tiny sizes on the CPU")
    p.add_argument("--device", default="cuda", help="torch device (default cuda)")
    p.add_argument("--out", default=os.path.join(ROOT, "output", "gpu_check", "gpu_check.json"))
    p.add_argument("--iters", type=int, help="timed calls per measure")
    p.add_argument("--warmup", type=int, help="untimed calls per measure first")
    p.add_argument("--amp-dtype", choices=["auto", *sorted(AMP_DTYPES)], default="auto")
    p.add_argument("--render", metavar="JSON", help="print the docs table of a result and exit")
    p.add_argument("--write-standins", metavar="DIR", help="write cv2/matplotlib stand-ins, exit")
    return p


def main(argv=None):
    args = get_parser().parse_args(argv)
    if args.write_standins:
        print(" ".join(write_standins(args.write_standins)))
        return 0
    if args.render:
        with open(args.render) as f:
            print(render_table(json.load(f)))
        return 0
    import torch

    import disalign_det  # registrations only; the v0.6 shims come from the explicit call below

    disalign_det.compat.apply_legacy_shims()  # numpy aliases: detectron2 v0.6's loader, lvis

    logging.basicConfig(level=logging.WARNING)
    device = "cpu" if args.cpu_dry_run else args.device
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("gpu_check: no CUDA device here (use --cpu-dry-run for the CPU dry run)")
    sizes = list(DRY_RUN_SIZES if args.cpu_dry_run else GPU_SIZES)
    if args.iters:
        sizes[3] = args.iters
    if args.warmup is not None:
        sizes[4] = args.warmup
    if args.cpu_dry_run:
        torch.set_num_threads(1)
    opts = DRY_RUN_OPTS if args.cpu_dry_run else ()
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    amp = args.amp_dtype
    if amp == "auto":  # as SOLVER.AMP.PRECISION "auto"
        amp = "fp16" if device.startswith("cuda") else "bf16"
    result = run(device, tuple(sizes), AMP_DTYPES[amp], opts=opts, partial=args.out)
    result["dry_run"] = bool(args.cpu_dry_run)
    result["complete"] = True
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print(render_table(result))
    print(f"[gpu_check] written {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
