"""docker-compose.yml agrees with the CLI and the settings (no Docker engine runs the tests).

Every bonewatch command in the file is parsed by the real command line, every BONEWATCH_*
variable must be a setting, and the services depend on each other in the order that works.
The deployment's security settings are checked too: secrets only as files, Redis and Flower
behind credentials, Flower on loopback, images pinned, capabilities dropped, root file systems
read-only.
"""

from __future__ import annotations

import re
import secrets
import tomllib
from pathlib import Path
from typing import Any

import pytest
import typer.main
import yaml

from bonewatch.worker.cli import app
from bonewatch.worker.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
BONEWATCH_SERVICES = ("migrate", "worker", "sender", "watcher", "listener", "web")
DICOM_PORT = "11112"
SECRETS_DIR = "/run/secrets"
# The image `build: .` makes from the Dockerfile: every bonewatch service, and Flower.
PROJECT_IMAGE = re.compile(r"bonewatch:[\w.-]+")
# What the official postgres entrypoint needs before it steps down to the postgres user.
POSTGRES_CAPS = {"CHOWN", "DAC_OVERRIDE", "FOWNER", "SETGID", "SETUID"}


@pytest.fixture(scope="module")
def compose_text() -> str:
    return (ROOT / "docker-compose.yml").read_text()


@pytest.fixture(scope="module")
def compose(compose_text) -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load(compose_text)
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


def _command_text(service: dict[str, Any]) -> str:
    command = service.get("command", [])
    return command if isinstance(command, str) else " ".join(command)


