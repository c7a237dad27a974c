"""Distributed mode against the real Redis and PostgreSQL on localhost.

Workers run as real ``bonewatch worker`` processes (Celery prefork). Faults are real too: SIGKILL
of a pool child and of a whole worker, FLUSHALL on Redis, PostgreSQL stopped and started. After
each, every registered file must end final exactly once: one prediction row per image, none
missing. Under ``CI=true`` an unreachable server fails these tests instead of skipping them.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import psycopg
import pytest
import redis

from bonewatch.db import upgrade
from bonewatch.ingest import write_png
from bonewatch.worker.settings import Settings
from tests.conftest import _empty_pg_database

pytestmark = pytest.mark.services

TIMEOUT = 180.0


# --------------------------------------------------------------------------- harness


@pytest.fixture
def cluster(
    tmp_path: Path, pg_url: str, redis_url: str, tiny_bundle_dir: Path
) -> Iterator[Cluster]:
    _empty_pg_database(pg_url)
    upgrade(pg_url)
    c = Cluster(tmp_path, pg_url, redis_url, tiny_bundle_dir)
    try:
        yield c
    finally:
        c.stop_all()


class Cluster:
    """Worker, watcher and client processes sharing one ledger and one broker."""

    def __init__(self, root: Path, pg_url: str, redis_url: str, bundle: Path) -> None:
        self.root = root
        self.pg_url = pg_url
        self.redis_url = redis_url
        self.dsn = pg_url.replace("postgresql+psycopg://", "postgresql://")
        self.env = {
            **os.environ,
            "BONEWATCH_BROKER_URL": redis_url,
            "BONEWATCH_DATABASE_URL": pg_url,
            "BONEWATCH_BUNDLE": str(bundle),
            "BONEWATCH_DATA_DIR": str(root / "data"),
            "BONEWATCH_PHI_SALT": "distributed-test",
            "BONEWATCH_BATCH_SIZE": "4",
            "BONEWATCH_DECODE_WORKERS": "1",
            "BONEWATCH_LEASE_SECONDS": "60",
            "BONEWATCH_RECONCILE_INTERVAL": "2",
            "BONEWATCH_RECONCILE_GRACE_SECONDS": "2",
            "BONEWATCH_RETRY_BACKOFF_SECONDS": "1",
            "BONEWATCH_RETRY_BACKOFF_MAX": "4",
            "BONEWATCH_SETTLE_SECONDS": "0.2",
        }
        self.procs: list[tuple[subprocess.Popen[bytes], Path]] = []

    def settings(self) -> Settings:
        env = {k: v for k, v in self.env.items() if k.startswith("BONEWATCH_")}
        return Settings.model_validate({k[len("BONEWATCH_") :].lower(): v for k, v in env.items()})

    def spawn(self, *args: str, log: str, **env: str) -> subprocess.Popen[bytes]:
        out = self.root / log
        proc = subprocess.Popen(
            [sys.executable, "-m", "bonewatch", *args],
            env={**self.env, **env},
            stdout=out.open("ab"),
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: kill -9 takes the pool children too
        )
        self.procs.append((proc, out))
        return proc

    def worker(
        self, name: str = "w1", *, concurrency: int = 1, **env: str
    ) -> subprocess.Popen[bytes]:
        proc = self.spawn(
            "worker", "--concurrency", str(concurrency), "--hostname", f"{name}@%h",
            log=f"{name}.log", **env,
        )  # fmt: skip
        self.wait_for(lambda: "ready." in self.log(f"{name}.log"), f"worker {name} ready")
        return proc

    def run(self, *args: str) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            [sys.executable, "-m", "bonewatch", *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=TIMEOUT,
        )
        assert result.returncode == 0, result.stdout + result.stderr
        return result

    def log(self, name: str) -> str:
        path = self.root / name
        return path.read_text(errors="replace") if path.exists() else ""

    def logs(self) -> str:
        return "\n".join(
            f"--- {p.name}\n{p.read_text(errors='replace')[-3000:]}" for _, p in self.procs
        )

    def wait_for(self, check: Callable[[], bool], what: str, timeout: float = TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if check():
                return
            for proc, _ in self.procs:
                if proc.poll() not in (None, 0, -signal.SIGKILL, -signal.SIGTERM):
                    pytest.fail(f"a process exited with {proc.returncode} waiting for {what}\n"
                                + self.logs())  # fmt: skip
            time.sleep(0.1)
        pytest.fail(f"timed out waiting for {what}; ledger {self.counts()}\n{self.logs()}")

    def query(self, sql: str, *params: Any) -> list[tuple[Any, ...]]:
        for attempt in range(50):  # the server may be restarting
            try:
                with psycopg.connect(self.dsn, connect_timeout=3) as conn:
                    return conn.execute(sql, params).fetchall()
            except psycopg.OperationalError:
                if attempt == 49:
                    raise
                time.sleep(0.2)
        raise AssertionError("unreachable")

    def counts(self) -> dict[str, int]:
        return dict(self.query("SELECT status, count(*) FROM images GROUP BY status"))

    def finished(self) -> int:
        c = self.counts()
        return sum(c.values()) - c.get("queued", 0) - c.get("processing", 0)

    def wait_all_final(self, n: int) -> None:
        self.wait_for(lambda: self.finished() == n, f"{n} images final")

    def assert_exactly_once(self, n: int) -> None:
        """Every registered image is done, with exactly one prediction; nothing else."""
        assert self.counts() == {"done": n}, self.counts()
        per_image = self.query(
            "SELECT i.id, count(p.id) FROM images i LEFT JOIN predictions p ON p.image_id = i.id "
            "GROUP BY i.id"
        )
        assert len(per_image) == n
        assert {count for _, count in per_image} == {1}, "an image missing or predicted twice"
        status = self.settings_status()
        assert status["lost"] == 0 and status["health"]["double_predictions"] == 0, status

    def settings_status(self) -> dict[str, Any]:
        import json

        return dict(json.loads(self.run("status", "--format", "json").stdout))

    def stop_all(self) -> None:
        for proc, _ in self.procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for proc, _ in self.procs:
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def make_inbox(root: Path, n: int, *, size: int = 256, seed: int = 0) -> Path:
    """``n`` distinct bright PNGs: the tiny bundle calls each an ELBOW and predicts it."""
    inbox = root / "archive"
    inbox.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        write_png(
            inbox / f"img{i:04d}.png", (0.6 + 0.4 * rng.random((size, size))).astype(np.float32)
        )
    return inbox


# --------------------------------------------------------------------------- no servers needed


def test_the_parent_process_never_imports_tensorflow():
    code = (
        "import sys, bonewatch.worker.cli, bonewatch.worker.distributed.celery_app,"
        " bonewatch.worker.distributed;"
        "assert 'tensorflow' not in sys.modules and 'keras' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_celery_is_configured_for_at_least_once_delivery_and_live_first():
    from bonewatch.worker.distributed.celery_app import celery_config

    conf = celery_config(Settings(broker_url="redis://127.0.0.1:6379/0", lease_seconds=120))
    assert conf["task_acks_late"] and conf["task_reject_on_worker_lost"]
    assert conf["worker_prefetch_multiplier"] == 1
    assert conf["task_ignore_result"] and conf["worker_send_task_events"]
    assert conf["broker_transport_options"]["queue_order_strategy"] == "priority"
    # Redis hands an unacknowledged message to another worker only after a batch's lease ran out
    assert conf["broker_transport_options"]["visibility_timeout"] > 120
    assert conf["worker_proc_alive_timeout"] >= 60  # children import TensorFlow at start
    assert [q.name for q in conf["task_queues"]] == ["live", "bulk"]


def test_queues_are_consumed_live_first_whatever_the_order_typed():
    from bonewatch.worker.distributed import DistributedError, parse_queues

    assert parse_queues("bulk,live") == ["live", "bulk"]
    assert parse_queues(" bulk ") == ["bulk"]
    with pytest.raises(DistributedError, match="queues must be among"):
        parse_queues("live,urgent")


def test_a_bare_postgresql_url_uses_psycopg_3():
    s = Settings(database_url="postgresql://postgres@db:5432/bonewatch")
    assert s.resolved_database_url == "postgresql+psycopg://postgres@db:5432/bonewatch"


# --------------------------------------------------------------------------- broker bookkeeping


def _queued_rows(pg_url: str, n: int) -> list[int]:
    from bonewatch.db import NewImage, make_engine, register_images

    engine = make_engine(pg_url)
    try:
        rows = [NewImage(f"/in/{i}.png", f"{i:064x}", 10, "png", queue="bulk") for i in range(n)]
        return [r.image_id for r in register_images(engine, rows)]
    finally:
        engine.dispose()


@pytest.fixture
def ledger(pg_url: str) -> str:
    _empty_pg_database(pg_url)
    upgrade(pg_url)
    return pg_url


def test_the_broker_view_lists_the_ids_inside_waiting_messages(ledger, redis_url):
    from bonewatch.worker.distributed import get_app, inspect_broker, publish

    settings = Settings(broker_url=redis_url, database_url=ledger)
    app = get_app(settings)
    assert publish(app, list(range(1, 11)), "bulk", batch_size=4) == 3
    publish(app, [42], "live", batch_size=4)
    view = inspect_broker(app, fresh_seconds=30)
    assert view.depths == {"live": 1, "bulk": 3}
    assert view.ids == {*range(1, 11), 42}


def test_reconcile_republishes_only_rows_whose_message_is_gone(ledger, redis_url):
    from bonewatch.db import make_engine
    from bonewatch.worker.distributed import get_app, inspect_broker, publish, reconcile

    settings = Settings(broker_url=redis_url, database_url=ledger, reconcile_grace_seconds=0)
    app = get_app(settings)
    ids = _queued_rows(ledger, 10)
    publish(app, ids[:6], "bulk", batch_size=16)  # the last four were never published
    engine = make_engine(ledger)
    try:
        first = reconcile(engine, settings, app)
        assert first.republished == 4
        assert inspect_broker(app, fresh_seconds=30).ids == set(ids)
        assert reconcile(engine, settings, app).republished == 0  # nothing twice

        redis.Redis.from_url(redis_url).flushall()  # the broker forgets everything
        assert reconcile(engine, settings, app).republished == 10
        assert inspect_broker(app, fresh_seconds=30).ids == set(ids)
    finally:
        engine.dispose()


def test_a_message_delivered_long_ago_whose_row_still_waits_is_lost(ledger, redis_url):
    """A worker that took a message and died leaves it in Redis' unacked set; it must not hide
    the row from reconcile until the visibility timeout, an hour later."""
    from bonewatch.worker.distributed import get_app, inspect_broker, publish

    settings = Settings(broker_url=redis_url, database_url=ledger)
    app = get_app(settings)
    publish(app, [7, 8], "bulk", batch_size=4)
    client = redis.Redis.from_url(redis_url)
    raw = client.rpop("bulk")
    client.hset("unacked", "tag-1", f'[{raw.decode()}, "bulk", "bulk"]')
    client.zadd("unacked_index", {"tag-1": time.time()})
    assert inspect_broker(app, fresh_seconds=30).ids == {7, 8}
    client.zadd("unacked_index", {"tag-1": time.time() - 120})
    assert inspect_broker(app, fresh_seconds=30).ids == set()


def test_commands_that_need_a_broker_say_so(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("BONEWATCH_")}
    env["BONEWATCH_DATA_DIR"] = str(tmp_path)
    for command in ("worker", "reconcile"):
        result = subprocess.run(
            [sys.executable, "-m", "bonewatch", command], env=env, capture_output=True, text=True
        )
        assert result.returncode == 2
        assert "BONEWATCH_BROKER_URL" in result.stderr


def test_process_refuses_a_ledger_that_was_never_migrated(tmp_path, pg_url, redis_url):
    _empty_pg_database(pg_url)
    (tmp_path / "a.png").write_bytes(b"")
    env = {**os.environ, "BONEWATCH_BROKER_URL": redis_url, "BONEWATCH_DATABASE_URL": pg_url}
    result = subprocess.run(
        [sys.executable, "-m", "bonewatch", "process", str(tmp_path / "a.png")],
        env=env,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2
    assert "bonewatch db upgrade" in result.stderr


# ------------------------------------------------------------------ real workers, real faults


@pytest.mark.slow
def test_two_workers_on_one_queue_never_predict_an_image_twice(cluster):
    inbox = make_inbox(cluster.root, 160, size=128)
    cluster.worker("w1")
    cluster.worker("w2")
    cluster.run("process", str(inbox))
    cluster.wait_all_final(160)
    cluster.assert_exactly_once(160)
    # every image was claimed exactly once: no second attempt, no batch done twice
    assert cluster.query("SELECT DISTINCT attempts FROM images") == [(1,)]
    for name in ("w1.log", "w2.log"):
        assert "succeeded" in cluster.log(name), f"{name} took no work"


@pytest.mark.slow
def test_kill_9_of_a_pool_child_mid_batch(cluster):
    # big noisy images in batches of 8: a batch takes long enough to be caught in the middle
    inbox = make_inbox(cluster.root, 96, size=1600)
    cluster.env["BONEWATCH_BATCH_SIZE"] = "8"
    cluster.worker("w1", concurrency=2)
    cluster.run("process", str(inbox))
    held: list[tuple[Any, ...]] = []

    def batch_in_flight() -> bool:
        held[:] = cluster.query(
            "SELECT id, leased_by FROM images WHERE status = 'processing' AND leased_by IS NOT NULL"
        )
        return cluster.finished() >= 8 and bool(held)

    # A kill can land just after a batch was recorded (the race between reading the lease and
    # the signal); then it proved nothing, and the next batch in flight is tried.
    caught: list[int] = []
    for _ in range(5):
        cluster.wait_for(batch_in_flight, "a batch in flight")
        holder = held[0][1]
        victims = [image_id for image_id, who in held if who == holder]
        os.kill(int(str(holder).rpartition(":")[2]), signal.SIGKILL)

        def released(holder: str = holder, victims: list[int] = victims) -> bool:
            rows = cluster.query("SELECT status, leased_by FROM images WHERE id = ANY(%s)", victims)
            return all(status != "processing" or who != holder for status, who in rows)

        cluster.wait_for(released, "the killed child's rows to be released")
        # Mid-batch, the rows went back unrecorded: queued again, or already claimed a second
        # time. A kill just after the batch was recorded leaves them finished on attempt 1.
        again = cluster.query("SELECT status, attempts FROM images WHERE id = ANY(%s)", victims)
        if all(status == "queued" or a >= 2 for status, a in again):
            caught = victims
            break
    assert caught, "no kill landed in the middle of a batch"
    cluster.wait_all_final(96)
    cluster.assert_exactly_once(96)
    # Celery saw its child die
    cluster.wait_for(lambda: "SIGKILL" in cluster.log("w1.log"), "Celery to log the lost child")


@pytest.mark.slow
def test_kill_9_of_a_whole_worker_then_a_new_worker(cluster):
    inbox = make_inbox(cluster.root, 160)
    first = cluster.worker("w1", concurrency=2)
    cluster.run("process", str(inbox))
    cluster.wait_for(lambda: cluster.counts().get("processing", 0) > 0 and cluster.finished() >= 20,
                     "a batch in flight")  # fmt: skip
    os.killpg(first.pid, signal.SIGKILL)
    first.wait()
    left = 160 - cluster.finished()
    assert left > 0
    cluster.worker("w2")
    cluster.wait_all_final(160)
    cluster.assert_exactly_once(160)


@pytest.mark.slow
def test_flushall_mid_run_then_reconcile(cluster):
    inbox = make_inbox(cluster.root, 160)
    cluster.worker("w1", BONEWATCH_RECONCILE_INTERVAL="0")  # only the explicit reconcile repairs
    cluster.run("process", str(inbox))
    cluster.wait_for(lambda: cluster.finished() >= 20, "the run to be under way")
    redis.Redis.from_url(cluster.redis_url).flushall()
    # what the worker already held finishes; everything else waits for a message forever
    cluster.wait_for(lambda: cluster.counts().get("processing", 0) == 0, "in-flight batches")
    time.sleep(2.5)  # past the reconcile grace period
    stuck = cluster.counts().get("queued", 0)
    assert stuck > 0, "the flush landed after the run finished"
    assert cluster.settings_status()["lost"] == stuck
    summary = cluster.run("reconcile", "--format", "json").stdout
    assert f'"republished": {stuck}' in summary
    cluster.wait_all_final(160)
    cluster.assert_exactly_once(160)


def _pg_cluster() -> list[str]:
    versions = sorted(os.listdir("/etc/postgresql")) if os.path.isdir("/etc/postgresql") else []
    if not versions:
        pytest.skip("no local PostgreSQL cluster to restart (pg_ctlcluster)")
    return ["pg_ctlcluster", "--skip-systemctl-redirect", versions[-1], "main"]


@pytest.mark.slow
def test_postgresql_restart_mid_run_workers_retry_and_finish(cluster):
    ctl = _pg_cluster()
    inbox = make_inbox(cluster.root, 160)
    cluster.worker("w1", concurrency=2)
    cluster.run("process", str(inbox))
    cluster.wait_for(lambda: cluster.finished() >= 20, "the run to be under way")
    subprocess.run([*ctl, "stop", "--", "-m", "fast"], check=True, timeout=60)
    try:
        time.sleep(3)  # the database is gone for a while, not just a dropped connection
    finally:
        subprocess.run([*ctl, "start"], check=True, timeout=60)
    cluster.wait_all_final(160)
    cluster.assert_exactly_once(160)
    log = cluster.log("w1.log")
    assert "Retry in" in log, "no task was retried: the outage was missed"
    # retried batches were taken over at once, not left to wait for their leases to run out
    assert "expired leases" not in log


@pytest.mark.slow
def test_a_live_file_overtakes_a_bulk_backlog(cluster):
    inbox = cluster.root / "inbox"
    inbox.mkdir()
    archive = make_inbox(cluster.root, 500, size=96)
    cluster.env["BONEWATCH_BATCH_SIZE"] = "2"  # 250 bulk messages
    cluster.worker("w1")
    cluster.spawn("watch", str(inbox), log="watch.log")
    cluster.wait_for(lambda: "watching" in cluster.log("watch.log"), "the watcher")
    cluster.run("process", str(archive))
    cluster.wait_for(lambda: cluster.finished() >= 10, "the backlog to be under way")
    live = np.full((96, 96), 0.9, np.float32)
    write_png(cluster.root / "incoming.png", live)
    os.rename(cluster.root / "incoming.png", inbox / "urgent.png")
    cluster.wait_for(
        lambda: cluster.query("SELECT status FROM images WHERE queue = 'live'") == [("done",)],
        "the live file",
    )
    ((bulk_before,),) = cluster.query(
        "SELECT count(*) FROM images WHERE queue = 'bulk' AND status = 'done' AND finished_at <= "
        "(SELECT finished_at FROM images WHERE queue = 'live')"
    )
    assert bulk_before < 250, f"{bulk_before} bulk images were done before the live one"
    cluster.wait_all_final(501)
    cluster.assert_exactly_once(501)


# --------------------------------------------------------------------------- RabbitMQ

AMQP_URL = "amqp://guest:guest@127.0.0.1:5672//"


@pytest.fixture
def amqp_url() -> Iterator[str]:
    """RabbitMQ on localhost, with bonewatch's queues deleted before and after the test."""
    from kombu import Connection

    from tests.conftest import _unavailable

    def purge() -> None:
        with Connection(AMQP_URL, connect_timeout=3) as conn:
            channel = conn.channel()
            for name in ("live", "bulk"):
                channel.queue_delete(name)  # also drops a declaration from other settings

    try:
        purge()
    except Exception as exc:
        _unavailable(f"RabbitMQ at 127.0.0.1:5672 is not reachable as guest: {exc}")
    try:
        yield AMQP_URL
    finally:
        purge()


