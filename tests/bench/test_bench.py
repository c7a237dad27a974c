"""``bonewatch bench`` (bench/): it runs end to end and reports every figure."""

from __future__ import annotations

import hashlib
import json
import sys

import pydicom
import pytest
from typer.testing import CliRunner

from bonewatch.bench import (
    REPORT_KEYS,
    BenchConfig,
    distributed_unavailable,
    run_bench,
    run_child,
    run_rss_track,
    write_phantoms,
)
from bonewatch.ingest import parse_mura_path, read_header
from bonewatch.models.engines import (
    cpu_pass_size,
    cpu_supports_bf16,
    default_streams,
    openvino_available,
)
from bonewatch.worker.cli import app

pytest.importorskip("onnxruntime")


def _bench(tmp_path, *extra: str) -> dict:
    result = CliRunner().invoke(
        app,
        [
            "bench",
            "--images",
            "8",
            "--backbone",
            "small_cnn",
            "--input-size",
            "64",
            "--image-size",
            "160",
            "--format",
            "json",
            # keep it quick and hermetic: few files to register, no Celery workers
            "--register-files",
            "100",
            "--seed-style-images",
            "4",
            "--distributed-workers",
            "0",
            "--work-dir",
            str(tmp_path / "work"),
            *extra,
        ],
    )
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_bench_reports_every_figure(tmp_path):
    report = _bench(tmp_path, "--repeats", "1")
    assert set(REPORT_KEYS) <= set(report)
    assert report["engine"] in ("onnx", "openvino")
    assert report["input"] == "png" and report["image_px"] == 160
    for key in (
        "bare_img_s",
        "seed_style_img_s",
        "embedded_img_s",
        "embedded_vs_bare",
        "embedded_vs_seed_style",
        "peak_rss_mb",
        "register_files_s",
        "decode_img_s",
        "decode_full_img_s",
        "decode_processes_img_s",
        "decode_one_thread_img_s",
        "embedded_bound_img_s",
        "embedded_vs_bound",
    ):
        assert isinstance(report[key], float) and report[key] > 0, key
    assert report["distributed_img_s"] is None and report["distributed_runs_img_s"] == []
    assert "skipped" in report["distributed_note"]
    # The chosen engine and precision are the worker's auto: the fastest stage 1 measured here
    # among every ONNX engine and precision that passed its parity check.
    trials = report["auto_trials"]
    served = [t for t in trials if t["img_s"] is not None]
    assert (report["engine"], report["precision"]) == (served[0]["engine"], served[0]["precision"])
    assert [t["img_s"] for t in served] == sorted((t["img_s"] for t in served), reverse=True)
    rows = {(r["engine"], r["precision"]): r for r in report["by_engine_precision"]}
    expected = {("keras", "fp32"), ("onnx", "fp32"), ("onnx", "int8")}
    if openvino_available():
        expected |= {("openvino", "fp32"), ("openvino", "int8")}
    if cpu_supports_bf16():
        expected.add(("openvino", "bf16"))
    else:
        assert any("bf16" in note for note in report["precision_notes"])
    assert expected <= set(rows)
    assert {(t["engine"], t["precision"]) for t in trials} == expected - {("keras", "fp32")}
    for (engine, precision), row in rows.items():
        assert row["bare_img_s"] > 0 and row["embedded_img_s"] > 0, (engine, precision)
        # Every variant went through `bonewatch process` (medians of two: the J2K test).
        runs = report["embedded_runs_img_s"][f"{engine}-{precision}"]
        assert len(runs) == 1 and row["embedded_img_s"] == pytest.approx(runs[0], abs=0.01)
        assert len(report["bare_runs_img_s"][f"{engine}-{precision}"]) == 1
    chosen = rows[(report["engine"], report["precision"])]
    assert report["bare_img_s"] == chosen["bare_img_s"]
    assert report["embedded_img_s"] == chosen["embedded_img_s"]
    best_int8 = max(r["embedded_img_s"] for r in rows.values() if r["precision"] == "int8")
    assert report["int8_vs_fp32_embedded"] == pytest.approx(
        best_int8 / rows[("onnx", "fp32")]["embedded_img_s"], rel=0.02
    )
    # The figures by engine stay each engine's fp32 ones.
    assert set(report["bare_img_s_by_engine"]) >= {"keras", "onnx"}
    assert report["bare_img_s_by_engine"]["onnx"] == rows[("onnx", "fp32")]["bare_img_s"]
    assert report["embedded_img_s_by_engine"]["keras"] == rows[("keras", "fp32")]["embedded_img_s"]
    assert report["onnx_vs_keras_embedded"] == pytest.approx(
        report["embedded_img_s_by_engine"]["onnx"] / report["embedded_img_s_by_engine"]["keras"],
        rel=0.02,
    )
    assert len(report["seed_style_runs_img_s"]) == 1
    assert report["embedded_vs_bare"] == pytest.approx(
        report["embedded_img_s"] / report["bare_img_s"], rel=0.02
    )
    # The shared-core bound: each image's bare core time plus one thread's decode, on every core.
    cores, decode = report["machine"]["cores"], report["decode_one_thread_img_s"]
    for row in rows.values():
        bound = cores / (cores / row["bare_img_s"] + 1 / decode)
        assert row["bound_img_s"] == pytest.approx(bound, rel=0.02) and bound < row["bare_img_s"]
        assert row["embedded_vs_bound"] == pytest.approx(row["embedded_img_s"] / bound, rel=0.02)
    assert report["embedded_bound_img_s"] == chosen["bound_img_s"]
    # Every image reached stage 2: one group per batch here (all from the same part's folder
    # or not, the random stage 1 has to pick a part, never `other`).
    assert report["stage2_groups_per_batch"] >= 1
    # A worker process with a model loaded: more than an empty interpreter, far less than 8 GB.
    assert 50 < report["peak_rss_mb"] < 8000
    assert report["machine"]["cores"] >= 1
    # Bare passes and worker runs use each engine's own streams and threads.
    threads = report["threads_by_engine"]
    assert threads["keras"]["streams"] == 1
    side = report["input_size"]
    for name in ("keras", "onnx"):
        assert threads[name]["forward_batch"] == cpu_pass_size(name, (None, side, side, 1))
    assert threads["onnx"]["streams"] == default_streams("onnx")
    assert threads["onnx"]["intra_op"] * threads["onnx"]["streams"] <= max(
        report["machine"]["cores"], threads["onnx"]["streams"]
    )
    assert report["threads"] == threads[report["engine"]]


