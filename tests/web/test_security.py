"""The review app under attack: no route without a login, passwords guessed, forms forged,
markup, path traversal and SQL in every parameter."""

from __future__ import annotations

import re
import time
import types
from urllib.parse import quote

import pytest
from fastapi.routing import APIRoute
from fastapi.testclient import TestClient
from sqlalchemy import func, inspect, select, update

from bonewatch.db.schema import images, predictions, reviews, study_results, users
from bonewatch.db.users import remove_user, set_password_hash
from bonewatch.db.worklist import WorklistFilter, bundle_versions, query_worklist
from bonewatch.web import create_app
from bonewatch.web.filters import PARAMS
from bonewatch.web.passwords import hash_password
from tests.web.conftest import ADMIN, REVIEWER, form_token, log_in

OPEN = {"/login", "/healthz"}
SAMPLE_PARAMS = {"study_uid": "1.2.3", "image_id": "1", "prediction_id": "1", "name": "app.css"}


def _api_routes(routes):
    for route in routes:
        if isinstance(route, APIRoute):
            yield route
        elif hasattr(route, "original_router"):  # FastAPI keeps included routers whole
            yield from _api_routes(route.original_router.routes)


def _routes(app):
    for route in _api_routes(app.routes):
        path = re.sub(r"{(\w+)(:\w+)?}", lambda m: SAMPLE_PARAMS[m[1]], route.path)
        for method in route.methods:
            yield method, route.path, path


def _scored_uid(engine) -> str:
    b = bundle_versions(engine)[0]
    page = query_worklist(engine, WorklistFilter(bundle_name=b.name, bundle_version=b.version))
    return page.rows[0].study_uid


def _counts(engine) -> dict[str, int]:
    with engine.connect() as conn:
        return {
            t.name: conn.execute(select(func.count()).select_from(t)).scalar_one()
            for t in (images, predictions, study_results, reviews, users)
        }


def test_every_route_but_login_and_healthz_needs_a_login(client):
    checked = 0
    for method, template, path in _routes(client.app):
        if template in OPEN:
            continue
        response = client.request(method, path, follow_redirects=False)
        checked += 1
        if response.status_code == 303:
            assert response.headers["location"].startswith("/login"), (method, path)
        else:
            assert response.status_code == 401, (method, path, response.status_code)
            assert response.headers["www-authenticate"].startswith("Basic")
        assert "bonewatch_session" not in response.headers.get("set-cookie", "")
    assert checked >= 12


def test_no_openapi_or_docs_routes(reviewer):
    for path in ("/docs", "/redoc", "/openapi.json"):
        assert reviewer.get(path).status_code == 404, path


def test_a_page_asked_for_without_login_comes_back_after_it(client):
    response = client.get("/studies?part=HAND", follow_redirects=False)
    assert response.headers["location"] == "/login?next=%2Fstudies%3Fpart%3DHAND"
    login = log_in(client, next_path="/studies?part=HAND")
    assert login.headers["location"] == "/studies?part=HAND"


@pytest.mark.parametrize(
    "target", ["//evil.example/x", "https://evil.example/", "/\\evil.example", "javascript:x"]
)
def test_login_never_redirects_off_the_site(client, target):
    response = log_in(client, next_path=target)
    assert response.status_code == 303 and response.headers["location"] == "/studies"


def test_wrong_password_sets_no_session_and_is_audited(client, web_engine):
    from bonewatch.db.audit import query_audit

    response = log_in(client, (REVIEWER[0], "not the password"))
    assert response.status_code == 401
    assert "Wrong user name or password" in response.text
    assert "bonewatch_session" not in response.headers.get("set-cookie", "")
    assert client.get("/studies", follow_redirects=False).status_code == 303
    unknown = log_in(client, ("nobody", "whatever password"))
    assert unknown.status_code == 401 and "Wrong user name or password" in unknown.text
    failed = query_audit(web_engine, action="login_failed")
    assert {e.username for e in failed} == {"bob", "nobody"}


def test_wrong_passwords_are_rate_limited_per_account(client):
    for _ in range(3):  # login_attempts=3 in the test config
        assert log_in(client, (REVIEWER[0], "guess")).status_code == 401
    locked = log_in(client, REVIEWER)  # even the right password waits now
    assert locked.status_code == 429
    assert int(locked.headers["retry-after"]) > 0
    assert "bonewatch_session" not in locked.headers.get("set-cookie", "")
    assert log_in(client, ADMIN).status_code == 303  # another account is not affected
    basic = client.get("/api/studies", auth=(REVIEWER[0], REVIEWER[1]))
    assert basic.status_code == 429


