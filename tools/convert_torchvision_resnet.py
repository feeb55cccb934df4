#!/usr/bin/env python
"""Convert a torchvision ResNet / ResNeXt checkpoint (e.g. resnet152-394f9c45.pth, downloaded
elsewhere) to the parameter names of disalign_det's ImageClassifier (detectron2's ResNet), for
``train.init_checkpoint`` of configs/Places-LT/resnet152.py:

    python tools/convert_torchvision_resnet.py resnet152-394f9c45.pth \
        output/pretrained/resnet152_torchvision_d2.pth [--keep-fc]

The classifier (``fc``) is dropped unless --keep-fc (ImageNet's 1000 classes rarely fit).
"""

import argparse
import os

import torch

from disalign_det.modeling.classification import convert_torchvision_resnet


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", help="torchvision state dict (.pth)")
    parser.add_argument("target", help="output checkpoint for train.init_checkpoint")
    parser.add_argument("--keep-fc", action="store_true", help="keep fc as head.cls_score")
    args = parser.parse_args(argv)
    if not os.path.isfile(args.source):
        raise SystemExit(f"{args.source!r} does not exist")
    state = torch.load(args.source, map_location="cpu", weights_only=True)
    for key in ("state_dict", "model"):  # some files wrap the state dict
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    converted = convert_torchvision_resnet(state, keep_fc=args.keep_fc)
    os.makedirs(os.path.dirname(os.path.abspath(args.target)), exist_ok=True)
    torch.save({"model": converted, "__author__": "torchvision"}, args.target)
    print(f"{len(converted)} tensors written to {args.target}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
