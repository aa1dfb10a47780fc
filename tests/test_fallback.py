"""The outage fallback (app/storage/fallback.py) without a real outage: a database store
that is down while the test says so. Every kind of change it serves from memory
reaches the database on replay, once; reads are never replayed."""

from __future__ import annotations

from datetime import datetime
from typing import get_args

import pytest

from app.domain.credits import Attempt, Change, Deduct, Operation, Refund, Reset, Upgrade
from app.errors import StorageUnavailableError
from app.repositories.base import CreditRepository, Stores
from app.repositories.memory import MemoryConsentRepository, MemoryData, memory_stores
from app.schemas import ConsentEvent, CreditTransaction, UserConsent, UserCredits
from app.services.consents import UserConsentService
from app.services.credits import CreditService
from app.storage.fallback import OutageFallback, with_fallback
from tests.conftest import RULES
from tests.support.clock import FakeClock

EXAMPLES: dict[type, Change] = {
    Deduct: Deduct(3, description="during the outage"),
    Refund: Refund(2),
    Upgrade: Upgrade(),
    Reset: Reset(),
}


class Outage:
    """A memory store standing in for the database, down while `down` is true."""

    def __init__(self) -> None:
        self.down = False
        self.stores = memory_stores(RULES)

    def check(self) -> None:
        if self.down:
            raise StorageUnavailableError("the database is down (test)")


class DownableCredits:
    def __init__(self, outage: Outage) -> None:
        self._outage = outage
        self._inner: CreditRepository = outage.stores.credits

    async def apply(self, user_id: str, operation: Operation, attempt: Attempt) -> UserCredits:
        self._outage.check()
        return await self._inner.apply(user_id, operation, attempt)

    async def history(self, user_id: str, limit: int) -> list[CreditTransaction]:
        self._outage.check()
        return await self._inner.history(user_id, limit)

    async def delete_transactions_before(self, cutoff: datetime) -> int:
        self._outage.check()
        return await self._inner.delete_transactions_before(cutoff)


class DownableConsents(MemoryConsentRepository):
    def __init__(self, outage: Outage) -> None:
        super().__init__(MemoryData())
        self._outage = outage

    async def upsert(
        self,
        user_id: str,
        *,
        terms_accepted: bool,
        marketing_consent: bool,
        terms_version: str | None,
        now: datetime,
    ) -> UserConsent:
        self._outage.check()
        return await super().upsert(
            user_id,
            terms_accepted=terms_accepted,
            marketing_consent=marketing_consent,
            terms_version=terms_version,
            now=now,
        )

    async def set_marketing(
        self, user_id: str, marketing_consent: bool, *, now: datetime
    ) -> UserConsent | None:
        self._outage.check()
        return await super().set_marketing(user_id, marketing_consent, now=now)

    async def history(self, user_id: str) -> list[ConsentEvent]:
        self._outage.check()
        return await super().history(user_id)


@pytest.fixture
def outage() -> Outage:
    return Outage()


@pytest.fixture
def fallback() -> OutageFallback:
    return OutageFallback(lambda: memory_stores(RULES))


def database_of(outage: Outage) -> Stores:
    return Stores(
        credits=DownableCredits(outage),
        consents=DownableConsents(outage),
        cache=outage.stores.cache,
    )


def test_every_kind_of_credit_change_has_an_example_here() -> None:
    assert set(EXAMPLES) == set(get_args(Change))


@pytest.mark.parametrize("change", EXAMPLES.values(), ids=[kind.__name__ for kind in EXAMPLES])
async def test_a_change_served_during_an_outage_reaches_the_database_once(
    outage: Outage, fallback: OutageFallback, change: Change
) -> None:
    database = database_of(outage)
    clock = FakeClock()
    credits = CreditService(with_fallback(database, fallback).credits, clock=clock)
    reference = CreditService(memory_stores(RULES).credits, clock=clock)
    for service in (credits, reference):
        await service.deduct_credits("traveller", 6)

    outage.down = True
    served = await credits.get_user_credits("traveller")  # a read: nothing to replay
    assert fallback.depth == 0
    attempt = Attempt(clock.now, "during" if isinstance(change, Deduct | Refund) else None)
    await with_fallback(database, fallback).credits.apply("traveller", change, attempt)
    assert fallback.depth == 1
    assert served.available_credits == 10  # the fallback store knew nothing of the 6

    outage.down = False
    await fallback.replay(database)
    await fallback.replay(database)  # a second replay changes nothing
    await reference.get_user_credits("traveller")
    await reference_apply(reference, change, attempt)
    assert fallback.depth == 0
    assert rows(await database.credits.history("traveller", 50)) == rows(
        await reference.get_transaction_history("traveller", 50)
    )


