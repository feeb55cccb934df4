"""Registration of LVIS-format datasets with metadata read from their own json.

detectron2 v0.6's ``register_lvis_instances`` only knows the built-in LVIS class lists: any other
name fails with "No built-in metadata", and a name containing "v1" silently gets the 1203 LVIS
classes. :func:`register_lvis_format` registers any LVIS-format json instead, with the classes, the
r/c/f buckets and the per-class image/instance counts taken from the json itself.

Built-in names (registered on ``import disalign_det.data``, relative to ``$DETECTRON2_DATASETS``,
default ``datasets``):

* ``lvis_v1_train`` / ``lvis_v1_val``: detectron2's own registration (``lvis/lvis_v1_*.json``,
  images in ``coco/``) and metadata, plus ``class_frequency``, ``class_image_count``,
  ``image_count`` and ``instance_count`` read lazily from the json on first access (the train
  json is ~1 GB: nothing is read at import), and a clear error when the files are missing.
* ``lvis_synth_train`` / ``lvis_synth_val``: the generated dataset of
  :mod:`disalign_det.data.synthetic` (default parameters) in ``lvis_synth/``, generated on first
  load. Its metadata is available right after import without generating anything: the category
  list is a cheap, exact function of the generator's parameters (or read from the json if present).

See ``datasets/README.md`` for the expected layout.
"""

import fcntl
import functools
import json
import logging
import os
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.catalog import Metadata
from detectron2.data.datasets.lvis import load_lvis_json

from .frequency import frequency_bucket

__all__ = [
    "LVISFormatError",
    "LVISCategoryInfo",
    "read_lvis_json",
    "validate_lvis_dict",
    "lvis_category_info",
    "register_lvis_format",
    "register_datasets_from_cfg",
    "check_num_classes",
    "num_classes_of",
    "register_builtin_datasets",
    "register_lvis_synth",
    "ensure_synthetic_dataset",
    "SYNTH_DATASETS",
    "LVIS_V1_DATASETS",
]

logger = logging.getLogger(__name__)

README_HINT = "See datasets/README.md for the expected layout and how to register LVIS-format data."

REQUIRED_TOP_LEVEL = ("images", "annotations", "categories")
REQUIRED_IMAGE_FIELDS = ("id", "width", "height", "coco_url")
REQUIRED_ANNOTATION_FIELDS = ("id", "image_id", "category_id", "segmentation", "area", "bbox")
REQUIRED_CATEGORY_FIELDS = ("id", "name")

# name -> (split, json path relative to the datasets root, image root relative to it)
LVIS_V1_DATASETS = {
    "lvis_v1_train": ("lvis/lvis_v1_train.json", "coco/"),
    "lvis_v1_val": ("lvis/lvis_v1_val.json", "coco/"),
}
SYNTH_SUBDIR = "lvis_synth"
SYNTH_DATASETS = {"lvis_synth_train": "train", "lvis_synth_val": "val"}

# Our registrations: name -> (absolute json path, absolute image root ending in a separator).
_REGISTERED: Dict[str, Tuple[str, str]] = {}


class LVISFormatError(ValueError):
    """An LVIS-format json lacks something detectron2's loader or LVISEval relies on."""


# --------------------------------------------------------------------------------------------------
# Reading and validating a json
# --------------------------------------------------------------------------------------------------


def _first_missing(records, fields, what, json_file):
    for i, rec in enumerate(records):
        if not isinstance(rec, dict):
            raise LVISFormatError(f"{json_file}: {what}[{i}] is not an object")
        missing = [f for f in fields if f not in rec]
        if missing:
            raise LVISFormatError(
                f"{json_file}: {what}[{i}] (id={rec.get('id')!r}) lacks required field(s) "
                f"{missing}; every entry of '{what}' needs {list(fields)}"
            )


