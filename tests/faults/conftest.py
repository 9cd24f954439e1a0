"""Every fault test reads the operator's view: the bridge's INFO log events."""

from __future__ import annotations

import logging

import pytest


@pytest.fixture(autouse=True)
def _journal(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="voicebridge")
