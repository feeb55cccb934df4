"""Long-tail stage-one classification losses for the box predictor: EQLv2, Seesaw, ECM and GOL.

Longer than 450 lines: the four losses (and Seesaw's objectness variant) share the layout
helpers, the option checks, the config keys and the one module (:class:`StageOneLoss`) that
dispatches between them; split, each piece would import the others.

Each loss is a pure function of the (R, K + 1) class logits (detectron2's layout, background LAST)
and the (R,) labels in [0, K]; the little state two of them keep (EQLv2's accumulated gradients,
Seesaw's cumulative class counts) lives in the buffers of :class:`StageOneLoss`, saved with the
model and all-reduced so that every process holds the same values.

* EQLv2 (Tan et al., CVPR 2021, "Equalization Loss v2"): K + 1 sigmoids (the last one is the
  background/objectness sigmoid). With g_j the ratio of the accumulated positive to negative
  gradient magnitudes of class j,

      q_j = 1 / (1 + exp(-gamma (g_j - mu))),   r_j = 1 + alpha (1 - q_j),

  each RoI's binary term of class j is weighted r_j if j is its label, q_j otherwise (weight 1 in
  the background column), summed and divided by R. The accumulated gradients are those of the
  weighted loss, |sigmoid(z) - y| times the weight, summed over RoIs. Before any accumulation
  every weight is 1 (nothing is known yet), as in the authors' implementation.
* Seesaw (Wang et al., CVPR 2021, "Seesaw Loss"): softmax cross-entropy where, for a RoI of class
  i, every other class j's exp(z_j) is scaled by S_ij = M_ij C_ij,

      M_ij = (N_j / N_i) ** p  if N_j < N_i else 1     (mitigation, N the cumulative counts),
      C_ij = (s_j / s_i) ** q  if s_j > s_i else 1     (compensation, s = softmax(z) detached,
                                                         s_i clamped to >= eps),

  i.e. z_j + log S_ij. By default the factors act among the K foreground classes of detectron2's
  K + 1 softmax: the background logit and background RoIs are plain cross-entropy.
  With ``objectness`` (the mmdetection model of the paper): K + 2 outputs, K class logits c and
  two objectness logits o = (o_fg, o_bg); the Seesaw term acts on softmax(c) for the foreground
  RoIs only, a 2-way cross-entropy on softmax(o) (target fg / bg) on every RoI, both summed and
  divided by R; the model predicts p_j = softmax(c)_j softmax(o)_fg and p_bg = softmax(o)_bg.
  The predictor hands these K + 1 probabilities on as log-probabilities
  (:func:`objectness_softmax_log_probs`), the logits of a K + 1 softmax, so that everything
  downstream (inference, DisAlign's GRW, NorCal, FRACAL) sees detectron2's layout; the loss
  (:func:`seesaw_objectness_loss`) recovers c up to a per-RoI constant (to which the Seesaw term
  is invariant) and log softmax(o) from them.
* ECM (Cho and Kraehenbuehl, ECCV 2022, "Long-tail detection with effective class-margins"):
  K + 1 sigmoids with class margins from the training frequencies n_j (the background's
  n_{K} = fg_bg_ratio * sum_j n_j, the empirical foreground/background RoI ratio), n-_j = N - n_j
  (N the sum over all K + 1):

      m+_j = log((n_j^(1/4) + n-_j^(1/4)) / n-_j^(1/4)),
      m-_j = log((n_j^(1/4) + n-_j^(1/4)) / n_j^(1/4)),
      p+_ij = e^(z_ij + m+_j) / (e^(z_ij + m+_j) + e^(-z_ij + m-_j)),
      L = sum_ij w_j BCE(p+_ij, y_ij) / R,   w_j = a_j log((1 + a_j) / a_j),  a_j = n-_j / n_j.

* GOL (Alexandridis et al., ECCV 2022, "Long-tailed Instance Segmentation using Gumbel Optimized
  Loss"): K binary terms with the Gumbel activation G(z) = exp(-exp(-z)) instead of the sigmoid,

      L = -sum_{i, j<K} [y_ij log G(z_ij) + (1 - y_ij) log(1 - G(z_ij))] / R,
      log G(z) = -exp(-z),   log(1 - G(z)) = log(-expm1(-exp(-z)))  (~ -z - exp(-z) / 2 for
                                                                        large z, where exp(-z)
                                                                        underflows),

  z clamped to [clamp_min, clamp_max] first (the authors' GOL code: [-4, 10]; the y = 1 term
  exp(-z) grows exponentially below). The (K + 1)-th column is ignored, as in detectron2's sigmoid
  classifier and the authors' GOL head (K outputs): a background RoI has K negative targets.
  Predictions: p_j = G(z_j) for every column (the last one is meaningless, as for the sigmoid).

EQLv2 and ECM predict with the objectness activation of their papers' code:
p_j = sigmoid(z_j) (1 - sigmoid(z_bg)) for the K classes, sigmoid(z_bg) for the background.

"""

