"""The generated long-tailed LVIS-format dataset: a generator (a library: the demo, the configs'
``lvis_synth*`` datasets and the tests use it) and its registration as detectron2 datasets.

Modules, leaves first (each imports only those above it):

* :mod:`.render`: pixels: shapes, details, layout, exact visible polygons;
* :mod:`.families`: LVIS's long-tail structure (the ``"lvis"`` preset's fine-grained families);
* :mod:`.plan`: presets and the plan of every image (which objects, size, negatives), no pixels;
* :mod:`.generate`: plans -> images and LVIS-format jsons (:func:`generate_synthetic_lvis`);
* :mod:`.cache`: the generated dataset as registered detectron2 datasets, generated on first load.

The same seed and parameters always give byte-identical json and images. Command line:
``datasets/prepare_synthetic.py``; presets and rationale: docs/synthetic.md.
"""

from .cache import (
    SYNTH_DATASETS,
    SYNTH_SUBDIR,
    datasets_root,
    ensure_synthetic_dataset,
    register_lvis_synth,
    synth_paths,
)
from .generate import (
    GENERATOR_VERSION,
    IMAGES_DIR,
    LT_DATASETS,
    LT_SUBDIR,
    SPLIT_FOLDERS,
    TRAIN_JSON,
    URL_PREFIX,
    VAL_JSON,
    generate_synthetic_lvis,
    generation_params,
    plan_images,
    summarize,
    synthetic_categories,
)
from .plan import (
    DEFAULT_NUM_CLASSES,
    DEFAULT_NUM_TRAIN_IMAGES,
    DEFAULT_NUM_VAL_IMAGES,
    PRESETS,
    ImagePlan,
    class_styles,
    synthetic_styles,
)
from .render import (
    COLOURS,
    DETAILS,
    SHAPES,
    TEXTURES,
    RenderSpec,
    SyntheticClass,
    visible_polygons,
)

__all__ = [
    # pixels
    "SHAPES",
    "COLOURS",
    "TEXTURES",
    "DETAILS",
    "RenderSpec",
    "SyntheticClass",
    "visible_polygons",
    # plan
    "PRESETS",
    "DEFAULT_NUM_CLASSES",
    "DEFAULT_NUM_TRAIN_IMAGES",
    "DEFAULT_NUM_VAL_IMAGES",
    "ImagePlan",
    "class_styles",
    "synthetic_styles",
    "plan_images",
    # writing
    "GENERATOR_VERSION",
    "TRAIN_JSON",
    "VAL_JSON",
    "IMAGES_DIR",
    "SPLIT_FOLDERS",
    "URL_PREFIX",
    "LT_DATASETS",
    "LT_SUBDIR",
    "generate_synthetic_lvis",
    "generation_params",
    "summarize",
    "synthetic_categories",
    # registration
    "SYNTH_DATASETS",
    "SYNTH_SUBDIR",
    "datasets_root",
    "ensure_synthetic_dataset",
    "register_lvis_synth",
    "synth_paths",
]
