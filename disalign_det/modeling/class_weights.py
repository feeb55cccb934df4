"""Class frequencies of the DisAlign heads: the GRW class weights of the losses, installed when
training starts, never when a model is built.

Building a model (for inference, evaluation, export) reads no training json: the GRW weights
``(1 / r_j) ** rho`` are needed only by the losses, so the heads start without them and
:func:`install_class_weights` (called by ``Trainer.__init__``; a LazyConfig training script calls
it too, or :func:`set_class_frequencies` with counts of its own) computes them from the training
data. The counts come from :func:`~.frequency.class_counts_from_cfg` (a segmentation model's from
the training pixels, :func:`default_counts_reader`), cached per json / label-map state, so
every process of a distributed run installs identical weights without communicating. A loss that
is configured for GRW but has no weights refuses to run.
"""

import logging

import torch
from detectron2.utils import comm

from .losses import check_rho, global_normalizer, grw_class_weights

__all__ = [
    "ClassFrequencyMixin",
    "default_counts_reader",
    "install_class_weights",
    "set_class_frequencies",
]

logger = logging.getLogger(__name__)


class ClassFrequencyMixin:
    """Shared by the box predictor and the mask head: the ``class_weights`` buffer of a loss that
    may be GRW-weighted, its validation and its installation, and the normaliser of the loss.

    ``class_weights`` is a (K + 1,) non-persistent buffer (background last): all ones for the
    unweighted loss; for "grw" it holds the GRW weights once installed. It is not saved: it is a
    function of the training data and rho, not a learned state.
    """

    def _init_class_weights(self, loss, choices, key, class_weights, num_classes, rho=0.0):
        """Validate ``loss`` (config ``key``, one of ``choices``) and register ``class_weights``:
        the given (K + 1,) weights, or for "grw" without them a placeholder until installed."""
        if loss not in choices:
            raise ValueError(f"{key} must be one of {choices}, got {loss!r}")
        self.loss_config_key = key
        self.uses_grw = loss == "grw"
        self.rho = check_rho(rho)
        self.num_weighted_classes = num_classes
        installed = not self.uses_grw or class_weights is not None
        self.register_buffer("class_weights", torch.ones(num_classes + 1), persistent=False)
        self.class_weights_installed = installed
        if self.uses_grw and class_weights is not None:
            self._set_class_weights(class_weights)

    def _set_class_weights(self, class_weights):
        w = torch.as_tensor(class_weights, dtype=torch.float32).flatten()
        K = self.num_weighted_classes
        if w.numel() != K + 1:
            raise ValueError(
                f"{self.loss_config_key}='grw' needs K + 1 = {K + 1} class weights, got "
                f"{w.numel()}"
            )
        self.class_weights.copy_(w.to(self.class_weights.device))
        self.class_weights_installed = True

    @property
    def needs_class_frequencies(self) -> bool:
        """True if training this module needs the class frequencies of the training data."""
        return self.uses_grw

    def set_class_frequencies(self, counts, rho=None):
        """Install the GRW weights of (K,) training frequencies ``counts`` (with this module's
        configured rho unless ``rho`` is given). A no-op for an unweighted loss."""
        counts = torch.as_tensor(counts).flatten()
        if counts.numel() != self.num_weighted_classes:
            raise ValueError(
                f"{type(self).__name__} has K = {self.num_weighted_classes} classes "
                f"(MODEL.ROI_HEADS.NUM_CLASSES) but got {counts.numel()} class counts"
            )
        if self.uses_grw:
            self._set_class_weights(grw_class_weights(counts, self.rho if rho is None else rho))

    def grw_weights(self):
        """(K + 1,) class weights for the loss, or None for the unweighted loss; raises if GRW is
        configured but its weights were never installed."""
        if not self.uses_grw:
            return None
        if not self.class_weights_installed:
            raise RuntimeError(
                f"{self.loss_config_key}='grw' but the GRW class weights of "
                f"{type(self).__name__} were never installed: they are computed from the "
                "training data when training starts. Call "
                "disalign_det.modeling.install_class_weights(model, cfg) (Trainer does) or "
                "disalign_det.modeling.set_class_frequencies(model, counts) before training."
            )
        return self.class_weights

    @staticmethod
    def loss_normalizer():
        """``normalize`` for the weighted-mean losses: over the global batch with several
        processes (:func:`~.losses.global_normalizer`), None (the local mean, unchanged bit for
        bit, no communication) with one."""
        return global_normalizer if comm.get_world_size() > 1 else None


