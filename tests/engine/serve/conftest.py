"""Fixtures of the serve tests: servers on free loopback ports, over the fake or the real engine."""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from engine.serve.app import ServedModel, build_app
from engine.serve.async_engine import AsyncEngine
from engine.serve.launcher import ServerThread
from engine.serve.metrics import ServeMetrics

_HERE = Path(__file__).resolve().parent


def _load(name: str) -> ModuleType:
    """Import a helper module that sits beside this file (tests are not a package here)."""
    key = f"_serve_tests_{name}"
    if key not in sys.modules:
        spec = importlib.util.spec_from_file_location(key, _HERE / f"{name}.py")
        assert spec and spec.loader
        module = importlib.util.module_from_spec(spec)
        sys.modules[key] = module
        spec.loader.exec_module(module)
    return sys.modules[key]


@pytest.fixture(scope="session")
def fake() -> ModuleType:
    return _load("fake_engine")


@pytest.fixture(scope="session")
def promtext() -> ModuleType:
    return _load("promtext")


@contextmanager
def serving(
    engine: Any,
    *,
    name: str,
    max_model_len: int,
    vocab_size: int,
    num_spec_tokens: int = 0,
    params_factory: Callable[..., Any] | None = None,
) -> Iterator[tuple[ServerThread, ServeMetrics]]:
    metrics = ServeMetrics(name, max_model_len=max_model_len, num_spec_tokens=num_spec_tokens)
    served = ServedModel(
        name=name, tokenizer=engine.tokenizer, max_model_len=max_model_len, vocab_size=vocab_size
    )
    kwargs = {"params_factory": params_factory} if params_factory is not None else {}
    app = build_app(AsyncEngine(engine, metrics), served, metrics, **kwargs)
    with ServerThread(app) as server:
        yield server, metrics


@pytest.fixture
def fake_server(fake: ModuleType) -> Callable[..., Any]:
    """``with fake_server(engine) as (server, metrics):`` over a FakeEngine."""

    def make(engine: Any = None, **kw: Any) -> Any:
        engine = engine or fake.FakeEngine()

        def params(**kwargs: Any) -> Any:
            p = fake.FakeParams(**kwargs)
            p.validate()
            return p

        return serving(
            engine,
            name="fake",
            max_model_len=engine.max_model_len,
            vocab_size=320,
            params_factory=params,
            **kw,
        )

    return make
