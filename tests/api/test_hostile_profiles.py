"""Hostile profiles, posted or left on disk: a 201 or a 422 naming the field, never a 500 anywhere after."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from api.app import create_app
from tests.support.hostile_profiles import CORPUS, SYN, as_json, follow_ups, hostile_documents

DOCS = hostile_documents()
# schema-valid but nothing to plan from, or out of bounds / malformed: refused at the door
REFUSED = {
    name
    for name in CORPUS
    if name.endswith(("_over", "_1e308", "_5e-324", "_256", "_1e30", "_2e7", "_1e12", "_nan", "_infinity"))
    or name.startswith(("kv_by_tp_", "top_level_", "schema_version_", "model_name_n", "model_name_e"))
    or name
    in {
        "tokens_per_step_huge", "concurrency_float", "all_failed", "no_decode", "extra_field",
        "created_at_garbage", "deep_nesting", "duplicate_points", "prefill_same_input_len",
    }
}  # fmt: skip


# the field reports, and the bound edges that stress planning most: run by default; the rest is slow
FAST = {
    "kv_by_tp_negative", "step_ms_1e308", "step_ms_5e-324", "model_name_256", "model_name_mathtext",
    "context_len_1e30", "concurrency_2e7", "step_ms_infinity", "step_ms_max", "concurrency_max", "kv_zero",
}  # fmt: skip
CASES = [n if n in FAST else pytest.param(n, marks=pytest.mark.slow) for n in sorted(CORPUS)]


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory):
    d = tmp_path_factory.mktemp("profiles")
    shutil.copy(SYN, d / "syn.json")
    with TestClient(create_app(d), raise_server_exceptions=False) as c:
        yield c


@pytest.mark.parametrize("name", CASES)
def test_posted_hostile_profile_is_a_201_or_a_422_and_never_breaks_a_read(
    client: TestClient, name: str
) -> None:
    r = client.post(
        "/profiles", params={"id": name, "overwrite": "true"}, content=as_json(DOCS[name]),
        headers={"content-type": "application/json"},
    )  # fmt: skip
    if name in REFUSED:
        assert r.status_code == 422, r.text
        assert r.json()["detail"][0]["loc"][0] == "body"
        return
    assert r.status_code == 201, r.text
    for url in follow_ups(name):
        got = client.get(url)
        assert got.status_code < 500, f"{url}: {got.status_code} {got.text[:300]}"
        assert got.status_code in (200, 422), f"{url}: {got.status_code} {got.text[:300]}"


@pytest.mark.parametrize(
    "names", [FAST, pytest.param(set(CORPUS), marks=pytest.mark.slow)], ids=["fast", "all"]
)
def test_hostile_files_on_disk_are_skipped_and_the_server_starts(tmp_path: Path, names: set[str]) -> None:
    shutil.copy(SYN, tmp_path / "syn.json")
    for name in names:
        (tmp_path / f"{name}.json").write_text(as_json(DOCS[name]))
    with TestClient(create_app(tmp_path), raise_server_exceptions=False) as c:
        health = c.get("/healthz").json()
        assert set(health["profile_load_errors"]) == names & REFUSED
        assert health["profiles"] == 1 + len(names - REFUSED)
        for name in ("context_len_1e30", "kv_by_tp_negative", "model_name_256"):
            assert name in health["profile_load_errors"][name]  # the message names the file
        assert c.get("/plan?itl_ms=30&profile=syn").status_code == 200