def _frequency_modules(model):
    return [m for m in model.modules() if isinstance(m, ClassFrequencyMixin)]


def set_class_frequencies(model, counts, rho=None):
    """Give every DisAlign head of ``model`` the (K,) training class frequencies ``counts``: the GRW
    weights of its loss and what its inference needs (NorCal's counts). For a LazyConfig model,
    ``counts`` can come from ``disalign_det.data.get_class_counts(dataloader.train.dataset.names)``.

    Args:
        model: any module (a DDP wrapper too) containing DisAlign heads.
        counts: (K,) non-negative per-class counts n_j.
        rho: the GRW exponent; None keeps each head's configured ``MODEL.DISALIGN.RHO``.

    Returns:
        int: the number of heads that received them.
    """
    modules = _frequency_modules(model)
    for m in modules:
        m.set_class_frequencies(counts, rho)
    return len(modules)


def default_counts_reader(cfg):
    """The training frequencies :func:`install_class_weights` reads for ``cfg``: the training
    **pixel** counts for detectron2's ``SemanticSegmentor``
    (:func:`~disalign_det.data.sem_seg_counts.pixel_counts_from_cfg`; ADE20K's ``objectInfo150``
    ratios when ``MODEL.DISALIGN.PIXEL_RATIOS_FILE`` is set), else the per-class image or
    instance counts of ``DATASETS.TRAIN`` (:func:`~disalign_det.data.class_counts.
    class_counts_from_cfg`, ``FREQUENCY_SOURCE``). Returns ``cfg -> (K,) counts``."""
    if cfg.MODEL.META_ARCHITECTURE == "SemanticSegmentor":
        from ..data.sem_seg_counts import pixel_counts_from_cfg

        return pixel_counts_from_cfg
    from ..data.class_counts import class_counts_from_cfg

    return class_counts_from_cfg


def _check_sem_seg_freeze(cfg):
    if (
        cfg.MODEL.META_ARCHITECTURE == "SemanticSegmentor"
        and cfg.MODEL.DISALIGN.FREEZE == "all_but_classifier"
    ):
        # apply_freeze's classifier is the box head's cls_score: nothing of a segmentation head.
        raise ValueError(
            "MODEL.DISALIGN.FREEZE 'all_but_classifier' has no segmentation counterpart (it "
            "trains the box classifier cls_score): use 'all_but_calibration' or 'none'"
        )


def install_class_weights(model, cfg, read_counts=None):
    """Read the training frequencies of ``cfg`` and give them to the heads of ``model`` that need
    them for training (GRW losses, NorCal), once per process at the start of training. Reads
    nothing when no head needs them. The one entry point of the detection heads (class counts)
    and of the segmentation heads (pixel counts): the trainer and the config pre-check call it.

    Args:
        model: any module containing DisAlign heads (:class:`ClassFrequencyMixin`).
        cfg: its config.
        read_counts: ``cfg -> (K,) counts``; None: :func:`default_counts_reader` (pixel counts for
            a ``SemanticSegmentor``, class counts otherwise).

    Returns:
        The (K,) counts, or None when nothing needed them.
    """
    _check_sem_seg_freeze(cfg)
    modules = [m for m in _frequency_modules(model) if m.needs_class_frequencies]
    if not modules:
        return None
    counts = (read_counts or default_counts_reader(cfg))(cfg)
    for m in modules:
        m.set_class_frequencies(counts)
    logger.info(
        "Training frequencies of %s installed in %d head(s) (GRW rho=%g)",
        list(cfg.DATASETS.TRAIN),
        len(modules),
        cfg.MODEL.DISALIGN.RHO,
    )
    return counts
