"""The HTTP API: answers equal the planner's, errors name the field, unknown profiles are 404."""

from __future__ import annotations

import html
import json
import shutil
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from api.app import create_app
from kvbm import capacity
from planner.plan import Planner
from planner.profile import load_profile, parse_profile

REPO = Path(__file__).resolve().parents[2]
SYN = REPO / "configs" / "profiles" / "synthetic-vicuna-7b-h100.json"


@pytest.fixture
def profiles_dir(tmp_path: Path) -> Path:
    shutil.copy(SYN, tmp_path / "syn.json")
    return tmp_path


@pytest.fixture
def client(profiles_dir: Path):
    with TestClient(create_app(profiles_dir)) as c:
        yield c


def test_plan_equals_the_planner(client: TestClient) -> None:
    params = {"itl_ms": 20, "isl": 512, "osl": 256, "request_rate": 12}
    got = client.get("/plan", params=params)
    assert got.status_code == 200
    want = Planner(load_profile(SYN), "syn").plan(20, isl=512, osl=256, request_rate=12)
    body = got.json()
    assert body["choice"] == json.loads(want.choice.model_dump_json())
    assert body["feasible"] and body["source"] == "synthetic" and "synthetic" in body["warning"]
    again = client.get("/plan", params=params).json()  # served from the plan cache
    assert again == body


def test_infeasible_is_an_answer_not_an_error(client: TestClient) -> None:
    r = client.get("/plan", params={"itl_ms": 0.5})
    assert r.status_code == 200
    body = r.json()
    assert body["feasible"] is False and body["lowest_achievable_itl_ms"] > 0.5
    assert body["choice"]["tp"] >= 1 and "lowest achievable ITL" in body["message"]


@pytest.mark.parametrize(
    ("query", "field"),
    [
        ("", "itl_ms"),
        ("itl_ms=abc", "itl_ms"),
        ("itl_ms=-3", "itl_ms"),
        ("itl_ms=inf", "itl_ms"),
        ("itl_ms=30&isl=0", "isl"),
        ("itl_ms=30&osl=1.5", "osl"),
        ("itl_ms=30&acceptance=2", "acceptance"),
        ("itl_ms=30&draft_coverage=-1", "draft_coverage"),
        ("itl_ms=30&max_gpus=0", "max_gpus"),
        ("itl_ms=30&request_rate=0", "request_rate"),
        ("itl_ms=30&corrected=maybe", "corrected"),
    ],
)
def test_bad_query_is_422_naming_the_field(client: TestClient, query: str, field: str) -> None:
    r = client.get(f"/plan?{query}")
    assert r.status_code == 422
    assert [d["loc"] for d in r.json()["detail"]] == [["query", field]]


def test_unknown_profile_is_404(client: TestClient) -> None:
    for url in ("/plan?itl_ms=30&profile=nope", "/profiles/nope", "/capacity?tp=1&context=10&profile=nope"):
        r = client.get(url)
        assert r.status_code == 404 and "nope" in r.json()["detail"]


def test_profiles_list_get_and_upload(client: TestClient, profiles_dir: Path) -> None:
    listed = client.get("/profiles").json()
    assert [p["id"] for p in listed] == ["syn"] and listed[0]["source"] == "synthetic"
    doc = client.get("/profiles/syn").json()
    assert parse_profile(doc).metadata.model.name == "vicuna-7b"

    r = client.post("/profiles", params={"id": "copy"}, json=doc)
    assert r.status_code == 201 and r.json()["id"] == "copy"
    assert load_profile(profiles_dir / "copy.json").model_dump() == parse_profile(doc).model_dump()
    assert not list(profiles_dir.glob(".*.tmp"))  # written atomically, no temp left behind
    assert client.post("/profiles", params={"id": "copy"}, json=doc).status_code == 409
    assert client.post("/profiles", params={"id": "copy", "overwrite": "true"}, json=doc).status_code == 201
    # two profiles loaded: /plan must be told which one
    r = client.get("/plan?itl_ms=30")
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["query", "profile"]
    assert client.get("/plan?itl_ms=30&profile=copy").status_code == 200


