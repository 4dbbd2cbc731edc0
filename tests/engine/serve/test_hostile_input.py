"""Inputs that must answer 400 naming the field: invalid Unicode and fields the engine cannot honour."""

from __future__ import annotations

import httpx
import pytest


def _post_raw(server, path: str, raw_json: str) -> httpx.Response:
    # httpx's json= cannot encode a lone surrogate; JSON text can spell one with an escape.
    return httpx.post(
        server.base_url + path, content=raw_json.encode("ascii"), headers={"content-type": "application/json"}
    )


@pytest.mark.parametrize(
    ("path", "raw", "needle"),
    [
        ("/v1/completions", r'{"model": "fake", "prompt": "hi \ud800", "max_tokens": 2}', "prompt"),
        ("/v1/completions", r'{"model": "fake", "prompt": ["\udfff"], "max_tokens": 2}', "prompt[0]"),
        ("/v1/completions", r'{"model": "fake", "prompt": "hi", "stop": ["\ud800"]}', "stop[0]"),
        ("/v1/completions", r'{"model": "\ud800", "prompt": "hi"}', "model"),
        (
            "/v1/chat/completions",
            r'{"model": "fake", "messages": [{"role": "user", "content": "x\ud800"}]}',
            "messages[0].content",
        ),
        (
            "/v1/chat/completions",
            r'{"model": "fake", "messages": [{"role": "user", '
            r'"content": [{"type": "text", "text": "\ud800"}]}]}',
            "messages[0].content[0].text",
        ),
    ],
)
def test_lone_surrogate_is_400_naming_the_field(fake_server, path, raw, needle) -> None:
    with fake_server() as (server, _):
        r = _post_raw(server, path, raw)
        assert r.status_code == 400, r.text
        msg = r.json()["error"]["message"]
        assert needle in msg and "surrogate" in msg
        assert httpx.get(server.base_url + "/health").status_code == 200


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("tools", [{"type": "function", "function": {"name": "f"}}]),
        ("tool_choice", "auto"),
        ("response_format", {"type": "json_object"}),
        ("top_k", 5),
        ("top_k", True),
        ("min_tokens", 4),
    ],
)
@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_unsupported_field_is_400_naming_it(fake_server, path, field, value) -> None:
    body = {"model": "fake", "max_tokens": 2, field: value}
    chat = {"messages": [{"role": "user", "content": "hi"}]}
    body |= {"prompt": "hi"} if path == "/v1/completions" else chat
    with fake_server() as (server, _):
        r = httpx.post(server.base_url + path, json=body)
        assert r.status_code == 400, r.text
        assert r.json()["error"]["message"].startswith(f"{field}: not supported")


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("tools", []),
        ("tool_choice", "none"),
        ("response_format", {"type": "text"}),
        ("top_k", -1),
        ("min_tokens", 0),
    ],
)
def test_neutral_values_of_unsupported_fields_are_accepted(fake_server, field, value) -> None:
    with fake_server() as (server, _):
        body = {"model": "fake", "prompt": "hi", "max_tokens": 2, field: value}
        r = httpx.post(server.base_url + "/v1/completions", json=body)
        assert r.status_code == 200, r.text


def test_serve_binds_loopback_by_default() -> None:
    import argparse

    from engine.serve.cli import add_arguments

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    assert parser.parse_args(["--model", "tiny"]).host == "127.0.0.1"
    assert "--host" in parser.format_help() and "0.0.0.0" in parser.format_help()  # says how to expose it


def test_serve_turns_prefix_caching_off_with_vllms_flag(monkeypatch: pytest.MonkeyPatch) -> None:
    """``--no-enable-prefix-caching`` reaches the engine (profiler validate serves with it, so every
    measured pass prefills its prompts)."""
    import argparse

    from engine import llm_engine
    from engine.serve import cli

    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    assert parser.parse_args(["--model", "tiny"]).enable_prefix_caching is True
    args = parser.parse_args(["--model", "tiny", "--no-enable-prefix-caching", "--port", "0"])
    seen = {}

    class Stop(Exception):
        pass

    def fake_engine(config):  # noqa: ANN001, ANN202
        seen["config"] = config
        raise Stop

    monkeypatch.setattr(llm_engine, "LLMEngine", fake_engine)
    with pytest.raises(Stop):
        cli.main(args)
    assert seen["config"].enable_prefix_caching is False
