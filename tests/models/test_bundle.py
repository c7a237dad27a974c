import json

import pytest

from ingest import MURA_PARTS
from models.bundle import BundleError, load_bundle, read_manifest
from tests.models.conftest import build_tiny_bundle


def test_load_once_per_process(tiny_bundle):
    assert load_bundle(tiny_bundle) is load_bundle(str(tiny_bundle))


def test_manifest_lists_every_part(tiny_bundle):
    manifest = read_manifest(tiny_bundle)
    assert manifest.parts() == list(MURA_PARTS)


def test_tampered_weights_are_refused(tmp_path):
    root = build_tiny_bundle(tmp_path / "b")
    with (root / "fracture_wrist.keras").open("ab") as fh:
        fh.write(b"tampered")
    with pytest.raises(BundleError, match="sha256"):
        load_bundle(root)


def test_missing_fracture_model_is_named(tmp_path):
    root = build_tiny_bundle(tmp_path / "b")
    data = json.loads((root / "manifest.json").read_text())
    del data["fracture"]["HAND"]
    (root / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(BundleError, match="HAND"):
        read_manifest(root)


def test_not_a_bundle(tmp_path):
    with pytest.raises(BundleError, match="manifest.json not found"):
        read_manifest(tmp_path)


def test_shipped_demo_bundle_says_it_is_not_for_clinical_use():
    from worker.settings import DEMO_BUNDLE

    manifest = read_manifest(DEMO_BUNDLE)
    assert "not for clinical use" in manifest.intended_use.lower()
    assert "phantom" in manifest.intended_use.lower()
    size = sum(p.stat().st_size for p in DEMO_BUNDLE.iterdir())
    assert size < 8 * 1024 * 1024
