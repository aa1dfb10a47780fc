"""The credit contract, model-checked on every store (SPEC §3).

A Hypothesis state machine drives random sequences of credit calls through the
service: reads, checks, deductions, refunds, upgrades, resets, idempotency keys repeated
with the same request (a replay, said so) or another (refused), a retry of a call whose
answer was lost, history, retention, with a clock moved
across reset boundaries (to the microsecond included). Its oracle is the domain's rules
(app/domain/credits.py) over plain dicts: after each step the store must answer as the
model does and every user's ledger must be the model's. Because the stores share those
rules, each step also checks what SPEC §3 says independently of them: a balance within
[0, maximum], the maximum of the tier, a refill once a period has passed, the ledger
summing to the balance, and the ledger audit (SPEC §11) judging no account drifted, on
the store's own figures, retention or not.

Stores: memory, SQLite, and PostgreSQL with its fast path and without it. Each example
works on users of its own in one database per store.
"""

from __future__ import annotations

import asyncio
import itertools
import os
from collections import defaultdict
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, ClassVar, TypeVar

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from app.config import Settings
from app.db.engine import create_engine, fast_connections
from app.domain.audit import Verdict, verdict
from app.domain.credits import (
    Account,
    Attempt,
    Claim,
    CreditRules,
    Deduct,
    Keyed,
    Operation,
    Read,
    Refund,
    Reset,
    Upgrade,
)
from app.errors import IdempotencyKeyReusedError, InsufficientCreditsError
from app.repositories.base import CreditRepository, StateRepository
from app.repositories.database import sql_stores
from app.repositories.memory import MemoryData, memory_stores
from app.schemas import UserCredits
from app.services.credits import Applied, CreditService
from tests.conftest import RULES, database_state, fresh_database, memory_state
from tests.support.clock import FakeClock

T = TypeVar("T")
CI = os.environ.get("CI", "").lower() in {"1", "true", "yes"}
MACHINE_SETTINGS = settings(
    max_examples=int(os.environ.get("MODEL_EXAMPLES", "40")),
    stateful_step_count=30,
    deadline=None,
    derandomize=CI,  # the same sequences on every CI run and every mutant
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)
USERS = st.sampled_from(["ann", "bob", "cyd"])
KEYS = st.none() | st.sampled_from(["k1", "k2", "k3"])
AMOUNTS = st.integers(min_value=1, max_value=12)
# Across a reset boundary, onto it to the microsecond, and short of it.
HOURS = st.sampled_from([0.5, 6, 23.99, 24, 25, 49]) | st.just(-1)
_examples = itertools.count()
Refused = InsufficientCreditsError | IdempotencyKeyReusedError
REFUSALS = (InsufficientCreditsError, IdempotencyKeyReusedError)


@dataclass
class Target:
    """One store under test, and the event loop its calls run on."""

    runner: asyncio.Runner
    credits: CreditRepository
    state: StateRepository  # the same store's users as a whole, for the ledger audit

    def run(self, call: Coroutine[Any, Any, T]) -> T:
        return self.runner.run(call)


@pytest.fixture(
    params=[
        "memory",
        "sqlite",
        pytest.param("postgres", marks=pytest.mark.postgres),
        pytest.param("postgres-general", marks=pytest.mark.postgres),
    ]
)
def target(request: pytest.FixtureRequest) -> Iterator[Target]:
    with asyncio.Runner() as runner:
        if request.param == "memory":
            data = MemoryData()
            yield Target(runner, memory_stores(RULES, data).credits, memory_state(data))
            return
        database = fresh_database(request, "sqlite" if request.param == "sqlite" else "postgres")
        url = runner.run(database.__aenter__())
        config = Settings(database_url=url)
        engine = create_engine(config)
        fast = fast_connections(engine, config) if request.param == "postgres" else None
        try:
            stores = sql_stores(engine, RULES, fast=fast)
            yield Target(runner, stores.credits, database_state(engine))
        finally:
            if fast is not None:
                runner.run(fast.close())
            runner.run(engine.dispose())
            runner.run(database.__aexit__(None, None, None))


