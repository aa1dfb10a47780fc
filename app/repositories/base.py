"""The repository protocols every store implements."""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any, Protocol, runtime_checkable

from app.domain.audit import LedgerFigures
from app.domain.carry import Carried, carried_state
from app.domain.consents import ConsentChange
from app.domain.credits import Account, Attempt, Claim, Operation
from app.domain.privacy import Pseudonyms, is_pseudonym
from app.domain.state import Erasure, KeyRecord, LedgerRecord, Merged, UserState
from app.schemas import ConsentEvent, CreditTransaction, UserConsent, UserCredits


class CreditRepository(Protocol):
    """Accounts and their ledger, by the rules of app/domain/credits.py.

    `apply` is one atomic unit of work: it opens an unseen account, applies a due reset,
    then the operation, and writes every balance change's ledger row with it. A change
    whose key was applied before for that user changes nothing else.
    """

    async def apply(self, user_id: str, operation: Operation, attempt: Attempt) -> UserCredits:
        """Raises InsufficientCreditsError, changing nothing, when the balance is short."""
        ...

    async def history(self, user_id: str, limit: int) -> list[CreditTransaction]:
        """Newest first."""
        ...

    async def delete_transactions_before(self, cutoff: datetime) -> int:
        """Deletes ledger rows and idempotency keys older than `cutoff`; counts the rows."""
        ...


class ConsentRepository(Protocol):
    """Consent records, one per user, each change made through `apply`."""

    async def get(self, user_id: str) -> UserConsent | None: ...

    async def apply(
        self, user_id: str, change: ConsentChange, *, now: datetime
    ) -> UserConsent | None:
        """The consent after `change` (app/domain/consents.py), one unit of work in which
        its history gains the event. RecordConsent creates the record, or replaces it
        keeping its first-recorded `timestamp`; ChangeMarketing answers None, changing
        nothing, when no consent is recorded for the user."""
        ...

    async def history(self, user_id: str) -> list[ConsentEvent]:
        """Every recorded change of the user's consent, newest first."""
        ...

    async def page(self, limit: int, offset: int) -> list[UserConsent]:
        """Ordered by user_id."""
        ...

    async def admission(
        self, user_id: str, *, now: datetime
    ) -> tuple[UserConsent | None, UserCredits | None]:
        """What the assistant reads of a user before answering: the consent, and the
        account too where the same read gives it (PostgreSQL's fast path, an account
        with no reset due); None for the account otherwise, which the caller then asks
        the credit service for."""
        ...


class CacheRepository(Protocol):
    """Cached answers by key, each with its expiry."""

    async def get(self, key: str, *, now: datetime) -> dict[str, Any] | None:
        """None when absent or expired."""
        ...

    async def set(
        self, key: str, result: dict[str, Any], *, now: datetime, expires_at: datetime
    ) -> None: ...

    async def delete_expired(self, *, now: datetime) -> int: ...

    async def clear(self) -> None: ...

    async def count(self, *, now: datetime) -> int:
        """Entries that have not expired."""
        ...


@runtime_checkable
class EntryReader(Protocol):
    """A shared tier that can also tell an entry's expiry (RedisCacheRepository)."""

    async def get_entry(
        self, key: str, *, now: datetime
    ) -> tuple[dict[str, Any], datetime] | None: ...


class StateRepository(Protocol):
    """A store's users as a whole, to carry them into another store by the one merge
    (app/domain/carry.py), and to erase one (SPEC §10)."""

    def user_ids(self, batch_size: int) -> AsyncIterator[list[str]]:
        """Every user with an account or a consent, and every erased user's pseudonym, in
        batches, ordered by user_id."""
        ...

    def erasures(self, batch_size: int) -> AsyncIterator[list[Erasure]]:
        """Every erasure record, in batches."""
        ...

    async def read(self, user_ids: Sequence[str]) -> list[UserState]:
        """The state of each named user, one consistent read, with the store's record of
        their erasure (a pseudonym: its rows and its own record); users the store does
        not hold come back empty."""
        ...

    async def merge(self, carried: Sequence[Carried]) -> Merged:
        """The one merge of each user carried (`carry`), as one unit of work that holds
        them, then VERIFY of what the store holds afterwards against the plans."""
        ...

    async def merge_erasures(self, erasures: Sequence[Erasure]) -> int:
        """Records each erasure the store lacks (the later of two stands); a user the store
        still holds under a newly recorded pseudonym is erased as of that record. Counts
        the users erased."""
        ...

    async def erase(self, user_id: str, pseudonym: str, now: datetime) -> int | None:
        """SPEC §10, as one unit of work: the user's consent, history, keys and account
        removed, the erasure recorded under `pseudonym` with the account (ERASED
        RESUMES), the ledger rows moved to `pseudonym` with descriptions and keys cleared.
        Counts the rows moved; None when the store holds nothing of the user, whose
        erasure is recorded all the same (an earlier record keeps its account)."""
        ...

    async def ledger_figures(self, after: str | None, limit: int) -> list[LedgerFigures]:
        """The ledger audit's figures (app/domain/audit.py) of up to `limit` accounts, the
        first by user_id after `after` (None: from the first); one consistent read."""
        ...

    async def merge_rows(self, batch: StagedBatch, rows: StagedRows) -> Merged:
        """`merge` of a batch of an import, given as its rows (Row)."""
        ...


