"""An RPN that skips its losses when nothing behind them trains (DisAlign stage two)."""

from detectron2.modeling.proposal_generator import PROPOSAL_GENERATOR_REGISTRY, RPN

__all__ = ["DisAlignRPN"]


@PROPOSAL_GENERATOR_REGISTRY.register()
class DisAlignRPN(RPN):
    """Detectron2's ``RPN`` (same parameters, same proposals) that, in training, neither labels
    anchors nor computes its losses when no parameter of the RPN and no input feature requires
    grad. Anchor matching against the ground truth is a large share of a frozen detector's training
    step and its losses could not change anything; with anything trainable it is the stock RPN."""

    def forward(self, images, features, gt_instances=None):
        self._skip_losses = (
            self.training
            and not any(p.requires_grad for p in self.parameters())
            and not any(features[f].requires_grad for f in self.in_features)
        )
        return super().forward(images, features, gt_instances)

    def label_and_sample_anchors(self, anchors, gt_instances):
        if getattr(self, "_skip_losses", False):
            return None, None
        return super().label_and_sample_anchors(anchors, gt_instances)

    def losses(self, anchors, pred_objectness_logits, gt_labels, pred_anchor_deltas, gt_boxes):
        if gt_labels is None:
            return {}
        return super().losses(
            anchors, pred_objectness_logits, gt_labels, pred_anchor_deltas, gt_boxes
        )
