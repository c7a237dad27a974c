"""`bonewatch serve`, `user` and `reviews`: binding, accounts, the labels CSV and the stats, and
the loop back to training: reviewers' verdicts exported and trained on."""

from __future__ import annotations

import csv
import json
import sqlite3
from contextlib import closing
from pathlib import Path

import pytest
from typer.testing import CliRunner

from bonewatch.db import make_engine
from bonewatch.db.reviews import NewReview, record_review
from bonewatch.db.users import get_user
from bonewatch.db.worklist import WorklistFilter, bundle_versions, query_worklist
from bonewatch.web.passwords import verify_password
from bonewatch.worker.cli import app


@pytest.fixture
def cli(tmp_path, monkeypatch):
    monkeypatch.setenv("BONEWATCH_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.delenv("BONEWATCH_DATABASE_URL", raising=False)
    runner = CliRunner()

    def invoke(*args: str, input: str | None = None):
        return runner.invoke(app, list(args), input=input, catch_exceptions=False)

    return invoke


def _url(tmp_path: Path) -> str:
    return f"sqlite:///{(tmp_path / 'data' / 'bonewatch.sqlite').resolve()}"


def test_user_add_reads_the_password_from_stdin(cli, tmp_path):
    added = cli("user", "add", "carol", "--role", "admin", input="a long password\n")
    assert added.exit_code == 0, added.output
    engine = make_engine(_url(tmp_path))
    user = get_user(engine, username="carol")
    assert user.role == "admin" and user.password_hash.startswith("$argon2id$")
    assert "a long password" not in user.password_hash
    assert verify_password(user.password_hash, "a long password")
    listed = json.loads(cli("user", "list", "--format", "json").stdout)
    assert [(u["username"], u["role"]) for u in listed] == [("carol", "admin")]
    again = cli("user", "add", "carol", input="another password\n")
    assert again.exit_code == 1 and "exists" in again.output
    assert cli("user", "passwd", "carol", input="a newer password\n").exit_code == 0
    assert verify_password(get_user(engine, username="carol").password_hash, "a newer password")
    assert cli("user", "remove", "carol").exit_code == 0
    assert cli("user", "remove", "carol").exit_code == 1
    engine.dispose()


@pytest.mark.parametrize(
    ("args", "stdin", "message"),
    [
        (["bad name"], "a long password\n", "user name"),
        (["dave"], "short\n", "8 to 1024"),
        (["dave", "--role", "root"], "a long password\n", "root"),
    ],
)
def test_user_add_refuses(cli, args, stdin, message):
    result = cli("user", "add", *args, input=stdin)
    assert result.exit_code == 2 and message in result.output


def test_serve_refuses_another_address_while_no_user_exists(cli, monkeypatch):
    import uvicorn

    ran = []
    monkeypatch.setattr(uvicorn, "run", lambda *a, **kw: ran.append(kw))
    refused = cli("serve", "--host", "0.0.0.0")
    assert refused.exit_code == 2 and "no user exists" in " ".join(refused.output.split())
    assert ran == []
    local = cli("serve")
    assert local.exit_code == 0, local.output
    assert ran[-1]["host"] == "127.0.0.1" and ran[-1]["port"] == 8000
    assert ran[-1]["proxy_headers"] is False and ran[-1]["access_log"] is False
    cli("user", "add", "erin", input="a long password\n")
    monkeypatch.setenv("BONEWATCH_WEB_TRUSTED_PROXIES", "10.0.0.2")
    wide = cli("serve", "--host", "0.0.0.0", "--port", "8443")
    assert wide.exit_code == 0, wide.output
    assert ran[-1]["host"] == "0.0.0.0" and ran[-1]["port"] == 8443
    assert ran[-1]["proxy_headers"] is True and ran[-1]["forwarded_allow_ips"] == "10.0.0.2"


def test_serve_keeps_one_session_key(cli, tmp_path, monkeypatch):
    import uvicorn

    monkeypatch.setattr(uvicorn, "run", lambda *a, **kw: None)
    cli("serve")
    key = tmp_path / "data" / "session-key"
    first = key.read_text()
    cli("serve")
    assert key.read_text() == first and len(first) >= 32
    assert key.stat().st_mode & 0o077 == 0


@pytest.fixture
def reviewed_ledger(tmp_path, processed_ledger):
    """The processed ledger copied to this test's data folder, every scored study reviewed:
    agreeing with the model, except on every third study."""
    data = tmp_path / "data"
    data.mkdir()
    with closing(sqlite3.connect(processed_ledger.sqlite)) as source:
        with closing(sqlite3.connect(data / "bonewatch.sqlite")) as target:
            source.backup(target)
    engine = make_engine(_url(tmp_path))
    b = bundle_versions(engine)[0]
    page = query_worklist(engine, WorklistFilter(bundle_name=b.name, bundle_version=b.version))
    for i, row in enumerate(page.rows):
        record_review(
            engine,
            NewReview(
                study_uid=row.study_uid,
                reviewer="bob",
                verdict="disagree" if i % 3 == 2 else "agree",
                bundle_name=b.name,
                bundle_version=b.version,
            ),
        )
    engine.dispose()
    return page.rows


def test_reviews_export_writes_the_labels_csv(cli, tmp_path, reviewed_ledger):
    out = tmp_path / "labels.csv"
    result = cli("reviews", "export", "--out", str(out))
    assert result.exit_code == 0, result.output
    with out.open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert list(rows[0]) == ["study_uid", "label", "part"]
    by_uid = {r["study_uid"]: r for r in rows}
    assert set(by_uid) == {r.study_uid for r in reviewed_ledger}
    for i, row in enumerate(reviewed_ledger):
        flipped = {"positive": "negative", "negative": "positive"}[row.label]
        assert by_uid[row.study_uid]["label"] == (flipped if i % 3 == 2 else row.label)
        assert by_uid[row.study_uid]["part"] == row.body_part


def test_reviews_export_with_no_reviews(cli):
    cli("user", "list")  # creates the ledger
    result = cli("reviews", "export", "--out", "x.csv")
    assert result.exit_code == 1 and "no reviews" in result.output


def test_reviews_stats_json(cli, reviewed_ledger):
    result = cli("reviews", "stats", "--format", "json", "--resamples", "100")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    n = len(reviewed_ledger)
    disagreements = sum(1 for i in range(n) if i % 3 == 2)
    overall = report["overall"]
    assert overall["n_studies"] == n
    assert overall["agreement"]["value"] == pytest.approx((n - disagreements) / n, abs=1e-4)
    for metric in ("sensitivity", "specificity", "kappa", "auroc"):
        assert metric in overall
    assert set(report["per_part"]) <= {"ELBOW", "FINGER", "FOREARM", "HAND", "HUMERUS",
                                       "SHOULDER", "WRIST"}  # fmt: skip
    table = cli("reviews", "stats")
    assert table.exit_code == 0 and "overall" in table.stdout


@pytest.mark.slow
def test_a_bundle_trains_on_exported_reviews(cli, tmp_path):
    """Phantom DICOM studies in the ledger, every one reviewed (the reviewers' label is the
    phantom's truth); the export is the labels CSV that `train --labels` trains a bundle on."""
    from bonewatch.ingest import MURA_PARTS, read_header
    from bonewatch.models.bundle import read_manifest
    from bonewatch.worker.synth import synthesize
    from tests.db.review_ledger import BUNDLE, add_study

    phantoms = tmp_path / "phantoms"
    synthesize(phantoms, studies=32, fmt="dicom", seed=5, size=64)
    truth: dict[str, tuple[str, int, list[str]]] = {}
    for path in sorted(phantoms.rglob("*.dcm")):
        meta = read_header(path, salt="loop")
        if meta.mura_part in MURA_PARTS and meta.study_uid:
            part, label, paths = truth.setdefault(
                meta.study_uid, (meta.mura_part, int(meta.mura_label), [])
            )
            paths.append(str(path))
    assert {part for part, _, _ in truth.values()} == set(MURA_PARTS)
    cli("user", "list")  # creates the ledger
    engine = make_engine(_url(tmp_path))
    for i, (uid, (part, label, paths)) in enumerate(sorted(truth.items())):
        # the model is right on two studies in three
        right = i % 3 != 0
        p = 0.8 if bool(label) == right else 0.2
        add_study(engine, uid, [p] * len(paths), part=part, paths=paths)
        record_review(
            engine,
            NewReview(
                study_uid=uid,
                reviewer="bob",
                verdict="agree" if right else "disagree",
                bundle_name=BUNDLE[0],
                bundle_version=BUNDLE[1],
            ),
        )
    engine.dispose()
    labels = tmp_path / "labels.csv"
    assert cli("reviews", "export", "--out", str(labels)).exit_code == 0
    with labels.open(newline="") as fh:
        exported = {r["study_uid"]: r["label"] for r in csv.DictReader(fh)}
    assert exported == {
        uid: "positive" if label else "negative" for uid, (_, label, _) in truth.items()
    }
    bundle = tmp_path / "bundle"
    result = cli(
        "train", str(phantoms), "--labels", str(labels), "--out", str(bundle),
        "--input-size", "16", "--epochs", "1", "--fracture-epochs", "1", "--part-epochs", "1",
        "--batch-size", "16", "--name", "from-reviews",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    manifest = read_manifest(bundle)
    assert manifest.name == "from-reviews"
    assert set(manifest.fracture) == set(MURA_PARTS)
