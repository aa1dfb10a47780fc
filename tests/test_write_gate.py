"""The write gate (app/switching/routing.py): what a hand-over relies on to lose no write."""

from __future__ import annotations

import asyncio

import pytest

from app.errors import StorageUnavailableError
from app.switching.routing import WriteGate


async def test_holding_waits_for_the_writes_in_flight_and_holds_new_ones() -> None:
    gate = WriteGate()
    events: list[str] = []
    await gate.enter("early")  # a write in flight when the final step begins

    async def final_step() -> None:
        async with gate.holding(drain_seconds=5):
            events.append("final step")
            await asyncio.sleep(0.05)
            events.append("flipped")

    async def late_write() -> None:
        await asyncio.sleep(0.01)
        await gate.enter("late")
        events.append("late write")
        gate.leave("late")

    step = asyncio.create_task(final_step())
    late = asyncio.create_task(late_write())
    await asyncio.sleep(0.03)
    assert events == []  # the final step waits for the early write
    events.append("early write done")
    gate.leave("early")
    await asyncio.gather(step, late)
    assert events == ["early write done", "final step", "flipped", "late write"]


async def test_writes_in_flight_past_the_drain_time_abandon_the_step() -> None:
    gate = WriteGate()
    await gate.enter("stuck")
    with pytest.raises(StorageUnavailableError):
        async with gate.holding(drain_seconds=0.05):
            pytest.fail("the held step ran with a write in flight")
    gate.leave("stuck")
    await asyncio.wait_for(gate.enter("after"), 1)  # the gate opened again


async def test_the_watch_notes_users_written_including_writes_begun_before_it() -> None:
    gate = WriteGate()
    await gate.enter("begun-before")
    with gate.watching() as touched:
        await gate.enter("during")
        gate.leave("during")
        gate.leave("begun-before")
        assert touched.take() == ["begun-before", "during"]
        assert touched.take() == []
    await gate.enter("after")
    gate.leave("after")
    assert touched.take() == []
