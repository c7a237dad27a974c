"""What a bundle says about itself, said wherever bonewatch speaks: a model that is not for
clinical use is named as such at start-up, above results, and on every picture it makes."""

from __future__ import annotations

from functools import cache
from pathlib import Path

from bonewatch.models.bundle import BundleError, read_manifest
from bonewatch.worker.settings import DEMO_BUNDLE, Settings

_NOT_CLINICAL = ("not for clinical use", "not for diagnostic use", "not a diagnostic device")


@cache
def _card(bundle_dir: Path) -> tuple[str, str, str]:
    """(name, version, intended use) of a bundle, or empty strings when it cannot be read."""
    try:
        manifest = read_manifest(bundle_dir)
    except BundleError:
        return "", "", ""
    return manifest.name, manifest.version, manifest.intended_use or ""


def is_not_for_clinical_use(intended_use: str) -> bool:
    text = " ".join(intended_use.lower().split())
    return any(phrase in text for phrase in _NOT_CLINICAL)


def not_for_clinical_use(bundle_name: str, settings: Settings) -> bool:
    """Whether results of ``bundle_name`` come from the shipped demo bundle, or from the
    configured bundle whose intended use says it is not for clinical use."""
    if bundle_name == _card(DEMO_BUNDLE.resolve())[0]:
        return True
    name, _, use = _card(Path(settings.bundle).resolve())
    return bundle_name == name and is_not_for_clinical_use(use)


def start_warning(settings: Settings) -> str | None:
    """The warning a serving command prints at start, or None for a clinical bundle."""
    name, version, use = _card(Path(settings.bundle).resolve())
    if not name:
        return None
    demo = Path(settings.bundle).resolve() == DEMO_BUNDLE.resolve()
    if not demo and not is_not_for_clinical_use(use):
        return None
    if demo:
        return (
            f"serving {name} {version}, the shipped demo bundle: it was trained on synthetic "
            "phantoms and is not for clinical use. Set BONEWATCH_BUNDLE to a bundle trained on "
            "real radiographs."
        )
    return f"serving {name} {version}: its model card says it is not for clinical use."
