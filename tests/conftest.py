"""Fixtures every suite may use."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.relay.apphelp import RelayRun


@pytest.fixture
def runs() -> Iterator[list[RelayRun]]:
    """The relay subprocesses a test started (it appends them): killed when the test ends."""
    started: list[RelayRun] = []
    yield started
    for run in started:
        run.kill()
