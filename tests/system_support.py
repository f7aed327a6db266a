"""Tests that need the system's tools (root, `ip`, Debian's `docker-compose`): skipped, with the reason, where
one is missing; failed instead under `SPLIT_TESTS_REQUIRE_ALL=1` (.ci/run installs them), so CI never skips."""

from __future__ import annotations

import os
from typing import NoReturn

import pytest


def unavailable(reason: str) -> NoReturn:
    """Skip the calling test for `reason`, or fail it where every requirement must be met."""
    if os.environ.get("SPLIT_TESTS_REQUIRE_ALL") == "1":
        pytest.fail(f"{reason} (SPLIT_TESTS_REQUIRE_ALL=1: .ci/run installs it)")
    pytest.skip(reason)
