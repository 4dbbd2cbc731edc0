"""The API never answers 500 to a client's input, never serves a replaced profile, and can lock writes."""

from __future__ import annotations

import errno
import json
import os
import shutil
import threading
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from api.app import create_app
from api.plan_response_cache import PlanResponseCache
from api.store import ProfileStore
from planner.plan import Planner
from planner.profile import load_profile, parse_profile

REPO = Path(__file__).resolve().parents[2]
SYN = REPO / "configs" / "profiles" / "synthetic-vicuna-7b-h100.json"
JSON = {"content-type": "application/json"}


def _doc(model: str | None = None) -> dict:
    doc = json.loads(SYN.read_text())
    if model is not None:
        doc["metadata"]["model"]["name"] = model
    return doc


@pytest.fixture
def profiles_dir(tmp_path: Path) -> Path:
    shutil.copy(SYN, tmp_path / "syn.json")
    return tmp_path


@pytest.fixture
def client(profiles_dir: Path):
    with TestClient(create_app(profiles_dir), raise_server_exceptions=False) as c:
        yield c


# ---------------------------------------------------------------- 4, 12: non-finite numbers


@pytest.mark.parametrize("literal", ["Infinity", "-Infinity", "NaN"])
@pytest.mark.parametrize("field", ["step_ms", "concurrency"])
def test_non_finite_numbers_are_a_422_naming_the_field(
    client: TestClient, profiles_dir: Path, literal: str, field: str
) -> None:
    """Infinity used to be accepted (201) and written as null; a NaN in an int field was a 500."""
    doc = _doc()
    doc["decode"][0][field] = 12345.5
    text = json.dumps(doc).replace("12345.5", literal)
    r = client.post("/profiles", params={"id": "inf"}, content=text, headers=JSON)
    assert r.status_code == 422, r.text
    detail = r.json()["detail"]  # the echoed input is JSON (a bare NaN made the handler itself fail)
    assert detail[0]["loc"] == ["body", "decode", 0, field]
    assert detail[0]["input"] in ("inf", "-inf", "nan")
    assert not (profiles_dir / "inf.json").exists()


def test_a_one_token_capacity_context_is_a_422_naming_it(client: TestClient) -> None:
    """A peak context of one token (no output) divided by zero blocks per sequence: a 500."""
    r = client.get("/capacity?tp=1&k=0&context=1")
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["query", "context"]
    assert client.get("/capacity?tp=1&k=0&context=2").json()["max_concurrency"] > 0


def test_the_dashboard_takes_an_empty_workload_as_not_given(client: TestClient) -> None:
    """The form sends an empty field as ``workload=``: the length check on None was a 500."""
    r = client.get("/?workload=&itl_ms=30")
    assert r.status_code == 200 and "workload mix" in r.text
    assert client.get("/?workload=" + "x" * 41).status_code == 422


# ---------------------------------------------------------------- 5: bounded declarations, event loop


@pytest.mark.parametrize("concurrency", [20_000_000, 10**12])
def test_absurd_declared_concurrency_is_refused(client: TestClient, concurrency: int) -> None:
    doc = _doc()
    doc["decode"][0]["concurrency"] = concurrency
    r = client.post("/profiles", params={"id": "huge"}, json=doc)
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "decode", 0, "concurrency"]
    assert client.get("/profiles").json()[0]["id"] == "syn" and len(client.get("/profiles").json()) == 1


def test_plans_are_computed_off_the_event_loop(client: TestClient, monkeypatch: pytest.MonkeyPatch) -> None:
    """While a slow plan is being computed, other requests are answered."""
    started, release, order = threading.Event(), threading.Event(), []
    plan = Planner.plan

    def slow_plan(self, *args, **kwargs):
        started.set()
        release.wait(10)
        order.append("plan")
        return plan(self, *args, **kwargs)

    monkeypatch.setattr(Planner, "plan", slow_plan)
    answers = []
    t = threading.Thread(target=lambda: answers.append(client.get("/plan?itl_ms=31")))
    t.start()
    assert started.wait(10)
    assert client.get("/healthz").status_code == 200
    order.append("healthz")
    release.set()
    t.join(20)
    assert order == ["healthz", "plan"] and answers[0].status_code == 200


# ---------------------------------------------------------------- 6: token, read-only, body size


def test_writes_need_the_token_when_one_is_set(profiles_dir: Path) -> None:
    with TestClient(create_app(profiles_dir, api_key="s3cret")) as c:
        doc = c.get("/profiles/syn").json()
        assert c.get("/plan?itl_ms=30").status_code == 200  # reads stay open
        r = c.post("/profiles", params={"id": "new"}, json=doc)
        assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
        bad = c.post("/profiles", params={"id": "new"}, json=doc, headers={"Authorization": "Bearer s3cre"})
        assert bad.status_code == 401 and "invalid API token" in bad.json()["detail"]
        assert not (profiles_dir / "new.json").exists()
        ok = c.post("/profiles", params={"id": "new"}, json=doc, headers={"Authorization": "Bearer s3cret"})
        assert ok.status_code == 201 and (profiles_dir / "new.json").exists()


def test_an_empty_token_is_refused_at_start(profiles_dir: Path) -> None:
    with pytest.raises(ValueError, match="api_key"):
        create_app(profiles_dir, api_key="  ")


def test_read_only_refuses_every_write(profiles_dir: Path) -> None:
    with TestClient(create_app(profiles_dir, api_key="t", read_only=True)) as c:
        doc = c.get("/profiles/syn").json()
        r = c.post(
            "/profiles",
            params={"id": "syn", "overwrite": "true"},
            json=doc,
            headers={"Authorization": "Bearer t"},
        )
        assert r.status_code == 403 and "read-only" in r.json()["detail"]
        assert load_profile(profiles_dir / "syn.json").model_dump() == load_profile(SYN).model_dump()


