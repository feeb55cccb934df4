"""Long-tailed image classification datasets in detectron2's ``DatasetCatalog``: ImageNet-LT,
Places-LT (their public list files), iNaturalist 2018 (its COCO-like jsons), and two CPU sets
made long-tailed here (scikit-learn's handwritten digits; rendered fine-grained families).

A dataset dict is ``{"file_name": str, "image_id": int, "label": int}`` (or ``"image"``, an
(H, W, 3) uint8 array, instead of ``file_name`` for the in-memory CPU sets). Every dataset's
metadata carries ``evaluator_type = "classification"``, ``num_classes``, the many / few shot
thresholds and, computed from the training list once on first access, ``class_image_count``
(training images per class: GRW's n_j and the shot split of the evaluator).

Layout under ``$DETECTRON2_DATASETS`` (default ``datasets``; ``datasets/prepare_classification.py``
checks it):

* ``ImageNet_LT/ImageNet_LT_{train,val,test}.txt`` (lines ``train/n01440764/xxx.JPEG 0``) over
  ``imagenet/`` (ILSVRC-2012's ``train/`` and ``val/`` folders): ``imagenet_lt_{train,val,test}``.
* ``Places_LT/Places_LT_{train,val,test}.txt`` over ``places365/`` (Places-365's
  ``data_256/`` and ``val_256/``): ``places_lt_{train,val,test}``.
* ``inaturalist2018/{train2018,val2018}.json`` over ``inaturalist2018/`` (``train_val2018/``):
  ``inat2018_{train,val}``.
"""

import functools
import json
import logging
import os
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np
import torch
from detectron2.data import DatasetCatalog
from detectron2.data.build import trivial_batch_collator
from detectron2.data.common import DatasetFromList, MapDataset
from detectron2.data.samplers import InferenceSampler
from detectron2.utils import comm

from .metadata import install_lazy_metadata

__all__ = [
    "CLASSIFICATION_DATASETS",
    "ClassBalancedTrainingSampler",
    "ClassificationMapper",
    "build_classification_test_loader",
    "class_image_counts",
    "get_classification_dicts",
    "read_image_list",
    "read_inaturalist_json",
    "register_classification_dataset",
]

logger = logging.getLogger(__name__)

README_HINT = "See datasets/README.md; python datasets/prepare_classification.py checks a download."

# Shot split of ImageNet-LT / Places-LT / iNaturalist: many > 100, few < 20 training images.
MANY_THRESHOLD, FEW_THRESHOLD = 100, 20


# --------------------------------------------------------------------------------------------------
# Readers
# --------------------------------------------------------------------------------------------------


def read_image_list(list_file: str, image_root: str) -> List[dict]:
    """Read an ImageNet-LT / Places-LT list file: one ``relative/path.jpg label`` per line.

    Returns dataset dicts ``{"file_name": image_root/path, "image_id": line index, "label"}``.
    Raises FileNotFoundError for a missing file, ValueError naming the file and line for a line
    that is not ``path int`` (empty lines are skipped).
    """
    if not os.path.isfile(list_file):
        raise FileNotFoundError(f"Image list not found: '{list_file}'. {README_HINT}")
    out = []
    with open(list_file) as f:
        for lineno, line in enumerate(f, 1):
            parts = line.split()
            if not parts:
                continue
            if len(parts) != 2 or not parts[1].lstrip("-").isdigit() or int(parts[1]) < 0:
                raise ValueError(
                    f"{list_file}:{lineno}: expected 'relative/path label' with a label >= 0, "
                    f"got {line.rstrip()!r}"
                )
            # Some Places-LT lists start paths with '/': they are relative to the image root.
            path = parts[0].lstrip("/")
            out.append(
                {
                    "file_name": os.path.join(image_root, path),
                    "image_id": len(out),
                    "label": int(parts[1]),
                }
            )
    return out


