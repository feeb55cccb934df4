#!/usr/bin/env python
"""Speed of a DisAlign stage-two iteration on a segmentation model, relative to the same model's
no-grad forward on the same batch (goal: <= 1.15x), measured in one run.

    python tools/benchmark_speed_sem_seg.py [--rounds 3] [--cpu-rounds N] [--ade-size 512] \
        [--ade-batch 1] [--no-autograd-baseline] [--no-ops-baseline] [--only ade|cpu]

Models: the ADE20K DisAlign DeepLabV3+ R50-D8 stage two (configs/ADE20K/, random weights, plain BN
instead of SyncBN, ``--ade-size`` square crops) and the CPU config on the generated data
(configs/ADE20K/synthetic/, 4 images of 112 x 144). For each: the median over ``--rounds`` of

* forward: ``model(batch)`` in training mode (losses computed) under ``torch.no_grad()``;
* iteration: forward, backward and an SGD step of the trainable (calibration) parameters, i.e.
  what the trainer does per stage-two iteration;

with the head's GRW loss as built (``upsampled_cross_entropy``, its backward by the C++ CPU
kernel of ``disalign_det/csrc/`` where that is built, which the tool prints), and both again, for
comparison, with the same loss's backward by PyTorch ops (``DISALIGN_CPU_KERNEL=0``;
``--no-ops-baseline`` skips it) and with autograd's GRW loss (the head's ``fused_pixel_loss =
False``: ``F.interpolate`` and the per-pixel cross-entropy, backpropagated by autograd;
``--no-autograd-baseline`` skips it).

The measurements are interleaved within each round, so that load changes hit them alike. The ratio
iteration / forward (of wall-clock medians) is the cost of training the calibration on top of
running the frozen model. Timings on a shared CPU vary; the ratios are measured within one process.
The next column, the same ratio of the process's CPU-time medians, leaves out the time the process
waited for a core (with one torch thread, ``OMP_NUM_THREADS=1``, it is the single thread's time;
with several it adds them up). The last gives the median minor page faults of a forward and of an
iteration: with glibc's malloc, a full-resolution tensor (20 MB on the CPU config) is either
reused from the heap or mapped afresh and zero-filled page by page (~10k faults, 10-20 ms a
forward), depending on the allocator's history in the process; the forward's time, hence the
ratio, depends on which. So by default the tool pins glibc's malloc first (``mallopt``: no
``mmap``, no trimming): freed memory is reused, no page faults, and the ratio compares the
computation alone, the strictest case for it (a faulting forward is slower, the ratio lower).
``--no-pin-malloc`` leaves the allocator as it is.
"""

import argparse
import ctypes
import ctypes.util
import os
import resource
import sys
import time

import torch

import disalign_det  # noqa: F401  isort: skip  (shims and registrations first)
from detectron2.config import get_cfg
from detectron2.modeling import build_model

from disalign_det import add_disalign_config
from disalign_det.modeling import apply_freeze
from disalign_det.modeling.cpu_kernel import ENV_VAR, enabled, load_cpu_kernel

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# lab/ is not installed: run as a script, Python puts tools/ on sys.path, not the checkout's root
# (appended: an installed disalign_det still wins).
sys.path.append(ROOT)

from lab.stats import median  # noqa: E402

ADE = "configs/ADE20K/disalign_deeplab_v3_plus_R_50_D8_512x512_4k.yaml"
CPU = "configs/ADE20K/synthetic/disalign_semantic_fpn_synth.yaml"


