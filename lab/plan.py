"""What the long-tail benchmark compares: stage-one recipes, methods, presets and the run plan.

Every run is one ``tools/train_net.py`` invocation (:class:`Run`), grouped in chains that share a
stage one (:func:`build_plan`); :mod:`.run` executes them, :mod:`.results` summarises them.
"""

import os
from collections import OrderedDict
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

__all__ = [
    "CLASSIC_STAGE_ONES",
    "METHODS",
    "PRESETS",
    "REPO_ROOT",
    "SIGMOID_STAGE_ONES",
    "STAGE_ONES",
    "TASKS",
    "TASK_LABEL",
    "Preset",
    "Run",
    "StageOne",
    "build_plan",
    "method_rows",
]

# lab/ is not installed: it lives in, and runs, a checkout (its configs and tools/train_net.py).
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The LVIS-structured generated data (preset "lvis", lvis_synth_lt_*): its folder mirrors
# configs/LVIS/synthetic/ file name for file name, so the recipes below name files only.
SYNTH = os.path.join(REPO_ROOT, "configs", "LVIS", "synthetic_lt")
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
    softmax: bool = True  # NorCal renormalises softmax probabilities (not sigmoids, not Gumbels)


def _recipe(key, label, suffix, stage_two_suffix, tau_norm, softmax=True):
    # The config folders name their files after the recipe: mask_rcnn_synth<suffix>.yaml for stage
    # one, disalign{_box_only,}_synth<stage_two_suffix>.yaml for its stage twos.
    return StageOne(
        key=key,
        label=label,
        config=f"mask_rcnn_synth{suffix}.yaml",
        disalign_box_only=f"disalign_box_only_synth{stage_two_suffix}.yaml",
        disalign_box_mask=f"disalign_synth{stage_two_suffix}.yaml",
        tau_norm=tau_norm,
        softmax=softmax,
    )


STAGE_ONES = OrderedDict(
    (s.key, s)
    for s in (
        _recipe("softmax", "softmax", "", "", tau_norm=True),
        # RFS only changes stage one's sampling; its stage two is the plain one (uniform sampling,
        # as in the official recipe).
        _recipe("rfs", "RFS", "_rfs", "", tau_norm=True),
        _recipe("cosine", "cosine", "_cosine", "_cosine", tau_norm=False),
        # The long-tail losses (disalign_det/modeling/stage_one_losses.py); EQLv2 and ECM need
        # detectron2 main's sigmoid classifier.
        _recipe("eqlv2", "EQLv2", "_eqlv2", "_eqlv2", tau_norm=True, softmax=False),
        _recipe("seesaw", "Seesaw", "_seesaw", "_seesaw", tau_norm=False),
        _recipe("ecm", "ECM", "_ecm", "_ecm", tau_norm=False, softmax=False),
        # GOL's Gumbel classifier: its own activation (any detectron2), no softmax for NorCal.
        _recipe("gol", "GOL", "_gol", "_gol", tau_norm=True, softmax=False),
    )
)
SIGMOID_STAGE_ONES = ("eqlv2", "ecm")
# The stage ones of the original benchmark (run_benchmark's default; the CLI's is the preset's).
CLASSIC_STAGE_ONES = ("softmax", "rfs", "cosine")

# Evaluating a stage-one checkpoint with a post-hoc adjustment: the DisAlign predictor with
# calibration and re-weighting off is the stock predictor with the same parameter names, so the
# stage-one weights load unchanged (the cosine stage one already uses it); only POSTHOC differs.
POSTHOC_DELTA = (
    "MODEL.ROI_HEADS.NAME", "DisAlignROIHeads",
    "MODEL.DISALIGN.BOX_CALIBRATION", "False",
    "MODEL.DISALIGN.CLS_LOSS", "ce",
)  # fmt: skip

POSTHOC_LABEL = {
    "norcal": "NorCal γ={p:g}",
    "tau_norm": "τ-norm τ={p:g}",
    "fracal": "FRACAL λ={p:g}",
}
# The methods compared on every stage one (beside the stage one itself, always run: the others need
# its checkpoint); Preset.methods / --methods pick a subset (e.g. issue 26's grid: DisAlign
# box+mask, NorCal and FRACAL), each still only where it applies (_posthoc_runs).
METHODS = ("disalign_box_only", "disalign_box_mask", "norcal", "tau_norm", "fracal")

# FRACAL runs once, at the paper's lambda (its own key), not at every --posthoc-powers value.
FRACAL_LAMBDA = 2.0


def _posthoc_runs(s1, powers, methods=METHODS):
    """(kind, power, config options) of the post-hoc rows of stage one ``s1`` among ``methods``."""
    out = []
    for kind in ("norcal", "tau_norm", "fracal"):
        if kind not in methods:
            continue
        if (kind == "tau_norm" and not s1.tau_norm) or (kind == "norcal" and not s1.softmax):
            continue
        if kind == "fracal":
            out.append((kind, FRACAL_LAMBDA, ["MODEL.DISALIGN.FRACAL_LAMBDA", repr(FRACAL_LAMBDA)]))
            continue
        out += [(kind, p, ["MODEL.DISALIGN.POSTHOC_POWER", repr(float(p))]) for p in powers]
    return out


