"""`bonewatch listen` against dcmtk's echoscu and storescu: who may send, every transfer syntax
as sent, parallel associations, kill -9, a ledger outage, a full disk and broken PDUs."""

from __future__ import annotations

import logging
import os
import signal
import socket
import sqlite3
import struct
import subprocess
import sys
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pydicom
import pytest
from typer.testing import CliRunner

from bonewatch.db import ledger_health, make_engine, query_arrivals, query_results
from bonewatch.ingest.listener import INCOMING, TLSFiles
from bonewatch.worker.cli import app
from bonewatch.worker.settings import Settings
from tests.worker.conftest import wait_for
from tests.worker.dicom_net import (
    JPEG_LS_LOSSLESS,
    RG1_J2KR,
    RG1_UNCR,
    RG3_J2KR,
    RG3_UNCR,
    echoscu,
    free_port,
    parse_storescu,
    phantom_instances,
    received_path,
    require_dcmtk,
    running_listener,
    sop_uid,
    storescu,
    storescu_command,
)

LISTENER_LOG = "bonewatch.ingest.listener"


@pytest.fixture(autouse=True)
def _dcmtk() -> None:
    require_dcmtk()


def _rows(settings: Settings) -> list[dict[str, object]]:
    engine = make_engine(settings.resolved_database_url)
    try:
        return query_results(engine)
    finally:
        engine.dispose()


def test_c_echo_from_echoscu_and_bonewatch_echo(settings):
    with running_listener(settings) as listener:
        port = listener.address[1]
        proc = echoscu(port)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert "Received Echo Response (Success)" in proc.stdout + proc.stderr
        result = CliRunner().invoke(app, ["echo", f"BONEWATCH@127.0.0.1:{port}"])
        assert result.exit_code == 0, result.output
        assert "Success, round trip" in result.output and " ms" in result.output
        wrong = CliRunner().invoke(app, ["echo", f"NOBODY@127.0.0.1:{port}"])
        assert wrong.exit_code == 1
        assert "rejected: called AE title not recognised" in " ".join(wrong.output.split())


def test_a_wrong_called_ae_title_is_rejected_and_logged(settings, caplog):
    caplog.set_level(logging.WARNING, logger=LISTENER_LOG)
    with running_listener(settings) as listener:
        run = storescu(listener.address[1], [RG3_UNCR], "-aet", "MODALITY1", aec="PACS")
    assert run.returncode != 0
    assert "Called AE Title Not Recognized" in run.output
    assert not run.acknowledged
    assert any(
        "MODALITY1@127.0.0.1" in r.message and "called AE title 'PACS' not recognised" in r.message
        for r in caplog.records
    ), caplog.text
    assert _rows(settings) == []


def test_an_unlisted_peer_is_rejected_while_peers_are_set(settings, caplog):
    caplog.set_level(logging.WARNING, logger=LISTENER_LOG)
    settings = settings.replace(dicom_peers="CT1, PACS@127.0.0.1")
    with running_listener(settings) as listener:
        port = listener.address[1]
        refused = storescu(port, [RG3_UNCR], "-aet", "MODALITY1")
        allowed = storescu(port, [RG3_UNCR], "-aet", "PACS")
    assert "Calling AE Title Not Recognized" in refused.output
    assert not refused.acknowledged
    assert allowed.acknowledged == [RG3_UNCR], allowed.output
    rejection = [r.message for r in caplog.records if "MODALITY1@127.0.0.1" in r.message]
    assert rejection and "add MODALITY1@127.0.0.1 to BONEWATCH_DICOM_PEERS" in rejection[0]


