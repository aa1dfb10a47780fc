"""Erasure's pseudonyms (SPEC §10): the name an erased user's ledger rows are kept under.

An HMAC-SHA256 of the user id with ERASURE_KEY, never a plain hash: a plain hash of a
guessable id would be the id. The name begins with "!", which no user id may contain
(SPEC §4), so no client can address it, create an account under it, or read its ledger.
"""

from __future__ import annotations

import hashlib
import hmac

ERASED_PREFIX = "!erased:"


class Pseudonyms:
    def __init__(self, key: str) -> None:
        self._key = key.encode()

    def of(self, user_id: str) -> str:
        digest = hmac.new(self._key, user_id.encode(), hashlib.sha256).hexdigest()
        return ERASED_PREFIX + digest


def is_pseudonym(user_id: str) -> bool:
    """Is this id an erased user's pseudonym (whose rows are books, not a user's)?"""
    return user_id.startswith(ERASED_PREFIX)
