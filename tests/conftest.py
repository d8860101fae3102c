"""Shared test paths: the official fixtures live in ../shared beside the repository and are read in place."""

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
OFFICIAL = SHARED / "fixtures" / "official"
TINY_LIKE = OFFICIAL / "checkpoints" / "tiny-like"
IMAGES = SHARED / "images"


@pytest.fixture(scope="session")
def official_dir() -> Path:
    if not OFFICIAL.is_dir():
        pytest.fail(f"official fixtures not found at {OFFICIAL}")
    return OFFICIAL