def test_bench_on_jpeg2000_dicom_decodes_reduced(tmp_path):
    report = _bench(
        tmp_path, "--input", "dicom-j2k", "--image-size", "320", "--one-engine", "--repeats", "2"
    )
    assert report["input"] == "dicom-j2k"
    images = sorted((tmp_path / "work" / "images").rglob("*.dcm"))
    assert len(images) == 8
    meta = read_header(images[0], salt="t")
    assert meta.transfer_syntax == "1.2.840.10008.1.2.4.90"
    assert (meta.rows, meta.columns, meta.bits_stored) == (320, 320, 12)
    # --one-engine: the chosen engine and precision only.
    assert [(r["engine"], r["precision"]) for r in report["by_engine_precision"]] == [
        (report["engine"], report["precision"])
    ]
    # The worker decodes them at 1/2: the smallest JPEG 2000 level covering twice the input.
    assert report["decode_min_side"] == 64 and report["decoded_px"] == 160
    assert report["decode_img_s"] > 0 and report["decode_full_img_s"] > 0
    assert report["decode_processes_img_s"] > 0
    assert report["embedded_img_s"] > 0 and report["embedded_vs_bare"] > 0
    # Two runs of each figure; the report has their medians.
    runs = report["embedded_runs_img_s"][f"{report['engine']}-{report['precision']}"]
    assert len(runs) == 2 and all(r > 0 for r in runs)
    assert report["embedded_img_s"] == pytest.approx(sum(runs) / 2, abs=0.01)
    assert len(report["seed_style_runs_img_s"]) == 2


def test_phantoms_are_distinct_files_in_mura_layout(tmp_path):
    paths = write_phantoms(tmp_path, 14, px=64, distinct=3)
    assert len(paths) == 14
    assert len({hashlib.sha256(p.read_bytes()).hexdigest() for p in paths}) == 14
    parsed = [parse_mura_path(p) for p in paths]
    assert all(info is not None and info["mura_part"] for info in parsed)


