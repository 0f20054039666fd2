"""Shared by the FID tests: the MNIST classifier trained once per session into a temporary cache."""

import os

import pytest


@pytest.fixture(scope="module", autouse=True)
def classifier_cache(tmp_path_factory):
    """$IDIFF_CACHE_DIR -> <pytest base temp>/idiff-cache for the module (one training per session)."""
    before = os.environ.get("IDIFF_CACHE_DIR")
    os.environ["IDIFF_CACHE_DIR"] = str(tmp_path_factory.getbasetemp() / "idiff-cache")
    yield
    if before is None:
        del os.environ["IDIFF_CACHE_DIR"]
    else:
        os.environ["IDIFF_CACHE_DIR"] = before