class Model:
    """The oracle: the domain's rules, the accounts, ledgers and keys in dicts."""

    def __init__(self, rules: CreditRules) -> None:
        self.rules = rules
        self.accounts: dict[str, Account] = {}
        self.ledgers: dict[str, list[tuple[str, int, datetime, str | None]]] = defaultdict(list)
        self.keys: dict[tuple[str, str], tuple[datetime, Claim]] = {}
        self.opened_as_guest: dict[str, bool] = {}
        self.replayed = False  # whether the last keyed change was a replay

    def apply(
        self, user_id: str, operation: Operation, at: datetime, key: str | None = None
    ) -> UserCredits:
        held = None if key is None else self.keys.get((user_id, key))
        claimed = None if held is None else held[1]
        outcome = self.rules.apply(
            self.accounts.get(user_id), user_id, operation, at, claimed=claimed
        )
        self.replayed = claimed is not None
        # SPEC §3: reads and deductions name the tier; refunds, upgrades, resets have none.
        opens_as_guest = operation.is_guest if isinstance(operation, Read | Deduct) else True
        self.opened_as_guest.setdefault(user_id, opens_as_guest)
        self.accounts[user_id] = outcome.account
        self.ledgers[user_id] += [(e.kind, e.amount, at, e.description) for e in outcome.entries]
        if key is not None and claimed is None and isinstance(operation, Deduct | Refund):
            self.keys[(user_id, key)] = (at, Claim.of(operation))
        return self.rules.view(outcome.account)

    def history(self, user_id: str, limit: int) -> list[tuple[str, int, datetime, str | None]]:
        return list(reversed(self.ledgers[user_id]))[:limit]

    def cleanup(self, cutoff: datetime) -> None:
        for user_id, rows in self.ledgers.items():
            self.ledgers[user_id] = [row for row in rows if row[2] >= cutoff]
        self.keys = {key: held for key, held in self.keys.items() if held[0] >= cutoff}


