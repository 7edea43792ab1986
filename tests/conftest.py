"""Session-wide fixtures: the shared gloo worker pools (see tests/pool.py)."""
from __future__ import annotations

import os

import pytest

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")


@pytest.fixture(scope="session")
def pools():
    from tests.pool import Pools

    p = Pools(max_alive=int(os.environ.get("MP_TEST_MAX_POOLS", "3")))
    yield p
    p.close()
