"""The review app's routes through FastAPI's TestClient, on a ledger the demo bundle filled."""

from __future__ import annotations

import io
import re
from urllib.parse import quote

import pytest
from PIL import Image
from sqlalchemy import func, select

from bonewatch.db.reviews import latest_reviews
from bonewatch.db.schema import audit_events, predictions, reviews
from bonewatch.db.worklist import WorklistFilter, bundle_versions, query_worklist, study_detail
from tests.web.conftest import form_token


def _worklist(engine, **filters):
    b = bundle_versions(engine)[0]
    return query_worklist(
        engine, WorklistFilter(bundle_name=b.name, bundle_version=b.version, **filters), limit=200
    )


def _study_links(html: str) -> list[str]:
    return [
        link.replace("&amp;", "&")
        for link in re.findall(r'<td class="uid"><a href="([^"]+)"', html)
    ]


def _review_form(html: str) -> dict[str, str]:
    form = html[html.index('<form id="review-form"') :]
    form = form[: form.index("</form>")]
    return dict(re.findall(r'<input type="hidden" name="([^"]+)" value="([^"]*)"', form))


def test_home_leads_to_the_worklist(reviewer):
    response = reviewer.get("/", follow_redirects=False)
    assert response.status_code == 303 and response.headers["location"] == "/studies"


def test_worklist_lists_every_scored_study_highest_score_first(reviewer, web_engine):
    page = reviewer.get("/studies")
    assert page.status_code == 200
    expected = _worklist(web_engine)
    links = _study_links(page.text)
    assert [link.split("?")[0] for link in links] == [
        "/studies/" + quote(r.study_uid, safe="/") for r in expected.rows
    ]
    scores = [r.mean_p_fracture for r in expected.rows]
    assert scores == sorted(scores, reverse=True)
    # the page shows each row's part, threshold, label and status
    first = expected.rows[0]
    assert first.body_part.lower() in page.text
    assert f"{first.threshold:.2f}" in page.text
    assert "done" in page.text


def test_worklist_sorts_by_uncertainty_and_filters(reviewer, web_engine):
    uncertain = _worklist(web_engine, sort="uncertain")
    distances = [abs(r.mean_p_fracture - r.threshold) for r in uncertain.rows]
    assert distances == sorted(distances)
    page = reviewer.get("/studies?sort=uncertain")
    assert [link.split("?")[0] for link in _study_links(page.text)][0] == (
        "/studies/" + quote(uncertain.rows[0].study_uid, safe="/")
    )
    positives = reviewer.get("/studies?label=positive")
    expected = _worklist(web_engine, label="positive")
    assert len(_study_links(positives.text)) == len(expected.rows) > 0
    assert "negative</span>" not in positives.text
    part = expected.rows[0].body_part
    by_part = reviewer.get(f"/studies?part={part}&min_p=0.5&max_p=1")
    assert all(r.body_part == part for r in _worklist(web_engine, part=part).rows)
    assert len(_study_links(by_part.text)) == len(_worklist(web_engine, part=part, min_p=0.5).rows)
    unscored = reviewer.get("/studies?label=unscored")
    assert unscored.status_code == 200


def test_worklist_pages(reviewer, web_engine):
    total = _worklist(web_engine).total
    first = reviewer.get("/studies?per_page=5")
    second = reviewer.get("/studies?per_page=5&page=2")
    assert len(_study_links(first.text)) == 5
    assert set(_study_links(first.text)).isdisjoint(_study_links(second.text))
    assert f"Page 1 of {-(-total // 5)}" in first.text
    assert 'rel="next"' in first.text
    beyond = reviewer.get("/studies?per_page=5&page=999")
    assert beyond.status_code == 200 and "No study matches" in beyond.text


def test_worklist_refuses_values_outside_the_choices(reviewer):
    for query in (
        "part=KNEE",
        "label=maybe",
        "min_p=2",
        "sort=random",
        "page=0",
        "since=yesterday",
    ):
        response = reviewer.get(f"/studies?{query}")
        assert response.status_code == 422, query
        assert "<h1>422</h1>" in response.text


