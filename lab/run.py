"""Running the benchmark's plan: child-process and in-process runners, reuse of finished runs, and a
scheduler that starts every run as soon as its stage one is available.
"""

import importlib
import json
import logging
import os
import subprocess
import sys
import threading
import time
from typing import Callable, Optional

from .plan import REPO_ROOT, Run
from .progress import Progress
from .report import load_metrics

__all__ = ["InProcessRunner", "SubprocessRunner", "execute", "run_scheduled"]

logger = logging.getLogger(__name__)


class SubprocessRunner:
    """Runs ``tools/train_net.py`` in a child process, its output in OUT_DIR/stdout.txt.

    Each child gets ``threads`` intra-op threads (OMP/MKL), so that ``jobs`` children side by side
    share the cores instead of oversubscribing them.
    """

    def __init__(self, threads: int):
        self.threads = max(1, int(threads))

    def __call__(self, run: Run) -> int:
        cmd = [
            sys.executable,
            os.path.join(REPO_ROOT, "tools", "train_net.py"),
            *run.command_args(),
        ]
        env = dict(os.environ)
        for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
            env[var] = str(self.threads)
        with open(os.path.join(run.out_dir, "stdout.txt"), "a") as log:
            log.write(f"\n$ {' '.join(cmd)}\n")
            log.flush()
            proc = subprocess.Popen(
                cmd, stdout=log, stderr=subprocess.STDOUT, cwd=REPO_ROOT, env=env
            )
            try:
                # wait4 gives this child's own CPU time: with runs side by side on a shared
                # machine, CPU seconds size a preset better than wall time does.
                _, status, usage = os.wait4(proc.pid, 0)
            except BaseException:
                proc.kill()
                proc.wait()
                raise
            proc.returncode = os.waitstatus_to_exitcode(status)
            run.cpu_s = usage.ru_utime + usage.ru_stime
            return proc.returncode


class InProcessRunner:
    """Runs ``train_net.main`` in this process (serialised): no interpreter start-up per run, for
    tests and debugging. Datasets given by DATASETS.LVIS_FORMAT in the runs' options work as in a
    child process."""

    _lock = threading.Lock()

    def __init__(self, threads: Optional[int] = None):
        self.threads = threads
        try:
            # tools/ is a package beside lab/: what put the checkout on the path to import lab
            # (pytest, see setup.cfg; ``python -m`` from the root; the benchmark tools) lets it in.
            self.train_net = importlib.import_module("tools.train_net")
        except ModuleNotFoundError as e:
            raise ModuleNotFoundError(
                f"InProcessRunner imports tools.train_net ({e}); run from the repository root "
                f"({REPO_ROOT}) or put it on PYTHONPATH"
            ) from e

    def __call__(self, run: Run) -> int:
        import torch
        from detectron2.engine import default_argument_parser

        args = default_argument_parser().parse_args(run.command_args())
        with self._lock:
            before = torch.get_num_threads()
            if self.threads:
                torch.set_num_threads(self.threads)
            try:
                self.train_net.main(args)
            except Exception:  # reported like a failed child process
                logger.exception("run %s failed", run.key)
                return 1
            finally:
                torch.set_num_threads(before)
        return 0


