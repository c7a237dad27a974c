"""Serving without TensorFlow: what `pip install bonewatch` (no [train] extra) can do.

Two proofs, both slow:

- a subprocess in which any import of tensorflow, keras or tf2onnx raises (a ``sys.meta_path``
  finder installed before bonewatch loads) and is written to a log: synth, process with heatmaps
  on the shipped demo bundle, status, results, send --out and serve answer as they should, and
  none of them even tries those imports; train, bundle export-onnx and the keras engine fail
  with one line naming the extra;
- a fresh virtual environment (no system site packages) with ``pip install .`` from a copy of
  the source, as the Dockerfile does: no TensorFlow or Keras in it, and process writes results
  and heatmaps with the demo bundle.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from bonewatch.worker.settings import DEMO_BUNDLE

ROOT = Path(__file__).resolve().parents[2]
TRAIN_ONLY = ("tensorflow", "keras", "tf2onnx")
EXTRA_LINE = "needs the [train] extra: pip install 'bonewatch[train]'"

# The `bonewatch` entry point behind a finder that refuses the [train] extra's modules and logs
# each attempt to $BLOCKED_LOG.
BLOCKED_CLI = f"""
import os, sys

class NoTrainExtra:
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in {TRAIN_ONLY!r}:
            with open(os.environ["BLOCKED_LOG"], "a") as log:
                log.write(name + "\\n")
            raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
        return None

