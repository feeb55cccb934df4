"""Feature tests for the detectron2 API differences between v0.6 (Oct 2021) and current main.

Each function answers one question about the installed detectron2 by looking at the API itself
(attributes, signatures, source), never at ``__version__`` (v0.6 and main both say ``"0.6"``).
Each says what it covers and when it can be deleted: all of them go once detectron2 v0.6 is no
longer supported (then the answer is always the main one). Each is used by the code or by the
tests that skip where detectron2 v0.6 lacks the feature. detectron2 is imported lazily, inside the
functions: importing this module imports nothing of detectron2.
"""

import functools
import importlib
import inspect
import logging

__all__ = [
    "accepts_kwarg",
    "create_local_process_group",
    "has_federated_loss",
    "launch_supports_cpu",
    "lvis_evaluator_takes_max_dets",
    "trainer_supports_async_write_metrics",
]

logger = logging.getLogger(__name__)


def accepts_kwarg(fn, name):
    """True if ``fn`` takes a parameter called ``name`` (the feature tests below; ``False`` where
    ``fn`` has no signature, e.g. a builtin)."""
    try:
        return name in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


@functools.lru_cache(maxsize=None)
def launch_supports_cpu():
    """Does ``detectron2.engine.launch`` start several processes without CUDA (gloo)?

    main: yes (its worker picks ``GLOO`` when CUDA is absent). v0.6: no, every worker asserts
    CUDA. Used by :func:`disalign_det.engine.launch`, which keeps its own CPU workers for v0.6
    only. Delete with v0.6.
    """
    # The module: ``detectron2.engine.launch`` as an attribute is the function.
    launch_module = importlib.import_module("detectron2.engine.launch")
    worker = getattr(launch_module, "_distributed_worker", None)
    try:
        src = inspect.getsource(worker)
    except (OSError, TypeError):  # no source (frozen install): our own CPU workers, safe on both
        return False
    return "gloo" in src.lower() and "assert torch.cuda.is_available()" not in src


def create_local_process_group(num_per_machine):
    """Create detectron2's per-machine process group (``comm.get_local_rank``/``_size`` use it).

    main: ``comm.create_local_process_group``. v0.6: the group lives in
    ``comm._LOCAL_PROCESS_GROUP``, which its launch sets inline. Delete with v0.6.
    """
    import torch.distributed as dist
    from detectron2.utils import comm

    if hasattr(comm, "create_local_process_group"):
        comm.create_local_process_group(num_per_machine)
        return
    assert comm._LOCAL_PROCESS_GROUP is None
    world_size = dist.get_world_size()
    machine_rank = dist.get_rank() // num_per_machine
    for i in range(world_size // num_per_machine):
        ranks = list(range(i * num_per_machine, (i + 1) * num_per_machine))
        group = dist.new_group(ranks)  # every rank creates every group (collective)
        if i == machine_rank:
            comm._LOCAL_PROCESS_GROUP = group


@functools.lru_cache(maxsize=None)
def trainer_supports_async_write_metrics():
    """Can ``SimpleTrainer`` write metrics in a worker thread (``async_write_metrics``)?

    main: yes (``_write_metrics`` may then run after the optimizer step, in another thread);
    v0.6: no. Delete with v0.6.
    """
    from detectron2.engine import SimpleTrainer

    return accepts_kwarg(SimpleTrainer.__init__, "async_write_metrics")


@functools.lru_cache(maxsize=None)
def has_federated_loss():
    """Does ``FastRCNNOutputLayers`` know ``USE_SIGMOID_CE``/``USE_FED_LOSS``/``FED_LOSS_*``?

    main: yes (also reads ``class_image_count`` from the dataset metadata, which
    ``disalign_det.data`` always sets). v0.6: no, the keys do not even exist in its config.
    Delete with v0.6.
    """
    from detectron2.modeling.roi_heads.fast_rcnn import FastRCNNOutputLayers

    return accepts_kwarg(FastRCNNOutputLayers.__init__, "use_fed_loss")


@functools.lru_cache(maxsize=None)
def lvis_evaluator_takes_max_dets():
    """Does ``LVISEvaluator`` take ``max_dets_per_image``?

    v0.6 (the PyPI copy) and main: yes; detectron2 releases before v0.6 always used LVIS's 300.
    :class:`disalign_det.evaluation.StreamingLVISEvaluator` passes the argument to its base class
    only where it exists (it applies the limit itself in every case), and the tests and
    ``tools/benchmark_lvis_eval.py`` compare with the stock evaluator at a non-default limit only
    where it exists. Can go, with those branches, when a detectron2 before v0.6 is certainly never
    met (both supported ones answer yes).
    """
    from detectron2.evaluation import LVISEvaluator

    return accepts_kwarg(LVISEvaluator.__init__, "max_dets_per_image")
