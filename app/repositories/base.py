"""The repository protocols every store implements."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Protocol

from app.domain.audit import LedgerFigures
from app.domain.credits import Account, Attempt, Operation
from app.domain.state import LedgerRecord, Merged, Round, UserState, verified
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
    """Consent records, one per user."""

    async def get(self, user_id: str) -> UserConsent | None: ...

    async def upsert(
        self,
        user_id: str,
        *,
        terms_accepted: bool,
        marketing_consent: bool,
        terms_version: str | None,
        now: datetime,
    ) -> UserConsent:
        """Creates the record, or updates it keeping its first-recorded `timestamp`; its
        history gains the event in the same unit of work."""
        ...

    async def set_marketing(
        self, user_id: str, marketing_consent: bool, *, now: datetime
    ) -> UserConsent | None:
        """None when no consent is recorded for the user; else its history gains the
        event in the same unit of work."""
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


class StateRepository(Protocol):
    """A store's users as a whole, to move them to another store (app/domain/state.py)."""

    def user_ids(self, batch_size: int) -> AsyncIterator[list[str]]:
        """Every user with an account or a consent, in batches, ordered by user_id."""
        ...

    async def read(self, user_ids: Sequence[str]) -> list[UserState]:
        """The state of each named user, one consistent read; users the store does not
        hold come back empty."""
        ...

    async def merge(self, states: Sequence[UserState], round: Round | None = None) -> int:
        """MERGE the states in, as one unit of work; counts the ledger rows added. In a
        `round`, LOWEST WINS among the replicas that carried a user (a memory store,
        one process's own, has no other replica to weigh and ignores it)."""
        ...

    async def erase(self, user_id: str, pseudonym: str, now: datetime) -> int | None:
        """SPEC §10, as one unit of work: the user's consent, history, keys and account
        removed, the account kept under `pseudonym` (ERASED RESUMES), the ledger rows
        moved to `pseudonym` with descriptions and keys cleared. Counts the rows moved;
        None when the store holds nothing of the user."""
        ...

    async def ledger_figures(self, after: str | None, limit: int) -> list[LedgerFigures]:
        """The ledger audit's figures (app/domain/audit.py) of up to `limit` accounts, the
        first by user_id after `after` (None: from the first); one consistent read."""
        ...

    async def merge_verified(
        self, states: Sequence[UserState], round: Round | None = None
    ) -> Merged:
        """`merge`, then VERIFY of the states against what the store holds afterwards
        (in a `round`, a lower balance may stand); the rows added and the differences
        found, by user, as app/domain/state.py's `differences` words them."""
        ...

    async def merge_rows(self, batch: StagedBatch, rows: StagedRows) -> Merged:
        """`merge_verified` of a batch of an import, given as its rows (Row)."""
        ...


# An import's rows as staged, in stream order:
# an account (user_id, is_guest, available_credits, max_credits, last_reset),
# a ledger row (user_id, kind, amount, timestamp, description, idempotency_key),
# a consent (user_id, terms_accepted, marketing_consent, timestamp, updated_at,
#            terms_version).
Row = tuple[Any, ...]
# A batch's accounts, ledger rows and consents.
StagedRows = tuple[list[Row], list[Row], list[Row]]


@dataclass(frozen=True, slots=True)
class StagedBatch:
    """Users merged together, each with one run of its lines."""

    number: int
    user_ids: list[str]
    lines: int
    # A user of the batch carries no account: the accounts are locked before the merge
    # (an account's INSERT locks those it replaces by itself).
    lock: bool
    # It names a user the batch before names: merged after that one.
    follows: bool


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
    accounts, ledger, consents = rows
    account_of = {row[0]: Account(*row) for row in accounts}
    ledger_of: dict[str, list[LedgerRecord]] = {}
    for row in ledger:
        ledger_of.setdefault(row[0], []).append(LedgerRecord(*row))
    consent_of = {row[0]: _consent(row) for row in consents}
    return [
        UserState(
            user_id,
            account_of.get(user_id),
            tuple(ledger_of.get(user_id, ())),
            consent_of.get(user_id),
        )
        for user_id in batch.user_ids
    ]


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


async def read_back_verified(
    repository: StateRepository, states: Sequence[UserState], round: Round | None
) -> Merged:
    """`merge_verified` as a store does it that cannot verify in place: merge, read the
    users back, compare with app/domain/state.py's `differences`."""
    added = await repository.merge(states, round)
    held = await repository.read([state.user_id for state in states])
    return Merged(added, verified(states, held, in_round=round is not None))


@dataclass(frozen=True)
class Stores:
    """One store's three repositories."""

    credits: CreditRepository
    consents: ConsentRepository
    cache: CacheRepository
