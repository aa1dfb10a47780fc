"""The rules of moving a user between stores (app/domain/state.py): MERGE and VERIFY."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from app.domain.credits import Account
from app.domain.state import (
    LedgerRecord,
    UserState,
    Verification,
    differences,
    later_consent,
    missing_rows,
    verified,
)
from app.schemas import UserConsent

AT = datetime(2026, 11, 29, 12, tzinfo=UTC)


def row(amount: int, *, key: str | None = None, id_: int = 0, at: datetime = AT) -> LedgerRecord:
    return LedgerRecord("u", "deduction", amount, at, None, key, id_)


def consent(marketing: bool, updated: datetime) -> UserConsent:
    return UserConsent(
        user_id="u",
        terms_accepted=True,
        marketing_consent=marketing,
        timestamp=AT,
        updated_at=updated,
    )


ACCOUNT = Account("u", True, 7, 10, AT)


class TestMissingRows:
    def test_a_row_is_known_by_everything_but_the_stores_id(self) -> None:
        assert missing_rows([row(-1, id_=5)], [row(-1, id_=900)]) == []

    def test_two_equal_rows_stay_two(self) -> None:
        assert missing_rows([row(-1), row(-1)], [row(-1)]) == [row(-1)]

    def test_the_key_and_the_instant_tell_rows_apart(self) -> None:
        later = AT + timedelta(microseconds=1)
        incoming = [row(-1, key="a"), row(-1, at=later)]
        assert missing_rows(incoming, [row(-1, key="b"), row(-1)]) == incoming

    def test_rows_only_the_receiving_store_holds_stay_its_own(self) -> None:
        assert missing_rows([], [row(-3)]) == []


class TestLaterConsent:
    def test_the_later_update_wins_either_way(self) -> None:
        old, new = consent(False, AT), consent(True, AT + timedelta(seconds=1))
        assert later_consent(new, old) == new
        assert later_consent(old, new) is None

    def test_a_tie_keeps_what_is_held(self) -> None:
        assert later_consent(consent(True, AT), consent(False, AT)) is None

    def test_a_consent_only_one_side_has(self) -> None:
        assert later_consent(consent(True, AT), None) == consent(True, AT)
        assert later_consent(None, consent(True, AT)) is None


class TestDifferences:
    def test_an_exact_copy_has_none(self) -> None:
        state = UserState("u", ACCOUNT, (row(-3),), consent(True, AT))
        assert differences(state, state) == []

    def test_each_account_field_is_named(self) -> None:
        held = UserState("u", Account("u", False, 6, 50, AT))
        assert differences(UserState("u", ACCOUNT), held) == [
            "balance 6, expected 7",
            "maximum 50, expected 10",
            "tier registered, expected guest",
        ]

    def test_a_missing_account_row_or_consent_is_named(self) -> None:
        incoming = UserState("u", ACCOUNT, (row(-3), row(-1)), consent(True, AT))
        assert differences(incoming, UserState("u", ledger=(row(-3),))) == [
            "account missing",
            "1 ledger row(s) missing: ledger sum -3, expected -4",
            "consent differs",
        ]

    def test_a_later_consent_held_and_extra_rows_are_no_difference(self) -> None:
        incoming = UserState("u", ACCOUNT, (row(-3),), consent(False, AT))
        held = UserState("u", ACCOUNT, (row(-3), row(-2)), consent(True, AT + timedelta(seconds=1)))
        assert differences(incoming, held) == []


class TestVerification:
    def test_a_user_verified_again_replaces_its_earlier_result(self) -> None:
        verification = Verification()
        incoming = [UserState("u", ACCOUNT)]
        verification.record(["u"], verified(incoming, [UserState("u")]))
        assert verification.mismatches == 1
        assert verification.samples() == [{"user_id": "u", "differences": ["account missing"]}]
        verification.record(["u"], verified(incoming, incoming))
        assert verification.mismatches == 0
