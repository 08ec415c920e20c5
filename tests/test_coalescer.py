"""api.reads.Coalescer: concurrent lookups answered by few batches, each its own answer."""

from __future__ import annotations

import asyncio

import pytest

from api.reads import Coalescer, DatabaseUnavailable


class Recorder:
    def __init__(self, delay: float = 0.01, fail: Exception | None = None) -> None:
        self.batches: list[list[int]] = []
        self.running = 0
        self.most_running = 0
        self.delay = delay
        self.fail = fail

    async def __call__(self, keys: list[int]) -> list[int]:
        self.batches.append(list(keys))
        self.running += 1
        self.most_running = max(self.most_running, self.running)
        try:
            await asyncio.sleep(self.delay)
            if self.fail is not None:
                raise self.fail
            return [k * 10 for k in keys]
        finally:
            self.running -= 1


def test_a_lone_lookup_is_its_own_batch() -> None:
    async def scenario() -> None:
        run = Recorder()
        c = Coalescer(run, max_in_flight=2, max_batch=8)
        assert await c.get(3) == 30
        assert await c.get(4) == 40
        assert run.batches == [[3], [4]]

    asyncio.run(scenario())


def test_concurrent_lookups_share_batches_within_the_limits() -> None:
    async def scenario() -> None:
        run = Recorder()
        c = Coalescer(run, max_in_flight=2, max_batch=16)
        first = await asyncio.gather(*(c.get(k) for k in range(100)))
        assert first == [k * 10 for k in range(100)]
        # All 100 asked in one loop iteration: batches of at most 16, at most 2 at once.
        assert sorted(k for b in run.batches for k in b) == list(range(100))
        assert all(len(b) <= 16 for b in run.batches) and len(run.batches) == 7
        assert run.most_running == 2

        # Lookups arriving while both slots are busy go out together afterwards.
        run.batches.clear()

        async def trickle(k: int) -> int:
            await asyncio.sleep(0.001 * k)
            return await c.get(k)

        later = await asyncio.gather(*(trickle(k) for k in range(40)))
        assert later == [k * 10 for k in range(40)]
        assert len(run.batches) < 40 and run.most_running == 2

    asyncio.run(scenario())


def test_an_unavailable_database_fails_each_lookup_of_the_batch_and_the_next_batch_runs() -> None:
    async def scenario() -> None:
        run = Recorder(fail=DatabaseUnavailable("database away"))
        c = Coalescer(run, max_in_flight=1, max_batch=4)
        results = await asyncio.gather(*(c.get(k) for k in range(6)), return_exceptions=True)
        assert all(isinstance(r, DatabaseUnavailable) for r in results)
        assert [len(b) for b in run.batches] == [4, 2], "no retry one by one: all are down"
        run.fail = None
        assert await c.get(7) == 70

    asyncio.run(scenario())


class Poisoned(Recorder):
    """A batch query that fails whenever key 13 is in it (as a bad input would)."""

    async def __call__(self, keys: list[int]) -> list[int]:
        self.fail = ValueError("bad input") if 13 in keys else None
        return await super().__call__(keys)


def test_a_member_that_fails_its_batch_fails_alone_and_the_others_get_their_answers() -> None:
    async def scenario() -> None:
        run = Poisoned()
        c = Coalescer(run, max_in_flight=1, max_batch=8)
        keys = [1, 2, 13, 4, 5]
        results = await asyncio.gather(*(c.get(k) for k in keys), return_exceptions=True)
        assert results[:2] == [10, 20] and results[3:] == [40, 50]
        assert isinstance(results[2], ValueError)
        assert run.batches[0] == keys  # tried together first, then one by one
        assert sorted(map(tuple, run.batches[1:])) == [(1,), (2,), (4,), (5,), (13,)]
        # A lone failing lookup gets its error, not a hang.
        with pytest.raises(ValueError):
            await asyncio.wait_for(c.get(13), timeout=5)

    asyncio.run(scenario())


def test_a_cancelled_lookup_leaves_the_others_answered() -> None:
    async def scenario() -> None:
        run = Recorder(delay=0.05)
        c = Coalescer(run, max_in_flight=1, max_batch=8)
        tasks = [asyncio.create_task(c.get(k)) for k in range(5)]
        await asyncio.sleep(0.01)
        tasks[2].cancel()  # a client that hung up
        done = await asyncio.gather(*tasks, return_exceptions=True)
        assert isinstance(done[2], asyncio.CancelledError)
        assert [d for i, d in enumerate(done) if i != 2] == [0, 10, 30, 40]

    asyncio.run(scenario())


def test_a_cancelled_batch_cancels_its_lookups_instead_of_leaving_them_waiting() -> None:
    async def scenario() -> None:
        run = Recorder(delay=10)
        c = Coalescer(run, max_in_flight=1, max_batch=8)
        lookups = [asyncio.create_task(c.get(k)) for k in range(3)]
        await asyncio.sleep(0.01)
        for batch in list(c._tasks):  # what loop shutdown does to pending tasks
            batch.cancel()
        done = await asyncio.wait_for(asyncio.gather(*lookups, return_exceptions=True), 1)
        assert all(isinstance(d, asyncio.CancelledError) for d in done)

    asyncio.run(scenario())


@pytest.mark.parametrize("bad", [0, -1])
def test_limits_must_be_positive(bad: int) -> None:
    with pytest.raises(ValueError):
        Coalescer(Recorder(), max_in_flight=bad, max_batch=4)
    with pytest.raises(ValueError):
        Coalescer(Recorder(), max_in_flight=1, max_batch=bad)
