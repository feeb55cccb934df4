from .checkpoint import DisAlignCheckpointer
from .launch import launch, launch_from_argv
from .strict_load import DisAlignPredictor
from .trainer import ResumableSampler, Trainer

__all__ = [
    "DisAlignCheckpointer",
    "DisAlignPredictor",
    "ResumableSampler",
    "Trainer",
    "launch",
    "launch_from_argv",
]
