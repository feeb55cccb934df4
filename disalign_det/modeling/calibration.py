"""Adaptive calibration (Sec. 3.2 of the paper) as a pure function plus a tiny module."""

import torch
from torch import nn

__all__ = [
    "add_calibration",
    "calibrate_logits",
    "confidence_logit",
    "CosineLinear",
    "NormedLinear",
]


def calibrate_logits(logits, confidence_logit, logit_scale, logit_bias):
    """Adaptive calibration z' = s (beta z + gamma) + (1 - s) z, with s = sigmoid(confidence_logit).

    Written as z + s ((beta - 1) z + gamma), which is the same function and exactly z when beta = 1
    and gamma = 0 (whatever s is), so stage two starts from the stage-one predictions bit for bit.

    Args:
        logits: (R, C, ...) logits z of the classes being calibrated (foreground only; the
            caller keeps the background logit out).
        confidence_logit: (R, 1, ...) w.x + b, broadcast over the classes.
        logit_scale: beta, broadcastable to ``logits`` (e.g. (C,) or (R, 1, 1)).
        logit_bias: gamma, same shape as ``logit_scale``.

    Returns:
        float32 tensor with the shape of ``logits``.

    Computed in float32 whatever the dtype of the inputs (fp16/bf16 under autocast): in half
    precision s(x) would be quantised to 8 (bf16) or 11 (fp16) bits and the small steps of beta
    and gamma away from (1, 0) would round away; the cast of a half-precision z to float32 is
    exact, so the identity at init still holds bit for bit.
    """
    logits = logits.float()
    s = torch.sigmoid(confidence_logit.float())
    return logits + s * ((logit_scale.float() - 1.0) * logits + logit_bias.float())


def confidence_logit(layer, x):
    """``layer(x)``, the confidence logit w.x + b of s(x), in float32 with autocast off.

    Under autocast a Linear / Conv2d runs in half precision; s(x) is a product of DisAlign's own
    parameters and is cheap (one output channel), so it is computed in float32 on any device.

    Args:
        layer: the confidence layer (Linear(D, 1) or a 1x1 Conv2d(C, 1)).
        x: its input, (R, D) or (R, C, M, M), any floating dtype.
    """
    if not _autocast_available(x.device.type):  # e.g. "meta": no autocast to turn off
        return layer(x.float())
    with torch.autocast(device_type=x.device.type, enabled=False):
        return layer(x.float())


def _autocast_available(device_type):
    # torch.amp.is_autocast_available exists from torch 2.3 on.
    check = getattr(torch.amp, "is_autocast_available", None)
    return check(device_type) if check is not None else device_type in ("cpu", "cuda")


def add_calibration(module, num_classes, confidence_layer, init_std):
    """Give ``module`` the calibration parameters: beta (``logit_scale``, (K,) ones), gamma
    (``logit_bias``, (K,) zeros) and ``confidence_layer`` (weight ~ N(0, init_std), bias 0), so the
    calibrated logits equal the uncalibrated ones at the start of stage two."""
    module.logit_scale = nn.Parameter(torch.ones(num_classes))
    module.logit_bias = nn.Parameter(torch.zeros(num_classes))
    nn.init.normal_(confidence_layer.weight, std=init_std)
    nn.init.constant_(confidence_layer.bias, 0.0)
    module.confidence_layer = confidence_layer


class CosineLinear(nn.Module):
    """Cosine classifier: z_j = tau * <x / |x|, w_j / |w_j|>, no bias, learnable tau.

    Attributes:
        weight: (C, D) class weight vectors.
        scale: () the temperature tau.
    """

    def __init__(self, in_features: int, out_features: int, scale: float = 20.0):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        nn.init.normal_(self.weight, std=0.01)
        self.scale = nn.Parameter(torch.tensor(float(scale)))

    def forward(self, x):
        """x: (R, D) -> (R, C)."""
        x = nn.functional.normalize(x, dim=1)
        w = nn.functional.normalize(self.weight, dim=1)
        return self.scale * nn.functional.linear(x, w)

    def extra_repr(self):
        return f"in_features={self.in_features}, out_features={self.out_features}, cosine"


class NormedLinear(nn.Linear):
    """Seesaw's normalised linear classifier (mmdetection's ``NormedLinear``):
    z_j = tau <x / (|x| + eps), w_j / (|w_j| + eps)> + b_j, tau fixed, with a bias.

    Unlike :class:`CosineLinear` the temperature is a constant (not a parameter) and every output
    has a bias; eps = 1e-6 is added to the norms as mmdetection does. An ``nn.Linear``, so its
    parameters keep the stock names ``weight`` (C, D) and ``bias`` (C,); initialised as
    mmdetection does (weight ~ N(0, 0.01), bias 0).
    """

    def __init__(self, in_features: int, out_features: int, scale: float = 20.0, eps=1e-6):
        super().__init__(in_features, out_features, bias=True)
        self.scale = float(scale)
        self.eps = float(eps)
        nn.init.normal_(self.weight, std=0.01)
        nn.init.constant_(self.bias, 0.0)

    def forward(self, x):
        """x: (R, D) -> (R, C)."""
        x = x / (x.norm(dim=1, keepdim=True) + self.eps)
        w = self.weight / (self.weight.norm(dim=1, keepdim=True) + self.eps)
        return nn.functional.linear(self.scale * x, w, self.bias)

    def extra_repr(self):
        return super().extra_repr() + f", normed, tau={self.scale} (fixed)"
