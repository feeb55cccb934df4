"""Dataset metadata whose class fields are computed on first access.

Registering the built-in datasets must read no json at import (LVIS train is ~1 GB, and the
synthetic data may not be generated yet); their class lists, buckets and counts are filled from the
json (or the generator's parameters) the first time one of them is read.
"""

from typing import Callable, Dict

from detectron2.data import MetadataCatalog
from detectron2.data.catalog import Metadata

__all__ = ["LAZY_KEYS", "LazyLVISMetadata", "install_lazy_metadata"]

LAZY_KEYS = frozenset(
    ("thing_classes", "class_frequency", "class_image_count", "image_count", "instance_count")
)
# name -> function returning the lazy fields; dropped once it has run.
_LAZY_LOADERS: Dict[str, Callable[[], dict]] = {}


class LazyLVISMetadata(Metadata):
    """Metadata whose class fields (``LAZY_KEYS``) are computed on first access. Everything else
    behaves like detectron2's Metadata."""

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
        if key in LAZY_KEYS:
            self._load_lazy()
            if key in self.__dict__:
                return self.__dict__[key]
        return super().__getattr__(key)

    def __setattr__(self, key, val):
        # Setting a field that is still lazy must not trigger a (possibly huge) json read.
        if key in LAZY_KEYS and key not in self.__dict__ and self.name in _LAZY_LOADERS:
            object.__setattr__(self, key, val)
            return
        super().__setattr__(key, val)

    def as_dict(self):
        self._load_lazy()
        return super().as_dict()


def install_lazy_metadata(name: str, loader: Callable[[], dict], **eager) -> Metadata:
    """Replace ``MetadataCatalog[name]`` by a :class:`LazyLVISMetadata` keeping its fields, with
    ``eager`` fields set now and ``loader()`` giving the ``LAZY_KEYS`` fields on first access."""
    old = MetadataCatalog.get(name)
    fields = dict(old.__dict__)
    fields.update(eager)
    fields["name"] = name
    meta = LazyLVISMetadata(**fields)
    MetadataCatalog[name] = meta
    _LAZY_LOADERS[name] = loader
    return meta