def test_every_transfer_syntax_is_stored_as_sent(settings, tmp_path):
    """Uncompressed, JPEG 2000 (-xv) and JPEG-LS (-xt) instances: pydicom-data's RG1 (chest) and
    RG3 (extremity) radiographs and phantoms, byte for byte, one ledger row each on `live`."""
    jls = phantom_instances(tmp_path / "jls", 2, transfer_syntax=JPEG_LS_LOSSLESS, tag="jls")
    phantoms = phantom_instances(tmp_path / "study", 3, tag="study")
    with running_listener(settings) as listener:
        port = listener.address[1]
        plain = storescu(port, [RG1_UNCR, RG3_UNCR, *phantoms])
        j2k = storescu(port, [RG1_J2KR, RG3_J2KR], "-xv")
        jpeg_ls = storescu(port, jls, "-xt")
    sent = [RG1_UNCR, RG3_UNCR, *map(str, phantoms), RG1_J2KR, RG3_J2KR, *map(str, jls)]
    assert plain.acknowledged + j2k.acknowledged + jpeg_ls.acknowledged == sent
    for original in sent:
        stored = received_path(settings, original)
        a = pydicom.dcmread(original)
        b = pydicom.dcmread(stored)
        assert b.file_meta.TransferSyntaxUID == a.file_meta.TransferSyntaxUID or (
            # storescu itself sends uncompressed files in the syntax it negotiated
            not a.file_meta.TransferSyntaxUID.is_compressed
        ), original
        assert b.PixelData == a.PixelData or not a.file_meta.TransferSyntaxUID.is_compressed
        assert b.file_meta.SourceApplicationEntityTitle == "STORESCU"
    rows = {row["sop_instance_uid"]: row for row in _rows(settings)}
    assert set(rows) == {sop_uid(p) for p in sent}
    assert {row["queue"] for row in rows.values()} == {"live"}
    # A chest is refused later, in the ledger, with its reason, like any other file.
    chest = rows[sop_uid(RG1_UNCR)]
    assert chest["status"] == "unsupported" and chest["reason"]
    assert rows[sop_uid(RG3_J2KR)]["status"] == "queued"
    assert not list((settings.data_dir / "received" / INCOMING).iterdir())


def test_four_associations_in_parallel(settings, tmp_path):
    batches = [
        phantom_instances(tmp_path / f"a{k}", 10, studies=2, tag=f"par{k}") for k in range(4)
    ]
    with running_listener(settings) as listener:
        port = listener.address[1]
        with ThreadPoolExecutor(4) as pool:
            runs = list(pool.map(lambda files: storescu(port, files), batches))
        assert listener.counters.stored == 40
    for run, files in zip(runs, batches, strict=True):
        assert run.returncode == 0, run.output
        assert run.acknowledged == [str(p) for p in files]
    rows = _rows(settings)
    assert len(rows) == 40 and {r["status"] for r in rows} == {"queued"}


def test_a_resend_is_one_row_and_changed_bytes_a_duplicate(settings):
    with running_listener(settings) as listener:
        port = listener.address[1]
        assert storescu(port, [RG3_UNCR], "-xe").acknowledged == [RG3_UNCR]
        assert storescu(port, [RG3_UNCR], "-xe").acknowledged == [RG3_UNCR]  # same bytes
        assert storescu(port, [RG3_UNCR], "-xi").acknowledged == [RG3_UNCR]  # re-encoded
    rows = _rows(settings)
    assert [r["status"] for r in rows] == ["queued", "duplicate"]
    first = received_path(settings, RG3_UNCR)
    assert rows[0]["path"] == str(first)
    assert rows[1]["path"] == str(first.with_name(first.stem + ".1.dcm"))
    assert rows[1]["duplicate_of"] == rows[0]["id"]


def test_a_full_disk_answers_out_of_resources(settings, caplog):
    caplog.set_level(logging.WARNING, logger=LISTENER_LOG)
    settings = settings.replace(min_free_mb=1 << 40)  # more than any disk has
    with running_listener(settings) as listener:
        run = storescu(listener.address[1], [RG3_UNCR])
    assert run.failed == [RG3_UNCR] and not run.acknowledged
    assert "0xa700" in run.output.lower() or "OutOfResources" in run.output
    assert "Out of Resources (0xA700)" in caplog.text and "BONEWATCH_MIN_FREE_MB" in caplog.text
    assert _rows(settings) == []
    received = settings.data_dir / "received"
    assert [p.name for p in received.iterdir()] == [INCOMING]
    assert not list((received / INCOMING).iterdir())


def _pdu(kind: int, body: bytes, length: int | None = None) -> bytes:
    return struct.pack(">BBL", kind, 0, len(body) if length is None else length) + body


def _closed_by_peer(sock: socket.socket, timeout: float = 10.0) -> bool:
    """Whether the listener closed the connection within ``timeout`` (after any A-ABORT or
    A-ASSOCIATE-RJ it sent first); False when it still holds it open."""
    sock.settimeout(timeout)
    try:
        while sock.recv(4096):
            continue  # read past what the listener sends before it closes
    except TimeoutError:
        return False
    except OSError:  # reset by the peer
        return True
    return True