def _env(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment", {})
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {k: str(v) for k, v in env.items()}


def _secret_names(service: dict[str, Any]) -> set[str]:
    return {s if isinstance(s, str) else s["source"] for s in service.get("secrets", [])}


def test_the_services_a_distributed_setup_needs(compose):
    assert set(compose["services"]) == {
        "redis",
        "postgres",
        "migrate",
        "worker",
        "sender",
        "watcher",
        "listener",
        "web",
        "flower",
    }


def test_redis_and_postgres_have_healthchecks(compose):
    for name in ("redis", "postgres"):
        assert compose["services"][name]["healthcheck"]["test"], name


@pytest.mark.parametrize(
    ("service", "command"),
    [
        ("migrate", "upgrade"),
        ("worker", "worker"),
        ("sender", "worker"),
        ("watcher", "watch"),
        ("listener", "listen"),
        ("web", "serve"),
    ],
)
def test_each_command_is_one_the_cli_accepts(compose, service, command):
    argv = compose["services"][service]["command"]
    ctx = _parse(argv)
    assert ctx.info_name == command
    if service == "worker":
        from bonewatch.worker.distributed import parse_queues

        assert parse_queues(ctx.params["queues"]) == ["live", "bulk"]
        assert ctx.params["concurrency"] >= 1
    if service == "sender":  # results to PACS on a queue of their own, never beside inference
        from bonewatch.worker.distributed import parse_queues

        assert parse_queues(ctx.params["queues"]) == ["send"]
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
    for name in BONEWATCH_SERVICES:
        env = _env(compose["services"][name])
        unknown = {k for k in env if k.startswith("BONEWATCH_")} - fields
        assert not unknown, f"{name}: {unknown} are not settings"


def test_urls_and_the_phi_key_come_from_secret_files(compose):
    """The database and broker URLs carry passwords: they are secrets_dir files named like the
    variables, never environment values. Patient hashes must agree across hosts: one HMAC key,
    given explicitly as a file, in every service that registers or processes studies."""
    for name in BONEWATCH_SERVICES:
        service = compose["services"][name]
        env = _env(service)
        assert "BONEWATCH_DATABASE_URL" not in env and "BONEWATCH_BROKER_URL" not in env, name
        assert "BONEWATCH_PHI_SALT" not in env, name
        assert "bonewatch_database_url" in _secret_names(service), name
    for name in ("worker", "sender", "watcher", "listener"):
        service = compose["services"][name]
        assert {"bonewatch_broker_url", "bonewatch_phi_key"} <= _secret_names(service), name
        assert _env(service)["BONEWATCH_PHI_KEY_FILE"] == f"{SECRETS_DIR}/bonewatch_phi_key"
    # The schema migration needs the ledger and nothing else.
    assert _secret_names(compose["services"]["migrate"]) == {"bonewatch_database_url"}


def test_settings_read_the_compose_secret_files(compose, monkeypatch, tmp_path):
    """What a worker container sees, with its /run/secrets laid out in tmp_path."""
    worker = compose["services"]["worker"]
    password = secrets.token_hex(8)
    contents = {
        "bonewatch_database_url": f"postgresql+psycopg://bonewatch:{password}@postgres:5432/bonewatch",
        "bonewatch_broker_url": f"redis://:{password}@redis:6379/0",
        "bonewatch_phi_key": secrets.token_hex(32),
    }
    assert _secret_names(worker) == set(contents)
    for name, value in contents.items():
        (tmp_path / name).write_text(value + "\n")  # a trailing newline, as `openssl rand` writes
    for field in Settings.model_fields:
        monkeypatch.delenv(f"BONEWATCH_{field.upper()}", raising=False)
    for key, value in _env(worker).items():
        monkeypatch.setenv(key, value.replace(SECRETS_DIR, str(tmp_path)))

    settings = Settings(_secrets_dir=tmp_path)  # type: ignore[call-arg]
    assert settings.distributed
    assert settings.broker_url == contents["bonewatch_broker_url"]
    assert settings.resolved_database_url == contents["bonewatch_database_url"]
    assert settings.batch_size == 16
    assert Path(settings.phi_key_file) == tmp_path / "bonewatch_phi_key"  # type: ignore[attr-defined]


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
    """Flower reads the broker URL from the workers' own secret file, not from a flag."""
    flower = compose["services"]["flower"]
    command = _command_text(flower)
    assert "bonewatch_broker_url" in _secret_names(flower)
    assert f"{SECRETS_DIR}/bonewatch_broker_url" in command
    assert "CELERY_BROKER_URL" in command
    assert "--broker" not in command


def test_flower_listens_on_loopback_only(compose):
    ports = compose["services"]["flower"]["ports"]
    assert ports == ["127.0.0.1:5555:5555"]
    published = {name for name, s in compose["services"].items() if s.get("ports")}
    assert published == {"flower", "listener", "web"}, (
        "Flower and the review app (on loopback) and the DICOM port only"
    )


def test_the_listener_publishes_its_dicom_port_and_admits_only_listed_peers(compose):
    listener = compose["services"]["listener"]
    env = _env(listener)
    assert listener["ports"] == [f"{DICOM_PORT}:{DICOM_PORT}"]
    assert env["BONEWATCH_DICOM_PORT"] == DICOM_PORT
    # Callers come from the Compose network, never loopback: with nothing configured, none is
    # let in (the listener logs each refusal with the entry to add), and never "*" by default.
    assert env["BONEWATCH_DICOM_PEERS"] == "${BONEWATCH_DICOM_PEERS:-}"
    settings = Settings(**{k.removeprefix("BONEWATCH_").lower(): v for k, v in env.items()
                           if k != "BONEWATCH_DICOM_PEERS"})  # fmt: skip
    assert settings.dicom_ae_title == env["BONEWATCH_DICOM_AE_TITLE"]
    ctx = _parse(listener["command"])
    assert ctx.params["process"] is True  # with the broker set, it registers and publishes only
    assert ctx.params["tls_cert"] is None or ctx.params["tls_key"] is not None


def test_workers_see_what_the_listener_received(compose):
    """Received files are written under DATA_DIR/received, on the volume the workers mount at
    the same path, and the listener starts after the schema exists."""
    listener, worker = compose["services"]["listener"], compose["services"]["worker"]
    assert _env(listener)["BONEWATCH_DATA_DIR"] == _env(worker)["BONEWATCH_DATA_DIR"] == "/data"
    assert "bonewatch-data:/data" in listener["volumes"]
    assert "bonewatch-data:/data" in worker["volumes"]
    assert listener["depends_on"]["migrate"]["condition"] == "service_completed_successfully"


def test_flower_requires_basic_auth_from_a_secret(compose):
    flower = compose["services"]["flower"]
    command = _command_text(flower)
    assert "flower_basic_auth" in _secret_names(flower)
    assert re.search(
        rf"(FLOWER_BASIC_AUTH=|--basic[-_]auth=)\"?\$\$\(cat {SECRETS_DIR}/flower_basic_auth\)",
        command,
    ), command
    # It refuses to start open: an unreadable or empty credential stops the shell.
    assert "set -eu" in command and 'test -n "$$FLOWER_BASIC_AUTH"' in command


def test_redis_requires_a_password_from_a_secret(compose):
    redis = compose["services"]["redis"]
    command = _command_text(redis)
    assert "redis_password" in _secret_names(redis)
    assert re.search(rf"requirepass \"?\$\$\(cat {SECRETS_DIR}/redis_password\)", command), command
    assert "--requirepass" not in command, "the password stays out of argv"
    health = " ".join(redis["healthcheck"]["test"])
    assert f'REDISCLI_AUTH="$$(cat {SECRETS_DIR}/redis_password)"' in health
    assert "grep -q PONG" in health, "NOAUTH must not count as healthy"


def test_every_broker_url_carries_credentials_from_a_secret(compose):
    for name, service in compose["services"].items():
        for key, value in _env(service).items():
            assert "BROKER_URL" not in key, f"{name}: {key} must come from a secret file"
            assert "redis://" not in value, f"{name}: {key}"
        assert "redis://" not in _command_text(service), name
    for name in ("worker", "watcher", "listener", "flower"):
        assert "bonewatch_broker_url" in _secret_names(compose["services"][name]), name


def test_no_password_literal_anywhere(compose, compose_text):
    # URL user:password@ pairs
    assert not re.search(r"://[^/\s@$]*:[^/\s@$]+@", compose_text)
    assert "PHI_SALT" not in compose_text
    credential = re.compile(r"PASSWORD|PASSWD|SECRET|SALT|TOKEN|AUTH|_KEY")
    for name, service in compose["services"].items():
        for key, value in _env(service).items():
            if credential.search(key):
                assert key.endswith("_FILE"), f"{name}: {key} must name a file"
                assert value.startswith(f"{SECRETS_DIR}/"), f"{name}: {key}={value}"
    postgres = _env(compose["services"]["postgres"])
    assert postgres["POSTGRES_PASSWORD_FILE"] == f"{SECRETS_DIR}/postgres_password"
    assert "postgres_password" in _secret_names(compose["services"]["postgres"])


def test_secrets_are_files_outside_the_repository(compose):
    declared = compose["secrets"]
    for name, secret in declared.items():
        assert set(secret) == {"file"}, f"{name}: a file secret, nothing else"
        assert secret["file"] == f"./secrets/{name}.txt", name
    used = set().union(*(_secret_names(s) for s in compose["services"].values()))
    assert used == set(declared), "every secret is declared and used"
    # In bonewatch's own services a secret is a settings file (bonewatch_<field>, read through
    # secrets_dir) or the target of a BONEWATCH_*_FILE variable.
    fields = set(Settings.model_fields)
    for name in BONEWATCH_SERVICES:
        service = compose["services"][name]
        targets = {v for k, v in _env(service).items() if k.endswith("_FILE")}
        for secret in _secret_names(service):
            a_setting = secret.startswith("bonewatch_") and secret[len("bonewatch_") :] in fields
            a_file = f"{SECRETS_DIR}/{secret}" in targets
            assert a_setting or a_file, f"{name}: {secret} is read by nothing"


def test_every_image_is_the_projects_build_or_pinned_by_digest(compose):
    digest = re.compile(r"[\w./-]+:[\w.-]+@sha256:[0-9a-f]{64}")
    for name, service in compose["services"].items():
        image = service.get("image")
        assert image is not None or "build" in service, name
        if image is None:
            continue
        if PROJECT_IMAGE.fullmatch(image):
            # the tag names what `build: .` makes here; it is never pulled from a registry
            assert service.get("build") == ".", f"{name}: {image} without the build that makes it"
        else:
            assert digest.fullmatch(image), f"{name}: {image} is neither built nor pinned"
    assert digest.fullmatch(compose["services"]["redis"]["image"])
    assert digest.fullmatch(compose["services"]["postgres"]["image"])


def test_flower_runs_from_the_projects_image_with_its_extra(compose):
    """No third-party Flower image: the Dockerfile installs the [flower] extra, and Flower's
    version floors sit in pyproject.toml beside the other dependencies."""
    flower = compose["services"]["flower"]
    assert flower["build"] == "." and PROJECT_IMAGE.fullmatch(flower["image"])
    assert "exec celery flower" in _command_text(flower)
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"][
        "optional-dependencies"
    ]
    assert any(req.startswith("flower>=") for req in extras["flower"])
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert re.search(r"pip install '\.\[([\w,]+,)?flower(,[\w,]+)?\]'", dockerfile), (
        "the image lacks the [flower] extra"
    )


