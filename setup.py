#!/usr/bin/env python
"""disalign-det: DisAlign (CVPR 2021) for long-tail instance segmentation, as a Detectron2 extension.

Detectron2 itself is deliberately NOT in install_requires: it is published from source only, and the
PyPI stand-in (pb1-detectron2) would then fight an official build for the ``detectron2`` import.
``scripts/install.sh`` installs the best available detectron2 first.
"""
from setuptools import find_packages, setup

setup(
    name="disalign-det",
    version="0.1.0",
    description="DisAlign (distribution alignment) for long-tail instance segmentation on LVIS",
    packages=find_packages(include=("disalign_det", "disalign_det.*")),
    # The CPU kernel's source, compiled on first use (disalign_det/modeling/cpu_kernel.py).
    package_data={"disalign_det": ["csrc/*.cpp"]},
    python_requires=">=3.8",
    install_requires=[
        "torch>=1.8",
        "torchvision>=0.9",
        "fvcore>=0.1.5",
        "iopath>=0.1.7",
        "lvis>=0.5.3",
        "pycocotools>=2.0.2",
        "numpy",
        "Pillow",
        "opencv-python-headless",
        "matplotlib",
        "tabulate",
        "scikit-learn",  # its real 8x8 digits: the CPU classification benchmark and demo
    ],
    extras_require={"dev": ["pytest", "pytest-timeout", "flake8", "black", "isort"]},
)
