"""Fixtures of the strategy tests."""

import pytest

from tests.helpers import TinyTextUNet


@pytest.fixture(scope="module")
def tiny(torch):
    """The strategy tests' text encoder + UNet (one per test module, as each compiles its own
    jitted functions)."""
    return TinyTextUNet(torch)
