"""Fixtures shared by the speculative-decoding tests."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from tests.support.medusa_oracle import oracle_propose


@pytest.fixture
def medusa_oracle() -> Callable:
    return oracle_propose