import logging
import math

import torch
import torch.distributed as dist
import torch.nn.functional as F
from detectron2.config import CfgNode as CN
from torch import nn

from .losses import _empty  # 0 connected to the logits, after taking part in the all-reduce

__all__ = [
    "GUMBEL_STAGE_ONE_LOSSES",
    "SIGMOID_STAGE_ONE_LOSSES",
    "STAGE_ONE_LOSSES",
    "StageOneLoss",
    "add_stage_one_loss_config",
    "all_reduce_sum",
    "ecm_loss",
    "ecm_margins",
    "gol_loss",
    "gumbel_probs",
    "eqlv2_gradient_statistics",
    "eqlv2_loss",
    "eqlv2_weights",
    "objectness_sigmoid_probs",
    "objectness_softmax_log_probs",
    "seesaw_loss",
    "seesaw_objectness_loss",
    "stage_one_loss_from_config",
]

logger = logging.getLogger(__name__)

STAGE_ONE_LOSSES = ("ce", "eqlv2", "seesaw", "ecm", "gol")
# Losses that need the sigmoid classifier (detectron2 main's MODEL.ROI_BOX_HEAD.USE_SIGMOID_CE).
SIGMOID_STAGE_ONE_LOSSES = ("eqlv2", "ecm")
# Losses with the Gumbel activation: their own loss and probabilities, on any detectron2 (they do
# not use detectron2's sigmoid classifier, so USE_SIGMOID_CE stays False).
GUMBEL_STAGE_ONE_LOSSES = ("gol",)
_KEY = "MODEL.ROI_BOX_HEAD.STAGE_ONE_LOSS"


def add_stage_one_loss_config(cfg):
    """Add the stage-one loss keys (and FRACAL's) to ``cfg`` in place; called by
    ``add_disalign_config``. Defaults change nothing."""
    h = cfg.MODEL.ROI_BOX_HEAD
    # Classification loss of stage one: "ce" (detectron2's: softmax cross-entropy, or the sigmoid
    # / federated loss of USE_SIGMOID_CE / USE_FED_LOSS), "eqlv2", "seesaw", "ecm" or "gol" (see
    # disalign_det/modeling/stage_one_losses.py). Used while MODEL.DISALIGN.CLS_LOSS is "ce";
    # a DisAlign stage two ("grw") keeps the activation it implies (sigmoid for eqlv2 / ecm,
    # Gumbel for gol).
    h.STAGE_ONE_LOSS = "ce"
    h.EQLV2 = CN()
    h.EQLV2.GAMMA = 12.0  # gamma, slope of the mapping q_j = sigmoid(gamma (g_j - mu))
    h.EQLV2.MU = 0.8  # mu, its centre
    h.EQLV2.ALPHA = 4.0  # alpha, positive weight r_j = 1 + alpha (1 - q_j)
    h.SEESAW = CN()
    h.SEESAW.P = 0.8  # p, exponent of the mitigation factor M_ij = (N_j / N_i) ** p
    h.SEESAW.Q = 2.0  # q, exponent of the compensation factor C_ij = (s_j / s_i) ** q
    h.SEESAW.EPS = 1e-2  # lower clamp of s_i in C_ij
    # mmdetection's objectness branch: K + 2 outputs (K classes + fg/bg), the Seesaw term among
    # the K classes on the foreground RoIs, a fg/bg cross-entropy on every RoI; scores
    # softmax(classes) * p_fg. False: detectron2's K + 1 softmax (background = class K + 1).
    h.SEESAW.OBJECTNESS = False
    h.ECM = CN()
    # n_bg / sum_j n_j: the background's frequency in the margins (the authors' Mask R-CNN value).
    h.ECM.FG_BG_RATIO = 6.3313
    h.GOL = CN()
    # z is clamped to [CLAMP_MIN, CLAMP_MAX] in the loss (the authors' GOL code; no gradient
    # outside): -log G(z) = exp(-z) grows exponentially for negative z.
    h.GOL.CLAMP_MIN = -4.0
    h.GOL.CLAMP_MAX = 10.0
    # Initial bias of the classifier (cls_score): G(-2) = exp(-e^2) ~ 6e-4, a small initial
    # probability of every class (the authors' init).
    h.GOL.INIT_BIAS = -2.0
    d = cfg.MODEL.DISALIGN
    # lambda of FRACAL (POSTHOC "fracal"): foreground probabilities divided by D_j ** lambda, D_j
    # the box-counting fractal dimension of class j's box centres.
    d.FRACAL_LAMBDA = 2.0
    # G: box counting on the g x g grids, g = 1 .. G.
    d.FRACAL_GRID = 64
    return cfg


