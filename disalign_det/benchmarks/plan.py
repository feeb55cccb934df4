"""What the long-tail benchmark compares: stage-one recipes, methods, presets and the run plan.

Every run is one ``tools/train_net.py`` invocation (:class:`Run`), grouped in chains that share a
stage one (:func:`build_plan`); :mod:`.run` executes them, :mod:`.results` summarises them.
"""

import os
from collections import OrderedDict
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

__all__ = [
    "PRESETS",
    "REPO_ROOT",
    "STAGE_ONES",
    "TASKS",
    "TASK_LABEL",
    "Preset",
    "Run",
    "StageOne",
    "build_plan",
    "method_rows",
]

# The benchmark runs the repository's configs and tools/train_net.py (an editable install).
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SYNTH = os.path.join(REPO_ROOT, "configs", "LVIS", "synthetic")
TASKS = ("bbox", "segm")
TASK_LABEL = {"bbox": "box", "segm": "mask"}


@dataclass(frozen=True)
class StageOne:
    """A stage-one recipe and the stage-two configs that go with it."""

    key: str
    label: str
    config: str
    disalign_box_only: str
    disalign_box_mask: str
    tau_norm: bool  # tau-normalisation needs a linear (non-cosine) classifier


STAGE_ONES = OrderedDict(
    (s.key, s)
    for s in (
        StageOne(
            key="softmax",
            label="softmax",
            config="mask_rcnn_synth.yaml",
            disalign_box_only="disalign_box_only_synth.yaml",
            disalign_box_mask="disalign_synth.yaml",
            tau_norm=True,
        ),
        # RFS only changes stage one's sampling; its stage two is the plain one (uniform sampling,
        # as in the official recipe).
        StageOne(
            key="rfs",
            label="RFS",
            config="mask_rcnn_synth_rfs.yaml",
            disalign_box_only="disalign_box_only_synth.yaml",
            disalign_box_mask="disalign_synth.yaml",
            tau_norm=True,
        ),
        StageOne(
            key="cosine",
            label="cosine",
            config="mask_rcnn_synth_cosine.yaml",
            disalign_box_only="disalign_box_only_synth_cosine.yaml",
            disalign_box_mask="disalign_synth_cosine.yaml",
            tau_norm=False,
        ),
    )
)

# Evaluating a stage-one checkpoint with a post-hoc adjustment: the DisAlign predictor with
# calibration and re-weighting off is the stock predictor with the same parameter names, so the
# stage-one weights load unchanged (the cosine stage one already uses it); only POSTHOC differs.
POSTHOC_DELTA = (
    "MODEL.ROI_HEADS.NAME", "DisAlignROIHeads",
    "MODEL.DISALIGN.BOX_CALIBRATION", "False",
    "MODEL.DISALIGN.CLS_LOSS", "ce",
)  # fmt: skip

POSTHOC_LABEL = {"norcal": "NorCal γ={p:g}", "tau_norm": "τ-norm τ={p:g}"}


