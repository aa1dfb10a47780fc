"""A connection refused is told apart from one that found nobody (app/db/refusal.py)."""

from __future__ import annotations

import asyncpg
import pytest
from sqlalchemy import exc as sa_exc

from app.db.refusal import connection_refusal


class _Adapted(Exception):
    """What SQLAlchemy's asyncpg dialect raises: the SQLSTATE copied, asyncpg's error as cause."""

    def __init__(self, error: asyncpg.PostgresError) -> None:
        super().__init__(str(error))
        self.sqlstate = error.sqlstate
        self.__cause__ = error


class TestRefusals:
    def test_pgbouncer_refusing_a_startup_parameter_names_the_setting_to_change(self) -> None:
        refusal = connection_refusal(asyncpg.ProtocolViolationError("unsupported parameter"))
        assert refusal is not None
        assert refusal.summary == (
            "the database refused the connection (SQLSTATE 08P01); behind a transaction pooler"
            " (PgBouncer, pool_mode = transaction) set DB_PREPARED_STATEMENTS=false, or"
            " DB_TRANSACTION_POOLER=true if it keeps prepared statements (PgBouncer 1.21 or"
            " later, max_prepared_statements above 0)"
        )

    @pytest.mark.parametrize(
        ("error", "sqlstate"),
        [
            (asyncpg.InvalidCatalogNameError("no such database"), "3D000"),
            (asyncpg.InvalidPasswordError("password authentication failed"), "28P01"),
            (asyncpg.TooManyConnectionsError("too many clients"), "53300"),
        ],
    )
    def test_other_refusals_give_their_sqlstate_alone(
        self, error: asyncpg.PostgresError, sqlstate: str
    ) -> None:
        refusal = connection_refusal(error)
        assert refusal is not None
        assert refusal.summary == f"the database refused the connection (SQLSTATE {sqlstate})"

    def test_a_refusal_wrapped_by_sqlalchemy_is_one_too(self) -> None:
        wrapped = sa_exc.DBAPIError("connect", None, _Adapted(asyncpg.InvalidPasswordError("no")))
        refusal = connection_refusal(wrapped)
        assert refusal is not None and refusal.sqlstate == "28P01"

    @pytest.mark.parametrize(
        "error",
        [
            ConnectionRefusedError(111, "Connection refused"),
            TimeoutError(),
            asyncpg.QueryCanceledError("statement timeout"),
            asyncpg.UniqueViolationError("duplicate key"),
        ],
        ids=["nothing-listens", "no-answer", "statement-timeout", "unique-violation"],
    )
    def test_nothing_answering_or_a_statement_failing_is_no_refusal(
        self, error: BaseException
    ) -> None:
        assert connection_refusal(error) is None
