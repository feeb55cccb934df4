from .checkpoint import DisAlignCheckpointer
from .launch import launch, launch_from_argv
from .loop import ResumableSampler, build_train_loop, freeze_model
from .trainer import Trainer

__all__ = [
    "DisAlignCheckpointer",
    "ResumableSampler",
    "Trainer",
    "build_train_loop",
    "freeze_model",
    "launch",
    "launch_from_argv",
]