def test_every_service_drops_capabilities_and_privilege_escalation(compose):
    for name, service in compose["services"].items():
        assert service.get("cap_drop") == ["ALL"], name
        assert "no-new-privileges:true" in service.get("security_opt", []), name
        assert not service.get("privileged"), name
        expected = POSTGRES_CAPS if name == "postgres" else set()
        assert set(service.get("cap_add", [])) == expected, name


def test_root_file_systems_are_read_only(compose):
    for name, service in compose["services"].items():
        assert service.get("read_only") is True, name
        tmpfs = service.get("tmpfs", [])
        assert "/tmp" in ([tmpfs] if isinstance(tmpfs, str) else tmpfs), name
    assert "/var/run/postgresql" in compose["services"]["postgres"]["tmpfs"]


def test_deployment_data_and_secrets_stay_out_of_git_and_the_image():
    for ignore_file in (".gitignore", ".dockerignore"):
        lines = {line.strip().lstrip("/") for line in (ROOT / ignore_file).read_text().splitlines()}
        for folder in ("inbox/", "archive/", "secrets/"):
            assert folder in lines, f"{ignore_file} lacks {folder}"


def test_the_image_installs_the_package_and_runs_as_a_user():
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert re.search(r"pip install '?\.(\[[\w,]+\])?'?", dockerfile)
    assert "USER bonewatch" in dockerfile
    assert re.search(r"^FROM [\w./-]+:[\w.-]+@sha256:[0-9a-f]{64}$", dockerfile, re.M)
    # Every folder that setuptools maps into the bonewatch package is in the build context.
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    folders = set(pyproject["tool"]["setuptools"]["package-dir"].values())
    assert "bonewatch" in folders
    for folder in folders:
        assert re.search(rf"^COPY {folder} {folder}$", dockerfile, re.M), f"COPY {folder}"


def test_the_review_app_is_on_loopback_read_only_and_behind_a_login(compose):
    """`web` binds all addresses inside its container (it refuses to while no account exists),
    is published on the host's loopback only for a TLS proxy, signs sessions with a secret file
    (its data volume is read-only), and reads the originals and heatmaps without writing them."""
    web = compose["services"]["web"]
    ctx = _parse(web["command"])
    assert ctx.info_name == "serve" and ctx.params["host"] == "0.0.0.0"
    port = str(ctx.params["port"])
    assert web["ports"] == [f"127.0.0.1:{port}:{port}"]
    assert _secret_names(web) == {"bonewatch_database_url", "bonewatch_session_secret"}
    assert "session_secret" in Settings.model_fields
    assert all(v.endswith(":ro") for v in web["volumes"]), web["volumes"]
    assert "bonewatch-data:/data:ro" in web["volumes"]
    env = _env(web)
    assert env["BONEWATCH_DATA_DIR"] == "/data" and env["BONEWATCH_WEB_SECURE_COOKIES"] == "true"
    assert "/healthz" in " ".join(web["healthcheck"]["test"])
    assert web["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