sys.meta_path.insert(0, NoTrainExtra())
from bonewatch.worker.cli import main
main(sys.argv[1:])
"""


def _environ(**env: str) -> dict[str, str]:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("BONEWATCH_")}
    environ.pop("PYTHONPATH", None)
    environ.update({"COLUMNS": "200", "BONEWATCH_PHI_SALT": "serving-install", **env})
    return environ


def _unavailable(message: str) -> None:
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"{message} (CI=true, so this is an error, not a skip)", pytrace=False)
    pytest.skip(message)


@pytest.fixture(scope="module")
def blocked(tmp_path_factory: pytest.TempPathFactory):
    """Run ``bonewatch ARGS`` without the [train] extra; returns (run, log, workdir, env)."""
    work = tmp_path_factory.mktemp("no-train")
    log = work / "blocked.log"
    env = _environ(
        BLOCKED_LOG=str(log),
        BONEWATCH_DATA_DIR=str(work / "data"),
        BONEWATCH_BUNDLE=str(DEMO_BUNDLE),
        BONEWATCH_HEATMAPS="1",
        BONEWATCH_STUDY_STABLE_SECONDS="0",  # complete at once, so send --out has studies
    )

    def run(*args: str, **extra: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-c", BLOCKED_CLI, *args],
            cwd=work, env={**env, **extra}, capture_output=True, text=True, timeout=600,
        )  # fmt: skip

    done = run("synth", str(work / "inbox"), "--studies", "8", "--format", "both", "--seed", "11")
    assert done.returncode == 0, done.stderr
    return run, log, work, env


def _attempts(log: Path) -> list[str]:
    return log.read_text().split() if log.exists() else []


@pytest.mark.slow
def test_serving_commands_never_import_tensorflow(blocked):
    run, log, work, env = blocked
    done = run("process", str(work / "inbox" / "train"))
    assert done.returncode == 0, done.stderr
    assert "processed" in done.stdout
    heatmaps = list((work / "data" / "heatmaps").rglob("*.png"))
    assert heatmaps, "no heatmap was written for the positive images"

    status = run("status", "--format", "json")
    assert status.returncode == 0, status.stderr
    counts = json.loads(status.stdout)["counts"]
    assert counts["done"] > 0 and counts["failed"] == 0, counts

    results = run("results", "--level", "study", "--format", "json")
    assert results.returncode == 0, results.stderr
    studies = json.loads(results.stdout)
    assert studies and all(s["mean_p_fracture"] is not None for s in studies)

    sent = run("send", "--out", str(work / "objects"))
    assert sent.returncode == 0, sent.stderr
    assert list((work / "objects").rglob("sr-*.dcm")), sent.stdout
    assert list((work / "objects").rglob("sc-*.dcm")), sent.stdout  # the heatmap captures

    assert _attempts(log) == []


@pytest.mark.slow
def test_serve_answers_without_tensorflow(blocked):
    run, log, work, env = blocked
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = subprocess.Popen(
        [sys.executable, "-c", BLOCKED_CLI, "serve", "--port", str(port)],
        cwd=work, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        status = None
        for _ in range(300):  # at most 30 s for the app to start
            if server.poll() is not None:
                break
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2) as r:
                    status = r.status
                break
            except OSError:
                time.sleep(0.1)
        assert status == 200, server.stderr.read() if server.poll() is not None else status
    finally:
        server.terminate()
        server.wait(timeout=30)
    assert _attempts(log) == []


@pytest.mark.slow
@pytest.mark.parametrize(
    ("args", "env", "what"),
    [
        (["train", "inbox", "--out", "bundle"], {}, "train"),
        (["bundle", "export-onnx", str(DEMO_BUNDLE)], {}, "bundle export-onnx"),
        (["process", "inbox/train"], {"BONEWATCH_ENGINE": "keras"}, "the keras engine"),
    ],
)
def test_train_only_commands_name_the_extra_in_one_line(blocked, args, env, what):
    run, _, work, _ = blocked
    done = run(*args, **env)
    assert done.returncode == 1
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert errors == [f"error: {what} {EXTRA_LINE}"], done.stderr
    assert "Traceback" not in done.stderr


def test_the_base_install_and_the_image_leave_tensorflow_to_the_train_extra():
    import re
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]

    def names(requirements: list[str]) -> set[str]:
        return {re.split(r"[<>=!~\[; ]", r, maxsplit=1)[0].lower() for r in requirements}

    base = names(project["dependencies"])
    train = names(project["optional-dependencies"]["train"])
    assert not base & {"tensorflow", "tensorflow-cpu", "keras", "tf2onnx"}, base
    assert {"tensorflow-cpu", "keras", "tf2onnx"} <= train
    assert {"onnxruntime", "openvino", "onnx"} <= base
    installs = re.findall(r"pip install (\S+)", (ROOT / "Dockerfile").read_text())
    assert installs and not any("train" in spec for spec in installs), installs


def _copy_source(dest: Path) -> Path:
    """What `pip install .` reads (as the Dockerfile copies it), without caches."""
    dest.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, dest / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")
    for folder in ("bonewatch", "ingest", "models", "db", "worker", "bench", "web", "deliver"):
        shutil.copytree(ROOT / folder, dest / folder, ignore=ignore)
    return dest


@pytest.mark.slow
def test_a_fresh_serving_install_processes_phantoms_without_tensorflow(tmp_path):
    source = _copy_source(tmp_path / "src")
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    python, bonewatch = venv / "bin" / "python", venv / "bin" / "bonewatch"
    env = _environ(BONEWATCH_DATA_DIR=str(tmp_path / "data"), BONEWATCH_HEATMAPS="1")
    install = subprocess.run(
        [str(python), "-m", "pip", "install", "--quiet", str(source)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=1800,
    )  # fmt: skip
    if install.returncode != 0:
        tail = install.stderr.strip().splitlines()[-3:]
        _unavailable(f"pip could not install bonewatch from PyPI here: {' | '.join(tail)}")

    found = subprocess.run(
        [str(python), "-c", "import importlib.util as u; "
         f"print([m for m in {TRAIN_ONLY!r} if u.find_spec(m)])"],
        env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert found.stdout.strip() == "[]", found.stdout + found.stderr

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(bonewatch), *args], cwd=tmp_path, env=env, capture_output=True, text=True,
            timeout=600,
        )  # fmt: skip

    synth = cli("synth", "inbox", "--studies", "6", "--format", "png", "--seed", "12")
    assert synth.returncode == 0, synth.stderr
    done = cli("process", "inbox/train")
    assert done.returncode == 0, done.stderr
    assert "warning: serving demo-phantom" in " ".join(done.stderr.split())  # the shipped bundle
    status = json.loads(cli("status", "--format", "json").stdout)["counts"]
    assert status["done"] > 0 and status["failed"] == 0, status
    assert list((tmp_path / "data" / "heatmaps").rglob("*.png"))
    refused = cli("train", "inbox", "--out", "bundle")
    assert refused.returncode == 1
    assert f"error: train {EXTRA_LINE}" in refused.stderr.splitlines(), refused.stderr