class CreditMachine(RuleBasedStateMachine):
    target: ClassVar[Target]

    def __init__(self) -> None:
        super().__init__()
        self.prefix = f"ex{next(_examples)}-"
        self.clock = FakeClock()
        self.service = CreditService(self.target.credits, clock=self.clock)
        self.model = Model(RULES)
        self.seen: dict[str, UserCredits] = {}  # each user's account as last answered
        self.lost_answers = itertools.count()
        self.trimmed = False  # retention removed ledger rows
        self.horizon = self.clock.now  # rows stamped since were never removed
        self.last_keyed: tuple[str, Keyed, str] | None = None  # user, change, key

    # --- steps -------------------------------------------------------------------------

    @rule(hours=HOURS)
    def advance(self, hours: float) -> None:
        """Moves the clock; -1: exactly to the first user's next reset, to the microsecond."""
        if hours >= 0:
            self.clock.advance(hours=hours)
        elif self.seen:
            self.clock.now = max(self.clock.now, next(iter(self.seen.values())).next_reset_at)

    @rule(user=USERS, is_guest=st.booleans())
    def read(self, user: str, is_guest: bool) -> None:
        self._expect(
            user,
            Read(is_guest),
            None,
            lambda uid: self.service.get_user_credits(uid, is_guest),
        )

    @rule(user=USERS, required=st.integers(min_value=1, max_value=60), is_guest=st.booleans())
    def check(self, user: str, required: int, is_guest: bool) -> None:
        uid = self.prefix + user
        expected = self.model.apply(uid, Read(is_guest), self.clock.now)
        answered = self.target.run(self.service.check_credits(uid, required, is_guest))
        assert answered == (expected.available_credits >= required)
        self._saw(uid, expected)

    @rule(
        user=USERS,
        amount=AMOUNTS,
        is_guest=st.booleans(),
        description=st.sampled_from([None, "a query"]),
        key=KEYS,
    )
    def deduct(
        self, user: str, amount: int, is_guest: bool, description: str | None, key: str | None
    ) -> None:
        self._keyed(user, Deduct(amount, is_guest, description), key)

    @rule(user=USERS, amount=AMOUNTS, description=st.sampled_from([None, "a return"]), key=KEYS)
    def refund(self, user: str, amount: int, description: str | None, key: str | None) -> None:
        self._keyed(user, Refund(amount, description), key)

    @precondition(lambda self: self.last_keyed is not None)
    @rule()
    def repeat_the_last_keyed_change(self) -> None:
        """The client sends its last keyed request again, as is: a replay."""
        assert self.last_keyed is not None
        self._keyed(*self.last_keyed)

    @rule(user=USERS)
    def upgrade(self, user: str) -> None:
        self._expect(user, Upgrade(), None, self.service.upgrade_to_registered)

    @rule(user=USERS)
    def reset(self, user: str) -> None:
        self._expect(user, Reset(), None, self.service.reset_credits)

    @rule(user=USERS, amount=AMOUNTS, is_guest=st.booleans())
    def deduct_whose_answer_was_lost(self, user: str, amount: int, is_guest: bool) -> None:
        """A deduction without a client key, sent twice with the same attempt, as a retry
        after a lost answer does: applied once."""
        uid = self.prefix + user
        attempt = Attempt(self.clock.now, f"own-{next(self.lost_answers)}", own_key=True)
        deduct = Deduct(amount, is_guest)
        for _ in range(2):
            self._compare(
                uid,
                lambda: self.model.apply(uid, deduct, attempt.at, attempt.key),
                self.target.credits.apply(uid, deduct, attempt),
            )

    @rule(user=USERS, limit=st.integers(min_value=1, max_value=4))
    def history(self, user: str, limit: int) -> None:
        uid = self.prefix + user
        rows = self.target.run(self.service.get_transaction_history(uid, limit))
        assert [_row(row) for row in rows] == self.model.history(uid, limit)

    @precondition(lambda self: bool(self.seen))
    @rule(days=st.integers(min_value=1, max_value=2))
    def cleanup(self, days: int) -> None:
        self.target.run(self.service.cleanup_old_transactions(days))
        self.model.cleanup(self.clock.now - timedelta(days=days))
        self.trimmed = True
        self.horizon = max(self.horizon, self.clock.now - timedelta(days=days))

    # --- after every step ----------------------------------------------------------------

    @invariant()
    def every_ledger_is_the_models(self) -> None:
        for uid in self.seen:
            rows = self.target.run(self.service.get_transaction_history(uid, 1000))
            assert [_row(row) for row in rows] == self.model.history(uid, 1000), uid

    @invariant()
    def every_ledger_sums_to_the_balance(self) -> None:
        """SPEC §3: the opening balance plus the ledger, until retention removes rows."""
        if self.trimmed:
            return
        for uid, account in self.seen.items():
            opening = RULES.full(self.model.opened_as_guest[uid])
            ledger = sum(row[1] for row in self.model.history(uid, 1000))
            assert account.available_credits == opening + ledger, uid

    @invariant()
    def the_audit_finds_no_drift(self) -> None:
        """SPEC §11: the ledger audit's rule (app/domain/audit.py), on the store's own
        figures, judges no account of a healthy store drifted, retention or not."""
        if not self.seen:
            return
        state = self.target.state
        figures = self.target.run(state.ledger_figures(self.prefix, len(self.seen)))
        assert {f.user_id for f in figures} == set(self.seen)
        for found in figures:
            assert verdict(found, self.horizon) is not Verdict.DRIFTED, found

    # --- helpers -------------------------------------------------------------------------

    def _keyed(self, user: str, change: Keyed, key: str | None) -> None:
        """A deduction or refund through the service, which also says whether it was a
        replay: as the model says."""

        async def call(uid: str) -> UserCredits:
            applied: Applied
            if isinstance(change, Deduct):
                applied = await self.service.deduct(
                    uid,
                    change.amount,
                    is_guest=change.is_guest,
                    description=change.description,
                    idempotency_key=key,
                )
            else:
                applied = await self.service.refund(
                    uid, change.amount, description=change.description, idempotency_key=key
                )
            assert applied.replayed is self.model.replayed
            return applied.account

        if key is not None:
            self.last_keyed = (user, change, key)
        self._expect(user, change, key, call)

    def _expect(
        self,
        user: str,
        operation: Operation,
        key: str | None,
        call: Callable[[str], Coroutine[Any, Any, UserCredits]],
    ) -> None:
        uid = self.prefix + user
        self._compare(uid, lambda: self.model.apply(uid, operation, self.clock.now, key), call(uid))

    def _compare(
        self,
        uid: str,
        model: Callable[[], UserCredits],
        store: Coroutine[Any, Any, UserCredits],
    ) -> None:
        try:
            expected: UserCredits | Refused = model()
        except REFUSALS as refused:
            expected = refused
        try:
            answered: UserCredits | Refused = self.target.run(store)
        except REFUSALS as refused:
            answered = refused
        if isinstance(expected, IdempotencyKeyReusedError):
            assert isinstance(answered, IdempotencyKeyReusedError), answered
            return
        if isinstance(expected, InsufficientCreditsError):
            assert isinstance(answered, InsufficientCreditsError), answered
            assert (answered.available, answered.required) == (
                expected.available,
                expected.required,
            )
            assert expected.required > expected.available  # SPEC: refused only when short
            return
        assert answered == expected
        self._saw(uid, answered)

    def _saw(self, uid: str, account: UserCredits) -> None:
        """What SPEC §3 says of any account, whatever the rules."""
        assert 0 <= account.available_credits <= account.max_credits
        assert account.max_credits == RULES.full(account.is_guest)
        assert account.next_reset_at == account.last_reset_timestamp + RULES.reset_period
        before = self.seen.get(uid)
        if before is not None and self.clock.now >= before.next_reset_at:
            assert account.last_reset_timestamp == self.clock.now  # refilled on this access
        self.seen[uid] = account


def _row(row: Any) -> tuple[str, int, datetime, str | None]:
    return (row.transaction_type, row.amount, row.timestamp, row.description)


def test_the_credit_rules_hold_on_every_store(target: Target) -> None:
    class Machine(CreditMachine):
        pass

    Machine.target = target
    run_state_machine_as_test(Machine, settings=MACHINE_SETTINGS)