def test_study_page_shows_images_numbers_and_keys(reviewer, web_engine):
    page = reviewer.get("/studies")
    link = _study_links(page.text)[0]
    study = reviewer.get(link)
    assert study.status_code == 200
    uid = _worklist(web_engine).rows[0].study_uid
    detail = study_detail(web_engine, uid)
    for image in detail.images:
        assert f'src="/images/{image.id}.png"' in study.text
        if image.prediction and image.prediction.has_heatmap:
            assert f'src="/heatmaps/{image.prediction.prediction_id}.png"' in study.text
    assert detail.result.bundle in study.text and detail.result.bundle_version in study.text
    assert f"{detail.result.threshold:.3f}" in study.text
    assert "stage1" in study.text  # timings
    assert 'id="agree"' in study.text and 'id="disagree"' in study.text
    assert 'id="toggle-heatmap"' in study.text
    nxt = re.search(r'data-next="([^"]*)"', study.text)[1]
    assert nxt.startswith("/studies/") and "pos=1" in nxt
    assert 'data-prev=""' in study.text  # the first study has no previous


def test_refused_images_show_their_reasons(reviewer, web_engine):
    # a study with an unsupported image (an x-ray of another region, or a refused header)
    with web_engine.connect() as conn:
        from bonewatch.db.schema import images

        row = conn.execute(
            select(images.c.study_uid, images.c.reason).where(
                images.c.status == "unsupported", images.c.study_uid.is_not(None)
            )
        ).first()
    assert row is not None
    page = reviewer.get("/studies/" + quote(row.study_uid, safe="/"))
    assert page.status_code == 200
    assert "unsupported" in page.text
    assert row.reason.split(":")[0][:30] in page.text.replace("&#39;", "'")


def test_unknown_study_is_404(reviewer):
    assert reviewer.get("/studies/1.2.3.4.5.6.7.8.9").status_code == 404


def test_image_routes_render_png_at_screen_size(reviewer, web_engine):
    uid = _worklist(web_engine).rows[0].study_uid
    detail = study_detail(web_engine, uid)
    image = detail.images[0]
    response = reviewer.get(f"/images/{image.id}.png?size=256")
    assert response.status_code == 200 and response.headers["content-type"] == "image/png"
    assert "no-store" in response.headers["cache-control"]
    picture = Image.open(io.BytesIO(response.content))
    assert max(picture.size) <= 256 and picture.mode == "L"
    with_heatmap = next(
        (i for i in detail.images if i.prediction and i.prediction.has_heatmap), None
    )
    if with_heatmap is None:
        pytest.skip("this study has no heatmap")
    heatmap = reviewer.get(f"/heatmaps/{with_heatmap.prediction.prediction_id}.png")
    assert heatmap.status_code == 200
    assert Image.open(io.BytesIO(heatmap.content)).mode == "RGB"
    assert reviewer.get(f"/images/{image.id}.png?size=99").status_code == 422
    assert reviewer.get("/images/999999.png").status_code == 404


def test_image_rendering_matches_the_models_decode(reviewer, web_engine, processed_ledger):
    """MONOCHROME1 and windowing come out as `read_image` gives them to the model."""
    import numpy as np

    from bonewatch.db.worklist import image_source
    from bonewatch.ingest import read_image

    uid = _worklist(web_engine).rows[0].study_uid
    image = study_detail(web_engine, uid).images[0]
    source = image_source(web_engine, image.id)
    decoded = read_image(source.path, salt="x").pixels
    response = reviewer.get(f"/images/{image.id}.png?size=2048")
    shown = np.asarray(Image.open(io.BytesIO(response.content)), dtype=np.float32) / 255.0
    assert shown.shape == decoded.shape
    assert float(np.abs(shown - decoded).max()) <= 1 / 255 + 1e-6


