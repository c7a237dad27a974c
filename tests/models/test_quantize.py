"""int8 models (models/quantize.py), precisions and the OpenVINO engine (models/engines.py)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from bonewatch.models import quantize as quantize_module
from bonewatch.models.bundle import (
    LOAD_PARITY,
    BundleError,
    check_parity,
    forget_bundle,
    load_bundle,
    read_manifest,
    resolve_precision,
    sha256_of,
)
from bonewatch.models.datasets import load_dataset
from bonewatch.models.engines import InferenceThreads, OnnxPredictor, cpu_supports_bf16
from bonewatch.models.evaluate import evaluate_bundle
from bonewatch.models.onnx_export import export_onnx, max_output_difference, parity_inputs
from bonewatch.models.quantize import QuantizationRefused, quantize_bundle
from bonewatch.worker.synth import synthesize
from tests.models.conftest import build_tiny_bundle

pytest.importorskip("onnxruntime")
pytest.importorskip("tf2onnx")

REPO = Path(__file__).resolve().parents[2]
DEMO = REPO / "models" / "bundles" / "demo-phantom"


@pytest.fixture(scope="module")
def fp32_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = build_tiny_bundle(tmp_path_factory.mktemp("quantize") / "tiny")
    export_onnx(root)
    return root


def _phantoms(tmp_path: Path, studies: int, seed: int) -> Path:
    """Held-out phantom studies, written as `bonewatch bundle quantize` writes them."""
    folder = tmp_path / "heldout"
    synthesize(folder, studies=studies, fmt="png", seed=seed, split="valid")
    return folder


def _copy(src: Path, tmp_path: Path) -> Path:
    dst = tmp_path / src.name
    shutil.copytree(src, dst)
    return dst


def test_quantize_adds_int8_models_and_records_the_changes(fp32_bundle, tmp_path):
    root = _copy(fp32_bundle, tmp_path)
    heldout = _phantoms(tmp_path, 24, 90210)
    manifest, models, comparison = quantize_bundle(
        root, heldout=heldout, heldout_source="phantoms, seed 90210", calibration_images=16
    )
    assert manifest.has_int8()
    assert {m.role for m in models} == set(manifest.models())
    for entry in manifest.models().values():
        assert entry.int8 is not None
        assert sha256_of(root / entry.int8.file) == entry.int8.sha256
    data = json.loads((root / "manifest.json").read_text())
    recorded = data["quantization"]
    assert set(recorded["delta"]["cascade"]) == {
        "fracture_auroc_study",
        "kappa_study",
        "body_part_accuracy",
    }
    assert "body_part" in recorded["delta"]["per_model"]
    assert recorded["tolerance"] == {"fracture_auroc_study": 0.005, "body_part_accuracy": 0.005}
    assert recorded["delta"] == comparison["delta"]
    assert recorded["heldout"]["source"] == "phantoms, seed 90210"
    assert recorded["heldout"]["n_images"] == len(load_dataset(heldout))
    assert load_bundle(root, engine="onnx", precision="int8").precision == "int8"
    auto = load_bundle(root, engine="onnx", precision="auto")
    assert "onnx/int8" in {t.served_as for t in auto.trials if t.img_s}  # a candidate now
    assert load_bundle(root, engine="onnx", precision="fp32").precision == "fp32"


def test_the_cli_compares_on_phantoms_it_writes_itself(fp32_bundle, tmp_path):
    """`bundle quantize` without --heldout writes phantom studies of seed 90210 and hands the
    folder to models.quantize, which never draws them itself."""
    from typer.testing import CliRunner

    from bonewatch.worker.cli import app

    root = _copy(fp32_bundle, tmp_path)
    result = CliRunner().invoke(
        app,
        ["bundle", "quantize", str(root), "--heldout-studies", "20", "--calibration-images", "8"],
    )
    assert result.exit_code == 0, result.output
    assert "int8 model(s) recorded" in result.output
    heldout = read_manifest(root).model_dump()["quantization"]["heldout"]
    assert heldout["source"] == "phantoms, seed 90210" and heldout["n_images"] > 20


def test_quantize_refuses_over_the_tolerance_and_adds_nothing(fp32_bundle, tmp_path, monkeypatch):
    root = _copy(fp32_bundle, tmp_path)
    before = (root / "manifest.json").read_bytes()
    files = sorted(p.name for p in root.iterdir())

    def worse(*args, **kwargs):
        return {
            "fp32": {},
            "int8": {},
            "delta": {
                "cascade": {
                    "fracture_auroc_study": -0.02,
                    "kappa_study": -0.1,
                    "body_part_accuracy": 0.0,
                },
                "per_model": {},
            },
        }

    monkeypatch.setattr(quantize_module, "compare_cascades", worse)
    with pytest.raises(QuantizationRefused, match="fracture_auroc_study"):
        quantize_bundle(root, heldout=_phantoms(tmp_path, 20, 90210), calibration_images=8)
    assert (root / "manifest.json").read_bytes() == before
    assert sorted(p.name for p in root.iterdir()) == files


def test_precision_rules(fp32_bundle):
    manifest = read_manifest(fp32_bundle)
    assert resolve_precision(manifest, "onnx") == "fp32"  # no int8 models yet
    assert resolve_precision(manifest, "keras") == "fp32"
    with pytest.raises(BundleError, match="no int8"):
        resolve_precision(manifest, "onnx", "int8")
    with pytest.raises(BundleError, match="fp32 only"):
        resolve_precision(manifest, "keras", "int8")
    with pytest.raises(BundleError, match="openvino"):
        resolve_precision(manifest, "onnx", "bf16")
    with pytest.raises(BundleError, match="unknown precision"):
        resolve_precision(manifest, "onnx", "fp8")


def test_int8_that_strays_on_this_cpu_is_never_served(fp32_bundle, tmp_path, monkeypatch, caplog):
    """Int8 kernels differ between CPUs (without VNNI, x86 int8 sums can saturate). Each int8
    model is checked at load against fp32 and the gap `bundle quantize` recorded; one over it
    makes auto serve fp32, with the reason logged, and an explicit int8 a one-line refusal."""
    from bonewatch.models import bundle as bundle_module

    root = _copy(fp32_bundle, tmp_path)
    quantize_bundle(
        root,
        heldout=_phantoms(tmp_path, 20, 90210),
        calibration_images=8,
        tolerance_auroc=1.0,
        tolerance_accuracy=1.0,
    )
    forget_bundle(root)
    served = load_bundle(root, engine="onnx", precision="auto")
    assert {t.served_as for t in served.trials if t.img_s} == {"onnx/int8", "onnx/fp32"}

    forget_bundle(root)
    monkeypatch.setattr(bundle_module, "int8_slack", lambda recorded: -1.0)  # every gap over
    with caplog.at_level("WARNING", logger="bonewatch.models.bundle"):
        served = load_bundle(root, engine="onnx", precision="auto")
    assert served.served_as == "onnx/fp32"
    assert "differs from fp32" in caplog.text and "onnx/int8 is not served" in caplog.text
    assert [t.refused is not None for t in served.trials] == [False, True]
    forget_bundle(root)
    with pytest.raises(BundleError, match=r"differs from fp32 .* not served"):
        load_bundle(root, engine="onnx", precision="int8")
    forget_bundle(root)
    assert load_bundle(root, engine="onnx", precision="fp32").served_as == "onnx/fp32"


# --- the shipped demo bundle, which carries its int8 models ---------------------------------


def _demo_roles(bundle):
    roles = {"body_part": bundle.body_part_model}
    roles.update({f"fracture_{p.lower()}": m for p, m in bundle.fracture_models.items()})
    return roles


def test_demo_bundle_carries_int8_models_within_its_tolerance():
    manifest = read_manifest(DEMO)
    assert manifest.has_int8()
    recorded = manifest.model_dump()["quantization"]
    cascade, tolerance = recorded["delta"]["cascade"], recorded["tolerance"]
    assert -cascade["fracture_auroc_study"] <= tolerance["fracture_auroc_study"]
    assert -cascade["body_part_accuracy"] <= tolerance["body_part_accuracy"]


def test_openvino_fp32_matches_onnx_runtime_on_the_demo_bundle():
    pytest.importorskip("openvino")
    bundle = load_bundle(DEMO, engine="openvino", precision="fp32")
    assert bundle.served_as == "openvino/fp32"
    gaps = []
    for role, entry in read_manifest(DEMO).models().items():
        x = parity_inputs(entry.spec, seed=3)
        ref = OnnxPredictor(DEMO / entry.onnx.file, InferenceThreads())(x)
        gaps.append(max_output_difference(_demo_roles(bundle)[role](x), ref))
    print(f"openvino fp32 vs onnxruntime: max |dp| {max(gaps):.2e}")
    assert max(gaps) <= 1e-4


@pytest.mark.parametrize("engine", ["onnx", "openvino"])
def test_int8_cascade_stays_within_the_manifest_tolerance(engine, tmp_path):
    if engine == "openvino":
        pytest.importorskip("openvino")
    recorded = read_manifest(DEMO).model_dump()["quantization"]
    tolerance = recorded["tolerance"]
    samples = load_dataset(_phantoms(tmp_path, 120, 7357))
    fp32 = evaluate_bundle(samples, load_bundle(DEMO, engine="onnx"), bootstrap=None)
    int8 = evaluate_bundle(
        samples, load_bundle(DEMO, engine=engine, precision="int8"), bootstrap=None
    )
    d_auroc = int8["fracture_auroc_study"] - fp32["fracture_auroc_study"]
    d_acc = int8["body_part_accuracy"] - fp32["body_part_accuracy"]
    print(f"{engine} int8 vs fp32: d study AUROC {d_auroc:+.4f}, d body-part accuracy {d_acc:+.4f}")
    assert -d_auroc <= tolerance["fracture_auroc_study"]
    assert -d_acc <= tolerance["body_part_accuracy"]


def test_bf16_only_after_its_parity_check():
    pytest.importorskip("openvino")
    manifest = read_manifest(DEMO)
    if not cpu_supports_bf16():
        with pytest.raises(BundleError, match="bfloat16"):
            resolve_precision(manifest, "openvino", "bf16")
        return
    try:
        bundle = load_bundle(DEMO, engine="openvino", precision="bf16")
    except BundleError as exc:  # the check refused it: that is the check working
        assert "not served" in str(exc)
        return
    gap = check_parity(DEMO, manifest, _demo_roles(bundle), "bf16")
    print(f"openvino bf16 vs onnxruntime fp32: max |dp| {gap:.2e}")
    assert gap <= LOAD_PARITY["bf16"]
    assert np.isfinite(gap)


def test_the_calibration_reader_rewinds_to_the_first_image():
    from bonewatch.models.quantize import _Reader

    reader = _Reader("x", np.arange(6, dtype=np.float32).reshape(3, 2))
    first = [reader.get_next() for _ in range(4)]
    assert first[-1] is None
    reader.rewind()
    again = reader.get_next()
    assert again is not None and np.array_equal(again["x"], first[0]["x"])


# --- auto precision: the fastest candidate here that passes its parity check ----------------


def test_auto_serves_the_fastest_candidate_here_and_keeps_the_measurement(tmp_path, caplog):
    from bonewatch.models import choice

    forget_bundle(DEMO)
    cache = tmp_path / "cache"
    with caplog.at_level("INFO", logger="bonewatch.models.bundle"):
        bundle = load_bundle(DEMO, precision="auto", choice_cache=cache)
    trials = list(bundle.trials)
    print("auto on the demo bundle:", choice.describe(trials), "->", bundle.served_as)
    expected = set(choice.candidates(read_manifest(DEMO), "auto"))
    assert {(t.engine, t.precision) for t in trials} == expected
    assert ("onnx", "int8") in expected and ("onnx", "fp32") in expected
    rates = [t.img_s for t in trials if t.img_s is not None]
    assert rates == sorted(rates, reverse=True) and rates[0] > 0
    assert bundle.served_as == trials[0].served_as  # the fastest that passed
    assert f"auto chose {bundle.served_as}" in caplog.text

    kept = json.loads((cache / choice.CACHE_FILE).read_text())
    assert [t["img_s"] for t in next(iter(kept.values()))["trials"]] == [t.img_s for t in trials]
    forget_bundle(DEMO)
    caplog.clear()
    with caplog.at_level("INFO", logger="bonewatch.models.bundle"):
        again = load_bundle(DEMO, precision="auto", choice_cache=cache)
    assert "kept from an earlier measurement" in caplog.text
    assert again.served_as == bundle.served_as and list(again.trials) == trials
    forget_bundle(DEMO)


def test_auto_serves_the_stage_1_model_it_measured_without_loading_it_again(tmp_path, monkeypatch):
    from bonewatch.models import bundle as bundle_module
    from bonewatch.models import choice

    forget_bundle(DEMO)
    stage1 = read_manifest(DEMO).body_part
    loads: list[tuple[str, str]] = []
    real = bundle_module._load_onnx

    def counting(root, entry, threads, engine, precision):
        if entry == stage1:
            loads.append((engine, precision))
        return real(root, entry, threads, engine, precision)

    monkeypatch.setattr(bundle_module, "_load_onnx", counting)
    threads = InferenceThreads(1, streams=2)
    bundle = load_bundle(DEMO, precision="auto", threads=threads, choice_cache=tmp_path)
    candidates = choice.candidates(read_manifest(DEMO), "auto")
    assert sorted(loads) == sorted(candidates), loads  # once each, by the measurement alone
    assert (bundle.engine, bundle.precision) == (
        bundle.trials[0].engine,
        bundle.trials[0].precision,
    )
    forget_bundle(DEMO)


def test_auto_never_serves_a_candidate_whose_parity_check_failed(tmp_path, monkeypatch):
    from bonewatch.models import bundle as bundle_module

    forget_bundle(DEMO)
    monkeypatch.setattr(bundle_module, "int8_slack", lambda recorded: -1.0)  # every int8 over
    bundle = load_bundle(DEMO, precision="auto", choice_cache=tmp_path)
    assert bundle.precision != "int8"
    refused = [t for t in bundle.trials if t.refused is not None]
    assert {t.precision for t in refused} == {"int8"} and len(refused) >= 1
    assert all("differs from fp32" in t.refused for t in refused)
    assert bundle.trials[-len(refused) :] == tuple(refused)  # ranked after every served one
    forget_bundle(DEMO)


def test_the_choice_is_measured_again_on_other_threads():
    from bonewatch.models.choice import cache_key

    pairs = [("onnx", "fp32"), ("onnx", "int8")]
    one = cache_key("d" * 64, pairs, lambda e: InferenceThreads(streams=1))
    two = cache_key("d" * 64, pairs, lambda e: InferenceThreads(streams=2))
    other_bundle = cache_key("e" * 64, pairs, lambda e: InferenceThreads(streams=1))
    assert len({one, two, other_bundle}) == 3
    assert one == cache_key("d" * 64, pairs, lambda e: InferenceThreads(streams=1))


def test_openvino_runs_each_inference_stream_on_its_own_cores():
    """Compiled with one stream of one thread, two inference streams took turns on one core."""
    pytest.importorskip("openvino")
    from bonewatch.models.engines import OpenVinoPredictor

    entry = read_manifest(DEMO).body_part
    predictor = OpenVinoPredictor(DEMO / entry.onnx.file, InferenceThreads(1, streams=2))
    assert int(predictor.compiled.get_property("NUM_STREAMS")) == 2
    assert int(predictor.compiled.get_property("INFERENCE_NUM_THREADS")) == 2
    # the decode threads share these cores: OpenVINO's threads are not pinned to them
    assert str(predictor.compiled.get_property("ENABLE_CPU_PINNING")) in ("False", "false", "0")