def validate_lvis_dict(data: dict, json_file: str = "<json>") -> None:
    """Raise :class:`LVISFormatError` naming ``json_file`` if ``data`` is not usable LVIS format.

    Checks what detectron2's LVIS loader and LVISEval rely on: the top-level keys, the fields of
    every image / annotation / category, category ids contiguous 1..K (the loader maps id -> id - 1
    and the evaluator maps back with + 1), unique ids, annotations pointing at existing images and
    categories, and polygons of at least 3 points.
    """
    if not isinstance(data, dict):
        raise LVISFormatError(
            f"{json_file}: top level must be an object, got {type(data).__name__}"
        )
    missing = [k for k in REQUIRED_TOP_LEVEL if k not in data]
    if missing:
        raise LVISFormatError(f"{json_file}: missing required top-level key(s) {missing}")
    cats, imgs, anns = data["categories"], data["images"], data["annotations"]
    _first_missing(cats, REQUIRED_CATEGORY_FIELDS, "categories", json_file)
    _first_missing(imgs, REQUIRED_IMAGE_FIELDS, "images", json_file)
    _first_missing(anns, REQUIRED_ANNOTATION_FIELDS, "annotations", json_file)
    if not cats:
        raise LVISFormatError(f"{json_file}: 'categories' is empty")

    cat_ids = [c["id"] for c in cats]
    if len(set(cat_ids)) != len(cat_ids):
        raise LVISFormatError(f"{json_file}: duplicate category ids")
    expected = set(range(1, len(cat_ids) + 1))
    if set(cat_ids) != expected:
        bad = sorted(set(cat_ids) - expected, key=str)[:10]
        raise LVISFormatError(
            f"{json_file}: category ids must be contiguous 1..K (K={len(cat_ids)}), as "
            f"detectron2's LVIS loader and evaluator assume; unexpected ids {bad}. Renumber the "
            "categories (and the annotations' category_id) to 1..K."
        )

    img_ids = set()
    for i, im in enumerate(imgs):
        if im["id"] in img_ids:
            raise LVISFormatError(f"{json_file}: duplicate image id {im['id']!r}")
        img_ids.add(im["id"])
        url = im["coco_url"]
        # The loader takes the split folder and file name from the last two '/' parts.
        if not isinstance(url, str) or len(url.split("/")) < 2:
            raise LVISFormatError(
                f"{json_file}: images[{i}] coco_url {url!r} must end with '<folder>/<file name>' "
                "(detectron2 builds image_root + folder + file name from it)"
            )

    cat_set = set(cat_ids)
    ann_ids = set()
    for i, a in enumerate(anns):
        if a["id"] in ann_ids:
            raise LVISFormatError(f"{json_file}: duplicate annotation id {a['id']!r}")
        ann_ids.add(a["id"])
        if a["category_id"] not in cat_set:
            raise LVISFormatError(
                f"{json_file}: annotations[{i}] (id={a['id']!r}) has category_id "
                f"{a['category_id']!r}, which is not among the {len(cat_ids)} categories"
            )
        if a["image_id"] not in img_ids:
            raise LVISFormatError(
                f"{json_file}: annotations[{i}] (id={a['id']!r}) has image_id {a['image_id']!r}, "
                "which is not among the images"
            )
        segm = a["segmentation"]
        if (
            not isinstance(segm, list)
            or not segm
            or any(not isinstance(p, list) or len(p) < 6 or len(p) % 2 for p in segm)
        ):
            raise LVISFormatError(
                f"{json_file}: annotations[{i}] (id={a['id']!r}) segmentation must be a non-empty "
                "list of polygons [x1, y1, x2, y2, ...] with at least 3 points each"
            )
        if not isinstance(a["bbox"], list) or len(a["bbox"]) != 4:
            raise LVISFormatError(
                f"{json_file}: annotations[{i}] (id={a['id']!r}) bbox must be [x, y, w, h]"
            )


