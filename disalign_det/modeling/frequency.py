"""Kept so that ``from .frequency import class_counts_from_cfg`` in the heads keeps working: the
class counts are data code and live in :mod:`disalign_det.data.class_counts`. Import from there."""

from ..data.class_counts import class_counts_from_cfg

__all__ = ["class_counts_from_cfg"]
