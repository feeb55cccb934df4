"""DisAlign box predictor: detectron2's ``FastRCNNOutputLayers`` plus adaptive calibration and GRW.

Logit layout follows detectron2: (R, K + 1) scores, background LAST. With detectron2 main's sigmoid
classifier (``use_sigmoid_ce``, optionally ``use_fed_loss``; feature-detected, absent on v0.6) the
(K + 1)-th column is kept and ignored, as detectron2 does. Parameter names of the stock
predictor (``cls_score``, ``bbox_pred``) are kept so stage-one checkpoints load unchanged; the
calibration adds ``logit_scale`` (K,), ``logit_bias`` (K,) and ``confidence_layer`` Linear(D, 1).
With Seesaw's objectness branch (``MODEL.ROI_BOX_HEAD.SEESAW.OBJECTNESS``) ``cls_score`` has K + 2
outputs (K classes, then fg / bg objectness); the calibration acts on the K class logits and the
predictor's scores are the (R, K + 1) log-probabilities of softmax(classes) * p_fg and p_bg.

Longer than 450 lines: one predictor serves every classifier (softmax, sigmoid, Seesaw's
objectness, GOL's Gumbel) with the calibration, GRW and the post-hoc adjustments on each; its
losses and probabilities branch on the same few attributes, which a split would scatter.
"""

import logging

import torch
import torch.nn.functional as F
from detectron2.config import configurable
from detectron2.layers import cat
from detectron2.modeling.roi_heads.fast_rcnn import FastRCNNOutputLayers, _log_classification_stats
from torch import nn

from .calibration import (
    CosineLinear,
    NormedLinear,
    add_calibration,
    calibrate_logits,
    confidence_logit,
)
from .class_weights import ClassFrequencyMixin
from .fracal import fracal_sigmoid_probs, fracal_softmax_probs, fracal_statistics_from_datasets
from .losses import weighted_cross_entropy, weighted_sigmoid_cross_entropy
from .stage_one_losses import (
    StageOneLoss,
    gol_loss,
    gumbel_probs,
    objectness_softmax_log_probs,
    stage_one_loss_from_config,
)

__all__ = ["DisAlignFastRCNNOutputLayers"]

logger = logging.getLogger(__name__)

_CLS_LOSSES = ("ce", "grw")
_POSTHOC = ("none", "norcal", "tau_norm", "fracal")