def test_wrong_passwords_are_rate_limited_per_address(client):
    for i in range(12):  # four times the per-account limit, spread over names
        assert log_in(client, (f"user{i}", "guess")).status_code == 401
    assert log_in(client, ADMIN).status_code == 429


def test_basic_auth_wrong_or_malformed(client):
    assert client.get("/api/studies", auth=("bob", "wrong")).status_code == 401
    for header in ("Basic !!!", "Basic " + "Ym9i", "Bearer x"):
        response = client.get("/api/studies", headers={"Authorization": header})
        assert response.status_code == 401, header
    assert client.get("/api/studies", auth=REVIEWER).status_code == 200


def test_login_form_needs_its_csrf_token(client):
    client.get("/login")
    response = client.post(
        "/login", data={"username": REVIEWER[0], "password": REVIEWER[1]}, follow_redirects=False
    )
    assert response.status_code == 403
    forged = client.post(
        "/login",
        data={"username": REVIEWER[0], "password": REVIEWER[1], "csrf_token": "forged"},
        follow_redirects=False,
    )
    assert forged.status_code == 403
    assert "bonewatch_session" not in forged.headers.get("set-cookie", "")


def test_review_and_logout_need_the_sessions_csrf_token(reviewer, web_engine):
    uid = _scored_uid(web_engine)
    b = bundle_versions(web_engine)[0]
    form = {"study_uid": uid, "verdict": "agree", "result_bundle": b.name,
            "result_version": b.version}  # fmt: skip
    assert reviewer.post("/review", data=form).status_code == 403
    assert reviewer.post("/review", data={**form, "csrf_token": "forged"}).status_code == 403
    assert _counts(web_engine)["reviews"] == 0
    assert reviewer.post("/logout", data={}).status_code == 403
    assert reviewer.get("/studies").status_code == 200  # still logged in
    token = form_token(reviewer.get("/studies").text)
    out = reviewer.post("/logout", data={"csrf_token": token}, follow_redirects=False)
    assert out.status_code == 303
    assert reviewer.get("/studies", follow_redirects=False).status_code == 303


def test_session_cookie_flags(client):
    response = log_in(client)
    cookie = response.headers["set-cookie"]
    assert cookie.startswith("bonewatch_session=")
    for flag in ("HttpOnly", "SameSite=lax", "Path=/", "Max-Age=28800"):
        assert flag.lower() in cookie.lower(), flag
    assert "secure" not in cookie.lower()


def test_cookies_are_secure_over_https(web_config, web_engine):
    with TestClient(create_app(web_config, engine=web_engine), base_url="https://testserver") as c:
        page = c.get("/login")
        assert "secure" in page.headers["set-cookie"].lower()
        response = log_in(c)
        assert "secure" in response.headers["set-cookie"].lower()


def test_sessions_expire(reviewer, monkeypatch):
    import itsdangerous.timed

    later = time.time() + 8 * 3600 + 5
    monkeypatch.setattr(itsdangerous.timed, "time", types.SimpleNamespace(time=lambda: later))
    assert reviewer.get("/studies", follow_redirects=False).status_code == 303


def test_a_forged_or_tampered_cookie_is_no_session(client):
    log_in(client)
    value = client.cookies["bonewatch_session"]
    client.cookies.clear()
    client.cookies.set(
        "bonewatch_session", value[:-2] + ("A" if value[-2] != "A" else "B") + value[-1]
    )
    assert client.get("/studies", follow_redirects=False).status_code == 303


def test_removed_users_and_changed_passwords_end_sessions(client, web_engine):
    log_in(client)
    assert client.get("/studies").status_code == 200
    set_password_hash(web_engine, REVIEWER[0], hash_password("a brand new password"))
    assert client.get("/studies", follow_redirects=False).status_code == 303
    client.cookies.clear()
    log_in(client, ADMIN)
    assert client.get("/studies").status_code == 200
    remove_user(web_engine, ADMIN[0])
    assert client.get("/studies", follow_redirects=False).status_code == 303


def test_markup_in_a_comment_is_rendered_escaped(reviewer, web_engine):
    uid = _scored_uid(web_engine)
    markup = '<script>alert(1)</script><img src=x onerror="alert(2)">'
    token = form_token(reviewer.get("/studies").text)
    response = reviewer.post(
        f"/api/studies/{quote(uid, safe='/')}/review",
        json={"verdict": "agree", "comment": markup},
        headers={"X-CSRF-Token": token},
    )
    assert response.status_code == 201
    page = reviewer.get("/studies/" + quote(uid, safe="/")).text
    assert "<script>alert" not in page and "<img src=x" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page


def test_markup_in_a_typed_user_name_is_escaped_on_the_audit_page(client):
    log_in(client, ("<b>x</b><script>y()</script>", "whatever"))
    log_in(client, ADMIN)
    page = client.get("/audit").text
    assert "<script>y()" not in page and "&lt;script&gt;y()" in page


