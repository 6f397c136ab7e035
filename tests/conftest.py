"""Every test starts with the tracer's failure counts at zero."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from asgi_asynctrace import reset_failures


@pytest.fixture(autouse=True)
def _fresh_failure_counts() -> Iterator[None]:
    reset_failures()
    yield
