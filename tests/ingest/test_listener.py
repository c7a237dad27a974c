"""Tests for ingest/listener.py with pynetdicom as the client: statuses, file placement, the
registration callback, stale partial files."""

from __future__ import annotations

import os
from pathlib import Path

import pydicom
import pytest
from pydicom.data import get_testdata_file
from pynetdicom import AE
from pynetdicom.sop_class import ComputedRadiographyImageStorage  # type: ignore[attr-defined]

from bonewatch.ingest.listener import (
    CANNOT_UNDERSTAND,
    INCOMING,
    PROCESSING_FAILURE,
    SUCCESS,
    ListenerConfig,
    ListenerError,
    Received,
    StorageListener,
    is_valid_uid,
    remove_stale_parts,
)

RG3_UNCR = get_testdata_file("RG3_UNCR.dcm")


@pytest.fixture
def received_dir(tmp_path: Path) -> Path:
    return tmp_path / "received"


def _config(received_dir: Path, **changes) -> ListenerConfig:
    return ListenerConfig(
        **{"received_dir": received_dir, "host": "127.0.0.1", "port": 0, **changes}
    )


def _send(listener: StorageListener, ds: pydicom.Dataset) -> int:
    ae = AE(ae_title="TESTSCU")
    ae.add_requested_context(ComputedRadiographyImageStorage, ds.file_meta.TransferSyntaxUID)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
    host, port = listener.address
    assoc = ae.associate(host, port, ae_title="BONEWATCH")
    assert assoc.is_established
    try:
        return int(assoc.send_c_store(ds).Status)
    finally:
        assoc.release()


def test_uids_are_digits_and_dots():
    assert is_valid_uid("1.2.840.10008.1.2.1")
    for bad in ("", "1..2", ".1", "1.", "1.2a", "../../etc", "1/2", "9" * 65):
        assert not is_valid_uid(bad), bad


def test_an_instance_lands_at_its_study_and_sop_path(received_dir):
    calls: list[Received] = []
    with StorageListener(_config(received_dir), calls.append) as listener:
        ds = pydicom.dcmread(RG3_UNCR)
        assert _send(listener, ds) == SUCCESS
        assert _send(listener, ds) == SUCCESS
    path = received_dir / ds.StudyInstanceUID / f"{ds.SOPInstanceUID}.dcm"
    assert [c.path for c in calls] == [path, path]
    assert [c.new_file for c in calls] == [True, False]
    assert calls[0].calling_ae == "TESTSCU" and calls[0].address == "127.0.0.1"
    stored = pydicom.dcmread(path)
    assert stored.PixelData == ds.PixelData
    assert stored.file_meta.SourceApplicationEntityTitle == "TESTSCU"
    assert not list((received_dir / INCOMING).iterdir())


@pytest.mark.filterwarnings("ignore:Invalid value for VR UI:UserWarning")
@pytest.mark.parametrize("field", ["StudyInstanceUID", "SOPInstanceUID"])
def test_a_uid_that_is_not_a_uid_is_refused_and_never_a_path(received_dir, field):
    calls: list[Received] = []
    ds = pydicom.dcmread(RG3_UNCR)
    setattr(ds, field, "../../../tmp/evil")
    with StorageListener(_config(received_dir), calls.append) as listener:
        assert _send(listener, ds) == CANNOT_UNDERSTAND
    assert calls == []
    assert sorted(p.name for p in received_dir.rglob("*")) == [INCOMING]


def test_a_registration_that_fails_answers_a_failure(received_dir):
    def ledger_down(received: Received) -> None:
        raise ConnectionError("the ledger is not there")

    with StorageListener(_config(received_dir), ledger_down) as listener:
        assert _send(listener, pydicom.dcmread(RG3_UNCR)) == PROCESSING_FAILURE
        assert listener.counters.refused == 1 and listener.counters.stored == 0


def test_partial_files_of_dead_processes_are_removed(tmp_path):
    incoming = tmp_path / INCOMING
    incoming.mkdir()
    mine = incoming / f"{os.getpid()}-a.part"
    dead = incoming / "999999999-b.part"
    for path in (mine, dead):
        path.write_bytes(b"partial")
    assert remove_stale_parts(incoming) == 2  # this process has just started: none is live
    assert not list(incoming.iterdir())


def test_a_bad_peer_list_or_a_taken_port_is_a_listener_error(received_dir):
    with pytest.raises(ListenerError, match="BONEWATCH_DICOM_PEERS"):
        StorageListener(_config(received_dir, peers="*, CT1"), lambda r: None)
    with StorageListener(_config(received_dir), lambda r: None) as first:
        port = first.address[1]
        taken = StorageListener(_config(received_dir, port=port), lambda r: None)
        with pytest.raises(ListenerError, match="cannot listen"):
            taken.start()
