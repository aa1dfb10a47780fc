"""The fast path's statements as PostgreSQL reads them: each prepares on the migrated
schema with exactly the parameters it declares, in order, and returns its columns in the
order the repositories unpack them."""

from __future__ import annotations

from collections.abc import AsyncIterator

import asyncpg
import pytest

from app.repositories.postgres.statements import ADMISSION, ALL, CONSENT, HISTORY, Statement
from tests.conftest import fresh_database, plain_dsn

pytestmark = pytest.mark.postgres

ACCOUNT_COLUMNS = [
    "user_id",
    "is_guest",
    "available_credits",
    "max_credits",
    "last_reset_timestamp",
]
RETURNED = {
    HISTORY.name: ["id", "user_id", "transaction_type", "amount", "timestamp", "description"],
    CONSENT.name: [
        "user_id",
        "terms_accepted",
        "marketing_consent",
        "timestamp",
        "updated_at",
        "terms_version",
    ],
    ADMISSION.name: [
        "terms_accepted",
        "marketing_consent",
        "timestamp",
        "updated_at",
        "terms_version",
        "is_guest",
        "available_credits",
        "max_credits",
        "last_reset_timestamp",
    ],
}


@pytest.fixture
async def connection(request: pytest.FixtureRequest) -> AsyncIterator[asyncpg.Connection]:
    async with fresh_database(request, "postgres") as url:
        connection = await asyncpg.connect(plain_dsn(url))
        try:
            yield connection
        finally:
            await connection.close()


@pytest.mark.parametrize("statement", ALL, ids=[statement.name for statement in ALL])
async def test_each_statement_takes_the_parameters_it_declares(
    connection: asyncpg.Connection, statement: Statement
) -> None:
    prepared = await connection.prepare(statement.sql)
    declared = [kind for _, kind in statement.params]
    assert [parameter.name for parameter in prepared.get_parameters()] == declared
    returned = [attribute.name for attribute in prepared.get_attributes()]
    assert returned == RETURNED.get(statement.name, ACCOUNT_COLUMNS)


def test_every_statement_has_a_name_of_its_own_and_names_its_parameters() -> None:
    assert len({statement.name for statement in ALL}) == len(ALL)
    for statement in ALL:
        names = [name for name, _ in statement.params]
        assert len(set(names)) == len(names), statement.name
        assert f"${len(names)}" in statement.sql and f"${len(names) + 1}" not in statement.sql
