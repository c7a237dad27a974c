"""docker-compose.yml agrees with the CLI and the settings (no Docker engine runs the tests).

Every bonewatch command in the file is parsed by the real command line, every BONEWATCH_*
variable must be a setting, and the services depend on each other in the order that works.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import typer.main
import yaml

from bonewatch.worker.cli import app
from bonewatch.worker.settings import Settings

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    return data


def _parse(argv: list[str]) -> Any:
    """Parse ``bonewatch ARGS`` down to the leaf command's context, as the CLI would, without
    running anything; raises the CLI's usage error on a bad command or option."""
    assert argv[0] == "bonewatch"
    command: Any = typer.main.get_command(app)
    ctx = command.make_context("bonewatch", list(argv[1:]))
    while hasattr(command, "resolve_command"):  # a group: descend into the subcommand
        name, sub, rest = command.resolve_command(ctx, [*ctx._protected_args, *ctx.args])
        command = sub
        ctx = sub.make_context(name or "", rest, parent=ctx)
    return ctx


def test_the_services_a_distributed_setup_needs(compose):
    assert set(compose["services"]) == {
        "redis",
        "postgres",
        "migrate",
        "worker",
        "watcher",
        "flower",
    }


def test_redis_and_postgres_have_healthchecks(compose):
    for name in ("redis", "postgres"):
        assert compose["services"][name]["healthcheck"]["test"], name


@pytest.mark.parametrize(
    ("service", "command"),
    [("migrate", "upgrade"), ("worker", "worker"), ("watcher", "watch")],
)
def test_each_command_is_one_the_cli_accepts(compose, service, command):
    argv = compose["services"][service]["command"]
    ctx = _parse(argv)
    assert ctx.info_name == command
    if service == "worker":
        from bonewatch.worker.distributed import parse_queues

        assert parse_queues(ctx.params["queues"]) == ["live", "bulk"]
        assert ctx.params["concurrency"] >= 1
    if service == "watcher":
        inbox = str(ctx.params["inbox"])
        mounts = [v.split(":")[1] for v in compose["services"]["watcher"]["volumes"]]
        assert inbox in mounts, "the watched folder must be a volume"


@pytest.mark.parametrize(
    "argv",
    [["bonewatch", "worker", "--queue", "live"], ["bonewatch", "db", "migrate"]],
)
def test_a_wrong_command_would_be_caught(argv):
    with pytest.raises(Exception) as caught:
        _parse(argv)
    assert type(caught.value).__name__ in {"NoSuchOption", "UsageError"}


def test_environment_names_only_real_settings(compose):
    fields = {f"BONEWATCH_{name.upper()}" for name in Settings.model_fields}
    for name in ("migrate", "worker", "watcher"):
        env = compose["services"][name]["environment"]
        unknown = {k for k in env if k.startswith("BONEWATCH_")} - fields
        assert not unknown, f"{name}: {unknown} are not settings"
        assert env["BONEWATCH_BROKER_URL"].startswith("redis://redis:")
        assert env["BONEWATCH_DATABASE_URL"].startswith("postgresql+psycopg://")
        assert "@postgres:5432/" in env["BONEWATCH_DATABASE_URL"]
        # patient hashes must agree across hosts: one salt, given explicitly
        assert "BONEWATCH_PHI_SALT" in env


def test_settings_parse_the_compose_environment(compose, monkeypatch):
    env = compose["services"]["worker"]["environment"]
    for key, value in env.items():
        monkeypatch.setenv(key, "x" * 16 if "${" in str(value) else str(value))
    settings = Settings()
    assert settings.distributed
    assert settings.batch_size == 16


def test_workers_scale_and_start_after_the_migration(compose):
    worker = compose["services"]["worker"]
    # `--scale worker=N` needs no fixed container name and no published port
    assert "container_name" not in worker and "ports" not in worker
    assert worker["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
    assert worker["depends_on"]["redis"]["condition"] == "service_healthy"
    assert compose["services"]["migrate"]["depends_on"]["postgres"]["condition"] == (
        "service_healthy"
    )


def test_workers_see_files_where_the_watcher_registered_them(compose):
    def mounts(service: str) -> set[str]:
        return {v.split(":")[1] for v in compose["services"][service]["volumes"]}

    assert mounts("watcher") <= mounts("worker")


def test_flower_watches_the_same_broker(compose):
    flower = " ".join(compose["services"]["flower"]["command"])
    broker = compose["services"]["worker"]["environment"]["BONEWATCH_BROKER_URL"]
    assert f"--broker={broker}" in flower


def test_the_image_installs_the_package_and_runs_as_a_user():
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert "pip install ." in dockerfile
    assert "USER bonewatch" in dockerfile
