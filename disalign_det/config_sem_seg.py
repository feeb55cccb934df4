"""Config keys of DisAlign for semantic segmentation (``add_sem_seg_disalign_config``, called by
``add_disalign_config``). ``MODEL.DISALIGN.RHO``, ``CONFIDENCE_INIT_STD`` and ``FREEZE`` mean the
same for segmentation as for LVIS and are reused; the keys below only act when the config selects
a DisAlign segmentation head (``MODEL.SEM_SEG_HEAD.NAME``, docs/semantic_segmentation.md).
"""

__all__ = ["add_sem_seg_disalign_config"]


def add_sem_seg_disalign_config(cfg):
    """Add the segmentation keys (and, where detectron2 ships it, DeepLab's) to ``cfg`` in place."""
    _C = cfg
    # Adaptive calibration of the per-pixel logits z_c(p) of the segmentation head's predictor:
    # z'_c(p) = s(p) (beta_c z_c(p) + gamma_c) + (1 - s(p)) z_c(p), s(p) from a 1x1 conv.
    _C.MODEL.DISALIGN.SEM_SEG_CALIBRATION = True
    # Per-pixel loss: "ce" (detectron2's cross-entropy) or "grw" (each pixel weighted by
    # w_c = (1 / r_c) ** rho of its label c, r_c the class's share of the training pixels, weights
    # scaled to mean 1; normalised by the summed weights of the non-ignored pixels).
    _C.MODEL.DISALIGN.SEM_SEG_LOSS = "grw"
    # r_c from a file instead of counting the training label maps: ADE20K's objectInfo150.csv
    # (or .txt; columns Idx, Ratio, ...). Empty: n_c counted from DATASETS.TRAIN's label PNGs
    # (once, cached by the PNGs' content).
    _C.MODEL.DISALIGN.PIXEL_RATIOS_FILE = ""
    # Processes that count n_c from the label PNGs (0: one per CPU core).
    _C.MODEL.DISALIGN.PIXEL_COUNT_WORKERS = 0
    # Head / body / tail classes of the long-tail mIoU: three lists of contiguous class indices.
    # Empty: ADE20K-150's split by index (0-19, 20-74, 75-149, as the official code), for other
    # datasets the classes sorted by training pixels in the same proportions (20 / 55 / 75 of 150).
    _C.TEST.SEM_SEG_GROUPS = ()
    # DisAlignDeepLabV3PlusHead: the ASPP's image-level branch averages the whole feature map (as
    # mmsegmentation's ASPP) instead of a window of the training crop's size, so that images of
    # any size can be evaluated (ADE20K's are not crop-sized).
    _C.MODEL.SEM_SEG_HEAD.ASPP_GLOBAL_POOLING = False

    try:  # DeepLab's keys (MODEL.SEM_SEG_HEAD.ASPP_*, SOLVER.POLY_LR_*, ...) for its heads
        from detectron2.projects.deeplab import add_deeplab_config
    except ImportError:  # DisAlignDeepLabV3*Head then fails, naming MODEL.SEM_SEG_HEAD.NAME
        return cfg
    if "LOSS_TYPE" not in _C.MODEL.SEM_SEG_HEAD:
        add_deeplab_config(_C)
    return cfg
