"""The review worklist on a large ledger: server time per page, filters and sorts.

``python -m bonewatch.bench.worklist [--studies 100000] [--url URL]`` fills a fresh ledger with
that many studies (one to four images each, a prediction per scored image, one bundle version's
study results, a review on one study in twenty), then times each worklist case twice: the
ledger query alone (:func:`bonewatch.db.worklist.query_worklist`, page rows and total count),
and the whole page as a logged-in browser gets it (``GET /studies?...`` through the app: session
check, query, template), and ``GET /api/studies`` for the same filter. Figures are the median
and the slowest of ``--repeats`` runs, in milliseconds, after one warm-up run.

Without ``--url`` the ledger is a SQLite file in a temporary folder (the embedded default);
``--url`` names an empty PostgreSQL (or SQLite) database to fill instead.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from bonewatch.db import make_engine, upgrade
from bonewatch.db.engine import write_transaction
from bonewatch.db.schema import images, predictions, reviews, studies, study_results, users
from bonewatch.db.worklist import WorklistFilter, query_worklist

BUNDLE = ("bench-bundle", "1.0.0")
PARTS = ("ELBOW", "FINGER", "FOREARM", "HAND", "HUMERUS", "SHOULDER", "WRIST")
THRESHOLDS = dict(zip(PARTS, (0.42, 0.49, 0.71, 0.36, 0.54, 0.32, 0.56), strict=True))
CHUNK = 5000
START = datetime(2026, 1, 1, tzinfo=UTC)

# (name, query string): each a worklist a reviewer asks for.
CASES: tuple[tuple[str, str], ...] = (
    ("highest score, page 1", ""),
    ("highest score, page 1000", "page=1000"),
    ("most uncertain, page 1", "sort=uncertain"),
    ("newest, page 1", "sort=newest"),
    ("part wrist, positive", "part=WRIST&label=positive"),
    ("not reviewed, most uncertain", "reviewed=no&sort=uncertain"),
    ("reviewed", "reviewed=yes"),
    ("score 0.4-0.6", "min_p=0.4&max_p=0.6"),
    ("received in one week", "since=2026-02-01&until=2026-02-07"),
    ("a failed image", "status=failed"),
    ("unscored", "label=unscored"),
    ("200 per page, page 50", "per_page=200&page=50"),
)


def fill_ledger(url: str, n_studies: int, *, seed: int = 0) -> dict[str, int]:
    """Write ``n_studies`` synthetic studies into the migrated ledger at ``url``."""
    rng = random.Random(seed)
    engine = make_engine(url)
    counted = {"studies": 0, "images": 0, "predictions": 0, "study_results": 0, "reviews": 0}
    image_id = prediction_id = 0
    try:
        with write_transaction(engine) as conn:
            user_id = conn.execute(
                users.insert()
                .values(username="bench", password_hash="x", role="reviewer", created_at=START)
                .returning(users.c.id)
            ).scalar_one()
        for start in range(0, n_studies, CHUNK):
            rows: dict[str, list[dict[str, Any]]] = {k: [] for k in counted}
            for i in range(start, min(start + CHUNK, n_studies)):
                uid = f"1.2.826.0.1.3680043.10.1234.{i}"
                when = START + timedelta(seconds=i * 60 + rng.random())
                part = PARTS[rng.randrange(len(PARTS))]
                n_images = rng.choice((1, 2, 2, 3, 3, 4))
                scored: list[float] = []
                for _ in range(n_images):
                    image_id += 1
                    roll = rng.random()
                    status = (
                        "done"
                        if roll < 0.9
                        else "unsupported"
                        if roll < 0.95
                        else "failed"
                        if roll < 0.98
                        else "queued"
                    )
                    rows["images"].append(
                        {
                            "id": image_id,
                            "path": f"/archive/{i}/{image_id}.dcm",
                            "sha256": f"{image_id:064x}",
                            "size_bytes": 1_000_000,
                            "format": "dicom",
                            "study_uid": uid,
                            "queue": "bulk",
                            "status": status,
                            "attempts": 1,
                            "created_at": when,
                            "updated_at": when,
                            "finished_at": when if status != "queued" else None,
                        }
                    )
                    if status == "done":
                        prediction_id += 1
                        p = min(max(rng.betavariate(0.6, 1.2), 0.0), 1.0)
                        scored.append(p)
                        rows["predictions"].append(
                            {
                                "id": prediction_id,
                                "image_id": image_id,
                                "bundle_name": BUNDLE[0],
                                "bundle_version": BUNDLE[1],
                                "body_part_probs": {part: 0.9, "other": 0.1},
                                "body_part": part,
                                "body_part_confidence": 0.9,
                                "body_part_disagrees": False,
                                "p_fracture": p,
                                "label": "positive" if p >= THRESHOLDS[part] else "negative",
                                "threshold": THRESHOLDS[part],
                                "timings": {"stage1_ms": 4.0, "stage2_ms": 3.0},
                                "created_at": when,
                            }
                        )
                rows["studies"].append(
                    {
                        "study_uid": uid,
                        "first_received_at": when,
                        "last_received_at": when,
                        "n_received": n_images,
                        "stable_at": when + timedelta(seconds=30),
                    }
                )
                if scored:
                    mean = sum(scored) / len(scored)
                    label = "positive" if mean >= THRESHOLDS[part] else "negative"
                    rows["study_results"].append(
                        {
                            "study_uid": uid,
                            "bundle_name": BUNDLE[0],
                            "bundle_version": BUNDLE[1],
                            "body_part": part,
                            "n_images": len(scored),
                            "mean_p_fracture": mean,
                            "threshold": THRESHOLDS[part],
                            "label": label,
                            "updated_at": when,
                        }
                    )
                    if rng.random() < 0.05:
                        agree = rng.random() < 0.85
                        rows["reviews"].append(
                            {
                                "study_uid": uid,
                                "user_id": user_id,
                                "reviewer": "bench",
                                "verdict": "agree" if agree else "disagree",
                                "label": label
                                if agree
                                else ("negative" if label == "positive" else "positive"),
                                "bundle_name": BUNDLE[0],
                                "bundle_version": BUNDLE[1],
                                "model_label": label,
                                "model_score": mean,
                                "created_at": when + timedelta(hours=1),
                            }
                        )
            with write_transaction(engine) as conn:
                for name, table in (
                    ("studies", studies),
                    ("images", images),
                    ("predictions", predictions),
                    ("study_results", study_results),
                    ("reviews", reviews),
                ):
                    if rows[name]:
                        conn.execute(table.insert(), rows[name])
                        counted[name] += len(rows[name])
        if engine.dialect.name == "postgresql":  # fresh statistics, as autovacuum would
            with engine.connect() as conn:
                conn.execution_options(isolation_level="AUTOCOMMIT")
                for table in (studies, images, predictions, study_results, reviews):
                    conn.exec_driver_sql(f"ANALYZE {table.name}")
        else:
            with engine.connect() as conn:
                conn.exec_driver_sql("ANALYZE")
    finally:
        engine.dispose()
    return counted


def _timed(call: Callable[[], Any], repeats: int) -> dict[str, float]:
    call()  # warm-up: the first run pays for caches and statement compilation
    runs = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        call()
        runs.append((time.perf_counter() - t0) * 1000)
    return {"median_ms": round(statistics.median(runs), 1), "max_ms": round(max(runs), 1)}


def _client(url: str) -> Any:
    """A TestClient on the app over ``url``, logged in as an account made for it."""
    import re

    from fastapi.testclient import TestClient

    from bonewatch.db.users import add_user
    from bonewatch.web import WebConfig, create_app
    from bonewatch.web.passwords import hash_password

    engine = make_engine(url)
    add_user(engine, "bench-web", hash_password("bench password"), "reviewer")
    config = WebConfig(
        database_url=url, session_secret="b" * 40, heatmap_dir=Path(tempfile.gettempdir())
    )
    client = TestClient(create_app(config, engine=engine))
    form = client.get("/login").text
    token = re.search(r'name="csrf_token" value="([^"]+)"', form)
    assert token is not None
    response = client.post(
        "/login",
        data={"username": "bench-web", "password": "bench password", "csrf_token": token[1]},
        follow_redirects=False,
    )
    if response.status_code != 303:
        raise RuntimeError(f"login failed: {response.status_code}")
    return client


def run(url: str, n_studies: int, repeats: int) -> dict[str, Any]:
    from bonewatch.web.filters import WorklistQuery

    upgrade(url)
    t0 = time.perf_counter()
    counted = fill_ledger(url, n_studies)
    fill_s = time.perf_counter() - t0
    engine = make_engine(url)
    client = _client(url)
    results = []
    try:
        for name, query in CASES:
            params = dict(p.split("=", 1) for p in query.split("&") if p)
            wq = WorklistQuery.parse(params)
            bundle = {"bundle": BUNDLE[0], "version": BUNDLE[1]}
            f: WorklistFilter = WorklistQuery.parse({**params, **bundle}).to_filter()
            ledger = _timed(_ledger_call(engine, f, wq.offset, wq.per_page), repeats)
            page = _timed(_get(client, f"/studies?{query}"), repeats)
            api = _timed(_get(client, f"/api/studies?{query}"), repeats)
            found = query_worklist(engine, f, offset=wq.offset, limit=wq.per_page)
            results.append(
                {
                    "case": name,
                    "query": query,
                    "matches": found.total,
                    "rows": len(found.rows),
                    "ledger": ledger,
                    "page": page,
                    "api": api,
                }
            )
    finally:
        client.close()
        engine.dispose()
    return {
        "dialect": make_engine(url).dialect.name,
        "rows": counted,
        "fill_s": round(fill_s, 1),
        "repeats": repeats,
        "machine": f"{platform.machine()}, {platform.processor() or platform.system()}, "
        f"{_cores()} cores, Python {platform.python_version()}",
        "cases": results,
    }


def _ledger_call(engine: Any, f: WorklistFilter, offset: int, limit: int) -> Callable[[], Any]:
    return lambda: query_worklist(engine, f, offset=offset, limit=limit)


def _get(client: Any, url: str) -> Callable[[], Any]:
    return lambda: _ok(client.get(url))


def _ok(response: Any) -> Any:
    if response.status_code != 200:
        raise RuntimeError(f"{response.request.url}: {response.status_code} {response.text[:200]}")
    return response


def _cores() -> int:
    import os

    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def print_report(report: dict[str, Any]) -> None:
    rows = report["rows"]
    print(
        f"{report['dialect']}: {rows['studies']} studies, {rows['images']} images, "
        f"{rows['predictions']} predictions, {rows['reviews']} reviews "
        f"(filled in {report['fill_s']} s); {report['machine']}"
    )
    print(f"median (max) of {report['repeats']} runs, ms:")
    header = f"{'case':32} {'matches':>8} {'ledger':>14} {'page':>14} {'api':>14}"
    print(header)
    print("-" * len(header))
    for case in report["cases"]:

        def cell(t: dict[str, float]) -> str:
            return f"{t['median_ms']:.1f} ({t['max_ms']:.0f})"

        print(
            f"{case['case']:32} {case['matches']:>8} {cell(case['ledger']):>14} "
            f"{cell(case['page']):>14} {cell(case['api']):>14}"
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--studies", type=int, default=100_000)
    parser.add_argument("--url", help="an empty database to fill; default a temporary SQLite")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bonewatch-worklist-") as folder:
        url = args.url or f"sqlite:///{Path(folder) / 'ledger.sqlite'}"
        report = run(url, args.studies, args.repeats)
    print_report(report)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