def test_a_verdict_is_a_new_row_and_moves_to_the_next_study(reviewer, web_engine):
    before = _prediction_rows(web_engine)
    page = reviewer.get("/studies")
    links = _study_links(page.text)
    study = reviewer.get(links[0])
    fields = _review_form(study.text)
    response = reviewer.post(
        "/review", data={**fields, "verdict": "agree", "comment": "clear fracture"},
        follow_redirects=False,
    )  # fmt: skip
    assert response.status_code == 303
    assert response.headers["location"].split("&saved=")[0] == links[1]
    second = reviewer.post(
        "/review", data={**fields, "verdict": "disagree"}, follow_redirects=False
    )
    assert second.status_code == 303
    uid = fields["study_uid"]
    detail = study_detail(web_engine, uid)
    assert [r.verdict for r in detail.reviews] == ["agree", "disagree"]  # history kept
    agree, disagree = detail.reviews
    assert agree.label == detail.result.label and agree.reviewer == "bob"
    assert disagree.label != agree.label
    assert agree.comment == "clear fracture"
    assert agree.bundle == detail.result.bundle
    assert latest_reviews(web_engine)[0].label == disagree.label  # the latest counts
    assert _prediction_rows(web_engine) == before  # predictions untouched
    with web_engine.connect() as conn:
        actions = [r.action for r in conn.execute(select(audit_events.c.action))]
    assert actions.count("review") == 2 and "view_study" in actions
    shown = reviewer.get("/studies/" + quote(uid, safe="/"))
    assert "clear fracture" in shown.text and "Reviews" in shown.text


def _prediction_rows(engine):
    with engine.connect() as conn:
        return [tuple(r) for r in conn.execute(select(predictions).order_by(predictions.c.id))]


def test_a_verdict_with_a_contradicting_label_or_unknown_part_is_refused(reviewer, web_engine):
    study = reviewer.get(_study_links(reviewer.get("/studies").text)[0])
    fields = _review_form(study.text)
    model_label = study_detail(web_engine, fields["study_uid"]).result.label
    other = "negative" if model_label == "positive" else "positive"
    for bad in ({"verdict": "agree", "label": other}, {"verdict": "agree", "part": "KNEE"},
                {"verdict": "maybe"}):  # fmt: skip
        response = reviewer.post("/review", data={**fields, **bad})
        assert response.status_code == 422, bad
    assert study_detail(web_engine, fields["study_uid"]).reviews == ()


def test_stats_page_and_roc_plot(reviewer, web_engine):
    page = reviewer.get("/studies")
    for link in _study_links(page.text)[:6]:
        fields = _review_form(reviewer.get(link).text)
        verdict = "disagree" if link.endswith("pos=2") else "agree"
        assert reviewer.post("/review", data={**fields, "verdict": verdict}).status_code == 200
    stats = reviewer.get("/stats")
    assert stats.status_code == 200
    assert "overall" in stats.text and "Cohen" in stats.text and "AUROC" in stats.text
    assert "<td>6</td>" in stats.text
    roc = reviewer.get("/stats/roc.png")
    assert roc.status_code == 200 and roc.content.startswith(b"\x89PNG")
    everything = reviewer.get("/stats?bundle=all")
    assert everything.status_code == 200


def test_api_lists_studies_with_the_keys_scripts_rely_on(reviewer, web_engine):
    data = reviewer.get("/api/studies?per_page=3").json()
    assert data["total"] == _worklist(web_engine).total and len(data["items"]) == 3
    keys = {"study_uid", "body_part", "n_images", "mean_p_fracture", "threshold", "label",
            "bundle", "bundle_version", "reviews"}  # fmt: skip
    assert keys <= set(data["items"][0])
    wrist = reviewer.get("/api/studies?label=negative&sort=uncertain").json()
    assert all(item["label"] == "negative" for item in wrist["items"])
    assert reviewer.get("/api/studies?part=KNEE").status_code == 422


