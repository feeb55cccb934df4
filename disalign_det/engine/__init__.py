from .checkpoint import DisAlignCheckpointer
from .launch import launch, launch_from_argv
from .loop import ResumableSampler, build_train_loop, freeze_model
from .strict_load import DisAlignPredictor
from .trainer import Trainer

__all__ = [
    "DisAlignCheckpointer",
    "DisAlignPredictor",
    "ResumableSampler",
    "Trainer",
    "build_train_loop",
    "freeze_model",
    "launch",
    "launch_from_argv",
]
