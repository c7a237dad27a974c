"""ONNX exports of a bundle (models/onnx_export.py) and the ONNX Runtime engine."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from bonewatch.ingest import DecodedImage, ImageMeta
from bonewatch.models.bundle import BundleError, load_bundle, read_manifest, resolve_engine
from bonewatch.models.cascade import predict_probs, run_cascade
from bonewatch.models.engines import InferenceThreads, KerasPredictor, OnnxPredictor, cpu_pass_size
from bonewatch.models.onnx_export import PARITY_TOLERANCE, export_onnx, parity_inputs
from bonewatch.models.phantoms import OTHER_REGIONS, PARTS, draw_phantom
from tests.models.conftest import build_tiny_bundle

pytest.importorskip("onnxruntime")
pytest.importorskip("tf2onnx")

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def onnx_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = build_tiny_bundle(tmp_path_factory.mktemp("onnx") / "tiny")
    export_onnx(root)
    return root


def _phantom_images(
    n: int, seed: int = 11, *, invert: bool = True, size: int = 96
) -> list[DecodedImage]:
    rng = np.random.default_rng(seed)
    regions = [*PARTS, *OTHER_REGIONS]
    images = []
    for i in range(n):
        region = regions[i % len(regions)]
        ph = draw_phantom(region, fractured=region in PARTS and i % 2 == 1, rng=rng, size=size)
        # Inverted phantoms are bright: the tiny bundle reads those as ELBOW, dark ones `other`.
        pixels = 1.0 - ph.pixels if invert and i % 3 else ph.pixels
        meta = ImageMeta(path=f"phantom{i}.png", sha256=f"{i:064x}", size_bytes=0, format="png")
        images.append(DecodedImage(pixels=pixels.astype(np.float32), meta=meta))
    return images


def test_export_records_every_model_with_its_checksum(onnx_bundle):
    manifest = read_manifest(onnx_bundle)
    assert manifest.has_onnx()
    for entry in manifest.models().values():
        assert entry.onnx is not None
        data = (onnx_bundle / entry.onnx.file).read_bytes()
        assert hashlib.sha256(data).hexdigest() == entry.onnx.sha256
        assert entry.onnx.max_abs_diff <= PARITY_TOLERANCE
        assert entry.onnx.opset == 17
    raw = json.loads((onnx_bundle / "manifest.json").read_text())
    assert raw["onnx_export"]["library_versions"]["onnxruntime"]
    # The Keras weights and what they were trained on stay as they were.
    assert raw["body_part"]["weights"] == "body_part.keras"


def test_engines_agree_on_phantoms(onnx_bundle):
    images = _phantom_images(20)
    keras_preds = run_cascade(images, load_bundle(onnx_bundle, engine="keras"), batch_size=8)
    onnx_preds = run_cascade(images, load_bundle(onnx_bundle, engine="onnx"), batch_size=8)
    worst = 0.0
    for k, o in zip(keras_preds, onnx_preds, strict=True):
        assert (k.status, k.body_part, k.label) == (o.status, o.body_part, o.label)
        for label, p in k.body_part_probs.items():
            worst = max(worst, abs(p - o.body_part_probs[label]))
        if k.p_fracture is not None:
            assert o.p_fracture is not None
            worst = max(worst, abs(k.p_fracture - o.p_fracture))
    assert worst <= PARITY_TOLERANCE
    assert {p.status for p in keras_preds} == {"done", "unsupported"}


def test_raw_outputs_agree_for_every_batch_size(onnx_bundle):
    keras_bundle = load_bundle(onnx_bundle, engine="keras")
    onnx_bundle_ = load_bundle(onnx_bundle, engine="onnx")
    x = parity_inputs(read_manifest(onnx_bundle).body_part.spec)
    for n in (1, 3, len(x)):
        a = keras_bundle.body_part_model(x[:n])
        b = onnx_bundle_.body_part_model(x[:n])
        assert a.shape == b.shape == (n, 8)
        assert b.dtype == np.float64
        assert np.max(np.abs(a - b)) <= PARITY_TOLERANCE


def test_auto_serves_onnx_when_every_model_has_an_export(onnx_bundle, tiny_bundle):
    assert load_bundle(onnx_bundle).engine == "onnx"
    assert load_bundle(tiny_bundle).engine == "keras"
    assert resolve_engine(read_manifest(onnx_bundle), "keras") == "keras"


def test_onnx_engine_without_exports_says_how_to_add_them(tiny_bundle):
    with pytest.raises(BundleError, match="export-onnx"):
        load_bundle(tiny_bundle, engine="onnx")


def test_unknown_engine_is_refused(tiny_bundle):
    with pytest.raises(BundleError, match="unknown engine"):
        load_bundle(tiny_bundle, engine="tensorrt")


def test_tampered_onnx_model_is_refused(tmp_path, onnx_bundle):
    root = tmp_path / "b"
    shutil.copytree(onnx_bundle, root)
    with (root / "fracture_hand.onnx").open("ab") as fh:
        fh.write(b"tampered")
    with pytest.raises(BundleError, match="sha256"):
        load_bundle(root, engine="onnx")


def test_an_export_that_disagrees_is_not_added(tmp_path, monkeypatch):
    root = build_tiny_bundle(tmp_path / "b")
    before = (root / "manifest.json").read_text()
    monkeypatch.setattr("bonewatch.models.onnx_export.max_output_difference", lambda a, b: 0.5)
    with pytest.raises(BundleError, match="differs from the Keras model"):
        export_onnx(root)
    assert (root / "manifest.json").read_text() == before
    assert not list(root.glob("*.onnx")) and not list(root.glob(".*.tmp"))


def test_onnx_predictor_uses_the_given_threads(onnx_bundle):
    entry = read_manifest(onnx_bundle).body_part
    assert entry.onnx is not None
    predictor = OnnxPredictor(onnx_bundle / entry.onnx.file, InferenceThreads(1, 1))
    options = predictor.session.get_session_options()
    assert (options.intra_op_num_threads, options.inter_op_num_threads) == (1, 1)


class _CountingOnnx(OnnxPredictor):
    """The ONNX engine, noting how many images each forward pass gets."""

    def __init__(self, path: Path, threads: InferenceThreads) -> None:
        super().__init__(path, threads)
        self.passes: list[int] = []

    def __call__(self, x: np.ndarray) -> np.ndarray:
        self.passes.append(len(x))
        return super().__call__(x)


def test_a_batch_runs_in_passes_of_the_engine_size_with_the_same_outputs(onnx_bundle):
    entry = read_manifest(onnx_bundle).body_part
    assert entry.onnx is not None
    x = parity_inputs(entry.spec)[:10]
    whole = _CountingOnnx(onnx_bundle / entry.onnx.file, InferenceThreads(1, 1, forward_batch=16))
    on_cpu = _CountingOnnx(onnx_bundle / entry.onnx.file, InferenceThreads(1, 1))
    three = _CountingOnnx(onnx_bundle / entry.onnx.file, InferenceThreads(1, 1, forward_batch=3))
    expected = predict_probs(whole, x, batch_size=16)
    assert whole.passes == [10]
    # On the CPU, ONNX Runtime's own pass size unless one is set; never above the batch asked for.
    size = cpu_pass_size("onnx", on_cpu.input_shape)
    assert on_cpu.forward_batch == size >= 1
    np.testing.assert_allclose(
        predict_probs(on_cpu, x, batch_size=16), expected, atol=PARITY_TOLERANCE
    )
    assert on_cpu.passes == [min(size, 10 - i) for i in range(0, 10, size)]
    np.testing.assert_allclose(
        predict_probs(three, x, batch_size=16), expected, atol=PARITY_TOLERANCE
    )
    assert three.passes == [3, 3, 3, 1]
    three.passes.clear()
    predict_probs(three, x, batch_size=2)
    assert three.passes == [2] * 5


def test_keras_passes_follow_the_bundle_threads(onnx_bundle):
    bundle = load_bundle(onnx_bundle, engine="keras")
    model = bundle.body_part_model
    assert isinstance(model, KerasPredictor)
    assert model.forward_batch == cpu_pass_size("keras", model.model.input_shape)  # no GPU here
    assert KerasPredictor(model.model, forward_batch=2).pass_size(16) == 2
    assert KerasPredictor(model.model, forward_batch=32).pass_size(16) == 16


def test_cpu_passes_hold_a_budget_of_pixels():
    # DenseNet121 at 224 px: one image per ONNX Runtime pass, four per Keras pass
    assert cpu_pass_size("onnx", (None, 224, 224, 3)) == 1
    assert cpu_pass_size("keras", ("batch", 224, 224, 3)) == 4
    # the demo's 128 px CNN: the call overhead matters more, so more images per pass
    assert cpu_pass_size("onnx", (None, 128, 128, 1)) == 3
    assert cpu_pass_size("keras", (None, 128, 128, 1)) == 12
    assert cpu_pass_size("onnx", (None, 1024, 1024, 1)) == 1
    assert cpu_pass_size("onnx", (None, "h", "w", 1)) == 0  # sides not fixed: the whole batch


def test_onnx_engine_never_imports_tensorflow(onnx_bundle):
    code = (
        "import sys\n"
        "import numpy as np\n"
        "from bonewatch.models.bundle import load_bundle\n"
        f"b = load_bundle({str(onnx_bundle)!r}, engine='onnx')\n"
        "out = b.body_part_model(np.zeros((2, 16, 16, 1), np.float32))\n"
        "assert out.shape == (2, 8), out.shape\n"
        "print(sorted(m for m in ('tensorflow', 'keras') if m in sys.modules))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "[]"


@pytest.mark.slow
def test_demo_bundle_engines_agree_on_unseen_phantoms(tmp_path):
    from bonewatch.worker.settings import DEMO_BUNDLE

    root = tmp_path / "demo"
    shutil.copytree(DEMO_BUNDLE, root)
    if not read_manifest(root).has_onnx():
        export_onnx(root)
    images = _phantom_images(60, seed=424242, invert=False, size=512)
    keras_preds = run_cascade(images, load_bundle(root, engine="keras"))
    onnx_preds = run_cascade(images, load_bundle(root, engine="onnx"))
    deltas = [
        abs(k.p_fracture - o.p_fracture)
        for k, o in zip(keras_preds, onnx_preds, strict=True)
        if k.p_fracture is not None and o.p_fracture is not None
    ]
    assert len(deltas) > 30
    assert max(deltas) <= PARITY_TOLERANCE
    assert [k.body_part for k in keras_preds] == [o.body_part for o in onnx_preds]