def test_pages_carry_security_headers(reviewer):
    response = reviewer.get("/studies")
    csp = response.headers["content-security-policy"]
    assert "default-src 'none'" in csp and "script-src 'self'" in csp
    assert "frame-ancestors 'none'" in csp and "unsafe-inline" not in csp
    assert response.headers["x-frame-options"] == "DENY"
    assert response.headers["x-content-type-options"] == "nosniff"
    assert response.headers["referrer-policy"] == "no-referrer"
    assert response.headers["cache-control"] == "no-store"


@pytest.mark.parametrize(
    "path",
    [
        "/images/../../etc/passwd",
        "/images/..%2f..%2fetc%2fpasswd.png",
        "/images/%2e%2e%2f1.png",
        "/images/1.png/../../../etc/passwd",
        "/images/-1.png",
        "/images/1e3.png",
        "/heatmaps/..%2F..%2Fetc%2Fpasswd.png",
        "/heatmaps/1.png%00.txt",
        "/static/../web/app.py",
        "/static/..%2fapp.py",
        "/static/%2e%2e%2f%2e%2e%2fpyproject.toml",
        "/static/app.css%00.py",
        "/static/..%5c..%5capp.py",
        "/static/templates",
        "/static/app.py",
    ],
)
def test_path_traversal_on_image_and_static_routes(reviewer, path):
    response = reviewer.get(path)
    assert response.status_code in (404, 422), (path, response.status_code)
    assert b"import" not in response.content and b"root:" not in response.content


def test_static_files_are_served(reviewer):
    css = reviewer.get("/static/app.css")
    assert css.status_code == 200 and css.headers["content-type"].startswith("text/css")
    assert reviewer.get("/static/review.js").status_code == 200


def test_a_heatmap_path_outside_the_heatmap_folder_is_never_served(reviewer, web_engine):
    with web_engine.begin() as conn:
        prediction_id = conn.execute(select(func.min(predictions.c.id))).scalar_one()
        conn.execute(
            update(predictions)
            .where(predictions.c.id == prediction_id)
            .values(heatmap_path="/etc/passwd")
        )
        image_id = conn.execute(select(func.min(images.c.id))).scalar_one()
        conn.execute(update(images).where(images.c.id == image_id).values(path="/etc/passwd"))
    heatmap = reviewer.get(f"/heatmaps/{prediction_id}.png")
    assert heatmap.status_code == 404 and b"root:" not in heatmap.content
    image = reviewer.get(f"/images/{image_id}.png")
    assert image.status_code == 404 and b"root:" not in image.content


SQL_VALUES = [
    "' OR '1'='1",
    "1; DROP TABLE reviews; --",
    '" OR 1=1 --',
    "%",
    "_",
    "\\",
    "ELBOW' --",
    "0.5) OR (1=1",
    "2026-01-01' OR 'x'='x",
    "1 UNION SELECT password_hash FROM users",
]


def test_sql_metacharacters_in_every_filter(reviewer, web_engine):
    before = _counts(web_engine)
    for name in (*PARAMS, "pos"):
        for value in SQL_VALUES:
            for route in ("/studies", "/api/studies"):
                response = reviewer.get(route, params={name: value})
                assert response.status_code in (200, 422), (route, name, value)
                assert "password_hash" not in response.text and "$argon2" not in response.text
    for value in SQL_VALUES:
        assert reviewer.get("/studies/" + quote(value, safe="")).status_code in (404, 422)
        assert reviewer.get("/api/studies/" + quote(value, safe="")).status_code == 404
        assert reviewer.get("/audit").status_code == 403
        stats = reviewer.get("/stats", params={"bundle": value, "version": value})
        assert stats.status_code == 200 and "No reviewed studies" in stats.text
    assert _counts(web_engine) == before
    assert {"reviews", "users", "audit_events"} <= set(inspect(web_engine).get_table_names())


def test_sql_metacharacters_in_audit_filters(admin, web_engine):
    for value in SQL_VALUES:
        for name in ("study", "user"):
            response = admin.get("/audit", params={name: value})
            assert response.status_code == 200, (name, value)
            assert "Nothing recorded" in response.text
    assert admin.get("/audit", params={"action": SQL_VALUES[0]}).status_code == 422


def test_the_ledger_treats_metacharacters_as_data(web_engine):
    b = bundle_versions(web_engine)[0]
    for value in SQL_VALUES:
        page = query_worklist(
            web_engine,
            WorklistFilter(bundle_name=b.name, bundle_version=value, part=value),
        )
        assert page.total == 0 and page.rows == ()