async def reference_apply(reference: CreditService, change: Change, attempt: Attempt) -> None:
    match change:
        case Deduct(amount, _, description):
            await reference.deduct_credits(
                "traveller", amount, description=description, idempotency_key=attempt.key
            )
        case Refund(amount, description):
            await reference.refund_credits(
                "traveller", amount, description=description, idempotency_key=attempt.key
            )
        case Upgrade():
            await reference.upgrade_to_registered("traveller")
        case Reset():
            await reference.reset_credits("traveller")


def rows(history: list[CreditTransaction]) -> list[tuple[object, ...]]:
    return [(r.transaction_type, r.amount, r.description, r.timestamp) for r in history]


async def test_consent_changes_served_during_an_outage_reach_the_database_in_order(
    outage: Outage, fallback: OutageFallback
) -> None:
    database = database_of(outage)
    clock = FakeClock()
    consents = UserConsentService(with_fallback(database, fallback).consents, clock=clock)
    outage.down = True
    await consents.record_consent("reader", marketing_consent=False)
    clock.advance(minutes=1)
    await consents.update_marketing_consent("reader", True)
    outage.down = False
    await fallback.replay(database)
    stored = await database.consents.get("reader")
    assert stored is not None
    assert (stored.terms_accepted, stored.marketing_consent, stored.updated_at) == (
        True,
        True,
        clock.now,
    )


async def test_a_replay_that_meets_the_database_down_again_keeps_the_rest(
    outage: Outage, fallback: OutageFallback
) -> None:
    database = database_of(outage)
    credits = CreditService(with_fallback(database, fallback).credits)
    outage.down = True
    for n in range(3):
        await credits.deduct_credits("patient", 1, idempotency_key=f"k{n}")
    await fallback.replay(database)  # still down
    assert fallback.depth == 3
    outage.down = False
    await fallback.replay(database)
    assert [row.amount for row in await database.credits.history("patient", 10)] == [-1] * 3


async def test_a_replayed_change_whose_key_the_database_holds_for_another_request_is_skipped(
    outage: Outage, fallback: OutageFallback
) -> None:
    database = database_of(outage)
    credits = CreditService(with_fallback(database, fallback).credits)
    await credits.deduct_credits("twice", 2, idempotency_key="order-1")
    outage.down = True
    await credits.deduct_credits("twice", 5, idempotency_key="order-1")  # unknown to memory
    await credits.deduct_credits("twice", 1, idempotency_key="order-2")
    outage.down = False
    await fallback.replay(database)
    assert (fallback.depth, fallback.key_conflicts) == (0, 1)
    assert [row.amount for row in await database.credits.history("twice", 10)] == [-1, -2]


async def test_the_consent_history_is_refused_during_an_outage_not_half_told(
    outage: Outage, fallback: OutageFallback
) -> None:
    database = database_of(outage)
    consents = UserConsentService(with_fallback(database, fallback).consents)
    await consents.record_consent("told", terms_accepted=True)
    outage.down = True
    await consents.record_consent("told", terms_accepted=True, marketing_consent=True)
    with pytest.raises(StorageUnavailableError):
        await consents.consent_history("told")
    outage.down = False
    await fallback.replay(database)
    assert len(await consents.consent_history("told")) == 2


async def test_a_full_outbox_refuses_further_writes_and_keeps_serving_reads(
    outage: Outage,
) -> None:
    fallback = OutageFallback(lambda: memory_stores(RULES), max_changes=2)
    database = database_of(outage)
    stores = with_fallback(database, fallback)
    credits, consents = CreditService(stores.credits), UserConsentService(stores.consents)
    outage.down = True
    await credits.deduct_credits("full", 1)
    await consents.record_consent("full", terms_accepted=True)
    with pytest.raises(StorageUnavailableError):
        await credits.deduct_credits("full", 1)
    with pytest.raises(StorageUnavailableError):
        await consents.record_consent("full", terms_accepted=False)
    assert (await credits.get_user_credits("full")).available_credits == 9  # nothing half-made
    assert fallback.depth == 2
    outage.down = False
    await fallback.replay(database)
    outage.down = True
    await credits.deduct_credits("full", 1)  # room again once replayed
    assert fallback.depth == 1