# Users read at a time while looking for those a carried erasure names.
ERASE_SCAN_BATCH = 1000

# An import's rows as staged, in stream order:
# an account (user_id, is_guest, available_credits, max_credits, last_reset),
# a ledger row (user_id, kind, amount, timestamp, description, idempotency_key),
# a consent (user_id, terms_accepted, marketing_consent, timestamp, updated_at,
#            terms_version),
# a claimed key (user_id, idempotency_key, created_at, operation, request),
# a consent event (user_id, terms_accepted, marketing_consent, terms_version, recorded_at).
Row = tuple[Any, ...]
# A batch's accounts, ledger rows, consents, keys and consent events.
StagedRows = tuple[list[Row], list[Row], list[Row], list[Row], list[Row]]


@dataclass(frozen=True, slots=True)
class StagedBatch:
    """Users merged together, each with one run of its lines."""

    number: int
    user_ids: list[str]
    lines: int
    # A user of the batch carries no account.
    lock: bool
    # It names a user the batch before names: merged after that one.
    follows: bool
    # The stream carries every claimed key (format 2); else keys are claimed from rows.
    keys: bool = True
    # The erasures the stream carries, by pseudonym: a user of the batch erased there was
    # exported as it came back after its erasure.
    erasures: Mapping[str, datetime] = field(default_factory=dict)


class Erasures(Protocol):
    """When users were erased (SPEC §10)."""

    async def erased_at(self, user_id: str) -> datetime | None:
        """The instant the user was last erased; None when never."""
        ...

    async def erased_since(self, after: datetime) -> list[tuple[str, datetime]]:
        """The pseudonyms of the users erased after `after`, with when, oldest first."""
        ...

    def pseudonym(self, user_id: str) -> str:
        """What the user's erasure is recorded under."""
        ...


def states_of(batch: StagedBatch, rows: StagedRows) -> list[UserState]:
    """A batch of an import as its users, in the batch's order."""
    accounts, ledger, consents, keys, events = rows
    account_of = {row[0]: Account(*row) for row in accounts}
    ledger_of: dict[str, list[LedgerRecord]] = {}
    for row in ledger:
        ledger_of.setdefault(row[0], []).append(LedgerRecord(*row))
    consent_of = {row[0]: _consent(row) for row in consents}
    keys_of: dict[str, list[KeyRecord]] = {}
    for user_id, key, created_at, operation, request in keys:
        keys_of.setdefault(user_id, []).append(
            KeyRecord(user_id, key, created_at, Claim(operation, request))
        )
    events_of: dict[str, list[ConsentEvent]] = {}
    for user_id, terms_accepted, marketing, version, recorded_at in events:
        events_of.setdefault(user_id, []).append(
            ConsentEvent(
                terms_accepted=terms_accepted,
                marketing_consent=marketing,
                terms_version=version,
                recorded_at=recorded_at,
            )
        )
    return [
        UserState(
            user_id,
            account_of.get(user_id),
            tuple(ledger_of.get(user_id, ())),
            consent_of.get(user_id),
            tuple(keys_of.get(user_id, ())),
            tuple(events_of.get(user_id, ())),
        )
        for user_id in batch.user_ids
    ]


def carried_batch(
    batch: StagedBatch, rows: StagedRows, pseudonyms: Pseudonyms | None
) -> list[Carried]:
    """A batch of an import as what it carries of its users (`merge_rows`), each with
    the erasure the stream carries of it."""
    carried = [carried_state(state, keys=batch.keys) for state in states_of(batch, rows)]
    if not batch.erasures or pseudonyms is None:
        return carried
    return [
        replace(one, erased_at=batch.erasures.get(pseudonyms.of(one.user_id))) for one in carried
    ]


def pseudonym_of(pseudonyms: Pseudonyms | None, user_ids: Sequence[str]) -> dict[str, str]:
    """The pseudonym each user's erasure is recorded under, by user (a pseudonym's own);
    none without ERASURE_KEY, but for pseudonyms."""
    found = {}
    for user_id in user_ids:
        if is_pseudonym(user_id):
            found[user_id] = user_id
        elif pseudonyms is not None:
            found[user_id] = pseudonyms.of(user_id)
    return found


async def erase_held(
    state: StateRepository, pseudonyms: Pseudonyms | None, recorded: dict[str, Erasure]
) -> int:
    """`merge_erasures`' last step: the users the store still holds under newly recorded
    pseudonyms (`recorded`, by pseudonym) erased as of their records, found by working
    out every held user's pseudonym. Counts them."""
    if not recorded or pseudonyms is None:
        return 0
    erased = 0
    async for user_ids in state.user_ids(ERASE_SCAN_BATCH):
        for user_id in user_ids:
            record = None if is_pseudonym(user_id) else recorded.get(pseudonyms.of(user_id))
            if record is not None:
                await state.erase(user_id, record.pseudonym, record.erased_at)
                erased += 1
    return erased


def _consent(row: Row) -> UserConsent:
    user_id, terms_accepted, marketing_consent, timestamp, updated_at, version = row
    return UserConsent(
        user_id=user_id,
        terms_accepted=terms_accepted,
        marketing_consent=marketing_consent,
        timestamp=timestamp,
        updated_at=updated_at,
        terms_version=version,
    )


@dataclass(frozen=True)
class Stores:
    """One store's three repositories."""

    credits: CreditRepository
    consents: ConsentRepository
    cache: CacheRepository
