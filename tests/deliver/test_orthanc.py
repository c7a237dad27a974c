"""Results delivered to a real PACS: Orthanc (Debian package ``orthanc``, with
``orthanc-dicomweb`` for STOW-RS) on loopback ports."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import highdicom as hd
import pydicom
import pytest

from bonewatch.deliver import codes as bw
from tests.deliver.pacs import Orthanc, base_env, outbox_rows, run, status, synth

pytestmark = pytest.mark.slow


def _reports(datasets: list[pydicom.Dataset], folder: Path) -> list[hd.sr.ComprehensiveSR]:
    out = []
    for n, ds in enumerate(d for d in datasets if d.Modality == "SR"):
        path = folder / f"sr{n}.dcm"
        ds.save_as(path, enforce_file_format=True)
        out.append(hd.sr.srread(path))
    return out


def _probabilities(report: hd.sr.ComprehensiveSR) -> dict[str, float]:
    """p(fracture) by referenced source SOP instance, as the SR holds them."""
    groups = [g for g in report.content.get_image_measurement_groups() if g.source_images]
    return {
        g.source_images[0].referenced_sop_instance_uid: float(
            g.get_measurements(name=bw.P_FRACTURE)[0].value
        )
        for g in groups
    }


def test_results_reach_orthanc_once_across_a_pacs_restart(orthanc: Orthanc, tmp_path: Path) -> None:
    env = base_env(
        tmp_path / "data",
        dicom_destinations=orthanc.destination,
        send_timeout="10",
        send_retries="20",
    )
    inbox = tmp_path / "in"
    sources = synth(inbox, 4, env)
    study_uids = {str(ds.StudyInstanceUID) for ds in sources.values()}

    # The PACS is down while `process` runs: it tries for BONEWATCH_SEND_TIMEOUT, exits 0, and
    # the objects stay pending.
    orthanc.stop()
    result = run(["process", str(inbox)], env)
    assert result.returncode == 0, result.stdout + result.stderr
    pending = status(env)
    assert pending["pending"] > 0 and pending["sent"] == 0, pending
    rows = outbox_rows(tmp_path / "data")
    assert all(r["attempts"] >= 1 and "no association" in r["last_error"] for r in rows), rows

    orthanc.start()
    result = run(["send"], env)
    assert result.returncode == 0, result.stdout + result.stderr
    again = run(["send"], env)  # nothing left: sends nothing twice
    assert again.returncode == 0 and "sent 0" in again.stdout, again.stdout
    counts = status(env)
    print("outbox after the PACS restart:", json.dumps(counts))
    assert counts == {"pending": 0, "sent": pending["pending"], "failed": 0}

    datasets = orthanc.datasets(tmp_path / "back")
    assert len(datasets) == counts["sent"]  # each object once
    assert {str(ds.SOPInstanceUID) for ds in datasets} == {r["sop_instance_uid"] for r in rows}
    reports = _reports(datasets, tmp_path)
    assert len(reports) == len(study_uids)
    for ds in datasets:
        assert ds.StudyInstanceUID in study_uids  # filed in the source's study
        source = sources[
            ds.SourceImageSequence[0].ReferencedSOPInstanceUID
            if ds.Modality != "SR"
            else ds.CurrentRequestedProcedureEvidenceSequence[0]
            .ReferencedSeriesSequence[0]
            .ReferencedSOPSequence[0]
            .ReferencedSOPInstanceUID
        ]
        assert ds.StudyInstanceUID == source.StudyInstanceUID
        assert ds.PatientID == source.PatientID
        if ds.Modality != "SR":
            assert ds.BurnedInAnnotation == "YES"
    # the SR read back holds each image's probability, as the ledger has it
    scores = {
        str(r["sop_instance_uid"]): float(r["p_fracture"])
        for r in json.loads(run(["results", "--format", "json"], env).stdout)
        if r.get("p_fracture") is not None
    }
    for report in reports:
        held = _probabilities(report)
        assert held and set(held) <= set(sources)
        for sop, p in held.items():
            assert p == pytest.approx(scores[sop], abs=1e-6)


def test_stow_rs_to_orthanc_dicomweb_files_the_objects_in_their_studies(
    orthanc_web: Orthanc, tmp_path: Path
) -> None:
    from dicomweb_client.api import DICOMwebClient

    env = base_env(tmp_path / "data", dicomweb_url=orthanc_web.dicomweb_url)
    inbox = tmp_path / "in"
    sources = synth(inbox, 3, env, seed=11)
    result = run(["process", str(inbox)], env)
    assert result.returncode == 0, result.stdout + result.stderr
    counts = status(env)
    assert counts["pending"] == counts["failed"] == 0 and counts["sent"] > 0, (
        result.stdout + result.stderr
    )
    rows = outbox_rows(tmp_path / "data")
    assert {r["destination"] for r in rows} == {orthanc_web.dicomweb_url}

    # read back through DICOMweb itself (QIDO-RS), study by study
    client = DICOMwebClient(url=orthanc_web.dicomweb_url)
    for study in {str(ds.StudyInstanceUID) for ds in sources.values()}:
        found = client.search_for_instances(study_instance_uid=study)
        held = {pydicom.Dataset.from_json(item).SOPInstanceUID for item in found}
        expected = {r["sop_instance_uid"] for r in rows if r["study_uid"] == study}
        assert expected and expected <= held  # the SR and SCs sit in the source's study
        assert len(expected & held) == len(expected)
    # and nothing else arrived: only the result objects were sent, never the originals
    assert len(orthanc_web.instances()) == len(rows)


def _bundle_version(tmp_path: Path, version: str) -> Path:
    """The demo bundle under another version (the same weights)."""
    from bonewatch.worker.settings import Settings

    copy = tmp_path / f"bundle-{version}"
    shutil.copytree(Settings().bundle, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["version"] = version
    (copy / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return copy


def _processed(orthanc: Orthanc, tmp_path: Path, studies: int, *, seed: int) -> dict[str, str]:
    """``studies`` synthetic studies processed (and sent to ``orthanc``) at once; their env."""
    env = base_env(
        tmp_path / "data", dicom_destinations=orthanc.destination, study_stable_seconds="0"
    )
    inbox = tmp_path / "in"
    synth(inbox, studies, env, seed=seed)
    assert run(["process", str(inbox)], env).returncode == 0
    return env


def test_a_new_bundle_version_makes_new_objects_and_the_old_stay(
    orthanc: Orthanc, tmp_path: Path
) -> None:
    env = _processed(orthanc, tmp_path, 2, seed=5)
    first = {str(ds.SOPInstanceUID): ds for ds in orthanc.datasets(tmp_path / "v1")}
    assert first and status(env)["sent"] == len(first)

    newer = _bundle_version(tmp_path, "1.1.0")
    result = run(["rescore", "--bundle", str(newer)], env)
    assert result.returncode == 0, result.stdout + result.stderr
    result = run(["send", "--bundle", str(newer)], env)
    assert result.returncode == 0, result.stdout + result.stderr
    both = {str(ds.SOPInstanceUID): ds for ds in orthanc.datasets(tmp_path / "v2")}
    added = {uid: ds for uid, ds in both.items() if uid not in first}
    assert set(first) <= set(both)  # the old objects stay
    assert len(added) >= len([d for d in first.values() if d.Modality == "SR"])
    assert all(ds.SoftwareVersions == "demo-phantom 1.1.0" for ds in added.values())
    assert all(ds.SoftwareVersions == "demo-phantom 1.0.0" for ds in first.values())
    old_series = {ds.SeriesInstanceUID for ds in first.values()}
    assert not old_series & {ds.SeriesInstanceUID for ds in added.values()}  # new series too
    assert {ds.StudyInstanceUID for ds in added.values()} == {
        ds.StudyInstanceUID for ds in first.values() if ds.Modality == "SR"
    }


def test_all_images_sends_a_secondary_capture_of_every_image(
    orthanc: Orthanc, tmp_path: Path
) -> None:
    env = _processed(orthanc, tmp_path, 4, seed=2)
    labels = {
        str(r["sop_instance_uid"]): r["label"]
        for r in json.loads(run(["results", "--format", "json"], env).stdout)
        if r.get("p_fracture") is not None
    }
    assert "negative" in labels.values() and "positive" in labels.values(), labels
    first = {
        ds.SourceImageSequence[0].ReferencedSOPInstanceUID
        for ds in orthanc.datasets(tmp_path / "a")
        if ds.Modality != "SR"
    }
    assert first == {uid for uid, label in labels.items() if label == "positive"}
    result = run(["send", "--all-images"], env)
    assert result.returncode == 0, result.stdout + result.stderr
    held = orthanc.datasets(tmp_path / "b")
    captures = {
        ds.SourceImageSequence[0].ReferencedSOPInstanceUID for ds in held if ds.Modality != "SR"
    }
    assert captures == set(labels)  # every scored image, positive or not
    assert status(env) == {"pending": 0, "sent": len(held), "failed": 0}