@pytest.mark.parametrize(
    ("mutate", "loc"),
    [
        (lambda d: d["metadata"].pop("block_size"), ["body", "metadata", "block_size"]),
        (lambda d: d["decode"][0].update(k=3), ["body", "decode", 0]),
        (lambda d: d.update(schema_version=99), ["body", "schema_version"]),
        (lambda d: d.update(decode=[]), ["body", "decode"]),
    ],
)
def test_bad_upload_is_422_naming_the_field(client: TestClient, mutate, loc: list) -> None:
    doc = client.get("/profiles/syn").json()
    mutate(doc)
    r = client.post("/profiles", params={"id": "bad"}, json=doc)
    assert r.status_code == 422
    assert r.json()["detail"][0]["loc"][: len(loc)] == loc


def test_upload_id_is_validated(client: TestClient) -> None:
    doc = client.get("/profiles/syn").json()
    r = client.post("/profiles", params={"id": "../evil"}, json=doc)
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["query", "id"]


def test_capacity_matches_kvbm(client: TestClient) -> None:
    r = client.get("/capacity", params={"tp": 2, "k": 4, "context": 2000}).json()
    blocks = load_profile(SYN).kv_blocks_per_replica(2)
    assert r["blocks_per_replica"] == blocks
    rule = capacity.static_bound("engine", "draft", 4, blocks, 2000, 16)  # a drafter at every step
    assert r["blocks_per_sequence"] == rule.blocks_per_sequence
    assert r["max_concurrency"] == rule.max_concurrency


def test_correction_health_and_metrics(client: TestClient) -> None:
    assert client.get("/correction").json()["enabled"] is False
    assert client.get("/plan?itl_ms=30&corrected=true").status_code == 409
    assert client.get("/healthz").json() == {
        "status": "ok", "profiles": 1, "profile_load_errors": {}, "correction": "off",
        "default_profile": "syn", "default_profile_reason": "the only loaded profile",
    }  # fmt: skip
    client.get("/plan?itl_ms=25")
    text = client.get("/metrics").text
    assert "planner_profiles_loaded 1.0" in text
    count = next(line for line in text.splitlines() if line.startswith("planner_plan_seconds_count"))
    assert float(count.split()[-1]) >= 1


def test_broken_profile_file_is_reported_not_fatal(profiles_dir: Path) -> None:
    (profiles_dir / "broken.json").write_text('{"schema_version": 1, "metadata": {')
    with TestClient(create_app(profiles_dir)) as c:
        health = c.get("/healthz").json()
        assert "broken" in health["profile_load_errors"]
        assert "truncated" in health["profile_load_errors"]["broken"]
        assert c.get("/plan?itl_ms=30").status_code == 200


def test_dashboard_draws_the_surfaces(client: TestClient) -> None:
    r = client.get("/", params={"itl_ms": 15, "isl": 512, "osl": 256})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    assert "<svg" in r.text and "SLA ITL 15 ms" in r.text and "chosen: tp=" in r.text
    assert "Synthetic profile" in r.text


def test_dashboard_says_why_each_speculative_method_won_or_lost(client: TestClient) -> None:
    """The text answer's 'speculation:' section is on the page too: chosen or refused, with the reason."""
    plan = client.get("/plan", params={"itl_ms": 15, "isl": 512, "osl": 256}).json()
    page = client.get("/", params={"itl_ms": 15, "isl": 512, "osl": 256}).text
    assert plan["speculation"] and "speculation:" in page
    for m in plan["speculation"]:
        assert f"{m['method']} {m['status']}" in page and html.escape(m["reason"]) in page


def test_response_cache_replays_bytes_and_is_cleared_by_uploads(client: TestClient) -> None:
    first = client.get("/plan?itl_ms=30")
    second = client.get("/plan?itl_ms=30")  # answered by the fast path
    assert second.status_code == 200 and second.content == first.content
    assert second.headers["content-type"] == "application/json"
    doc = client.get("/profiles/syn").json()
    assert client.post("/profiles", params={"id": "other"}, json=doc).status_code == 201
    # with two profiles the same query is now ambiguous: a stale cached 200 would be wrong
    r = client.get("/plan?itl_ms=30")
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["query", "profile"]