def pin_malloc() -> bool:
    """glibc's malloc: serve every allocation from the heap (``M_MMAP_MAX`` 0) and never give
    memory back (``M_TRIM_THRESHOLD`` 2**30), so that freed full-resolution tensors are reused
    without page faults. This process only (a benchmark's, not the library's). False where the C
    library is not glibc."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_max = -1, -4  # <malloc.h>
    return bool(mallopt(m_mmap_max, 0)) and bool(mallopt(m_trim_threshold, 2**30))


def _model(config, opts):
    cfg = get_cfg()
    add_disalign_config(cfg)
    cfg.merge_from_file(os.path.join(ROOT, config))
    cfg.merge_from_list(["MODEL.WEIGHTS", "", "MODEL.DEVICE", "cpu", *opts])
    for node in (cfg.MODEL.RESNETS, cfg.MODEL.SEM_SEG_HEAD):
        node.NORM = "BN" if node.NORM == "SyncBN" else node.NORM  # no process group here
    model = build_model(cfg)
    apply_freeze(model, cfg.MODEL.DISALIGN.FREEZE)
    head = model.sem_seg_head
    head.set_class_frequencies(torch.arange(1, head.predictor.out_channels + 1).float())
    return model.train()


def _batch(n, h, w, num_classes):
    g = torch.Generator().manual_seed(0)
    return [
        {
            "image": torch.randint(0, 255, (3, h, w), generator=g).float(),
            "sem_seg": torch.randint(0, num_classes, (h, w), generator=g),
        }
        for _ in range(n)
    ]


def measure(model, batch, rounds, baseline=True, ops_baseline=True):
    """Medians over ``rounds``: {(path, what): (wall seconds, process CPU seconds, minor page
    faults)} for path "fused" (the head's loss path as built, ``fused_pixel_loss``), when
    ``ops_baseline`` "ops" (the same with ``DISALIGN_CPU_KERNEL=0``) and, when ``baseline``,
    "autograd" (``fused_pixel_loss = False``), what "forward" or "iteration"."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=0.01, momentum=0.9)
    head = model.sem_seg_head
    switch = os.environ.get(ENV_VAR, "1")  # restored after each measurement

    def with_path(fused, use_kernel, f):
        def run():
            head.fused_pixel_loss = fused
            os.environ[ENV_VAR] = "1" if use_kernel else "0"
            try:
                f()
            finally:
                head.fused_pixel_loss = True
                os.environ[ENV_VAR] = switch

        return run

    def forward():
        with torch.no_grad():
            model(batch)

    def iteration():
        loss = sum(model(batch).values())
        opt.zero_grad()
        loss.backward()
        opt.step()

    built = enabled() and load_cpu_kernel() is not None
    paths = [("fused", True, built)]
    paths += [("ops", True, False)] if ops_baseline and built else []
    paths += [("autograd", False, built)] if baseline else []
    timed = {
        (path, what): with_path(fused, use_kernel, f)
        for path, fused, use_kernel in paths
        for what, f in (("forward", forward), ("iteration", iteration))
    }
    for f in timed.values():  # warm-up
        f()
    times = {k: ([], [], []) for k in timed}
    for _ in range(rounds):  # interleaved, so that load changes hit all alike
        for k, f in timed.items():
            faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            wall, cpu = time.perf_counter(), time.process_time()
            f()
            times[k][0].append(time.perf_counter() - wall)
            times[k][1].append(time.process_time() - cpu)
            times[k][2].append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults)
    return {k: tuple(median(v) for v in values) for k, values in times.items()}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3, help="rounds of the ADE20K-sized model")
    parser.add_argument(
        "--cpu-rounds", type=int, help="rounds of the CPU config (default: --rounds)"
    )
    parser.add_argument("--ade-size", type=int, default=512)
    parser.add_argument("--ade-batch", type=int, default=1)
    parser.add_argument(
        "--no-autograd-baseline",
        action="store_true",
        help="do not time the iteration with autograd's loss backward",
    )
    parser.add_argument(
        "--no-ops-baseline",
        action="store_true",
        help="do not time the iteration with the loss's backward by PyTorch ops",
    )
    parser.add_argument("--only", choices=("ade", "cpu"), help="time one of the two models")
    parser.add_argument(
        "--no-pin-malloc",
        action="store_true",
        help="leave glibc's malloc as it is (its page faults then vary with its history)",
    )
    args = parser.parse_args(argv)
    pinned = False if args.no_pin_malloc else pin_malloc()
    torch.manual_seed(0)
    s = args.ade_size
    cases = []
    if args.only in (None, "ade"):
        cases.append(
            (
                f"ADE20K DisAlign DeepLabV3+ R50-D8, {args.ade_batch} x {s}x{s}",
                lambda: _model(ADE, ["INPUT.CROP.SIZE", f"({s}, {s})"]),
                lambda: _batch(args.ade_batch, s, s, 150),
                args.rounds,
            )
        )
    if args.only in (None, "cpu"):
        cases.append(
            (
                "CPU config (generated data), 4 x 112x144",
                lambda: _model(CPU, []),
                lambda: _batch(4, 112, 144, 61),
                args.cpu_rounds or args.rounds,
            )
        )
    print(f"torch threads: {torch.get_num_threads()}")
    print(f"malloc pinned (no mmap, no trim): {pinned}")
    kernel = load_cpu_kernel() if enabled() else None
    print(f"C++ CPU kernel of the loss's backward: {kernel.__file__ if kernel else 'not used'}")
    print(f"load average: {', '.join(f'{v:.2f}' for v in os.getloadavg())}")
    print(
        "| model | rounds | loss path | no-grad forward (s) | stage-two iteration (s) | ratio "
        "| ratio of process CPU times | page faults (forward / iteration) |"
    )
    print("|---|---|---|---|---|---|---|---|")
    out = {}
    for name, model, batch, rounds in cases:
        res = measure(
            model(), batch(), rounds, not args.no_autograd_baseline, not args.no_ops_baseline
        )
        for path in ("fused", "ops", "autograd"):
            if (path, "forward") not in res:
                continue
            (fwd, fwd_cpu, fwd_pf), (it, it_cpu, it_pf) = (
                res[path, "forward"],
                res[path, "iteration"],
            )
            out[name, path] = (fwd, it, it / fwd, it_cpu / fwd_cpu)
            label = {
                "fused": "upsampled_cross_entropy" + (", C++ CPU kernel" if kernel else ""),
                "ops": "upsampled_cross_entropy, PyTorch ops",
                "autograd": "autograd (F.interpolate + cross-entropy)",
            }[path]
            print(
                f"| {name} | {rounds} | {label} | {fwd:.3f} | {it:.3f} | {it / fwd:.3f}x "
                f"| {it_cpu / fwd_cpu:.3f}x | {fwd_pf:.0f} / {it_pf:.0f} |",
                flush=True,
            )
    print(f"load average: {', '.join(f'{v:.2f}' for v in os.getloadavg())}")
    return out


if __name__ == "__main__":
    main()