def test_dicom_phantoms_written_again_with_another_seed_are_other_instances(tmp_path):
    # The distributed figure writes fresh phantoms into one shared ledger on every run: with
    # the same UIDs they were all SOP duplicates of the run before.
    def uids(folder, seed):
        paths = write_phantoms(folder, 3, px=64, seed=seed, input_format="dicom")
        return {str(pydicom.dcmread(p).SOPInstanceUID) for p in paths}

    first = uids(tmp_path / "run", 1)
    assert len(first) == 3
    assert not first & uids(tmp_path / "run", 2)  # same paths, another seed
    assert uids(tmp_path / "run", 1) == first  # the same set again is the same instances


def test_child_peak_memory_is_its_own(tmp_path):
    command = [
        sys.executable,
        "-c",
        "import time; block = bytearray(300 * 2**20); time.sleep(1.5)",
    ]
    run = run_child(command, {}, tmp_path / "child.log", tick_s=0.1)
    assert run.returncode == 0
    assert run.max_rss_mb is not None and 300 < run.max_rss_mb < 600


def test_a_failing_child_is_reported(tmp_path):
    run = run_child(
        [sys.executable, "-c", "import sys; print('boom'); sys.exit(3)"], {}, tmp_path / "c.log"
    )
    assert run.returncode == 3
    assert "boom" in run.tail()


def test_distributed_figure_says_why_it_is_missing():
    assert "skipped" in (distributed_unavailable(BenchConfig(distributed_workers=0)) or "")
    why = distributed_unavailable(BenchConfig(broker_url="redis://127.0.0.1:1/0"))
    assert why is not None and ("not installed" in why or "not reachable" in why)


def test_rss_track_needs_more_images_than_its_checkpoint(tmp_path):
    with pytest.raises(ValueError, match="more than 1000"):
        run_rss_track(BenchConfig(images=500), work_dir=tmp_path)


@pytest.mark.slow
def test_rss_track_samples_memory_against_images_done(tmp_path):
    config = BenchConfig(images=1300, backbone="small_cnn", input_size=32, image_px=64)
    report = run_rss_track(config, work_dir=tmp_path)
    assert report["rss_mb_after_checkpoint"] > 0 and report["rss_mb_end"] > 0
    assert report["samples"][-1][0] <= 1300
    assert isinstance(report["rss_flat"], bool)
    # What served, as the predictions record it, whatever auto chose.
    assert len(report["served"]) == 1 and report["served"][0].count("/") == 1


@pytest.mark.slow
def test_distributed_figure_through_celery(tmp_path, pg_url, redis_url):
    pytest.importorskip("bonewatch.worker.distributed")
    config = BenchConfig(
        images=8,
        backbone="small_cnn",
        input_size=32,
        seed_style_images=2,
        register_files=50,
        broker_url=redis_url,
        distributed_database_url=pg_url,
        repeats=1,
        compare_engines=False,
        engine="onnx",
        precision="fp32",
        scale_workers=(1, 2),
    )
    report = run_bench(config, work_dir=tmp_path)
    assert report["distributed_note"] is None
    assert isinstance(report["distributed_img_s"], float) and report["distributed_img_s"] > 0
    scaling = report["distributed_scaling"]
    assert [row["workers"] for row in scaling] == [1, 2]
    assert all(row["img_s"] > 0 and len(row["runs_img_s"]) == 1 for row in scaling)
    # The figure runs as many processes as `bonewatch worker` starts for the engine, and is that
    # count's scaling row, not a third run.
    assert report["distributed_workers"] == default_streams(report["engine"])
    row = next(r for r in scaling if r["workers"] == report["distributed_workers"])
    assert report["distributed_img_s"] == row["img_s"]
    assert report["distributed_runs_img_s"] == row["runs_img_s"]
    assert scaling[0]["vs_first"] == 1.0


@pytest.mark.parametrize("value", ["0,1", "one", ","])
def test_scale_workers_must_be_counts(value):
    result = CliRunner().invoke(app, ["bench", "--scale-workers", value])
    assert result.exit_code == 2
    assert "worker counts" in result.output
