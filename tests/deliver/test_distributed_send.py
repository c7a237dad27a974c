"""Distributed mode sends results from a Celery task on a queue of its own, ``send``, against
Redis, PostgreSQL and Orthanc (Debian package ``orthanc``): a PACS that is down delays the
results, never the inference."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import psycopg
import pytest

from bonewatch.db import upgrade
from bonewatch.worker.settings import Settings
from tests.conftest import _empty_pg_database
from tests.deliver.pacs import BONEWATCH, Orthanc, base_env, run, synth

pytestmark = [pytest.mark.services, pytest.mark.slow]

TIMEOUT = 240.0


def test_the_send_task_is_routed_to_its_own_queue(pg_url: str, redis_url: str) -> None:
    import redis

    from bonewatch.worker.distributed import get_app, parse_queues
    from bonewatch.worker.distributed.publishing import publish_send

    assert parse_queues("send,bulk,live") == ["live", "bulk", "send"]
    assert parse_queues("send") == ["send"]
    publish_send(get_app(Settings(broker_url=redis_url, database_url=pg_url)))
    client = redis.Redis.from_url(redis_url)
    try:
        assert client.llen("send") == 1
        assert client.llen("bulk") == client.llen("live") == 0
    finally:
        client.close()


class Workers:
    def __init__(self, root: Path, env: dict[str, str]) -> None:
        self.root = root
        self.env = env
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self, name: str, queues: str) -> None:
        log = self.root / f"{name}.log"
        self.procs.append(
            subprocess.Popen(
                [*BONEWATCH, "worker", "-Q", queues, "-c", "1", "--hostname", f"{name}@%h"],
                env=self.env,
                stdout=log.open("wb"),
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        )

    def log(self, name: str) -> str:
        path = self.root / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def wait_for(self, check: Callable[[], bool], what: str) -> None:
        deadline = time.monotonic() + TIMEOUT
        while time.monotonic() < deadline:
            if check():
                return
            for proc in self.procs:
                assert proc.poll() is None, f"a worker exited waiting for {what}\n{self.logs()}"
            time.sleep(0.3)
        pytest.fail(f"timed out waiting for {what}\n{self.logs()}")

    def logs(self) -> str:
        return "\n".join(f"--- {n}\n{self.log(n)[-3000:]}" for n in ("infer", "send"))

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


@pytest.fixture
def workers(tmp_path: Path) -> Iterator[Callable[[dict[str, str]], Workers]]:
    made: list[Workers] = []

    def make(env: dict[str, str]) -> Workers:
        made.append(Workers(tmp_path, env))
        return made[-1]

    yield make
    for w in made:
        w.stop()


def test_a_down_pacs_delays_the_send_queue_and_never_the_inference(
    orthanc: Orthanc,
    pg_url: str,
    redis_url: str,
    tmp_path: Path,
    workers: Callable[[dict[str, str]], Workers],
) -> None:
    _empty_pg_database(pg_url)
    upgrade(pg_url)
    env = base_env(
        tmp_path / "data",
        broker_url=redis_url,
        database_url=pg_url,
        dicom_destinations=orthanc.destination,
        study_stable_seconds="0",
        send_retries="100",
        reconcile_interval="2",
        reconcile_grace_seconds="2",
        decode_workers="1",
    )
    dsn = pg_url.replace("postgresql+psycopg://", "postgresql://")

    def query(sql: str) -> list[tuple[object, ...]]:
        with psycopg.connect(dsn, connect_timeout=3) as conn:
            return conn.execute(sql).fetchall()

    inbox = tmp_path / "in"
    synth(inbox, 2, env, seed=31)
    orthanc.stop()  # the PACS is down from the start
    cluster = workers(env)
    cluster.start("infer", "live,bulk")
    cluster.start("send", "send")
    cluster.wait_for(lambda: "ready." in cluster.log("infer") and "ready." in cluster.log("send"),
                     "both workers ready")  # fmt: skip
    result = run(["process", str(inbox)], env)
    assert result.returncode == 0, result.stdout + result.stderr

    # every image is scored while the PACS is down; its objects wait in the outbox
    def images_final() -> bool:
        return not query("SELECT 1 FROM images WHERE status IN ('queued', 'processing')")

    cluster.wait_for(images_final, "every image final")
    cluster.wait_for(
        lambda: bool(query("SELECT 1 FROM deliveries WHERE attempts > 0")), "a failed attempt"
    )
    assert not query("SELECT 1 FROM deliveries WHERE status = 'sent'")

    orthanc.start()

    def all_sent() -> bool:
        rows = query("SELECT status, count(*) FROM deliveries GROUP BY status")
        return bool(rows) and dict(rows) == {"sent": sum(int(str(n)) for _, n in rows)}

    cluster.wait_for(all_sent, "every object sent")
    rows = query("SELECT sop_instance_uid, study_uid FROM deliveries")
    held = {str(ds.SOPInstanceUID): ds for ds in orthanc.datasets(tmp_path / "back")}
    assert set(held) == {str(sop) for sop, _ in rows}  # each object once
    assert all(held[str(sop)].StudyInstanceUID == study for sop, study in rows)
    # the sending ran in the `send` worker only
    ran = "Task bonewatch.send_results["
    assert ran in cluster.log("send")
    assert ran not in cluster.log("infer")
    assert "Task bonewatch.process_images[" not in cluster.log("send")
