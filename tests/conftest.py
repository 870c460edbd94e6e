"""Shared test fixtures: the real data in ../shared/data, beside the checkout."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("NAPARI_HINGE_SHARED", REPO.parent / "shared")) / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.fail(f"real test data not found at {SHARED_DATA}; set NAPARI_HINGE_SHARED")
    return SHARED_DATA


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Keep pyramid and feature caches out of the user's home during tests."""
    cache = tmp_path_factory.getbasetemp() / "napari-hinge-cache"
    monkeypatch.setenv("NAPARI_HINGE_CACHE", str(cache))