def read_lvis_json(json_file: str, dataset_name: Optional[str] = None) -> dict:
    """Parse and validate an LVIS-format json; clear errors name the file (and dataset)."""
    who = f" of dataset '{dataset_name}'" if dataset_name else ""
    if not os.path.isfile(json_file):
        raise FileNotFoundError(f"LVIS-format json{who} not found: '{json_file}'. {README_HINT}")
    try:
        with open(json_file) as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise LVISFormatError(f"{json_file}: not valid json ({e})") from e
    validate_lvis_dict(data, json_file)
    return data


@dataclass(frozen=True)
class LVISCategoryInfo:
    """Classes of an LVIS-format json in contiguous order (index k = category id k + 1)."""

    json_file: str
    thing_classes: Tuple[str, ...]
    frequency: Tuple[str, ...]
    image_count: Tuple[int, ...]
    instance_count: Tuple[int, ...]
    # True when image/instance counts were counted from this json's annotations because its
    # categories lack them (then they are THIS split's statistics, not necessarily train's).
    counted_from_annotations: bool

    @property
    def num_classes(self) -> int:
        return len(self.thing_classes)

    def metadata(self) -> dict:
        """MetadataCatalog fields (``class_image_count`` as in detectron2 >= 0.6 main)."""
        return {
            "thing_classes": list(self.thing_classes),
            "class_frequency": list(self.frequency),
            "class_image_count": [
                {"id": k + 1, "image_count": n} for k, n in enumerate(self.image_count)
            ],
            "image_count": list(self.image_count),
            "instance_count": list(self.instance_count),
        }


def _info_from_dict(data: dict, json_file: str) -> LVISCategoryInfo:
    cats = sorted(data["categories"], key=lambda c: c["id"])
    k = len(cats)
    has_counts = all("image_count" in c and "instance_count" in c for c in cats)
    if has_counts:
        image_count = [int(c["image_count"]) for c in cats]
        instance_count = [int(c["instance_count"]) for c in cats]
    else:
        image_count, instance_count = [0] * k, [0] * k
        images_of = [set() for _ in range(k)]
        for a in data.get("annotations", []):
            c = a["category_id"] - 1
            instance_count[c] += 1
            images_of[c].add(a["image_id"])
        image_count = [len(s) for s in images_of]
    if all(c.get("frequency") in ("r", "c", "f") for c in cats):
        frequency = [c["frequency"] for c in cats]
    else:
        frequency = [frequency_bucket(n) for n in image_count]
    return LVISCategoryInfo(
        json_file=json_file,
        thing_classes=tuple(str(c["name"]) for c in cats),
        frequency=tuple(frequency),
        image_count=tuple(image_count),
        instance_count=tuple(instance_count),
        counted_from_annotations=not has_counts,
    )


_INFO_CACHE: Dict[tuple, LVISCategoryInfo] = {}


def lvis_category_info(json_file: str, dataset_name: Optional[str] = None) -> LVISCategoryInfo:
    """Validated class list and statistics of an LVIS-format json (cached per file state).

    Only the small summary is cached, never the parsed json (LVIS train is ~1 GB).
    """
    path = os.path.abspath(json_file)
    if not os.path.isfile(path):
        who = f" of dataset '{dataset_name}'" if dataset_name else ""
        raise FileNotFoundError(f"LVIS-format json{who} not found: '{json_file}'. {README_HINT}")
    st = os.stat(path)
    key = (path, st.st_mtime_ns, st.st_size)
    if key not in _INFO_CACHE:
        data = read_lvis_json(path, dataset_name)
        _INFO_CACHE[key] = _info_from_dict(data, path)
        if _INFO_CACHE[key].counted_from_annotations:
            logger.info("%s: categories lack image/instance counts; counted from annotations", path)
    return _INFO_CACHE[key]


# --------------------------------------------------------------------------------------------------
# Metadata filled on first access
# --------------------------------------------------------------------------------------------------

_LAZY_KEYS = frozenset(
    ("thing_classes", "class_frequency", "class_image_count", "image_count", "instance_count")
)
# name -> function returning the lazy fields; dropped once it has run.
_LAZY_LOADERS: Dict[str, Callable[[], dict]] = {}