def test_on_amqp_reconcile_waits_for_an_empty_queue(ledger, amqp_url):
    """RabbitMQ cannot list messages: a queued row counts as lost only once its queue is empty."""
    from bonewatch.db import make_engine
    from bonewatch.worker.distributed import get_app, inspect_broker, publish, reconcile

    settings = Settings(broker_url=amqp_url, database_url=ledger, reconcile_grace_seconds=0)
    app = get_app(settings)
    ids = _queued_rows(ledger, 6)
    publish(app, ids[:2], "bulk", batch_size=16)
    view = inspect_broker(app, fresh_seconds=30)
    assert view.ids is None and view.depths == {"live": 0, "bulk": 1}
    engine = make_engine(ledger)
    try:
        assert reconcile(engine, settings, app).republished == 0  # the queue still holds work
        with app.connection_for_write() as conn:
            conn.default_channel.queue_purge("bulk")  # the broker loses its messages
        assert reconcile(engine, settings, app).republished == 6
        assert inspect_broker(app, fresh_seconds=30).depths["bulk"] == 1
    finally:
        engine.dispose()


@pytest.mark.slow
def test_a_worker_on_rabbitmq_finishes_every_image_once(cluster, amqp_url):
    cluster.env["BONEWATCH_BROKER_URL"] = amqp_url
    inbox = make_inbox(cluster.root, 40, size=96)
    cluster.worker("w1")
    cluster.run("process", str(inbox))
    cluster.wait_all_final(40)
    cluster.assert_exactly_once(40)
    assert cluster.settings_status()["queues"] == {"live": 0, "bulk": 0}