@dataclass
class Preset:
    """Schedules and sizes of one benchmark run (see ``PRESETS``)."""

    name: str
    seeds: Tuple[int, ...]
    stage_one_iters: int
    stage_two_iters: int
    posthoc_powers: Tuple[float, ...] = (1.0,)
    # Stage-one recipes (keys of STAGE_ONES) run by default; --stage-ones overrides.
    stage_ones: Tuple[str, ...] = ("softmax",)
    # Appended to every run's command line (e.g. a different dataset in the smoke test).
    extra_opts: Tuple[str, ...] = ()
    # Methods (METHODS) run on each stage one; --methods overrides.
    methods: Tuple[str, ...] = METHODS
    note: str = ""

    def stage_one_opts(self) -> List[str]:
        n = self.stage_one_iters
        # The configs' 1200-iteration schedule: LR steps at 3/4 and 11/12 of it scaled to n; the
        # 100-iteration warm-up is kept (a shorter one diverges from scratch), capped for tiny n.
        return _schedule(n, steps=(round(n * 3 / 4), round(n * 11 / 12)), warmup=min(100, n // 4))

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


# Sized from the full preset's run times on the 2-core development machine (docs/benchmark.md,
# "Run times"; 1 thread per run, two runs side by side, so wall time is about total CPU / 2 plus
# the tail of the last chain). Every run is evaluated with Fixed AP, without a per-image cap, at
# SCORE_THRESH_TEST 0.001 (longtail.FIXED_AP_SCORE_THRESH): CPU seconds per run were 608 for a
# stage one (1200 iterations + evaluation), 148 for a stage two (300 iterations + evaluation), 139
# for a post-hoc evaluation. A softmax chain is then ~1200 CPU-s; 3 seeds measured 3544 CPU-s,
# 32.4 min wall. Each further stage one (--stage-ones softmax,rfs,cosine) adds about as much again.
PRESETS = {
    "quick": Preset(
        "quick",
        seeds=(0,),
        stage_one_iters=300,
        stage_two_iters=100,
        note="quick preset: ONE seed and short schedules (stage one far from converged), a smoke "
        "run of the comparison; no seed spread, so no gain can be called significant",
    ),
    # The demo's schedules (configs/LVIS/synthetic_lt: 1200 + 300 iterations), 3 seeds.
    "full": Preset("full", seeds=(0, 1, 2), stage_one_iters=1200, stage_two_iters=300),
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


def method_rows(
    stage_ones: Sequence[str], powers: Sequence[float], methods: Sequence[str] = METHODS
) -> List[Tuple[str, str, str]]:
    """(stage one, method, row label) of every table row, in table order."""
    rows = []
    for g in stage_ones:
        s1 = STAGE_ONES[g]
        rows.append((g, "stage_one", f"{s1.label} (stage one)"))
        for method, what in _STAGE_TWOS:
            if method in methods:
                rows.append((g, method, f"{s1.label} + {what}"))
        for kind, p, _ in _posthoc_runs(s1, powers, methods):
            rows.append((g, _posthoc_method(kind, p), f"{s1.label} + {_posthoc_label(kind, p)}"))
    return rows


_STAGE_TWOS = (
    ("disalign_box_only", "DisAlign box-only"),
    ("disalign_box_mask", "DisAlign box+mask"),
)


def _posthoc_method(kind, p):
    return f"{kind}_{p:g}"


def _posthoc_label(kind, p):
    return POSTHOC_LABEL[kind].format(p=p)


def build_plan(
    preset: Preset, out_dir: str, stage_ones: Sequence[str], eval_opts: Sequence[str] = ()
) -> List[List[Run]]:
    """The runs, grouped in chains: one chain per (seed, stage one), its stage one first; every
    other run of a chain needs the chain's stage-one checkpoint (``weights_from``).
    ``eval_opts`` (e.g. the Fixed AP switch) go last on every run's command line."""
    chains = []
    for seed in preset.seeds:
        for g in stage_ones:
            s1 = STAGE_ONES[g]
            common = ["SEED", str(seed), *preset.extra_opts, *eval_opts]
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
            for method, what in _STAGE_TWOS:
                if method not in preset.methods:
                    continue
                config = getattr(s1, method)
                chain.append(
                    make(
                        method, f"+ {what}", config, preset.stage_two_opts(), weights_from=first.key
                    )
                )
            for kind, p, power_opts in _posthoc_runs(s1, preset.posthoc_powers, preset.methods):
                delta = [*POSTHOC_DELTA, "MODEL.DISALIGN.POSTHOC", kind, *power_opts]
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
