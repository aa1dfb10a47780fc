"""Export of a store's state as NDJSON lines (app/transfer/lines.py), a batch of users
read at a time, so memory stays flat however many users the store holds."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from app.clock import utc_now
from app.domain.credits import CreditRules
from app.domain.state import Erasure
from app.repositories.base import StateRepository
from app.switching.handover import BATCH_SIZE
from app.transfer.lines import ENCODER, FORMAT


async def export_lines(
    state: StateRepository, rules: CreditRules, store: str
) -> AsyncIterator[bytes]:
    """The store's erasures, then its users, as NDJSON lines, a batch read at a time."""
    header = {"kind": "header", "format": FORMAT, "store": store, "exported_at": utc_now()}
    yield ENCODER.encode_lines([header])
    counts = dict.fromkeys(
        ("accounts", "ledger_rows", "consents", "keys", "consent_events", "erasures"), 0
    )
    async for records in state.erasures(BATCH_SIZE):
        yield ENCODER.encode_lines([_erasure_line(record) for record in records])
        counts["erasures"] += len(records)
    async for user_ids in state.user_ids(BATCH_SIZE):
        lines: list[dict[str, Any]] = []
        for user in await state.read(user_ids):
            if user.account is not None:
                view = rules.view(user.account)
                lines.append({"kind": "account", **view.model_dump()})
                counts["accounts"] += 1
            lines.extend({"kind": "ledger", **row.fields()} for row in user.ledger)
            counts["ledger_rows"] += len(user.ledger)
            lines.extend(
                {
                    "kind": "key",
                    "user_id": key.user_id,
                    "idempotency_key": key.key,
                    "operation": key.claim.operation,
                    "request": key.claim.request,
                    "created_at": key.created_at,
                }
                for key in user.keys
            )
            counts["keys"] += len(user.keys)
            if user.consent is not None:
                lines.append({"kind": "consent", **user.consent.model_dump()})
                counts["consents"] += 1
            lines.extend(
                {"kind": "consent_event", "user_id": user.user_id, **event.model_dump()}
                for event in user.events
            )
            counts["consent_events"] += len(user.events)
        yield ENCODER.encode_lines(lines)
    yield ENCODER.encode_lines([{"kind": "footer", **counts}])


def _erasure_line(record: Erasure) -> dict[str, Any]:
    account = record.account
    line: dict[str, Any] = {
        "kind": "erasure",
        "pseudonym": record.pseudonym,
        "erased_at": record.erased_at,
    }
    if account is not None:
        line.update(
            is_guest=account.is_guest,
            available_credits=account.available,
            max_credits=account.maximum,
            last_reset_timestamp=account.last_reset,
        )
    return line
