"""The shadow stage (SPEC §7): every write applied to the primary, then to the shadow with
the same attempt; a sample of answers compared; a user the shadow failed or answered
differently for is repaired in the background from the primary.

The client only ever gets the primary's answer. A repair carries the user's state from
the primary by the one merge (app/domain/carry.py): what the shadow lacks is added, a
shadow write that landed since the repair's read stands, nothing of a user erased since
comes back, and a shadow that drifted for reasons no write explains (a row changed
underneath the service) takes the primary's account (SAME HISTORY). The queue holds at most
`repair_max` users: past it a user is counted (`repair_overflow`) instead of queued, and
the shadow needs seeding again (docs/moving-state.md, runbook).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections import deque
from typing import Any

from pydantic import BaseModel

from app.config import StorageBackend
from app.domain.carry import carried_state
from app.domain.state import Tally, differences
from app.errors import InsufficientCreditsError
from app.repositories.base import StateRepository, Stores
from app.switching.provider import StorageProvider

logger = logging.getLogger(__name__)

SAMPLES = 20
# How often the background task retries the repair queue.
REPAIR_INTERVAL_SECONDS = 1.0
REPAIR_BATCH = 100

Answer = BaseModel | InsufficientCreditsError | None


class Shadow:
    """The shadow store of the moment, its comparisons and its repair queue."""

    def __init__(
        self,
        provider: StorageProvider,
        states: dict[StorageBackend, StateRepository],
        *,
        compare_rate: float,
        repair_max: int,
        carried: Tally,
    ) -> None:
        self._provider = provider
        self._states = states
        self._carried = carried  # what the repairs' merges did, counted with the others
        self._compare_rate = compare_rate
        self._repair_max = repair_max
        self.repair_overflow = 0
        self._rng = random.Random()
        self.compared = 0
        self.mismatches = 0
        self.samples: deque[dict[str, Any]] = deque(maxlen=SAMPLES)
        self._repairs: set[str] = set()
        self._repairing: asyncio.Task[None] | None = None

    def restart(self) -> None:
        """A new shadow: nothing compared yet, nothing to repair."""
        self.compared = self.mismatches = self.repair_overflow = 0
        self.samples.clear()
        self._repairs.clear()

    @property
    def stores(self) -> Stores | None:
        """The shadow's repositories, None while there is no shadow."""
        shadow = self._provider.shadow
        return None if shadow is None else self._provider.stores_of(shadow)

    @property
    def repair_queue(self) -> int:
        return len(self._repairs)

    def sampled(self) -> bool:
        """Whether this read is one of SHADOW_COMPARE_RATE's share to compare."""
        return self._compare_rate >= 1 or self._rng.random() < self._compare_rate

    def compare(self, user_id: str, operation: str, primary: Answer, shadow: Answer) -> None:
        """Counts the comparison; a difference is sampled and its user queued for repair."""
        self.compared += 1
        if _view(primary) == _view(shadow):
            return
        self.mismatches += 1
        self.samples.append(
            {
                "user_id": user_id,
                "operation": operation,
                "primary": _view(primary),
                "shadow": _view(shadow),
            }
        )
        self.repair(user_id)

    def failed(self, user_id: str, operation: str, error: BaseException) -> None:
        """A write the shadow could not take: the user waits in the repair queue."""
        logger.warning("shadow %s failed for a user (%s); queued for repair", operation, error)
        self.repair(user_id)

    def repair(self, user_id: str) -> None:
        if user_id not in self._repairs and len(self._repairs) >= self._repair_max:
            if not self.repair_overflow:
                logger.error(
                    "shadow repair queue full (%d users): the shadow needs seeding again",
                    self._repair_max,
                )
            self.repair_overflow += 1
            return
        self._repairs.add(user_id)
        if self._repairing is None or self._repairing.done():
            self._repairing = asyncio.get_running_loop().create_task(self._repair_loop())

    async def repair_now(self) -> int:
        """One pass over the queue; counts the users left in it."""
        shadow = self._provider.shadow
        if shadow is None or not self._repairs:
            return len(self._repairs)
        source, target = self._states[self._provider.backend], self._states[shadow]
        for user_ids in _batches(sorted(self._repairs), REPAIR_BATCH):
            try:
                states = await source.read(user_ids)
                merged = await target.merge([carried_state(state) for state in states])
                self._carried.add(merged.tally)
                held = {state.user_id: state for state in await target.read(user_ids)}
            except Exception as error:  # the shadow still down: try again later
                logger.warning("shadow repair failed (%s); will retry", error)
                return len(self._repairs)
            for state in states:
                # A write that came between the read and the merge shows as a difference:
                # the user stays queued for the next pass.
                if not differences(state, held[state.user_id]):
                    self._repairs.discard(state.user_id)
        return len(self._repairs)

    async def _repair_loop(self) -> None:
        while self._repairs and self._provider.shadow is not None:
            await self.repair_now()
            if self._repairs:
                await asyncio.sleep(REPAIR_INTERVAL_SECONDS)

    def view(self) -> dict[str, Any]:
        compared = self.compared
        return {
            "compared": compared,
            "mismatches": self.mismatches,
            "consistency": 1.0 if compared == 0 else 1 - self.mismatches / compared,
            "samples": list(self.samples),
        }

    async def close(self) -> None:
        if self._repairing is not None:
            self._repairing.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._repairing


def _view(answer: Answer) -> Any:
    if isinstance(answer, InsufficientCreditsError):
        return {"refused": "insufficient_credits", "available": answer.available}
    if isinstance(answer, BaseModel):
        return answer.model_dump(mode="json")
    return answer


def _batches(items: list[str], size: int) -> list[list[str]]:
    return [items[start : start + size] for start in range(0, len(items), size)]
