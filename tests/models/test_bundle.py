import json

import numpy as np
import pytest

from bonewatch.ingest import MURA_PARTS
from bonewatch.models.bundle import (
    BundleError,
    forget_bundle,
    load_bundle,
    read_manifest,
    write_manifest,
)
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
    from bonewatch.worker.settings import DEMO_BUNDLE

    manifest = read_manifest(DEMO_BUNDLE)
    assert "not for clinical use" in manifest.intended_use.lower()
    assert "phantom" in manifest.intended_use.lower()
    size = sum(p.stat().st_size for p in DEMO_BUNDLE.iterdir())
    assert size < 8 * 1024 * 1024


def test_manifest_lists_its_models_by_role(tiny_bundle):
    manifest = read_manifest(tiny_bundle)
    roles = list(manifest.models())
    assert roles[0] == "body_part"
    assert roles[1:] == [f"fracture_{part.lower()}" for part in MURA_PARTS]
    assert not manifest.has_onnx()


def test_manifest_is_replaced_whole(tmp_path):
    root = build_tiny_bundle(tmp_path / "b")
    data = json.loads((root / "manifest.json").read_text())
    data["version"] = "2"
    write_manifest(root, data)
    assert read_manifest(root).version == "2"
    assert sorted(p.name for p in root.iterdir() if p.name.startswith(".")) == []


def test_threads_after_tensorflow_started_keep_the_running_pools(tiny_bundle):
    from bonewatch.models.engines import InferenceThreads

    load_bundle(tiny_bundle)  # TensorFlow is running from here on
    forget_bundle(tiny_bundle)
    bundle = load_bundle(tiny_bundle, engine="keras", threads=InferenceThreads(1, 1))
    assert bundle.engine == "keras"
    assert bundle.body_part_model(np.zeros((1, 16, 16, 1), np.float32)).shape == (1, 8)


def test_warm_up_runs_every_model_once_per_batch_size(tiny_bundle):
    from bonewatch.models.bundle import Bundle
    from bonewatch.models.engines import Predictor

    loaded = load_bundle(tiny_bundle, engine="keras")
    calls: list[tuple[str, tuple[int, ...]]] = []

    class Counting(Predictor):
        def __init__(self, inner: Predictor, role: str) -> None:
            self.inner, self.role = inner, role

        def __call__(self, x: np.ndarray) -> np.ndarray:
            calls.append((self.role, x.shape))
            return self.inner(x)

    shared = Counting(loaded.fracture_models["HAND"], "shared")
    fracture = {p: Counting(m, p) for p, m in loaded.fracture_models.items()}
    fracture["FINGER"] = fracture["WRIST"] = shared  # one model serving two parts runs once
    bundle = Bundle(
        loaded.path, loaded.manifest, Counting(loaded.body_part_model, "body_part"), fracture
    )
    assert bundle.warm_up(4) > 0
    roles = sorted(role for role, _ in calls)
    assert roles == sorted(
        ["body_part", "shared", "ELBOW", "FOREARM", "HAND", "HUMERUS", "SHOULDER"]
    )
    spec = loaded.manifest.body_part.spec
    assert {shape for _, shape in calls} == {(4, spec.input_size, spec.input_size, spec.channels)}
    calls.clear()
    assert bundle.warm_up(4) == 0.0 and calls == []
    bundle.warm_up(2)
    assert len(calls) == 7