class DisAlignFastRCNNOutputLayers(ClassFrequencyMixin, FastRCNNOutputLayers):
    """``FastRCNNOutputLayers`` with DisAlign's adaptive calibration of the class logits,
    generalized re-weighting in the classification loss, an optional cosine classifier and the
    training-free test-time alternatives (NorCal-style logit adjustment, tau-normalisation).

    With ``calibrate=False``, ``cls_loss="ce"``, ``cosine=False`` and ``posthoc="none"`` it computes
    exactly what the stock predictor computes, for the softmax classifier and (detectron2 main)
    the sigmoid one with or without the federated loss: the calibration acts on the K foreground
    logits, inference takes the stage one's probability (softmax or sigmoid), and GRW weights
    each RoI's terms by the weight of its ground-truth class.
    """

    @configurable
    def __init__(
        self,
        input_shape,
        *,
        calibrate: bool = True,
        confidence_init_std: float = 0.01,
        cls_loss: str = "ce",
        class_weights=None,
        rho: float = 0.8,
        cosine: bool = False,
        cosine_scale: float = 20.0,
        normed_linear: bool = False,
        posthoc: str = "none",
        posthoc_power: float = 1.0,
        class_counts=None,
        class_counts_fallback=None,
        stage_one_loss: str = "ce",
        stage_one_options=None,
        fracal_lambda: float = 2.0,
        fracal_grid: int = 64,
        fracal_fallback=None,
        **kwargs,
    ):
        """
        Args:
            input_shape, **kwargs: as for ``FastRCNNOutputLayers``.
            calibrate: add the calibration parameters beta (``logit_scale``), gamma
                (``logit_bias``) and the confidence layer s(x) = sigmoid(w.x + b).
            confidence_init_std: std of the normal init of the confidence layer's weight.
            cls_loss: "ce" or "grw" (weighted cross-entropy with ``class_weights``).
            class_weights: (K + 1,) GRW weights (background last) for "grw"; without them they
                are installed when training starts (:func:`~.class_weights.install_class_weights`).
            rho: the GRW exponent used when the weights are installed from class counts.
            cosine: replace ``cls_score`` by a cosine classifier with temperature ``cosine_scale``.
            normed_linear: with ``cosine``, that classifier is Seesaw's :class:`NormedLinear`
                (``cosine_scale`` fixed, with a bias) instead of :class:`CosineLinear` (learned
                temperature, no bias).
            posthoc: test-time adjustment "none", "norcal" or "tau_norm".
            posthoc_power: gamma of "norcal" / tau of "tau_norm".
            class_counts: (K,) training frequencies n_j for "norcal". Stored with the model (the
                persistent buffer ``class_counts``), so its checkpoint alone reproduces inference.
            class_counts_fallback: for "norcal" without ``class_counts``: ``(dataset names,
                source)`` whose json categories carry the training counts (LVIS val jsons do),
                read at the first inference if neither a checkpoint nor training installed them.
            stage_one_loss: "ce" (detectron2's loss) or a loss of :mod:`.stage_one_losses`
                ("eqlv2", "seesaw", "ecm", "gol"), with ``stage_one_options``; it trains while
                ``cls_loss`` is "ce" and sets the inference activation (and, for "gol", the
                activation GRW trains through and the initial classifier bias).
            fracal_lambda, fracal_grid: lambda and G of ``posthoc="fracal"`` (:mod:`.fracal`).
            fracal_fallback: (training dataset names) whose boxes give FRACAL's statistics at
                the first inference when the model (its checkpoint) has none.
        """
        fed_weights = None
        if kwargs.get("use_fed_loss"):
            # detectron2 main computes the federated loss's sampling weights here, from the
            # training json; a model built for inference must not read it. Defer them to the first
            # loss (see _fed_loss_class_mask); a checkpoint's ``fed_loss_cls_weights`` wins.
            fed_weights, K = kwargs.get("get_fed_loss_cls_weights"), kwargs["num_classes"]
            kwargs["get_fed_loss_cls_weights"] = lambda: torch.zeros(K)
        super().__init__(input_shape, **kwargs)
        self._get_fed_loss_cls_weights = fed_weights
        # Absent on detectron2 v0.6 (softmax only).
        self.sigmoid_ce = bool(getattr(self, "use_sigmoid_ce", False))
        num_classes = self.num_classes
        self.stage_one_loss = None
        if stage_one_loss == "ce" and (stage_one_options or {}).get("objectness"):
            raise ValueError(
                "MODEL.ROI_BOX_HEAD.SEESAW.OBJECTNESS needs "
                "MODEL.ROI_BOX_HEAD.STAGE_ONE_LOSS='seesaw', got 'ce'"
            )
        if stage_one_loss != "ce":
            self.stage_one_loss = StageOneLoss(
                stage_one_loss, num_classes, **(stage_one_options or {})
            )
            if self.stage_one_loss.uses_sigmoid != self.sigmoid_ce:
                raise ValueError(
                    f"MODEL.ROI_BOX_HEAD.STAGE_ONE_LOSS={stage_one_loss!r} needs "
                    f"MODEL.ROI_BOX_HEAD.USE_SIGMOID_CE={self.stage_one_loss.uses_sigmoid}"
                )
        in_features = self.cls_score.in_features
        # Seesaw's objectness branch: K class logits, then the fg / bg objectness logits.
        self.objectness = self.stage_one_loss is not None and self.stage_one_loss.objectness
        num_logits = num_classes + (2 if self.objectness else 1)
        if self.objectness and not cosine:
            self.cls_score = nn.Linear(in_features, num_logits)
            nn.init.normal_(self.cls_score.weight, std=0.01)  # detectron2's init of cls_score
            nn.init.constant_(self.cls_score.bias, 0.0)
        if normed_linear and not cosine:
            raise ValueError(
                "MODEL.ROI_BOX_HEAD.NORMED_LINEAR picks the kind of normalised classifier: it "
                "needs MODEL.ROI_BOX_HEAD.COSINE_CLASSIFIER=True"
            )
        if cosine:
            layer = NormedLinear if normed_linear else CosineLinear
            self.cls_score = layer(in_features, num_logits, scale=cosine_scale)
        if self.activation == "gumbel" and getattr(self.cls_score, "bias", None) is not None:
            # GOL starts every class at a small Gumbel probability G(init_bias) (the authors'
            # init; a stage two loads its stage one's bias over it).
            nn.init.constant_(self.cls_score.bias, self.stage_one_loss.options["init_bias"])

        self.calibrate = calibrate
        if calibrate:
            add_calibration(self, num_classes, nn.Linear(in_features, 1), confidence_init_std)
        self.cls_loss = cls_loss
        self._init_class_weights(
            cls_loss, _CLS_LOSSES, "MODEL.DISALIGN.CLS_LOSS", class_weights, num_classes, rho
        )

        if posthoc not in _POSTHOC:
            raise ValueError(f"MODEL.DISALIGN.POSTHOC must be one of {_POSTHOC}, got {posthoc!r}")
        if posthoc == "tau_norm" and cosine:
            raise ValueError(
                "MODEL.DISALIGN.POSTHOC='tau_norm' re-normalises the rows of a linear classifier; "
                "the cosine classifier (MODEL.ROI_BOX_HEAD.COSINE_CLASSIFIER) is normalised "
                "already."
            )
        if posthoc == "norcal" and self.sigmoid_ce:
            raise ValueError(
                "MODEL.DISALIGN.POSTHOC='norcal' renormalises softmax probabilities; the sigmoid "
                "classifier (MODEL.ROI_BOX_HEAD.USE_SIGMOID_CE) has independent ones."
            )
        if posthoc == "norcal" and self.activation == "gumbel":
            raise ValueError(
                "MODEL.DISALIGN.POSTHOC='norcal' renormalises softmax probabilities; the Gumbel "
                f"classifier of MODEL.ROI_BOX_HEAD.STAGE_ONE_LOSS={stage_one_loss!r} has "
                "independent ones (use 'fracal' or 'tau_norm')."
            )
        self.posthoc = posthoc
        self.posthoc_power = float(posthoc_power)
        if posthoc == "norcal":
            if class_counts is None and class_counts_fallback is None:
                raise ValueError(
                    "MODEL.DISALIGN.POSTHOC='norcal' needs the K training class counts"
                )
            # Raw counts n_j, saved in checkpoints (inference needs them); zeros = not known yet.
            self.register_buffer("class_counts", torch.zeros(num_classes))
            self.class_counts_fallback = class_counts_fallback
            if class_counts is not None:
                self._set_class_counts(class_counts)
        if posthoc == "fracal":
            # FRACAL's statistics (image frequencies f_j, fractal dimensions D_j), saved in
            # checkpoints; zeros = not known yet (computed at the first inference).
            self.register_buffer("fracal_freq", torch.zeros(num_classes))
            self.register_buffer("fracal_dims", torch.zeros(num_classes))
            self.fracal_lambda, self.fracal_grid = float(fracal_lambda), int(fracal_grid)
            self.fracal_fallback = fracal_fallback

    @classmethod
    def from_config(cls, cfg, input_shape):
        ret = super().from_config(cfg, input_shape)
        d = cfg.MODEL.DISALIGN
        ret.update(
            calibrate=d.BOX_CALIBRATION,
            confidence_init_std=d.CONFIDENCE_INIT_STD,
            cls_loss=d.CLS_LOSS,
            cosine=cfg.MODEL.ROI_BOX_HEAD.COSINE_CLASSIFIER,
            cosine_scale=cfg.MODEL.ROI_BOX_HEAD.COSINE_SCALE,
            normed_linear=cfg.MODEL.ROI_BOX_HEAD.NORMED_LINEAR,
            posthoc=d.POSTHOC,
            posthoc_power=d.POSTHOC_POWER,
            rho=d.RHO,
            # Read only if inference finds no counts in the model (see _norcal_counts).
            class_counts_fallback=(tuple(cfg.DATASETS.TEST), d.FREQUENCY_SOURCE),
            fracal_lambda=d.FRACAL_LAMBDA,
            fracal_grid=d.FRACAL_GRID,
            fracal_fallback=tuple(cfg.DATASETS.TRAIN),
        )
        ret.update(stage_one_loss_from_config(cfg))
        return ret

    @property
    def activation(self) -> str:
        """The classifier's activation: "softmax", "sigmoid" (detectron2's sigmoid classifier,
        with EQLv2's / ECM's objectness factor for those losses) or "gumbel" (GOL)."""
        if self.stage_one_loss is not None:
            return self.stage_one_loss.activation
        return "sigmoid" if self.sigmoid_ce else "softmax"

    # ---- class frequencies (see class_weights.py) -------------------------------------------
    @property
    def needs_class_frequencies(self):
        stage_one = self.stage_one_loss is not None and self.stage_one_loss.needs_class_frequencies
        return self.uses_grw or self.posthoc == "norcal" or stage_one

    def set_class_frequencies(self, counts, rho=None):
        super().set_class_frequencies(counts, rho)
        if self.posthoc == "norcal":
            self._set_class_counts(counts)
        if self.stage_one_loss is not None:
            self.stage_one_loss.set_class_frequencies(counts)

    def _set_class_counts(self, counts):
        counts = torch.as_tensor(counts, dtype=torch.float32).flatten()
        if counts.numel() != self.num_classes:
            raise ValueError(
                "MODEL.DISALIGN.POSTHOC='norcal' needs the K training class counts: "
                f"K = {self.num_classes}, got {counts.numel()}"
            )
        self.class_counts.copy_(counts.to(self.class_counts.device))

    def _norcal_counts(self):
        """(K,) relative training frequencies n_j / mean(n) for NorCal: from the model (its
        checkpoint, or installed when training started), else from the categories of the first
        test dataset's json (LVIS val jsons carry the training image/instance counts)."""
        if not bool((self.class_counts > 0).any()):
            self._set_class_counts(_counts_from_test_json(*self.class_counts_fallback or ((), "")))
        counts = self.class_counts.clamp(min=1.0)
        # Relative frequencies n_j / mean(n): dividing by them only re-balances the classes;
        # the foreground as a whole keeps its mass against the background for gamma = 1.
        return counts / counts.mean()

    def _class_logits(self, x):
        """x: (R, D) -> (R, K + 1) uncalibrated logits (tau-normalised at inference if asked);
        (R, K + 2) with Seesaw's objectness branch."""
        if self.posthoc == "tau_norm" and not self.training:
            # Rows of the K foreground classes divided by ||w_j|| ** tau, rescaled so their mean
            # factor is 1 (keeps the foreground/background balance); background (or objectness)
            # rows untouched.
            K, w = self.num_classes, self.cls_score.weight
            norms = w[:K].norm(dim=1, keepdim=True).clamp(min=1e-12).pow(self.posthoc_power)
            w = torch.cat([w[:K] * (norms.mean() / norms), w[K:]], dim=0)
            return F.linear(x, w, self.cls_score.bias)
        return self.cls_score(x)

    def forward(self, x):
        """
        Args:
            x: (R, D) or (R, C, H, W) per-RoI features.

        Returns:
            scores: (R, K + 1) calibrated logits, background last (with Seesaw's objectness
                branch: the log-probabilities of softmax(calibrated classes) * p_fg and p_bg).
            proposal_deltas: (R, K * 4) or (R, 4).
        """
        if x.dim() > 2:
            x = torch.flatten(x, start_dim=1)
        scores = self._class_logits(x)
        proposal_deltas = self.bbox_pred(x)
        K = self.num_classes
        if self.calibrate:
            fg = calibrate_logits(
                scores[:, :K],
                confidence_logit(self.confidence_layer, x),
                self.logit_scale,
                self.logit_bias,
            )
            # float32 (calibrate_logits' dtype): under autocast the background logit is half.
            scores = torch.cat([fg, scores[:, K:].float()], dim=1)
        if self.objectness:
            scores = objectness_softmax_log_probs(scores)
        return scores, proposal_deltas

    def losses(self, predictions, proposals):
        """
        Args:
            predictions: (scores (R, K + 1), proposal_deltas) from :meth:`forward`.
            proposals (list[Instances]): with ``proposal_boxes``, ``gt_boxes``, ``gt_classes``.

        Returns:
            dict with ``loss_cls`` and ``loss_box_reg``. A loss with no trainable parameter behind
            it (its prediction does not require grad, e.g. the frozen ``bbox_pred`` of stage two)
            is not computed at all.
        """
        scores, proposal_deltas = predictions
        gt_classes = (
            cat([p.gt_classes for p in proposals], dim=0)
            if len(proposals)
            else torch.empty(0, dtype=torch.long, device=scores.device)
        )
        _log_classification_stats(scores, gt_classes)

        losses = {}
        if scores.requires_grad:
            weights, normalize = self.grw_weights(), self.loss_normalizer()
            if self.stage_one_loss is not None and not self.uses_grw:
                loss = self.stage_one_loss(scores, gt_classes, normalize)
            elif self.activation == "gumbel":
                # GRW through the Gumbel activation the stage one predicts with.
                o = self.stage_one_loss.options
                loss = gol_loss(
                    scores.float(), gt_classes, o["clamp_min"], o["clamp_max"], weights, normalize
                )
            elif self.sigmoid_ce:
                mask = None
                if self.use_fed_loss and gt_classes.numel():
                    mask = self._fed_loss_class_mask(gt_classes)
                loss = weighted_sigmoid_cross_entropy(scores, gt_classes, weights, mask, normalize)
            else:
                loss = weighted_cross_entropy(scores, gt_classes, weights, normalize)
            losses["loss_cls"] = loss
        if proposal_deltas.requires_grad:
            if len(proposals):
                proposal_boxes = cat([p.proposal_boxes.tensor for p in proposals], dim=0)
                gt_boxes = cat(
                    [
                        (p.gt_boxes if p.has("gt_boxes") else p.proposal_boxes).tensor
                        for p in proposals
                    ],
                    dim=0,
                )
            else:
                proposal_boxes = gt_boxes = torch.empty((0, 4), device=proposal_deltas.device)
            losses["loss_box_reg"] = self.box_reg_loss(
                proposal_boxes, gt_boxes, proposal_deltas, gt_classes
            )
        return {k: v * self.loss_weight.get(k, 1.0) for k, v in losses.items()}

    def _fed_loss_class_mask(self, gt_classes):
        """(K,) 0/1 mask of the federated loss's classes: the labels of ``gt_classes`` (R,) plus
        negatives sampled with the stage one's ``fed_loss_cls_weights`` (detectron2's own
        ``get_fed_loss_classes``, so the same random draws as the stock loss)."""
        K = self.num_classes
        if not bool((self.fed_loss_cls_weights != 0).any()):
            # Neither a checkpoint nor an earlier iteration provided them: training starts now.
            if self._get_fed_loss_cls_weights is None:
                raise ValueError(
                    "MODEL.ROI_BOX_HEAD.USE_FED_LOSS needs get_fed_loss_cls_weights (or a "
                    "checkpoint with fed_loss_cls_weights)"
                )
            w = torch.as_tensor(self._get_fed_loss_cls_weights(), dtype=torch.float32)
            self.fed_loss_cls_weights.copy_(w.to(self.fed_loss_cls_weights.device))
        classes = self.get_fed_loss_classes(
            gt_classes,
            num_fed_loss_classes=self.fed_loss_num_classes,
            num_classes=K,
            weight=self.fed_loss_cls_weights,
        )
        mask = classes.new_zeros(K + 1)
        mask[classes] = 1
        return mask[:K]

    def predict_probs(self, predictions, proposals):
        """The stage one's probabilities: softmax over K + 1 (NorCal- or FRACAL-adjusted if
        asked), or the sigmoid of each logit for the sigmoid classifier (with EQLv2's / ECM's
        objectness factor for those losses, FRACAL-adjusted if asked), or GOL's Gumbel
        G(z) = exp(-exp(-z)) of each logit (FRACAL-adjusted if asked: G(z) G(z + a + b)).
        List of (Ri, K + 1) tensors.
        """
        scores, _ = predictions
        num_inst_per_image = [len(p) for p in proposals]
        if self.activation != "softmax":
            # Independent per-class probabilities: detectron2's sigmoid, EQLv2's / ECM's sigmoid
            # with their objectness factor, or GOL's Gumbel.
            s1 = self.stage_one_loss
            probs = s1.probs(scores) if s1 is not None else scores.sigmoid()
            if self.posthoc == "fracal":
                # FRACAL's product form with the classifier's own activation (as the FRACAL
                # authors' head applies the loss's activation to both factors).
                act = gumbel_probs if self.activation == "gumbel" else torch.sigmoid
                freq, dims = self._fracal_statistics()
                probs = fracal_sigmoid_probs(
                    probs, scores, freq, dims, self.fracal_lambda, activation=act
                )
            return probs.split(num_inst_per_image, dim=0)
        if self.posthoc == "fracal":
            freq, dims = self._fracal_statistics()
            probs = fracal_softmax_probs(scores, freq, dims, self.fracal_lambda)
            return probs.split(num_inst_per_image, dim=0)
        probs = F.softmax(scores, dim=-1)
        if self.posthoc == "norcal":
            # p'_j ∝ p_j / n_j ** gamma for the foreground (n_j relative to its mean), background
            # untouched, renormalised.
            fg = probs[:, :-1] / self._norcal_counts().pow(self.posthoc_power)
            probs = torch.cat([fg, probs[:, -1:]], dim=1)
            probs = probs / probs.sum(dim=1, keepdim=True)
        return probs.split(num_inst_per_image, dim=0)

    def _fracal_statistics(self):
        """FRACAL's (K,) f and D: from the model (its checkpoint), else computed once from the
        boxes of the training datasets and kept in the buffers."""
        if not bool((self.fracal_freq > 0).any()):
            freq, dims = fracal_statistics_from_datasets(
                self.fracal_fallback or (), self.num_classes, self.fracal_grid
            )
            self.fracal_freq.copy_(freq.to(self.fracal_freq.device))
            self.fracal_dims.copy_(dims.to(self.fracal_dims.device))
        return self.fracal_freq, self.fracal_dims


def _counts_from_test_json(dataset_names, source):
    """(K,) training counts ``source`` from the categories of the first of ``dataset_names``."""
    from detectron2.data import MetadataCatalog

    from ..data import lvis_category_info

    hint = (
        "MODEL.DISALIGN.POSTHOC='norcal' needs the training class counts: the checkpoint has none "
        "(roi_heads.box_predictor.class_counts; a model trained with POSTHOC 'norcal' stores "
        "them) and "
    )
    if not dataset_names:
        raise ValueError(hint + "DATASETS.TEST is empty, so no test json can supply them.")
    name = dataset_names[0]
    json_file = MetadataCatalog.get(name).get("json_file")
    if not json_file:
        raise ValueError(hint + f"DATASETS.TEST[0]='{name}' has no LVIS-format json_file.")
    info = lvis_category_info(json_file)
    if info.counted_from_annotations:
        raise ValueError(
            hint + f"the categories of {json_file} (DATASETS.TEST[0]='{name}') carry no "
            "image_count/instance_count (LVIS val jsons carry the training counts)."
        )
    logger.info("NorCal: training class counts (%s) from the categories of %s", source, json_file)
    return getattr(info, source)