def _run_record(run: Run) -> dict:
    """What identifies a run's settings; paths inside the benchmark folder are written relative
    to it, so that a moved or copied benchmark folder is still recognised."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(run.out_dir.rstrip(os.sep))))
    opts = [
        "<out>" + o[len(root) :] if isinstance(o, str) and o.startswith(root + os.sep) else o
        for o in run.opts
    ]
    return {
        "config": os.path.relpath(run.config, REPO_ROOT),
        "eval_only": run.eval_only,
        "opts": opts,
    }


def execute(run: Run, runner: Callable[[Run], int], log: Callable[[str], None]) -> None:
    """Run ``run`` unless its results exist; fills status, metrics, wall time."""
    metrics_path = os.path.join(run.out_dir, "metrics_final.json")
    record_path = os.path.join(run.out_dir, "run.json")
    record = _run_record(run)
    if os.path.isfile(record_path):
        with open(record_path) as f:
            old = json.load(f)
        if old != record:
            # Reusing results (or resuming a checkpoint) of another schedule would silently mix
            # two experiments in one table.
            raise SystemExit(
                f"[benchmark] {run.out_dir} holds a run with other settings:\n  was {old}\n  now "
                f"{record}\nUse another --out (or delete that folder)."
            )
    timing_path = os.path.join(run.out_dir, "wall_time.json")
    if os.path.isfile(metrics_path):
        run.status, run.metrics = "reused", load_metrics(metrics_path)
        if os.path.isfile(timing_path):
            with open(timing_path) as f:
                timing = json.load(f)
            run.wall_s, run.cpu_s = timing.get("wall_s"), timing.get("cpu_s")
        log(f"{run.key}: reusing {metrics_path}")
        return
    if run.weights_from:
        weights = run.opts[run.opts.index("MODEL.WEIGHTS") + 1]
        if not os.path.isfile(weights):
            run.status, run.error = "skipped", f"no stage-one weights {weights}"
            log(f"{run.key}: SKIPPED ({run.error})")
            return
    os.makedirs(run.out_dir, exist_ok=True)
    with open(record_path, "w") as f:
        json.dump(record, f, indent=1)
    log(f"{run.key}: started")
    start = time.perf_counter()
    code = runner(run)
    run.wall_s = time.perf_counter() - start
    if code != 0 or not os.path.isfile(metrics_path):
        run.status, run.error = "failed", f"exit {code}; see {run.out_dir}/stdout.txt or log.txt"
        log(f"{run.key}: FAILED after {run.wall_s:.0f} s ({run.error})")
        return
    run.status, run.metrics = "done", load_metrics(metrics_path)
    with open(timing_path, "w") as f:
        # Kept for the timing summary of a resumed benchmark.
        json.dump({"wall_s": run.wall_s, "cpu_s": run.cpu_s}, f)
    log(f"{run.key}: done in {run.wall_s:.0f} s")


def run_scheduled(chains, runner, jobs: int, log, progress: Optional[Progress] = None) -> None:
    """Run every run on ``jobs`` workers, each as soon as its stage one is available.

    Stage ones go first (in plan order): they are the longest runs and everything else waits for
    them, so this keeps all workers busy until the end. A run whose stage one failed is skipped.
    An error that should stop the benchmark (e.g. a folder holding other settings) stops it.
    ``progress`` (optional) is told of every finished, reused or skipped run.
    """
    runs = [r for c in chains for r in c]
    by_key = {r.key: r for r in runs}
    pending = sorted(runs, key=lambda r: r.weights_from is not None)  # stable: plan order kept
    cond = threading.Condition()
    errors = []

    def next_run():
        # Called with `cond` held. Returns a runnable run, None when nothing is left.
        while True:
            if errors:
                return None
            for i, run in enumerate(pending):
                dep = by_key.get(run.weights_from) if run.weights_from else None
                if dep is not None and dep.status in ("failed", "skipped"):
                    run.status, run.error = "skipped", f"stage one {dep.key} {dep.status}"
                    log(f"{run.key}: SKIPPED ({run.error})")
                    pending.pop(i)
                    if progress is not None:
                        progress.finished(executed=False)
                    break
                if dep is None or dep.status in ("done", "reused"):
                    run.status = "running"
                    return pending.pop(i)
            else:
                if not pending:
                    return None
                cond.wait()

    def worker():
        while True:
            with cond:
                run = next_run()
            if run is None:
                return
            try:
                execute(run, runner, log)
                if progress is not None:
                    progress.finished(executed=run.status in ("done", "failed"))
            except BaseException as e:  # SystemExit included: stop scheduling, re-raise below
                run.status, run.error = "failed", str(e)
                with cond:
                    errors.append(e)
            finally:
                with cond:
                    cond.notify_all()

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(max(1, jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