class _LazyLVISMetadata(Metadata):
    """Metadata whose class fields are computed on first access, so that registering the built-in
    datasets at import reads no json. Everything else behaves like detectron2's Metadata."""

    def _load_lazy(self):
        name = self.__dict__.get("name")
        loader = _LAZY_LOADERS.get(name)
        if loader is None:
            return
        values = loader()  # may raise a clear FileNotFoundError: then it is retried next time
        _LAZY_LOADERS.pop(name, None)
        for k, v in values.items():
            if k not in self.__dict__:
                object.__setattr__(self, k, v)

    def __getattr__(self, key):
        if key in _LAZY_KEYS:
            self._load_lazy()
            if key in self.__dict__:
                return self.__dict__[key]
        return super().__getattr__(key)

    def __setattr__(self, key, val):
        # Setting a field that is still lazy must not trigger a (possibly huge) json read.
        if key in _LAZY_KEYS and key not in self.__dict__ and self.name in _LAZY_LOADERS:
            object.__setattr__(self, key, val)
            return
        super().__setattr__(key, val)

    def as_dict(self):
        self._load_lazy()
        return super().as_dict()


def _install_lazy_metadata(name: str, loader: Callable[[], dict], **eager) -> Metadata:
    old = MetadataCatalog.get(name)
    fields = dict(old.__dict__)
    fields.update(eager)
    fields["name"] = name
    meta = _LazyLVISMetadata(**fields)
    MetadataCatalog[name] = meta
    _LAZY_LOADERS[name] = loader
    return meta


# --------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------