def test_body_over_the_limit_is_a_413_declared_or_streamed(profiles_dir: Path) -> None:
    limit = len(SYN.read_bytes()) - 1
    with TestClient(create_app(profiles_dir, max_body_bytes=limit)) as c:
        body = SYN.read_bytes()
        r = c.post("/profiles", params={"id": "big"}, content=body, headers=JSON)
        assert r.status_code == 413 and str(limit) in r.json()["detail"]

        def chunks():  # no content-length: the limit counts the bytes as they arrive
            for i in range(0, len(body), 4096):
                yield body[i : i + 4096]

        r = c.post("/profiles", params={"id": "big"}, content=chunks(), headers=JSON)
        assert r.status_code == 413
        assert not (profiles_dir / "big.json").exists()
        small = json.dumps(c.get("/profiles/syn").json(), separators=(",", ":")).encode()
        assert len(small) <= limit
        assert c.post("/profiles", params={"id": "ok"}, content=small, headers=JSON).status_code == 201


# ---------------------------------------------------------------- 7: no stale plan after an overwrite


def test_a_plan_computed_during_an_overwrite_is_never_served_after_it(profiles_dir: Path) -> None:
    store = ProfileStore(profiles_dir)
    _, revision = store.snapshot()
    replaced = parse_profile(_doc("replaced"))

    def compute_while_replaced() -> bytes:
        store.add("syn", replaced, overwrite=True)  # the POST lands while the old plan is computed
        return b"old"

    assert store.cached_plan("syn", revision, ("q",), compute_while_replaced) == b"old"
    planners, now = store.snapshot()
    assert planners["syn"].profile.metadata.model.name == "replaced"
    assert store.cached_plan("syn", now, ("q",), lambda: b"new") == b"new"


def test_response_cache_replays_only_the_current_revision() -> None:
    revision = [0]
    cache = PlanResponseCache(lambda: revision[0])
    cache.put(b"q", b"old", 0)
    assert cache.get(b"q") == b"old"
    revision[0] = 1  # a profile was replaced
    assert cache.get(b"q") is None
    cache.put(b"q", b"late", 0)  # finished after the replacement: not kept
    assert cache.get(b"q") is None and len(cache) == 0


def test_response_cache_is_bounded_by_bytes() -> None:
    cache = PlanResponseCache(lambda: 0, max_bytes=10_000)
    for i in range(100):
        cache.put(str(i).encode(), b"x" * 1000, 0)
        assert cache.bytes <= 10_000
    assert 0 < len(cache) < 10 and cache.get(b"99") is not None


def test_concurrent_writers_and_readers_see_no_stale_plan(profiles_dir: Path) -> None:
    """Writers overwrite their own profile; right after each 201 a plan must come from what they wrote."""
    ids = ["a", "b"]
    for pid in ids:
        (profiles_dir / f"{pid}.json").write_text(json.dumps(_doc(f"{pid}-0")))
    stale: list[str] = []
    done = threading.Event()
    with TestClient(create_app(profiles_dir)) as c:

        def reader(n: int) -> None:
            i = 0
            while not done.is_set():
                i += 1
                c.get(
                    "/plan", params={"itl_ms": 20 + (i % 7), "profile": ids[(i + n) % 2], "isl": 400 + i % 5}
                )

        def writer(pid: str) -> None:
            for v in range(1, 16):
                r = c.post("/profiles", params={"id": pid, "overwrite": "true"}, json=_doc(f"{pid}-{v}"))
                assert r.status_code == 201
                for itl in (20 + v % 7, 21):
                    model = c.get("/plan", params={"itl_ms": itl, "profile": pid, "isl": 400 + v % 5}).json()[
                        "model"
                    ]
                    if model != f"{pid}-{v}":
                        stale.append(f"{pid}: wrote v{v}, served {model}")

        readers = [threading.Thread(target=reader, args=(n,)) for n in range(4)]
        writers = [threading.Thread(target=writer, args=(pid,)) for pid in ids]
        for t in readers + writers:
            t.start()
        for t in writers:
            t.join(120)
        done.set()
        for t in readers:
            t.join(30)
    assert stale == []


# ---------------------------------------------------------------- 15: disk full


def test_disk_full_is_a_507_and_changes_nothing(
    client: TestClient, profiles_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    before = (profiles_dir / "syn.json").read_bytes()
    plan = client.get("/plan?itl_ms=30").json()

    def no_space(fd: int) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", no_space)
    r = client.post("/profiles", params={"id": "syn", "overwrite": "true"}, json=_doc("other"))
    monkeypatch.undo()
    assert r.status_code == 507 and "No space left on device" in r.json()["detail"]
    assert (profiles_dir / "syn.json").read_bytes() == before
    assert sorted(p.name for p in profiles_dir.iterdir()) == ["syn.json"]  # no temp file left
    assert client.get("/plan?itl_ms=30").json() == plan  # still serving the profile on disk


def test_an_upload_clears_every_registered_plan_cache(profiles_dir: Path) -> None:
    store = ProfileStore(profiles_dir)
    cache = PlanResponseCache(lambda: store.revision)
    store.on_change(cache.clear)
    store.cached_plan("syn", store.revision, ("q",), lambda: b"plan")
    cache.put(b"itl_ms=30", b"plan", store.revision)
    store.add("syn", parse_profile(_doc("replaced")), overwrite=True)
    assert len(cache) == 0 and cache.bytes == 0
    assert store.cached_plan("syn", store.revision, ("q",), lambda: b"new") == b"new"