def read_inaturalist_json(json_file: str, image_root: str) -> List[dict]:
    """Read iNaturalist 2018's ``train2018.json`` / ``val2018.json`` (COCO-like: ``images`` with
    ``id`` and ``file_name``, ``annotations`` with ``image_id`` and ``category_id``, one per image,
    ``categories`` with ``id``). Labels are the category ids' ranks (iNaturalist 2018's ids are
    already 0..8141). ValueError naming the file and record for a malformed json."""
    if not os.path.isfile(json_file):
        raise FileNotFoundError(f"iNaturalist json not found: '{json_file}'. {README_HINT}")
    with open(json_file) as f:
        data = json.load(f)
    for key in ("images", "annotations", "categories"):
        if key not in data:
            raise ValueError(f"{json_file}: no '{key}' list (not an iNaturalist 2018 json)")
    cat_ids = sorted(int(c["id"]) for c in data["categories"])
    label_of = {c: i for i, c in enumerate(cat_ids)}
    category = {}
    for i, ann in enumerate(data["annotations"]):
        try:
            image_id, cat = int(ann["image_id"]), int(ann["category_id"])
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(
                f"{json_file}: annotations[{i}] has no valid image_id/category_id"
            ) from e
        if cat not in label_of:
            raise ValueError(f"{json_file}: annotations[{i}] has unknown category_id {cat}")
        if category.setdefault(image_id, cat) != cat:
            raise ValueError(f"{json_file}: image {image_id} has two categories")
    out = []
    for i, img in enumerate(data["images"]):
        if "id" not in img or "file_name" not in img:
            raise ValueError(f"{json_file}: images[{i}] has no 'id'/'file_name'")
        image_id = int(img["id"])
        if image_id not in category:
            raise ValueError(f"{json_file}: images[{i}] (id {image_id}) has no annotation")
        out.append(
            {
                "file_name": os.path.join(image_root, img["file_name"]),
                "image_id": image_id,
                "label": label_of[category[image_id]],
            }
        )
    return out


def class_image_counts(dicts: Sequence[dict], num_classes: int) -> np.ndarray:
    """(C,) int64 number of dataset dicts per label; ValueError for a label outside [0, C)."""
    labels = np.asarray([d["label"] for d in dicts], dtype=np.int64)
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        bad = labels[(labels < 0) | (labels >= num_classes)][0]
        raise ValueError(f"label {bad} outside [0, {num_classes}) (num_classes={num_classes})")
    return np.bincount(labels, minlength=num_classes).astype(np.int64)


# --------------------------------------------------------------------------------------------------
# Registration
# --------------------------------------------------------------------------------------------------


def register_classification_dataset(
    name: str,
    loader: Callable[[], List[dict]],
    *,
    num_classes: int,
    train_loader: Optional[Callable[[], List[dict]]] = None,
    many_threshold: int = MANY_THRESHOLD,
    few_threshold: int = FEW_THRESHOLD,
    class_names: Optional[Sequence[str]] = None,
    **metadata,
) -> None:
    """Register ``name`` (``loader()`` gives its dicts) with classification metadata.

    ``class_image_count`` is computed from ``train_loader()`` (default: ``loader``, for a training
    split) on first access, once; ``thing_classes`` defaults to ``class_<i>``.
    """
    if name in DatasetCatalog.list():
        DatasetCatalog.remove(name)
    DatasetCatalog.register(name, loader)
    counts_from = train_loader or loader

    def lazy():
        counts = class_image_counts(counts_from(), num_classes)
        names = list(class_names) if class_names else [f"class_{i}" for i in range(num_classes)]
        return {"class_image_count": counts.tolist(), "thing_classes": names}

    install_lazy_metadata(
        name,
        lazy,
        evaluator_type="classification",
        num_classes=num_classes,
        many_threshold=many_threshold,
        few_threshold=few_threshold,
        **metadata,
    )


def get_classification_dicts(names) -> List[dict]:
    """The concatenated dicts of one or several registered datasets (a LazyConfig's
    ``dataloader.train.dataset``)."""
    names = [names] if isinstance(names, str) else list(names)
    out = []
    for n in names:
        out.extend(DatasetCatalog.get(n))
    if not out:
        raise ValueError(f"Datasets {names} are empty")
    return out


def _root(root=None):
    return root if root is not None else os.getenv("DETECTRON2_DATASETS", "datasets")


#: name -> (kind, list/json file, image root, number of classes, train name), paths relative to
#: ``$DETECTRON2_DATASETS``.
CLASSIFICATION_DATASETS: Dict[str, tuple] = {}
for _split in ("train", "val", "test"):
    CLASSIFICATION_DATASETS[f"imagenet_lt_{_split}"] = (
        "list",
        f"ImageNet_LT/ImageNet_LT_{_split}.txt",
        "imagenet",
        1000,
        "imagenet_lt_train",
    )
    CLASSIFICATION_DATASETS[f"places_lt_{_split}"] = (
        "list",
        f"Places_LT/Places_LT_{_split}.txt",
        "places365",
        365,
        "places_lt_train",
    )
for _split in ("train", "val"):
    CLASSIFICATION_DATASETS[f"inat2018_{_split}"] = (
        "inat",
        f"inaturalist2018/{_split}2018.json",
        "inaturalist2018",
        8142,
        "inat2018_train",
    )


def _read(kind, path, image_root):
    return (read_image_list if kind == "list" else read_inaturalist_json)(path, image_root)


