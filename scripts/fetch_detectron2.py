#!/usr/bin/env python
"""Fetch the pure-Python detectron2 v0.6 sdist (``pb1-detectron2==0.6``) and make it buildable.

The sdist's Python files are the official v0.6 tag, but its C++ sources (``layers/csrc``) are
missing, so its setup.py cannot build as shipped. This script downloads it from the package index
(checking its sha256), unpacks it and rewrites setup.py so that:

* ``ext_modules`` is empty (no ``detectron2._C``; see ``disalign_det/compat.py`` for the stand-in),
* the top-level ``tools`` folder is not installed as a package,
* the ``all`` extra that names a direct URL is dropped (pip refuses it).

Usage: ``python scripts/fetch_detectron2.py DEST_DIR`` prints the path of the patched source tree.
"""

import hashlib
import os
import re
import sys
import tarfile
import urllib.request

NAME = "pb1-detectron2"
FILENAME = "pb1-detectron2-0.6.tar.gz"
SHA256 = "5d2e9e51e523ec72f6a31cca04b0a515492e9514b773a3d134cedc0677170b29"


def _index_url():
    return os.environ.get("PIP_INDEX_URL", "https://pypi.org/simple").rstrip("/")


def download(dest):
    path = os.path.join(dest, FILENAME)
    if os.path.isfile(path) and _sha256(path) == SHA256:
        return path
    page_url = f"{_index_url()}/{NAME}/"
    html = urllib.request.urlopen(page_url, timeout=120).read().decode()
    links = re.findall(r'href="([^"]+)"', html)
    links = [link for link in links if FILENAME in link]
    if not links:
        raise SystemExit(f"{FILENAME} is not listed at {page_url}")
    url = urllib.parse.urljoin(page_url, links[0].split("#")[0])
    tmp = path + ".part"
    with urllib.request.urlopen(url, timeout=300) as r, open(tmp, "wb") as f:
        f.write(r.read())
    digest = _sha256(tmp)
    if digest != SHA256:
        os.remove(tmp)
        raise SystemExit(f"sha256 mismatch for {url}: {digest} != {SHA256}")
    os.replace(tmp, path)
    return path


def _sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def patch_setup(setup_py):
    text = open(setup_py).read()
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
    dest = os.path.abspath(sys.argv[1] if len(sys.argv) > 1 else ".")
    os.makedirs(dest, exist_ok=True)
    archive = download(dest)
    with tarfile.open(archive) as tar:
        tar.extractall(dest, filter="data")
    src = os.path.join(dest, "pb1-detectron2-0.6")
    patch_setup(os.path.join(src, "setup.py"))
    print(src)


if __name__ == "__main__":
    main()
