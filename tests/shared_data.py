"""Where the tests find the shared data: ``../shared/data`` next to the repository (the
repository's parent directory holds ``shared/``; README "Tests"). A test whose data is
missing fails and names the path it looked for; it never skips."""
from __future__ import annotations

import os

import pytest

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED_DATA = os.path.join(os.path.dirname(REPO_ROOT), "shared", "data")


def shared_data_path(name: str) -> str:
    """The path of ``name`` under ``../shared/data`` (not checked: for module constants)."""
    return os.path.join(SHARED_DATA, name)


def require_shared_data(name: str) -> str:
    """The path of ``name`` under ``../shared/data``; fails the calling test if it is missing."""
    path = shared_data_path(name)
    if not os.path.isfile(path):
        pytest.fail(f"test data not found: {path} (the repository's parent directory must hold "
                    f"shared/data/{name}; see shared/data/README.md)", pytrace=False)
    return path
