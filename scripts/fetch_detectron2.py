#!/usr/bin/env python
"""Make the pure-Python detectron2 v0.6 sdist (``pb1-detectron2==0.6``) buildable.

``scripts/install.sh`` downloads the sdist with ``pip download`` (the user's pip configuration
applies, and pip checks its sha256). Its Python files are the official v0.6 tag, but its C++ sources
(``layers/csrc``) are missing, so its setup.py cannot build as shipped. This script unpacks it and
rewrites setup.py so that:

* ``ext_modules`` is empty (no ``detectron2._C``; ``disalign_det.compat`` installs a stand-in where
  detectron2 has no compiled extension),
* the top-level ``tools`` folder is not installed as a package,
* the ``all`` extra that names a direct URL is dropped (pip refuses it).

Usage: ``python scripts/fetch_detectron2.py SDIST DEST_DIR`` prints the path of the patched source
tree.
"""

import os
import sys
import tarfile

SRC_DIR = "pb1-detectron2-0.6"


def patch_setup(setup_py):
    with open(setup_py) as f:
        text = f.read()
    replacements = [
        ("ext_modules=get_extensions(),", "ext_modules=[],"),
        (
            'find_packages(exclude=("configs", "tests*"))',
            'find_packages(exclude=("configs", "tests*", "tools", "tools.*"))',
        ),
        (
            '"panopticapi @ https://github.com/cocodataset/panopticapi/archive/master.zip",',
            "",
        ),
    ]
    for old, new in replacements:
        if old not in text:
            raise SystemExit(f"unexpected {setup_py}: cannot find {old!r}")
        text = text.replace(old, new)
    with open(setup_py, "w") as f:
        f.write(text)


def main():
    if len(sys.argv) != 3:
        raise SystemExit(f"usage: {sys.argv[0]} SDIST DEST_DIR")
    archive, dest = sys.argv[1], os.path.abspath(sys.argv[2])
    os.makedirs(dest, exist_ok=True)
    with tarfile.open(archive) as tar:
        tar.extractall(dest, filter="data")
    src = os.path.join(dest, SRC_DIR)
    patch_setup(os.path.join(src, "setup.py"))
    print(src)


if __name__ == "__main__":
    main()