def test_api_study_detail_has_images_by_id_and_no_paths(reviewer, web_engine, processed_ledger):
    uid = _worklist(web_engine).rows[0].study_uid
    data = reviewer.get("/api/studies/" + quote(uid, safe="/")).json()
    assert data["study_uid"] == uid and data["images"] and data["result"]["label"]
    for image in data["images"]:
        assert image["image_url"] == f"/images/{image['id']}.png"
        assert reviewer.get(image["image_url"]).status_code == 200
    text = reviewer.get("/api/studies/" + quote(uid, safe="/")).text
    assert str(processed_ledger.inbox) not in text and "heatmap_path" not in text
    assert reviewer.get("/api/studies/no.such.study").status_code == 404


def test_api_review_with_basic_auth(client, web_engine):
    uid = _worklist(web_engine).rows[0].study_uid
    auth = ("alice", "alice's long password")
    response = client.post(
        f"/api/studies/{quote(uid, safe='/')}/review",
        json={"verdict": "disagree", "comment": "no fracture line", "part": "WRIST"},
        auth=auth,
    )
    assert response.status_code == 201, response.text
    body = response.json()
    assert body["verdict"] == "disagree" and body["reviewer"] == "alice" and body["part"] == "WRIST"
    assert body["label"] != body["model_label"]
    detail = client.get(f"/api/studies/{quote(uid, safe='/')}", auth=auth).json()
    assert [r["id"] for r in detail["reviews"]] == [body["id"]]
    contradicting = client.post(
        f"/api/studies/{quote(uid, safe='/')}/review",
        json={"verdict": "agree", "label": body["label"]},
        auth=auth,
    )
    assert contradicting.status_code == 422
    unknown_field = client.post(
        f"/api/studies/{quote(uid, safe='/')}/review", json={"verdict": "agree", "x": 1}, auth=auth
    )
    assert unknown_field.status_code == 422
    with web_engine.connect() as conn:
        assert conn.execute(select(func.count()).select_from(reviews)).scalar_one() == 1


def test_api_post_on_a_session_needs_the_csrf_header(reviewer, web_engine):
    uid = quote(_worklist(web_engine).rows[0].study_uid, safe="/")
    refused = reviewer.post(f"/api/studies/{uid}/review", json={"verdict": "agree"})
    assert refused.status_code == 403
    token = form_token(reviewer.get("/studies").text)
    accepted = reviewer.post(
        f"/api/studies/{uid}/review", json={"verdict": "agree"}, headers={"X-CSRF-Token": token}
    )
    assert accepted.status_code == 201


def test_metrics_by_token_or_admin(client, admin, web_engine):
    from tests.web.conftest import log_in

    text = admin.get("/metrics").text
    for name in ("bonewatch_images{", "bonewatch_images_processed_total",
                 "bonewatch_inference_seconds_bucket", "bonewatch_queue_depth{",
                 "bonewatch_reviews_total", "bonewatch_reviewed_studies",
                 "bonewatch_deliveries_pending"):  # fmt: skip
        assert name in text, name
    assert 'bonewatch_images{status="done"}' in text
    count = re.search(r"bonewatch_inference_seconds_count (\S+)", text)[1]
    with web_engine.connect() as conn:
        n = conn.execute(select(func.count()).select_from(predictions)).scalar_one()
    assert float(count) == n
    client.cookies.clear()
    assert client.get("/metrics").status_code == 401
    token = {"Authorization": "Bearer metrics-token-0123456789"}
    assert client.get("/metrics", headers=token).status_code == 200
    assert client.get("/metrics", headers={"Authorization": "Bearer wrong"}).status_code == 401
    log_in(client)  # bob is a reviewer, not an admin
    assert client.get("/metrics").status_code == 403


def test_audit_page_is_for_admins(admin, client):
    page = admin.get("/audit")
    assert page.status_code == 200 and "login" in page.text
    from tests.web.conftest import log_in

    client.cookies.clear()
    log_in(client)
    assert client.get("/audit").status_code == 403


def test_healthz_is_open(client):
    assert client.get("/healthz").json() == {"status": "ok"}
