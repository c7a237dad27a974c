"""Sending under faults, against Orthanc (Debian package ``orthanc``): a sender killed with
SIGKILL mid-send, and destinations that refuse or are not there."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest

from tests.deliver.pacs import (
    BONEWATCH,
    Orthanc,
    SlowLink,
    base_env,
    free_port,
    outbox_rows,
    run,
    status,
    synth,
)

pytestmark = pytest.mark.slow


def test_a_sender_killed_mid_send_sends_everything_once_after_a_restart(
    orthanc: Orthanc, tmp_path: Path
) -> None:
    link = SlowLink(orthanc.dicom_port)  # slow enough for the kill to land mid-send
    link.start()
    try:
        data = tmp_path / "data"
        env = base_env(data, study_stable_seconds="0")
        inbox = tmp_path / "in"
        synth(inbox, 3, env, seed=4)
        assert run(["process", str(inbox)], env).returncode == 0  # no destination yet
        env["BONEWATCH_DICOM_DESTINATIONS"] = f"{orthanc.aet}@127.0.0.1:{link.port}"

        sender = subprocess.Popen(
            [*BONEWATCH, "send", "--all-images"],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 240
        while not orthanc.instances() and sender.poll() is None:
            assert time.monotonic() < deadline, "nothing reached Orthanc"
            time.sleep(0.05)
        assert sender.poll() is None, "the sender finished before it could be killed"
        sender.kill()  # SIGKILL: no clean-up of any kind
        sender.wait(timeout=30)
        held_at_kill = set(orthanc.instances())
        after_kill = status(env)
        print("outbox after kill -9:", after_kill, "Orthanc held", len(held_at_kill))
        assert after_kill["pending"] > 0 and after_kill["failed"] == 0

        link.pause = 0.0
        result = run(["send", "--all-images"], env)
        assert result.returncode == 0, result.stdout + result.stderr
        counts = status(env)
        print("outbox after the restart:", counts)
        rows = outbox_rows(data)
        assert counts == {"pending": 0, "sent": len(rows), "failed": 0}
        assert held_at_kill < set(orthanc.instances())
        # each object once: as many instances as rows, with the rows' UIDs
        back = orthanc.datasets(tmp_path / "back")
        assert len(back) == len(rows)
        assert {str(ds.SOPInstanceUID) for ds in back} == {r["sop_instance_uid"] for r in rows}
    finally:
        link.close()


def test_refusing_and_absent_destinations_are_retried_then_failed_with_the_reason(
    tmp_path: Path, orthanc: Orthanc
) -> None:
    absent = free_port()  # nothing listens there
    refusing = f"NOTORTHANC@127.0.0.1:{orthanc.dicom_port}"  # Orthanc checks the called AE
    data = tmp_path / "data"
    env = base_env(
        data,
        dicom_destinations=f"PACS@127.0.0.1:{absent},{refusing}",
        dicomweb_url=f"http://127.0.0.1:{free_port()}/dicom-web",
        send_retries="3",
        retry_backoff_seconds="0.2",
        send_timeout="120",
    )
    inbox = tmp_path / "in"
    synth(inbox, 1, env, seed=9)
    result = run(["process", str(inbox)], env)
    assert result.returncode == 0, result.stdout + result.stderr  # the PACS's trouble is not ours
    rows = outbox_rows(data)
    assert rows and {r["destination"].split("@")[0] for r in rows} >= {"PACS", "NOTORTHANC"}
    for row in rows:
        assert row["status"] == "failed", row
        assert row["attempts"] == 3, row
        assert row["sent_at"] is None
        if row["destination"].startswith("http"):
            assert "STOW-RS" in row["last_error"] and "failed" in row["last_error"]
        else:
            assert "no association" in row["last_error"], row
        # the three attempts were spread out by the backoff (0.2 s, then about 0.4 s)
        assert (row["updated_at"] - row["created_at"]).total_seconds() >= 0.3
    assert status(env) == {"pending": 0, "sent": 0, "failed": len(rows)}
    assert orthanc.instances() == []

    # `send` retries the failed rows: a destination that answers now gets them
    env["BONEWATCH_DICOM_DESTINATIONS"] = orthanc.destination
    result = run(["send", "--to", orthanc.destination], env)
    assert result.returncode == 0, result.stdout + result.stderr
    sent = [r for r in outbox_rows(data) if r["destination"] == orthanc.destination]
    assert sent and all(r["status"] == "sent" for r in sent)
    assert len(orthanc.instances()) == len(sent)