def test_plan_takes_a_workload(client: TestClient) -> None:
    params = {"itl_ms": 20, "isl": 512, "osl": 256}
    mix = client.get("/plan", params=params).json()
    summ = client.get("/plan", params={**params, "workload": "summarization"}).json()
    assert mix["inputs"]["workload"] == "mix" and summ["inputs"]["workload"] == "summarization"
    want = Planner(load_profile(SYN), "syn").plan(20, isl=512, osl=256, workload="summarization")
    assert summ["speculation"] == json.loads(want.model_dump_json())["speculation"]
    bad = client.get("/plan", params={**params, "workload": "poetry"})
    assert bad.status_code == 422 and "workload" in bad.text and "poetry" in bad.text


def _measured_copy(tmp: Path, name: str, gpu: str, created: str) -> None:
    doc = json.loads(SYN.read_text())
    doc["metadata"].update(source="measured", created_at=created)
    doc["metadata"]["hardware"]["gpu_name"] = gpu
    (tmp / f"{name}.json").write_text(json.dumps(doc))


def test_several_profiles_default_to_the_newest_measured_never_synthetic(
    profiles_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SPECPLAN_HOST_GPU", "")
    _measured_copy(profiles_dir, "old", "NVIDIA H100", "2026-01-01T00:00:00Z")
    _measured_copy(profiles_dir, "new", "NVIDIA H200", "2026-02-01T00:00:00Z")
    with TestClient(create_app(profiles_dir)) as c:
        r = c.get("/plan?itl_ms=30")
        assert r.status_code == 200 and r.json()["profile"] == "new"
        assert c.get("/capacity?tp=1&context=2048").json()["profile"] == "new"
        health = c.get("/healthz").json()
        assert health["default_profile"] == "new" and "newest measured" in health["default_profile_reason"]
        page = c.get("/")
        assert page.status_code == 200 and '<option value="new" selected>' in page.text
        assert "[default]" in page.text and '<option value="syn">' in page.text


def test_default_prefers_this_hosts_gpu_then_the_configured_one(
    profiles_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SPECPLAN_HOST_GPU", "NVIDIA H100")
    _measured_copy(profiles_dir, "old", "NVIDIA H100", "2026-01-01T00:00:00Z")
    _measured_copy(profiles_dir, "new", "NVIDIA H200", "2026-02-01T00:00:00Z")
    with TestClient(create_app(profiles_dir)) as c:
        assert c.get("/plan?itl_ms=30").json()["profile"] == "old"
        assert "host's GPU" in c.get("/healthz").json()["default_profile_reason"]
    with TestClient(create_app(profiles_dir, default_profile="syn")) as c:
        assert c.get("/plan?itl_ms=30").json()["profile"] == "syn"
    with pytest.raises(ValueError, match="default_profile='nope'"):
        create_app(profiles_dir, default_profile="nope")


def test_docs_render_offline_from_the_schema(client: TestClient) -> None:
    r = client.get("/docs")
    assert r.status_code == 200 and "<script" not in r.text and "cdn" not in r.text.lower()
    for path in ("/plan", "/capacity", "/profiles/{profile_id}"):
        assert f"GET {path}" in r.text
    assert "itl_ms" in r.text and "ITL SLA (ms)" in r.text
    assert client.get("/redoc").status_code == 404


def test_dashboard_form_with_empty_fields_plans_and_bad_fields_are_named(client: TestClient) -> None:
    form = {"profile": "syn", "itl_ms": "15", "isl": "", "osl": "", "acceptance": "", "draft_coverage": ""}
    r = client.get("/", params=form)
    assert r.status_code == 200 and "chosen: tp=" in r.text
    r = client.get("/", params=form | {"acceptance": "0.7", "isl": "512"})
    assert r.status_code == 200 and "acceptance given: alpha=0.7" in r.text
    r = client.get("/", params=form | {"isl": "abc"})
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["query", "isl"]


def test_dashboard_plans_for_the_chosen_workload(client: TestClient) -> None:
    r = client.get("/", params={"profile": "syn", "itl_ms": "20", "workload": "summarization"})
    assert r.status_code == 200 and '<option value="summarization" selected>' in r.text
    assert "workload summarization" in r.text
    bad = client.get("/", params={"profile": "syn", "itl_ms": "20", "workload": "poetry"})
    assert bad.status_code == 422 and "poetry" in bad.text
