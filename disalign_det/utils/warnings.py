"""Quiet console for the tools: hide known third-party deprecation noise, keep our own warnings.

A user running ``tools/demo.py`` or ``tools/train_net.py`` used to see a wall of warnings from
libraries (``torch.jit.script`` deprecated, repeated at every start; ``torch.meshgrid``'s indexing
argument; numpy 2's ``__array__`` copy keyword in pycocotools; fvcore/iopath deprecations) before
anything of ours. Each filter below names the module the warning is attributed to, its category
and (where one library warns for several reasons) its message, so any other warning, and every
warning of ``disalign_det`` or of the user's code, still shows.

The filters are installed by the tools' entry points only, never by ``import disalign_det`` for a
library user: a tool sets ``DISALIGN_QUIET_WARNINGS=1`` before importing ``disalign_det`` (the
warnings in question are emitted while detectron2 is imported, so the filters must be in place
first), and ``disalign_det/__init__.py`` calls :func:`install_from_env` as its first statement.
``DISALIGN_QUIET_WARNINGS=0`` shows everything again. The variable is inherited, so the
``train_net.py`` processes ``tools/demo.py`` starts are quiet too.
"""

import os
import warnings

__all__ = ["ENV_VAR", "THIRD_PARTY_FILTERS", "install", "install_from_env"]

ENV_VAR = "DISALIGN_QUIET_WARNINGS"

# (category, module regex, message regex): matched as by ``warnings.filterwarnings`` (module: the
# whole name of the module the warning is attributed to; message: from its start).
THIRD_PARTY_FILTERS = (
    # torch >= 2.9: every @torch.jit.script at import time of detectron2/fvcore (9 at each start),
    # and torch.jit.trace / load of the export tool.
    (FutureWarning, r"torch\.jit\.\w+", r"`torch\.jit\.\w+` is deprecated"),
    # detectron2's anchor generator calls torch.meshgrid without `indexing`.
    (UserWarning, r"torch\.functional", r"torch\.meshgrid: in an upcoming release"),
    # pycocotools' mask encoding under numpy 2 (once per evaluated image).
    (DeprecationWarning, r"pycocotools(\..*)?", r"__array__ implementation doesn't accept a copy"),
    # fvcore / iopath deprecations of their own APIs that detectron2 still calls.
    (DeprecationWarning, r"(fvcore|iopath)(\..*)?", r""),
    (FutureWarning, r"(fvcore|iopath)(\..*)?", r""),
)

_INSTALLED = False


def install():
    """Add :data:`THIRD_PARTY_FILTERS` to the process's warning filters (idempotent)."""
    global _INSTALLED
    if _INSTALLED:
        return
    for category, module, message in THIRD_PARTY_FILTERS:
        warnings.filterwarnings("ignore", message=message, category=category, module=module)
    _INSTALLED = True


def install_from_env():
    """:func:`install` if ``DISALIGN_QUIET_WARNINGS`` is set to a true value (``1``, ``true``,
    ``yes``). Returns whether the filters are installed."""
    if os.environ.get(ENV_VAR, "").strip().lower() in ("1", "true", "yes"):
        install()
    return _INSTALLED