def test_malformed_and_truncated_pdus_drop_the_association_only(settings, caplog):
    caplog.set_level(logging.ERROR, logger="pynetdicom")
    settings = settings.replace(dicom_network_timeout=2.0, dicom_acse_timeout=2.0)
    with running_listener(settings) as listener:
        port = listener.address[1]
        attacks = [
            _pdu(0x99, b"\x00" * 8),  # no such PDU type
            _pdu(0x01, b"\x00\x01\x00\x00" + b"X" * 20),  # an A-ASSOCIATE-RQ cut short
            _pdu(0x01, b"\x00" * 64, length=0xFFFFFFF0),  # 4 GiB announced
            _pdu(0x01, b"\xff" * 200),  # garbage of the right length
        ]
        for attack in attacks:
            with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
                sock.sendall(attack)
                started = time.monotonic()
                assert _closed_by_peer(sock)
                assert time.monotonic() - started < 15
        proc = echoscu(port)
        assert proc.returncode == 0, "the listener stopped serving"
        assert storescu(port, [RG3_UNCR]).acknowledged == [RG3_UNCR]
    assert "Unknown PDU type" in caplog.text
    assert "announced a PDU of" in caplog.text
    assert len(_rows(settings)) == 1


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def _certificates(folder: Path) -> dict[str, Path]:
    """A CA, and a server and a client certificate it signed (RSA 2048, one day)."""
    folder.mkdir()
    subj = "/CN=bonewatch-test-"
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj",
             subj + "ca", "-keyout", "ca.key", "-out", "ca.crt", cwd=folder)  # fmt: skip
    for name in ("server", "client"):
        _openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", subj + name,
                 "-keyout", f"{name}.key", "-out", f"{name}.csr", cwd=folder)  # fmt: skip
        _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
                 "-CAcreateserial", "-days", "1", "-out", f"{name}.crt", cwd=folder)  # fmt: skip
    return {p.stem + p.suffix: p for p in folder.iterdir()}


def test_tls_with_client_certificates(settings, tmp_path):
    pem = _certificates(tmp_path / "pki")
    tls = TLSFiles(pem["server.crt"], pem["server.key"], pem["ca.crt"])
    client = ["+tls", str(pem["client.key"]), str(pem["client.crt"]), "+cf", str(pem["ca.crt"])]
    with running_listener(settings, tls=tls) as listener:
        port = listener.address[1]
        secure = storescu(port, [RG3_J2KR], "-xv", *client)
        anonymous = storescu(port, [RG3_UNCR], "+tla", "+cf", str(pem["ca.crt"]))
        plain = storescu(port, [RG3_UNCR])
        echo = CliRunner().invoke(
            app,
            ["echo", f"BONEWATCH@127.0.0.1:{port}", "--tls", "--tls-ca", str(pem["ca.crt"]),
             "--tls-cert", str(pem["client.crt"]), "--tls-key", str(pem["client.key"])],
        )  # fmt: skip
        assert echo.exit_code == 0, echo.output
    assert secure.acknowledged == [RG3_J2KR], secure.output
    assert not anonymous.acknowledged, "a client without a certificate must be refused"
    assert not plain.acknowledged, "a plain connection must not reach a TLS listener"
    assert [r["sop_instance_uid"] for r in _rows(settings)] == [sop_uid(RG3_J2KR)]


def test_studies_become_complete_after_the_quiet_time(settings, tmp_path):
    settings = settings.replace(study_stable_seconds=0.5)
    files = phantom_instances(tmp_path / "s", 3, studies=1, tag="stable")
    engine = make_engine(settings.resolved_database_url)
    try:
        with running_listener(settings) as listener:
            assert len(storescu(listener.address[1], files).acknowledged) == 3
            assert wait_for(lambda: query_arrivals(engine)[0]["stable_at"] is not None, 20)
        (study,) = query_arrivals(engine)
    finally:
        engine.dispose()
    assert study["n_received"] == 3
    assert study["stable_at"] > study["last_received_at"]


# --------------------------------------------------------------------------- crash and outage


def _ledger_sops(db_file: Path) -> set[str]:
    if not db_file.exists():
        return set()
    with sqlite3.connect(db_file, timeout=30) as conn:
        try:
            return {r[0] for r in conn.execute("SELECT sop_instance_uid FROM images")}
        except sqlite3.OperationalError:  # schema not created yet
            return set()