def register_builtin_classification(root: Optional[str] = None) -> None:
    """Register the public datasets (reads no file); the CPU sets: :mod:`.classification_cpu`."""
    root = _root(root)
    for name, (kind, rel, rel_root, num_classes, train) in CLASSIFICATION_DATASETS.items():
        path, image_root = os.path.join(root, rel), os.path.join(root, rel_root)
        tkind, trel, troot = CLASSIFICATION_DATASETS[train][:3]
        register_classification_dataset(
            name,
            functools.partial(_read, kind, path, image_root),
            num_classes=num_classes,
            train_loader=functools.partial(
                _read, tkind, os.path.join(root, trel), os.path.join(root, troot)
            ),
            list_file=path,
            image_root=image_root,
        )


# --------------------------------------------------------------------------------------------------
# Mapping and loading
# --------------------------------------------------------------------------------------------------


class ClassificationMapper:
    """Dataset dict -> ``{"image": (3, H, W) uint8 tensor (RGB), "label", "image_id"}`` with
    torchvision transforms: training RandomResizedCrop(``image_size``, scale ``(min_scale, 1)``),
    horizontal flip, ColorJitter(``color_jitter`` for brightness, contrast and saturation); test
    Resize(``resize_size``) + CenterCrop(``image_size``). The random draws come from torch's
    global RNG (restored on resume; per-image seeds with data-loader workers, see
    :mod:`.samplers`)."""

    def __init__(
        self,
        is_train: bool,
        *,
        image_size: int = 224,
        resize_size: int = 256,
        min_scale: float = 0.08,
        flip: bool = True,
        color_jitter: float = 0.4,
    ):
        from torchvision import transforms as T

        if is_train:
            ops = [T.RandomResizedCrop(image_size, scale=(min_scale, 1.0))]
            if flip:
                ops.append(T.RandomHorizontalFlip())
            if color_jitter > 0:
                ops.append(T.ColorJitter(color_jitter, color_jitter, color_jitter))
        else:
            ops = [T.Resize(resize_size), T.CenterCrop(image_size)]
        self.transform = T.Compose(ops)
        self.is_train = is_train

    def __call__(self, dataset_dict):
        from PIL import Image

        if "image" in dataset_dict:
            image = Image.fromarray(np.asarray(dataset_dict["image"], dtype=np.uint8))
        else:
            with Image.open(dataset_dict["file_name"]) as f:
                image = f.convert("RGB")
        image = self.transform(image)
        array = np.asarray(image, dtype=np.uint8)
        return {
            "image": torch.from_numpy(array.copy()).permute(2, 0, 1),
            "label": int(dataset_dict["label"]),
            "image_id": dataset_dict.get("image_id"),
        }


class ClassBalancedTrainingSampler(torch.utils.data.Sampler):
    """Infinite class-balanced index stream (cRT's sampling): each draw picks a class uniformly
    among those with images, then one of its images uniformly. Every process reads its own shard
    (indices ``rank::world_size``) of one stream seeded by ``seed`` (shared by the processes), as
    detectron2's ``TrainingSampler`` does."""

    def __init__(self, labels: Sequence[int], seed: Optional[int] = None, chunk: int = 4096):
        labels = np.asarray(labels, dtype=np.int64)
        self._members = [np.flatnonzero(labels == c) for c in np.unique(labels)]
        self._seed = int(comm.shared_random_seed() if seed is None else seed)
        self._rank, self._world = comm.get_rank(), comm.get_world_size()
        self._chunk = chunk

    def _stream(self):
        g = np.random.default_rng(self._seed)
        sizes = np.array([len(m) for m in self._members])
        while True:
            classes = g.integers(0, len(self._members), self._chunk)
            picks = (g.random(self._chunk) * sizes[classes]).astype(np.int64)
            for c, p in zip(classes, picks):
                yield int(self._members[c][p])

    def __iter__(self):
        import itertools

        return itertools.islice(self._stream(), self._rank, None, self._world)


def dataset_labels(names) -> List[int]:
    """The labels of the dicts of ``names`` (for :class:`ClassBalancedTrainingSampler`)."""
    return [d["label"] for d in get_classification_dicts(names)]


def build_classification_test_loader(
    dataset, *, mapper, batch_size: int = 32, num_workers: int = 0
):
    """Inference batches of ``batch_size`` images; each process gets its contiguous share of the
    dataset (detectron2's ``InferenceSampler``)."""
    dataset = MapDataset(DatasetFromList(list(dataset), copy=False), mapper)
    batch_sampler = torch.utils.data.BatchSampler(
        InferenceSampler(len(dataset)), batch_size, drop_last=False
    )
    return torch.utils.data.DataLoader(
        dataset,
        batch_sampler=batch_sampler,
        num_workers=num_workers,
        collate_fn=trivial_batch_collator,
    )
