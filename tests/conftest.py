"""Shared test setup: per-test seeds, and CUDA tests that skip cleanly without a GPU."""

from __future__ import annotations

import os
import zlib

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed(request):
    """Every test draws its own random inputs: the seed mixes the test's id with
    OMNIVMED_TEST_SEED (0 by default; set it to draw a different sample everywhere)."""
    base = int(os.environ.get("OMNIVMED_TEST_SEED", "0"))
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()) ^ base)