@pytest.mark.slow
def test_kill_9_mid_push_then_restart_and_push_again(settings, tmp_path):
    """Every instance acknowledged before the kill is in the ledger; after a restart and the
    whole set pushed again, each SOP instance has exactly one finished result."""
    files = phantom_instances(tmp_path / "push", 150, studies=5, size=128, tag="kill")
    port = free_port()
    env = {
        **os.environ,
        "BONEWATCH_DATA_DIR": str(settings.data_dir),
        "BONEWATCH_PHI_SALT": "test-salt",
        "BONEWATCH_DICOM_HOST": "127.0.0.1",
        "BONEWATCH_DICOM_PORT": str(port),
    }
    db_file = settings.data_dir / "bonewatch.sqlite"
    listener = subprocess.Popen(
        [sys.executable, "-m", "bonewatch", "listen", "--no-process"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        assert wait_for(lambda: echoscu(port).returncode == 0, 60), "the listener did not start"
        push = subprocess.Popen(
            storescu_command(port, files),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        assert wait_for(lambda: len(_ledger_sops(db_file)) >= 20, 60), "nothing arrived"
        listener.send_signal(signal.SIGKILL)
        listener.wait(timeout=30)
        output, _ = push.communicate(timeout=60)
    finally:
        for proc in (listener,):
            if proc.poll() is None:
                proc.kill()
    before = parse_storescu(push.returncode, output)
    # The ledger row is written before the acknowledgement is sent, so the instance in flight
    # at the kill may be in the ledger and not acknowledged: 20 rows mean at least 19 acks.
    assert 19 <= len(before.acknowledged) < len(files), "the kill did not land mid-push"
    assert {sop_uid(p) for p in before.acknowledged} <= _ledger_sops(db_file)

    with running_listener(settings, process=True) as restarted:
        again = storescu(restarted.address[1], files)
        assert again.acknowledged == [str(p) for p in files], again.output
        engine = make_engine(settings.resolved_database_url)
        try:
            finished = lambda: all(r["status"] == "done" for r in query_results(engine))  # noqa: E731
            assert wait_for(finished, 180), "not everything was processed"
            rows = query_results(engine)
            health = ledger_health(engine)
        finally:
            engine.dispose()
    assert len(rows) == len(files)
    assert {r["sop_instance_uid"] for r in rows} == {sop_uid(p) for p in files}
    assert all(r["p_fracture"] is not None for r in rows)
    assert health["double_predictions"] == 0
    with sqlite3.connect(db_file) as conn:
        (predictions,) = conn.execute("SELECT count(*) FROM predictions").fetchone()
    assert predictions == len(files)
    incoming = settings.data_dir / "received" / INCOMING
    assert not list(incoming.iterdir()), "a partial file was left behind"


@pytest.fixture
def pg_ledger(pg_url: str):
    """A PostgreSQL database of its own (it is made unreachable mid-test), dropped afterwards."""
    import psycopg
    from sqlalchemy.engine import make_url

    from bonewatch.db import upgrade
    from tests.conftest import PG_ADMIN_DSN

    name = f"bonewatch_outage_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(PG_ADMIN_DSN, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    url = make_url(pg_url).set(database=name).render_as_string(hide_password=False)
    upgrade(url)

    def reachable(yes: bool) -> None:
        with psycopg.connect(PG_ADMIN_DSN, autocommit=True) as admin:
            admin.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS {str(yes).lower()}')
            if not yes:
                admin.execute(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s",
                    (name,),
                )

    try:
        yield url, reachable
    finally:
        with psycopg.connect(PG_ADMIN_DSN, autocommit=True) as admin:
            admin.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS true')
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def test_a_ledger_outage_answers_failures_and_loses_nothing(settings, tmp_path, pg_ledger):
    url, reachable = pg_ledger
    settings = settings.replace(database_url=url)
    first = phantom_instances(tmp_path / "first", 5, tag="up")
    during = phantom_instances(tmp_path / "during", 5, tag="down")
    with running_listener(settings) as listener:
        port = listener.address[1]
        assert len(storescu(port, first).acknowledged) == 5
        reachable(False)
        try:
            outage = storescu(port, during)
        finally:
            reachable(True)
        assert not outage.acknowledged, "Success for an instance the ledger does not hold"
        assert outage.failed, outage.output
        retried = storescu(port, during)
    assert retried.acknowledged == [str(p) for p in during]
    rows = _rows(settings)
    assert {r["sop_instance_uid"] for r in rows} == {sop_uid(p) for p in first + during}
    assert len(rows) == 10
