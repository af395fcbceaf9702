"""Fixtures that run the annotation store's tests on SQLite and on a real PostgreSQL.

Import them into a test module (`from tests.ui.pg import postgres_server, store_url  # noqa: F401`).
One PostgreSQL server serves the whole session (initdb + start: ~1.5 s); each test gets a database
of its own, dropped afterwards. Without PostgreSQL binaries the postgresql cases skip, saying why.
"""

from __future__ import annotations

import itertools

import pytest

from infra import postgres

BACKENDS = ("sqlite", "postgresql")
_shared: list[postgres.Postgres] = []  # one server even when several modules import the fixture
_numbers = itertools.count()


@pytest.fixture(scope="session")
def postgres_server(tmp_path_factory) -> postgres.Postgres:
    if not _shared:
        try:
            _shared.append(postgres.start(tmp_path_factory.mktemp("postgres")))
        except postgres.PostgresUnavailable as err:
            pytest.skip(f"PostgreSQL cases need a PostgreSQL server: {err}")
    yield _shared[0]
    # Every importing module's copy of this fixture ends at session end; stop() is idempotent.
    _shared[0].stop()


@pytest.fixture(params=BACKENDS)
def store_url(request, tmp_path) -> str:
    """An empty labels database: a SQLite WAL file, or a fresh database on the session's PostgreSQL."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'labels.db'}"
        return
    server = request.getfixturevalue("postgres_server")
    name = f"labels_{next(_numbers)}"
    yield server.new_database(name)
    server.drop_database(name)  # WITH (FORCE): an engine the test left open cannot keep it
