from .checkpoint import DisAlignCheckpointer
from .launch import launch, launch_from_argv
from .trainer import ResumableSampler, Trainer

__all__ = ["DisAlignCheckpointer", "ResumableSampler", "Trainer", "launch", "launch_from_argv"]