def _check_image_paths(dicts, json_file, image_root, max_checks=5):
    """Fail early, with the path rule spelled out, when images are not where the loader looks."""
    if not dicts:
        return
    step = max(1, len(dicts) // max_checks)
    for d in dicts[::step][:max_checks]:
        if not os.path.isfile(d["file_name"]):
            raise FileNotFoundError(
                f"Image '{d['file_name']}' of {json_file} not found. detectron2's LVIS loader "
                f"builds image_root ('{image_root}') + the folder and file name of coco_url. "
                f"{README_HINT}"
            )


def _load_lvis_format(json_file: str, image_root: str, check_images: bool = True):
    if not os.path.isfile(json_file):
        raise FileNotFoundError(f"LVIS-format json not found: '{json_file}'. {README_HINT}")
    # dataset_name=None: with a name, v0.6 would replace our metadata with its built-in LVIS lists.
    dicts = load_lvis_json(json_file, image_root, None)
    if check_images:
        _check_image_paths(dicts, json_file, image_root)
    return dicts


def _normalise(json_file: str, image_root: str) -> Tuple[str, str]:
    # The loader concatenates image_root and the split folder as strings: end it with a separator.
    return os.path.abspath(json_file), os.path.join(os.path.abspath(image_root), "")


def register_lvis_format(name: str, json_file: str, image_root: str) -> Metadata:
    """Register an LVIS-format dataset whose classes and statistics come from its json.

    Args:
        name: any dataset name (no built-in metadata is looked up, "v1" in it is harmless).
        json_file: LVIS-format json, category ids contiguous 1..K.
        image_root: folder such that ``image_root/<folder of coco_url>/<file name>`` is an image.

    Metadata set: ``thing_classes`` (names by category id), ``json_file``, ``image_root``,
    ``evaluator_type="lvis"``, ``class_frequency`` ('r'/'c'/'f' per class), ``class_image_count``
    (``[{"id", "image_count"}]``), ``image_count`` and ``instance_count`` (per contiguous class;
    from the json's categories, counted from its annotations if absent).

    Registering the same name again with the same files is a no-op; with other files it raises.
    """
    json_abs, root_abs = _normalise(json_file, image_root)
    if name in _REGISTERED:
        if _REGISTERED[name] == (json_abs, root_abs):
            return MetadataCatalog.get(name)
        old_json, old_root = _REGISTERED[name]
        raise ValueError(
            f"Dataset '{name}' is already registered with json_file='{old_json}', "
            f"image_root='{old_root}'; cannot re-register it with json_file='{json_abs}', "
            f"image_root='{root_abs}'. Use another name."
        )
    if name in DatasetCatalog.list():
        raise ValueError(
            f"Dataset '{name}' is already registered (by detectron2 or other code); choose another "
            "name for this LVIS-format json"
        )
    if not os.path.isfile(json_abs):
        raise FileNotFoundError(
            f"LVIS-format json of dataset '{name}' not found: '{json_file}'. {README_HINT}"
        )
    if not os.path.isdir(root_abs):
        raise FileNotFoundError(
            f"Image root of dataset '{name}' not found: '{image_root}'. {README_HINT}"
        )
    info = lvis_category_info(json_abs, name)
    DatasetCatalog.register(name, functools.partial(_load_lvis_format, json_abs, root_abs))
    _REGISTERED[name] = (json_abs, root_abs)
    meta = MetadataCatalog.get(name)
    meta.set(json_file=json_abs, image_root=root_abs, evaluator_type="lvis", **info.metadata())
    logger.info(
        "Registered LVIS-format dataset '%s': %d classes (%s r / %s c / %s f) from %s",
        name,
        info.num_classes,
        info.frequency.count("r"),
        info.frequency.count("c"),
        info.frequency.count("f"),
        json_abs,
    )
    return meta


def register_datasets_from_cfg(cfg) -> List[str]:
    """Register every ``(name, json_file, image_root)`` of ``cfg.DATASETS.LVIS_FORMAT``.

    Idempotent. Returns the names.
    """
    entries = cfg.DATASETS.get("LVIS_FORMAT", ())
    if isinstance(entries, str) or not isinstance(entries, (list, tuple)):
        raise ValueError(
            f"DATASETS.LVIS_FORMAT must be a list of (name, json_file, image_root) triples, "
            f"got {entries!r}"
        )
    names = []
    for i, entry in enumerate(entries):
        ok = (
            isinstance(entry, (list, tuple))
            and len(entry) == 3
            and all(isinstance(x, str) and x for x in entry)
        )
        if not ok:
            raise ValueError(
                f"DATASETS.LVIS_FORMAT[{i}] must be a (name, json_file, image_root) triple of "
                f"non-empty strings, got {entry!r}"
            )
        register_lvis_format(*entry)
        names.append(entry[0])
    return names


def num_classes_of(dataset_name: str) -> Optional[int]:
    """Number of classes of a registered dataset (None if its metadata has no thing_classes)."""
    if dataset_name not in DatasetCatalog.list():
        raise KeyError(
            f"Dataset '{dataset_name}' is not registered. Register LVIS-format data with "
            f"DATASETS.LVIS_FORMAT. {README_HINT}"
        )
    classes = MetadataCatalog.get(dataset_name).get("thing_classes")
    return None if classes is None else len(classes)


def check_num_classes(cfg) -> None:
    """Raise ValueError if ``MODEL.ROI_HEADS.NUM_CLASSES`` differs from the class count of any
    dataset of ``DATASETS.TRAIN`` / ``DATASETS.TEST`` (registers ``DATASETS.LVIS_FORMAT`` first)."""
    register_datasets_from_cfg(cfg)
    expected = cfg.MODEL.ROI_HEADS.NUM_CLASSES
    for key in ("TRAIN", "TEST"):
        for name in getattr(cfg.DATASETS, key):
            k = num_classes_of(name)
            if k is None:
                logger.warning("Dataset '%s' has no thing_classes: NUM_CLASSES not checked", name)
                continue
            if k != expected:
                raise ValueError(
                    f"MODEL.ROI_HEADS.NUM_CLASSES={expected} but dataset '{name}' (DATASETS.{key}) "
                    f"has {k} classes; set MODEL.ROI_HEADS.NUM_CLASSES {k}"
                )


# --------------------------------------------------------------------------------------------------
# Built-in datasets
# --------------------------------------------------------------------------------------------------


def _datasets_root(root: Optional[str]) -> str:
    return root if root is not None else os.getenv("DETECTRON2_DATASETS", "datasets")


def _checked_loader(orig: Callable, json_file: str, image_root: str):
    def load():
        if not os.path.isfile(json_file):
            raise FileNotFoundError(f"LVIS json not found: '{json_file}'. {README_HINT}")
        if not os.path.isdir(image_root):
            raise FileNotFoundError(f"LVIS image root not found: '{image_root}'. {README_HINT}")
        return orig()

    return load


def _register_lvis_v1(root: str, datasets: Optional[Dict[str, Tuple[str, str]]] = None) -> None:
    for name, (rel_json, rel_root) in (datasets or LVIS_V1_DATASETS).items():
        json_file = os.path.join(root, rel_json)
        image_root = os.path.join(root, rel_root)
        if name in DatasetCatalog.list():
            # Keep detectron2's loader and class names; only add a clear missing-file error.
            orig = DatasetCatalog[name]
            DatasetCatalog.remove(name)
            DatasetCatalog.register(name, _checked_loader(orig, json_file, image_root))
        else:
            DatasetCatalog.register(
                name, functools.partial(_load_lvis_format, json_file, image_root, False)
            )
        _install_lazy_metadata(
            name,
            lambda j=json_file, n=name: lvis_category_info(j, n).metadata(),
            json_file=json_file,
            image_root=image_root,
            evaluator_type="lvis",
        )


def _synthetic():
    # Imported on use, not at import: `python -m disalign_det.data.synthetic` warns when the
    # package's __init__ has already imported the module it is about to run.
    from . import synthetic

    return synthetic


def _synth_paths(root: str, subdir: str) -> Dict[str, str]:
    # The generator's layout, spelled out here so that registering at import does not import the
    # generator (tests check these names against synthetic.TRAIN_JSON / VAL_JSON / IMAGES_DIR).
    out = os.path.join(root, subdir)
    return {
        "out_dir": out,
        "train_json": os.path.join(out, "lvis_synth_train.json"),
        "val_json": os.path.join(out, "lvis_synth_val.json"),
        "image_root": os.path.join(out, "images", ""),
    }


def _params_on_disk(json_file: str) -> Optional[dict]:
    try:
        with open(json_file) as f:
            info = json.load(f).get("info", {})
    except (OSError, ValueError):
        return None
    return info.get("synthetic_params") if isinstance(info, dict) else None


def _synth_is_current(paths: Dict[str, str], expected: dict) -> bool:
    """Both jsons exist and were written by this generator version with these parameters."""
    return all(
        os.path.isfile(paths[k]) and _params_on_disk(paths[k]) == expected
        for k in ("train_json", "val_json")
    )


def ensure_synthetic_dataset(
    root: Optional[str] = None, subdir: str = SYNTH_SUBDIR, **gen_kwargs
) -> Dict[str, str]:
    """Generate the synthetic dataset under ``root/subdir`` unless it is already there, generated
    with the same parameters by the same generator version (``info["synthetic_params"]``).

    A stale copy (other parameters or an older generator) is regenerated in place. Safe when several
    processes start at once: generation happens under an exclusive file lock, and the jsons (written
    last, atomically) mark a complete dataset.
    """
    paths = _synth_paths(_datasets_root(root), subdir)
    expected = _synthetic().generation_params(**gen_kwargs)
    if _synth_is_current(paths, expected):
        return paths
    os.makedirs(paths["out_dir"], exist_ok=True)
    with open(os.path.join(paths["out_dir"], ".generate.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            # Another process may have finished while we waited for the lock.
            if not _synth_is_current(paths, expected):
                stale = [paths[k] for k in ("train_json", "val_json") if os.path.isfile(paths[k])]
                if stale:
                    logger.warning(
                        "%s was generated with other parameters or an older generator: "
                        "regenerating it with %s",
                        paths["out_dir"],
                        expected,
                    )
                    # Jsons first: a reader must never pair an old json with new images.
                    for f in stale:
                        os.remove(f)
                logger.info("Generating the synthetic LVIS dataset in %s", paths["out_dir"])
                _synthetic().generate_synthetic_lvis(paths["out_dir"], **gen_kwargs)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    return paths


_PLAN_KEYS = ("seed", "num_classes", "num_train_images", "max_objects_per_image")


def _synth_metadata(paths: Dict[str, str], split: str, gen_kwargs: dict) -> dict:
    if _synth_is_current(paths, _synthetic().generation_params(**gen_kwargs)):
        return lvis_category_info(paths[f"{split}_json"]).metadata()
    # Not generated (or stale, hence regenerated on load): the categories are an exact function
    # of the generator's parameters, no rendering needed.
    plan_kwargs = {k: v for k, v in gen_kwargs.items() if k in _PLAN_KEYS}
    cats = _synthetic().synthetic_categories(**plan_kwargs)
    return _info_from_dict({"categories": cats}, paths[f"{split}_json"]).metadata()


def _load_synth(name, split, root, subdir, gen_kwargs):
    paths = ensure_synthetic_dataset(root, subdir, **gen_kwargs)
    json_file = paths[f"{split}_json"]
    on_disk = lvis_category_info(json_file, name).metadata()
    meta = MetadataCatalog.get(name)
    # Safety net: metadata computed earlier in this process must describe the data now on disk.
    if any(meta.get(k) != on_disk[k] for k in ("thing_classes", "image_count", "instance_count")):
        raise ValueError(
            f"{json_file} does not match the metadata of dataset '{name}' (generated with other "
            f"parameters than {gen_kwargs or 'the defaults'}?); delete '{paths['out_dir']}' to "
            "regenerate it"
        )
    return _load_lvis_format(json_file, paths["image_root"])


def register_lvis_synth(
    root: Optional[str] = None,
    names: Sequence[str] = tuple(SYNTH_DATASETS),
    subdir: str = SYNTH_SUBDIR,
    **gen_kwargs,
) -> None:
    """Register the generated dataset's (train, val) under ``names``, data in ``root/subdir``.

    The data is generated (``generate_synthetic_lvis(**gen_kwargs)``) on the first load; metadata
    needs no generation. Registering again with the same arguments is a no-op.
    """
    # Absolute, so that a later chdir does not move the data away from the metadata.
    root = os.path.abspath(_datasets_root(root))
    paths = _synth_paths(root, subdir)
    json_abs_root = paths["image_root"]
    for name, split in zip(names, ("train", "val")):
        json_file = paths[f"{split}_json"]
        key = (os.path.abspath(json_file), json_abs_root)
        if _REGISTERED.get(name) == key:
            continue
        if name in _REGISTERED or name in DatasetCatalog.list():
            raise ValueError(f"Dataset '{name}' is already registered with other files")
        DatasetCatalog.register(
            name, functools.partial(_load_synth, name, split, root, subdir, dict(gen_kwargs))
        )
        _REGISTERED[name] = key
        _install_lazy_metadata(
            name,
            functools.partial(_synth_metadata, paths, split, dict(gen_kwargs)),
            json_file=key[0],
            image_root=json_abs_root,
            evaluator_type="lvis",
        )


_BUILTINS_DONE = False


def register_builtin_datasets(root: Optional[str] = None) -> None:
    """Register ``lvis_v1_{train,val}`` and ``lvis_synth_{train,val}`` (once; reads no file)."""
    global _BUILTINS_DONE
    if _BUILTINS_DONE:
        return
    root = _datasets_root(root)
    _register_lvis_v1(root)
    register_lvis_synth(root)
    _BUILTINS_DONE = True