@pytest.mark.slow
def test_embedded_mode_on_postgresql_waits_out_a_restart(cluster):
    """No broker: `bonewatch process` itself retries with backoff while the ledger is down."""
    ctl = _pg_cluster()
    del cluster.env["BONEWATCH_BROKER_URL"]
    inbox = make_inbox(cluster.root, 200)
    proc = cluster.spawn("process", str(inbox), log="process.log")
    cluster.wait_for(lambda: cluster.finished() >= 20, "the run to be under way")
    subprocess.run([*ctl, "stop", "--", "-m", "fast"], check=True, timeout=60)
    try:
        time.sleep(3)
    finally:
        subprocess.run([*ctl, "start"], check=True, timeout=60)
    assert proc.wait(timeout=TIMEOUT) == 0, cluster.log("process.log")
    assert "ledger unavailable" in cluster.log("process.log")
    cluster.assert_exactly_once(200)


def test_worker_children_serve_the_bundle_given_on_the_command_line(cluster, tmp_path):
    # BONEWATCH_BUNDLE names the tiny bundle; `bonewatch worker --bundle OTHER` must win in the
    # pool children too, not only in the parent's checks.
    import json
    import shutil

    other = tmp_path / "other-bundle"
    shutil.copytree(cluster.env["BONEWATCH_BUNDLE"], other)
    manifest = json.loads((other / "manifest.json").read_text())
    manifest["name"], manifest["version"] = "other", "9.9.9"
    (other / "manifest.json").write_text(json.dumps(manifest))
    inbox = make_inbox(cluster.root, 8, size=64)
    proc = cluster.spawn(
        "worker", "--concurrency", "1", "--hostname", "wb@%h", "--bundle", str(other), log="wb.log"
    )
    cluster.wait_for(lambda: "ready." in cluster.log("wb.log"), "worker wb ready")
    assert proc.poll() is None
    cluster.run("process", str(inbox))
    cluster.wait_all_final(8)
    cluster.assert_exactly_once(8)
    bundles = cluster.query("SELECT DISTINCT bundle_name, bundle_version FROM predictions")
    assert bundles == [("other", "9.9.9")]


def test_remote_control_is_off_unless_asked_for():
    from bonewatch.worker.distributed.celery_app import celery_config

    assert celery_config(Settings(broker_url="redis://x"))["worker_enable_remote_control"] is False
    on = Settings(broker_url="redis://x", remote_control=True)
    assert celery_config(on)["worker_enable_remote_control"] is True