def stage_one_loss_from_config(cfg):
    """``DisAlignFastRCNNOutputLayers`` keyword arguments of the stage-one loss keys. For
    "eqlv2" / "ecm" also ``use_sigmoid_ce=True``; raises ValueError naming the key on a
    detectron2 without the sigmoid classifier (v0.6)."""
    from ..compat.features import has_federated_loss

    h = cfg.MODEL.ROI_BOX_HEAD
    kind = h.STAGE_ONE_LOSS
    ret = dict(
        stage_one_loss=kind,
        stage_one_options=dict(
            gamma=h.EQLV2.GAMMA,
            mu=h.EQLV2.MU,
            alpha=h.EQLV2.ALPHA,
            p=h.SEESAW.P,
            q=h.SEESAW.Q,
            eps=h.SEESAW.EPS,
            objectness=h.SEESAW.OBJECTNESS,
            fg_bg_ratio=h.ECM.FG_BG_RATIO,
            clamp_min=h.GOL.CLAMP_MIN,
            clamp_max=h.GOL.CLAMP_MAX,
            init_bias=h.GOL.INIT_BIAS,
        ),
    )
    if kind in SIGMOID_STAGE_ONE_LOSSES:
        if not has_federated_loss():
            raise ValueError(
                f"{_KEY}={kind!r} needs detectron2's sigmoid classifier "
                "(MODEL.ROI_BOX_HEAD.USE_SIGMOID_CE), which this detectron2 (v0.6) does not have: "
                "install detectron2 from its main branch (scripts/install.sh)"
            )
        ret["use_sigmoid_ce"] = True
    return ret


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """The sum of ``t`` over all processes (a new tensor; ``t`` itself with one process)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return t
    t = t.clone()
    dist.all_reduce(t)
    return t


def _one_hot(logits, labels):
    """(R, K + 1) float one-hot targets of ``labels`` (R,)."""
    target = torch.zeros_like(logits)
    target[torch.arange(len(labels), device=labels.device), labels] = 1
    return target


def _mean_over_rois(total, num_rois, logits, normalize):
    # The per-RoI mean, over the global batch when ``normalize`` (see losses.py) is given.
    n = logits.new_tensor(float(num_rois))
    return total / (n if normalize is None else normalize(n))


def objectness_sigmoid_probs(logits: torch.Tensor) -> torch.Tensor:
    """(R, K + 1) logits -> (R, K + 1) probabilities sigmoid(z_j) (1 - sigmoid(z_bg)) for the K
    classes and sigmoid(z_bg) for the background (EQLv2's and ECM's activation)."""
    p = logits.sigmoid()
    bg = p[:, -1:]
    return torch.cat([p[:, :-1] * (1 - bg), bg], dim=1)


# ---- EQLv2 -----------------------------------------------------------------------------------
def eqlv2_weights(pos_grad, neg_grad, gamma: float, mu: float, alpha: float):
    """EQLv2's (K,) positive weights r_j and negative weights q_j from the (K,) accumulated
    positive / negative gradient magnitudes (g_j = pos_j / (neg_j + 1e-10))."""
    g = pos_grad / (neg_grad + 1e-10)
    q = torch.sigmoid(gamma * (g - mu))
    return 1 + alpha * (1 - q), q


def _eqlv2_element_weights(target, pos_w, neg_w):
    one = pos_w.new_ones(1)
    r = torch.cat([pos_w, one]).to(target.dtype)
    q = torch.cat([neg_w, one]).to(target.dtype)
    return target * r + (1 - target) * q


def eqlv2_loss(logits, labels, pos_w, neg_w, normalize=None):
    """EQLv2 loss.

    Args:
        logits: (R, K + 1) logits, the last the background sigmoid's.
        labels: (R,) int64 in [0, K].
        pos_w, neg_w: (K,) r_j and q_j (:func:`eqlv2_weights`); the background column weighs 1.
        normalize: as in :mod:`.losses` (None: divide by the local R).

    Returns:
        Scalar ``sum_ij w_ij BCE(z_ij, y_ij) / R``; 0 connected to ``logits`` when R == 0.
    """
    if labels.numel() == 0:
        return _empty(logits, normalize)
    target = _one_hot(logits, labels)
    w = _eqlv2_element_weights(target, pos_w, neg_w)
    bce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    return _mean_over_rois((bce * w).sum(), len(labels), logits, normalize)


def eqlv2_gradient_statistics(logits, labels, pos_w, neg_w):
    """(K,) positive and negative gradient magnitudes of one batch of the weighted loss:
    sum_i w_ij |sigmoid(z_ij) - y_ij| over the RoIs whose label is (not) j."""
    with torch.no_grad():
        target = _one_hot(logits, labels)
        w = _eqlv2_element_weights(target, pos_w, neg_w)
        grad = (logits.sigmoid() - target).abs() * w
        pos = (grad * target).sum(dim=0)[:-1]
        neg = (grad * (1 - target)).sum(dim=0)[:-1]
    return pos, neg


# ---- Seesaw ----------------------------------------------------------------------------------
def seesaw_loss(logits, labels, counts, p: float, q: float, eps: float = 1e-2, normalize=None):
    """Seesaw loss on the (K + 1)-way softmax.

    Args:
        logits: (R, K + 1) logits, background last.
        labels: (R,) int64 in [0, K].
        counts: (K,) cumulative numbers of training RoIs N_j of each class (clamped to >= 1).
        p, q: exponents of the mitigation and compensation factors (0 turns one off).
        eps: lower clamp of the RoI's own-class probability in the compensation factor.
        normalize: as in :mod:`.losses` (None: the local mean).

    Returns:
        Scalar mean over RoIs of CE(z + log S), log S_ij = log M_ij + log C_ij for a foreground
        RoI of class i and a foreground class j != i, 0 elsewhere.
    """
    if labels.numel() == 0:
        return _empty(logits, normalize)
    num_classes = logits.shape[1] - 1
    fg = labels < num_classes
    log_s = torch.zeros_like(logits)
    if fg.any() and (p > 0 or q > 0):
        s = F.softmax(logits[fg].detach(), dim=1)[:, :num_classes] if q > 0 else None
        log_s[fg, :num_classes] = _seesaw_log_factors(s, labels[fg], counts, p, q, eps, logits)
    adjusted = logits + log_s
    if normalize is None:
        return F.cross_entropy(adjusted, labels, reduction="mean")
    total = F.cross_entropy(adjusted, labels, reduction="sum")
    return _mean_over_rois(total, len(labels), logits, normalize)


def _seesaw_log_factors(s, cls, counts, p, q, eps, like):
    """(Rfg, K) log S_ij = log M_ij + log C_ij of foreground RoIs of classes ``cls`` (Rfg,), 0 on
    each RoI's own class. ``s``: (Rfg, K) detached class probabilities (only their ratios count;
    None when q == 0); ``counts``: (K,) N_j; ``like``: a tensor giving dtype and device."""
    log_s = like.new_zeros(len(cls), len(counts))
    if p > 0:
        n = counts.to(like.dtype).clamp(min=1)
        # log (N_j / N_i) ** p where N_j < N_i, else 0.
        log_s += (p * (n[None, :].log() - n[cls][:, None].log())).clamp(max=0)
    if q > 0:
        own = s.gather(1, cls[:, None]).clamp(min=eps)
        # log (s_j / s_i) ** q where s_j > s_i, else 0.
        log_s += (q * (s.clamp(min=1e-38).log() - own.log())).clamp(min=0)
    return log_s.scatter_(1, cls[:, None], 0.0)  # no factor on the RoI's own class


def objectness_softmax_log_probs(logits):
    """(R, K + 2) logits of the Seesaw objectness model (K class logits c, then o_fg, o_bg) ->
    (R, K + 1) log-probabilities, background last:
    log p_j = log softmax(c)_j + log softmax(o)_fg, log p_bg = log softmax(o)_bg."""
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # fp32 under autocast
    log_obj = F.log_softmax(logits[:, -2:], dim=1)
    log_cls = F.log_softmax(logits[:, :-2], dim=1)
    return torch.cat([log_cls + log_obj[:, :1], log_obj[:, 1:]], dim=1)


def seesaw_objectness_loss(
    log_probs, labels, counts, p: float, q: float, eps: float = 1e-2, normalize=None
):
    """Seesaw loss of the objectness model (mmdetection's, K + 2 outputs).

    Args:
        log_probs: (R, K + 1) :func:`objectness_softmax_log_probs` of the (R, K + 2) logits.
        labels: (R,) int64 in [0, K] (K = background).
        counts, p, q, eps, normalize: as for :func:`seesaw_loss`.

    Returns:
        Scalar (sum over the foreground RoIs of CE_K(c + log S, y) + sum over all RoIs of
        CE_2(o, fg / bg)) / R. log_probs[:, :K] = c - (a per-RoI constant), which CE_K and S
        ignore; log softmax(o) = (logsumexp_j log p_j, log p_bg).
    """
    if labels.numel() == 0:
        return _empty(log_probs, normalize)
    num_classes = log_probs.shape[1] - 1
    fg = labels < num_classes
    cls_logits = log_probs[:, :num_classes]
    total = log_probs.new_zeros(())
    if fg.any():
        c, y = cls_logits[fg], labels[fg]
        if p > 0 or q > 0:
            s = F.softmax(c.detach(), dim=1) if q > 0 else None
            c = c + _seesaw_log_factors(s, y, counts, p, q, eps, c)
        total = total + F.cross_entropy(c, y, reduction="sum")
    log_obj = torch.stack([torch.logsumexp(cls_logits, dim=1), log_probs[:, -1]], dim=1)
    # nll of log softmax(o): the 2-way cross-entropy, target 0 = foreground, 1 = background.
    total = total + F.nll_loss(log_obj, (~fg).long(), reduction="sum")
    return _mean_over_rois(total, len(labels), log_probs, normalize)


# ---- ECM -------------------------------------------------------------------------------------
def ecm_margins(counts, fg_bg_ratio: float):
    """ECM's (K + 1,) margins m+ and m- and class weights w from (K,) training frequencies n_j
    (clamped to >= 1); the background's frequency is ``fg_bg_ratio * sum_j n_j``."""
    n = torch.as_tensor(counts, dtype=torch.float64).flatten().clamp(min=1)
    n = torch.cat([n, n.sum()[None] * fg_bg_ratio])
    n_neg = n.sum() - n
    a4, b4 = n.pow(0.25), n_neg.pow(0.25)
    m_pos = ((a4 + b4) / b4).log()
    m_neg = ((a4 + b4) / a4).log()
    a = n_neg / n
    w = a * ((1 + a) / a).log()
    return m_pos.float(), m_neg.float(), w.float()


def ecm_loss(logits, labels, m_pos, m_neg, class_weight, normalize=None):
    """ECM loss.

    Args:
        logits: (R, K + 1) logits, the last the background sigmoid's.
        labels: (R,) int64 in [0, K].
        m_pos, m_neg, class_weight: (K + 1,) from :func:`ecm_margins`.
        normalize: as in :mod:`.losses` (None: divide by the local R).

    Returns:
        Scalar ``sum_ij w_j BCE(p+_ij, y_ij) / R`` where p+_ij is the softmax of the two margin
        logits (z + m+, -z + m-), i.e. sigmoid(2 z + m+ - m-).
    """
    if labels.numel() == 0:
        return _empty(logits, normalize)
    target = _one_hot(logits, labels)
    m_pos, m_neg, w = (t.to(logits) for t in (m_pos, m_neg, class_weight))
    margin_logits = 2 * logits + (m_pos - m_neg)[None, :]
    bce = F.binary_cross_entropy_with_logits(margin_logits, target, reduction="none")
    return _mean_over_rois((bce * w[None, :]).sum(), len(labels), logits, normalize)


# ---- GOL ---------------------------------------------------------------------------------------
# Above this z, exp(-z) < 2e-9: log(1 - G(z)) = log(-expm1(-exp(-z))) is replaced by its expansion
# -z - exp(-z) / 2 (error ~ exp(-2z) / 24), which stays finite where exp(-z) underflows to 0.
_GUMBEL_LARGE_Z = 20.0


def gumbel_probs(logits: torch.Tensor) -> torch.Tensor:
    """(R, K + 1) logits -> (R, K + 1) Gumbel probabilities G(z) = exp(-exp(-z)) (GOL's
    activation; in [0, 1] for every finite z: exp(-z) = inf gives 0)."""
    return torch.exp(-torch.exp(-logits))


def _gumbel_log_one_minus(z):
    # log(1 - G(z)), stable for large z (see _GUMBEL_LARGE_Z). Both branches are computed on
    # finite inputs so that the gradient of the branch not taken is 0, never NaN. Below z = -50,
    # G(z) = exp(-e^50) is 0 even in float64: log(1 - G) is exactly 0 with a 0 gradient there,
    # and clamping first keeps exp(-z) finite (its inf would give 0 * inf = NaN gradients).
    large = z > _GUMBEL_LARGE_Z
    u = torch.exp(-torch.where(large, torch.zeros_like(z), z.clamp(min=-50.0)))
    exact = torch.log(-torch.expm1(-u))
    zl = torch.where(large, z, torch.full_like(z, _GUMBEL_LARGE_Z))
    expansion = -zl - 0.5 * torch.exp(-zl)
    return torch.where(large, expansion, exact)


def gol_loss(
    logits, labels, clamp_min: float = -4.0, clamp_max: float = 10.0, weights=None, normalize=None
):
    """GOL: binary cross-entropy of the Gumbel activation on the K foreground columns.

    Args:
        logits: (R, K + 1) logits; the (K + 1)-th column is ignored (a background RoI has K
            negative targets).
        labels: (R,) int64 in [0, K].
        clamp_min, clamp_max: z is clamped to this range first (no gradient outside it).
        weights: (K + 1,) class weights (DisAlign's GRW, background last) weighting each RoI's
            terms by its label's weight, or None.
        normalize: as in :mod:`.losses` (None: the local mean).

    Returns:
        Scalar ``sum_i w[y_i] sum_{j<K} [y_ij exp(-z_ij) - (1 - y_ij) log(1 - G(z_ij))] /
        sum_i w[y_i]`` (divided by R without weights); 0 connected to ``logits`` when R == 0.
    """
    if labels.numel() == 0:
        return _empty(logits, normalize)
    num_classes = logits.shape[1] - 1
    target = _one_hot(logits, labels)[:, :num_classes]
    z = logits[:, :num_classes].clamp(min=clamp_min, max=clamp_max)
    # -log G(z) = exp(-z) for the positives, -log(1 - G(z)) for the negatives.
    pos = target > 0
    if -50.0 <= clamp_min and clamp_max <= _GUMBEL_LARGE_Z:
        # Within these clamps exp(-z) is finite and log(-expm1(-exp(-z))) exact: one exp for
        # both terms (the default [-4, 10]; the loss is a sizeable part of a GPU iteration).
        u = torch.exp(-z)
        per_term = torch.where(pos, u, -torch.log(-torch.expm1(-u)))
    else:
        # exp(-z) only where it is used (elsewhere it may overflow, and inf * 0 is NaN in the
        # value and the gradient).
        per_term = torch.where(
            pos, torch.exp(-torch.where(pos, z, torch.zeros_like(z))), -_gumbel_log_one_minus(z)
        )
    if weights is None:
        return _mean_over_rois(per_term.sum(), len(labels), logits, normalize)
    roi_weights = weights.to(dtype=logits.dtype, device=logits.device)[labels]
    local = roi_weights.sum()
    total = (per_term * roi_weights[:, None]).sum()
    return total / (local if normalize is None else normalize(local))


# ---- the module holding the state --------------------------------------------------------------
class StageOneLoss(nn.Module):
    """The stage-one loss of the box predictor and its state.

    Buffers (persistent: saved in checkpoints, so a resumed run continues the same statistics;
    updated with the all-reduced sums of every process, so identical in every process):

    * "eqlv2": ``pos_grad`` (K,), ``neg_grad`` (K,) float64, the accumulated gradient magnitudes.
    * "seesaw": ``cum_samples`` (K + 1,) float64, the cumulative numbers of RoIs per label.
    * "ecm": ``sample_counts`` (K,), the training frequencies n_j behind the margins; installed
      when training starts (like the GRW weights), zeros until then.
    * "gol": none (its options: ``clamp_min``, ``clamp_max``, and ``init_bias``, which the box
      predictor gives its classifier's bias at construction).
    """

    def __init__(self, kind: str, num_classes: int, **options):
        super().__init__()
        if kind not in STAGE_ONE_LOSSES or kind == "ce":
            raise ValueError(f"{_KEY} must be one of {STAGE_ONE_LOSSES}, got {kind!r}")
        self.kind = kind
        self.num_classes = num_classes
        o = dict(
            gamma=12.0,
            mu=0.8,
            alpha=4.0,
            p=0.8,
            q=2.0,
            eps=1e-2,
            objectness=False,
            fg_bg_ratio=6.3313,
        )
        o.update(clamp_min=-4.0, clamp_max=10.0, init_bias=-2.0)  # GOL's
        unknown = set(options) - set(o)
        if unknown:
            raise ValueError(f"unknown {_KEY} options {sorted(unknown)}")
        o.update(options)
        signed = ("clamp_min", "clamp_max", "init_bias")  # may be negative
        for name, value in o.items():
            ok = isinstance(value, (int, float)) and math.isfinite(value)
            if not ok or (value < 0 and name not in signed):
                bound = "" if name in signed else " >= 0"
                raise ValueError(
                    f"{_KEY} option {name} must be a finite number{bound}, got {value}"
                )
        if kind == "gol" and not o["clamp_min"] < o["clamp_max"]:
            raise ValueError(
                f"{_KEY}='gol' needs MODEL.ROI_BOX_HEAD.GOL.CLAMP_MIN < CLAMP_MAX, got "
                f"{o['clamp_min']} and {o['clamp_max']}"
            )
        self.options = o
        # Seesaw's objectness branch (MODEL.ROI_BOX_HEAD.SEESAW.OBJECTNESS): K + 2 outputs.
        self.objectness = bool(o["objectness"])
        if self.objectness and kind != "seesaw":
            raise ValueError(
                f"MODEL.ROI_BOX_HEAD.SEESAW.OBJECTNESS needs {_KEY}='seesaw', got {kind!r}"
            )
        if kind == "eqlv2":
            self.register_buffer("pos_grad", torch.zeros(num_classes, dtype=torch.float64))
            self.register_buffer("neg_grad", torch.zeros(num_classes, dtype=torch.float64))
        elif kind == "seesaw":
            self.register_buffer("cum_samples", torch.zeros(num_classes + 1, dtype=torch.float64))
        elif kind == "ecm":
            self.register_buffer("sample_counts", torch.zeros(num_classes))

    @property
    def num_logits(self) -> int:
        """Outputs of the classifier: K + 2 with Seesaw's objectness branch, else K + 1."""
        return self.num_classes + (2 if self.objectness else 1)

    @property
    def uses_sigmoid(self) -> bool:
        """Whether it needs detectron2's sigmoid classifier (``use_sigmoid_ce``)."""
        return self.kind in SIGMOID_STAGE_ONE_LOSSES

    @property
    def activation(self) -> str:
        """ "softmax", "sigmoid" (with the objectness factor) or "gumbel": what :meth:`probs`
        computes, and what a DisAlign stage two trains its calibration through."""
        if self.kind in SIGMOID_STAGE_ONE_LOSSES:
            return "sigmoid"
        return "gumbel" if self.kind in GUMBEL_STAGE_ONE_LOSSES else "softmax"

    @property
    def needs_class_frequencies(self) -> bool:
        return self.kind == "ecm"

    def set_class_frequencies(self, counts):
        """Install ECM's (K,) training frequencies n_j (a no-op for the other losses)."""
        if self.kind != "ecm":
            return
        counts = torch.as_tensor(counts, dtype=torch.float32).flatten()
        if counts.numel() != self.num_classes:
            raise ValueError(
                f"{_KEY}='ecm' needs K = {self.num_classes} class frequencies, got {counts.numel()}"
            )
        self.sample_counts.copy_(counts.to(self.sample_counts.device))

    def eqlv2_weights(self):
        """(K,) r_j, q_j of the current state; all ones before anything was accumulated."""
        if not bool((self.neg_grad > 0).any()):
            ones = torch.ones(self.num_classes, device=self.neg_grad.device)
            return ones, ones
        o = self.options
        pos_w, neg_w = eqlv2_weights(self.pos_grad, self.neg_grad, o["gamma"], o["mu"], o["alpha"])
        return pos_w.float(), neg_w.float()

    def forward(self, logits, labels, normalize=None):
        """(R, K + 1) logits (the log-probabilities of :func:`objectness_softmax_log_probs` for
        Seesaw's objectness model), (R,) labels -> scalar loss; in training, updates the state."""
        # float32 maths under autocast, like the losses of losses.py (a sum over R x (K + 1)
        # sigmoid terms overflows float16).
        logits = logits.float()
        o = self.options
        if self.kind == "eqlv2":
            pos_w, neg_w = self.eqlv2_weights()
            loss = eqlv2_loss(logits, labels, pos_w, neg_w, normalize)
            if self.training:
                pos, neg = eqlv2_gradient_statistics(logits, labels, pos_w, neg_w)
                both = all_reduce_sum(torch.stack([pos, neg]).to(self.pos_grad))
                self.pos_grad += both[0]
                self.neg_grad += both[1]
            return loss
        if self.kind == "seesaw":
            if self.training:
                batch = torch.bincount(labels, minlength=self.num_classes + 1)
                self.cum_samples += all_reduce_sum(batch.to(self.cum_samples))
            counts = self.cum_samples[: self.num_classes]
            loss = seesaw_objectness_loss if self.objectness else seesaw_loss
            return loss(logits, labels, counts, o["p"], o["q"], o["eps"], normalize)
        if self.kind == "gol":
            return gol_loss(logits, labels, o["clamp_min"], o["clamp_max"], None, normalize)
        if not bool((self.sample_counts > 0).any()):
            raise RuntimeError(
                f"{_KEY}='ecm' but its class frequencies were never installed: they are read "
                "from the training data when training starts (Trainer does it; otherwise call "
                "disalign_det.modeling.set_class_frequencies(model, counts))."
            )
        m_pos, m_neg, w = ecm_margins(self.sample_counts, o["fg_bg_ratio"])
        return ecm_loss(logits, labels, m_pos, m_neg, w, normalize)

    def probs(self, logits):
        """(R, K + 1) logits -> (R, K + 1) probabilities of this loss's classifier."""
        if self.activation == "sigmoid":
            return objectness_sigmoid_probs(logits)
        if self.activation == "gumbel":
            return gumbel_probs(logits)
        return F.softmax(logits, dim=-1)

    def extra_repr(self):
        return f"{self.kind}, K={self.num_classes}, {self.options}"
