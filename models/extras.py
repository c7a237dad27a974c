"""What the ``[train]`` extra adds, and the one error for a command that needs it.

``pip install bonewatch`` serves: the bundle's ONNX files on ONNX Runtime or OpenVINO, heatmaps
from the ONNX graph's class activation output. TensorFlow and Keras come with
``pip install 'bonewatch[train]'``, for ``train``, ``bundle export-onnx``, the keras engine and
Keras Grad-CAM. This module never imports them; it only asks whether they could be imported.
"""

from __future__ import annotations

import importlib.util
from importlib.metadata import PackageNotFoundError, version

TRAIN_EXTRA = "train"
TRAIN_INSTALL = "pip install 'bonewatch[train]'"
# The distributions the extra adds, by import name.
TRAIN_MODULES = ("tensorflow", "keras")


class MissingExtra(ImportError):
    """A command or engine needs an optional extra that is not installed."""

    def __init__(self, what: str, extra: str = TRAIN_EXTRA, install: str = TRAIN_INSTALL) -> None:
        super().__init__(f"{what} needs the [{extra}] extra: {install}")
        self.what = what
        self.extra = extra


def _importable(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):  # a blocked or broken package
        return False


def train_available() -> bool:
    """Whether TensorFlow and Keras are installed (the ``[train]`` extra)."""
    return all(_importable(name) for name in TRAIN_MODULES)


def require_train(what: str) -> None:
    """Raise :class:`MissingExtra` naming ``what`` when the ``[train]`` extra is missing.

    Args:
        what: What needs it, as the message should start: ``"train"``, ``"the keras engine"``.
    """
    if not train_available():
        raise MissingExtra(what)


def installed_versions(*packages: str) -> dict[str, str]:
    """The installed version of each of ``packages`` that is installed."""
    versions = {}
    for package in packages:
        try:
            versions[package] = version(package)
        except PackageNotFoundError:
            continue
    return versions


__all__ = [
    "TRAIN_EXTRA",
    "TRAIN_INSTALL",
    "MissingExtra",
    "installed_versions",
    "require_train",
    "train_available",
]