@dataclass
class Preset:
    """Schedules and sizes of one benchmark run (see ``PRESETS``)."""

    name: str
    seeds: Tuple[int, ...]
    stage_one_iters: int
    stage_two_iters: int
    posthoc_powers: Tuple[float, ...] = (1.0,)
    # Appended to every run's command line (e.g. a different dataset in the smoke test).
    extra_opts: Tuple[str, ...] = ()
    note: str = ""

    def stage_one_opts(self) -> List[str]:
        n = self.stage_one_iters
        # The configs' 1500-iteration schedule: LR steps at 11/15 and 9/10 of it scaled to n; the
        # 100-iteration warm-up is kept (a shorter one diverges from scratch), capped for tiny n.
        return _schedule(n, steps=(round(n * 11 / 15), round(n * 9 / 10)), warmup=min(100, n // 4))

    def stage_two_opts(self) -> List[str]:
        n = self.stage_two_iters
        # The configs' 300-iteration stage two: LR step at 5/6 scaled to n, warm-up 20 kept.
        return _schedule(n, steps=(round(n * 5 / 6),), warmup=min(20, n // 4))


def _schedule(n, steps, warmup):
    steps = tuple(s for s in steps if 0 < s < n)
    return [
        "SOLVER.MAX_ITER", str(n),
        "SOLVER.STEPS", str(steps).replace(" ", "") if len(steps) != 1 else f"({steps[0]},)",
        "SOLVER.WARMUP_ITERS", str(warmup),
        # Only model_final is needed; intermediate checkpoints cost time and disk.
        "SOLVER.CHECKPOINT_PERIOD", str(10 * n),
    ]  # fmt: skip


# Sized from the CPU seconds of a quick run measured on the 2-core development machine (the
# md's "Run times" table, 1 thread per run): a stage-one run costs ~35 s + 0.42 s per iteration
# (batch 4 of 128 px), a stage-two run ~27 s + 0.14 s per iteration, a post-hoc run ~27 s (one
# evaluation of the 160 val images, plus start-up). Two runs execute side by side (--jobs 2), so
# wall time is about total CPU / 2 plus the tail after the last stage one:
#   quick: 3 x 161 + 6 x 41 + 5 x 27 = ~860 CPU-s -> ~8 min on 2 idle cores;
#   full (3 seeds): 9 x 329 + 18 x 55 + 15 x 27 = ~4350 CPU-s -> ~38 min on 2 idle cores.
# Measured for the full preset from an empty folder: 4220 CPU-s, 36.1 min wall (docs/benchmark.md).
PRESETS = {
    "quick": Preset(
        "quick",
        seeds=(0,),
        stage_one_iters=300,
        stage_two_iters=100,
        note="quick preset: ONE seed and short schedules (stage one far from converged), a smoke "
        "run of the comparison; no seed spread, so no gain can be called significant",
    ),
    "full": Preset("full", seeds=(0, 1, 2), stage_one_iters=700, stage_two_iters=200),
}


@dataclass
class Run:
    """One ``train_net.py`` invocation."""

    key: str  # seed<S>/<stage one>/<method>, also the output sub-folder
    seed: int
    stage_one: str
    method: str  # "stage_one", "disalign_box_only", "disalign_box_mask", "norcal_1", ...
    label: str
    config: str
    opts: List[str]
    eval_only: bool = False
    weights_from: Optional[str] = None  # key of the run whose model_final.pth is MODEL.WEIGHTS
    out_dir: str = ""
    # Filled after running.
    status: str = "pending"  # pending / done / reused / failed / skipped
    wall_s: Optional[float] = None
    cpu_s: Optional[float] = None  # CPU seconds of the run's process (subprocess runner only)
    metrics: Optional[dict] = None
    error: Optional[str] = None

    def command_args(self) -> List[str]:
        args = ["--config-file", self.config, "--resume"]
        if self.eval_only:
            args.append("--eval-only")
        args += ["OUTPUT_DIR", self.out_dir, *self.opts]
        return args


def method_rows(stage_ones: Sequence[str], powers: Sequence[float]) -> List[Tuple[str, str, str]]:
    """(stage one, method, row label) of every table row, in table order."""
    rows = []
    for g in stage_ones:
        s1 = STAGE_ONES[g]
        rows.append((g, "stage_one", f"{s1.label} (stage one)"))
        rows.append((g, "disalign_box_only", f"{s1.label} + DisAlign box-only"))
        rows.append((g, "disalign_box_mask", f"{s1.label} + DisAlign box+mask"))
        for kind in ("norcal", "tau_norm"):
            if kind == "tau_norm" and not s1.tau_norm:
                continue
            for p in powers:
                rows.append(
                    (g, _posthoc_method(kind, p), f"{s1.label} + {_posthoc_label(kind, p)}")
                )
    return rows


def _posthoc_method(kind, p):
    return f"{kind}_{p:g}"


def _posthoc_label(kind, p):
    return POSTHOC_LABEL[kind].format(p=p)


def build_plan(preset: Preset, out_dir: str, stage_ones: Sequence[str]) -> List[List[Run]]:
    """The runs, grouped in chains: one chain per (seed, stage one), its stage one first; every
    other run of a chain needs the chain's stage-one checkpoint (``weights_from``)."""
    chains = []
    for seed in preset.seeds:
        for g in stage_ones:
            s1 = STAGE_ONES[g]
            common = ["SEED", str(seed), *preset.extra_opts]
            prefix = f"seed{seed}/{g}"

            def make(method, label, config, opts, **kw):
                return Run(
                    key=f"{prefix}/{method}",
                    seed=seed,
                    stage_one=g,
                    method=method,
                    label=f"{s1.label} {label}",
                    config=os.path.join(SYNTH, config),
                    opts=opts + common,
                    **kw,
                )

            first = make("stage_one", "(stage one)", s1.config, preset.stage_one_opts())
            chain = [first]
            for method, config, what in (
                ("disalign_box_only", s1.disalign_box_only, "DisAlign box-only"),
                ("disalign_box_mask", s1.disalign_box_mask, "DisAlign box+mask"),
            ):
                chain.append(
                    make(
                        method, f"+ {what}", config, preset.stage_two_opts(), weights_from=first.key
                    )
                )
            for kind in ("norcal", "tau_norm"):
                if kind == "tau_norm" and not s1.tau_norm:
                    continue
                for p in preset.posthoc_powers:
                    delta = [*POSTHOC_DELTA, "MODEL.DISALIGN.POSTHOC", kind,
                             "MODEL.DISALIGN.POSTHOC_POWER", repr(float(p))]  # fmt: skip
                    chain.append(
                        make(
                            _posthoc_method(kind, p),
                            f"+ {_posthoc_label(kind, p)}",
                            s1.config,
                            delta,
                            eval_only=True,
                            weights_from=first.key,
                        )
                    )
            for run in chain:
                run.out_dir = os.path.join(out_dir, run.key)
                if run.weights_from:
                    weights = os.path.join(out_dir, run.weights_from, "model_final.pth")
                    run.opts = run.opts + ["MODEL.WEIGHTS", weights]
            chains.append(chain)
    return chains
