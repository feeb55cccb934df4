from .checkpoint import DisAlignCheckpointer
from .launch import launch
from .trainer import ResumableSampler, Trainer

__all__ = ["DisAlignCheckpointer", "ResumableSampler", "Trainer", "launch"]
