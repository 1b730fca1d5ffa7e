"""Shared by the test modules: the import path, and fixtures more than one module uses."""

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import realclients  # noqa: E402 (needs the path above)


@pytest.fixture(scope="session")
def stock_binaries():
    """tailscale and tailscaled 1.96.4, downloaded once and cached; skip when they cannot be had."""
    try:
        return realclients.stock_binaries()
    except realclients.StockUnavailable as why:
        pytest.skip(f"Tailscale's own client is unavailable: {why}")
