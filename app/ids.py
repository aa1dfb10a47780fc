"""Ids unique across processes and restarts, cheaply: 64 random bits drawn once per
process, then a counter. Random bits for every id would cost a system call each."""

from __future__ import annotations

import itertools
import os
import secrets


class UniqueIds:
    """`kind` + separator + the process's random part + separator + a counter (hex)."""

    def __init__(self, kind: str, separator: str = ":") -> None:
        self._kind = kind
        self._separator = separator
        self._prefix = ""
        self._counter = itertools.count()
        os.register_at_fork(after_in_child=self._forget)  # a forked worker draws its own

    def _forget(self) -> None:
        self._prefix = ""

    def __call__(self) -> str:
        if not self._prefix:
            sep = self._separator
            self._prefix = f"{self._kind}{sep}{secrets.token_hex(8)}{sep}"
            self._counter = itertools.count()
        return f"{self._prefix}{next(self._counter):x}"
