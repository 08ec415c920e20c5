"""Helpers shared by the whole suite (tests/service/conftest.py adds the service's)."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

PG_SERVER = "postgres@127.0.0.1:5432"


@contextmanager
def fresh_postgres_database(prefix: str) -> Iterator[str]:
    """A new database on the local PostgreSQL, migrated to head; dropped afterwards."""
    import psycopg

    from service.db import engine_for, migrate

    name = f"{prefix}_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(f"postgresql://{PG_SERVER}/test", autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    url = f"postgresql+psycopg://{PG_SERVER}/{name}"
    try:
        migrate(url)
        yield url
    finally:
        engine_for(url).dispose()
        with psycopg.connect(f"postgresql://{PG_SERVER}/test", autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def one_torch_thread() -> Iterator[None]:
    """One torch thread for the test: the two cores are shared with other processes."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
