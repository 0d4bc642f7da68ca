"""Hypothesis stateful test: the core against a small reference model of the kernel.

The model keeps, per ring, the pool as a list (top last) and the set of in-flight pages, and a
squeeze deadline per device (or one global one). Every rule compares the core with it and
checks the invariants of blkback-spec §6: in-flight pages are never freed, the pool after a
pass is exactly min(size, target), duration 0 never squeezes, reports extend the window with a
plain store, global vs device scope, lazy vs waking squeeze.
"""

from __future__ import annotations

from collections.abc import Sequence

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from blkback.clock import NS_PER_MS, ManualClock
from blkback.core.counting import CountingAllocator
from blkback.core.device import Bus
from blkback.core.params import Params
from blkback.core.ring import Ring


class RecordingAllocator(CountingAllocator):
    """Remembers every page freed, to check that no in-flight page ever is."""

    def __init__(self) -> None:
        super().__init__()
        self.freed_log: list[int] = []

    def free(self, pages: Sequence[int]) -> None:
        self.freed_log.extend(pages)
        super().free(pages)


class KernelModel(RuleBasedStateMachine):
    @initialize(
        scope=st.sampled_from(["device", "global"]),
        wake=st.booleans(),
        max_pages=st.integers(0, 40),
        duration_ms=st.sampled_from([0, 1, 10, 100]),
        batch=st.integers(1, 12),
    )
    def setup(self, scope: str, wake: bool, max_pages: int, duration_ms: int, batch: int) -> None:
        self.clock = ManualClock(1_000_000_000)
        self.params = Params(
            squeeze_scope=scope,
            squeeze_wake=wake,
            max_buffer_pages=max_pages,
            buffer_squeeze_duration_ms=duration_ms,
            batch_free_pages=batch,
        )
        self.bus = Bus(self.params)
        self.alloc = RecordingAllocator()
        self.rings: list[Ring] = []
        self.model_pool: dict[int, list[int]] = {}
        self.model_flight: dict[int, list[list[int]]] = {}
        self.model_end: dict[str, int] = {"a": 0, "b": 0}
        self.model_global_end = 0
        for name in ("a", "b"):
            dev = self.bus.add_device(name)
            for _ in range(2):
                ring = dev.add_ring(self.alloc, self.clock.now_ns())
                ring.waker = lambda: None
                self.rings.append(ring)
                self.model_pool[id(ring)] = []
                self.model_flight[id(ring)] = []

    def _end(self, ring: Ring) -> int:
        if self.params.squeeze_scope == "global":
            return self.model_global_end
        return self.model_end[ring.device.name]

    def _target(self, ring: Ring) -> int:
        return 0 if self.clock.now_ns() < self._end(ring) else self.params.max_buffer_pages

    @rule(i=st.integers(0, 3), n=st.integers(1, 30))
    def submit(self, i: int, n: int) -> None:
        ring = self.rings[i]
        pages = ring.get_pages(n, self.clock.now_ns())
        model = self.model_pool[id(ring)]
        k = min(n, len(model))
        expect_reused = [model.pop() for _ in range(k)]
        assert pages[:k] == expect_reused  # LIFO reuse, most recent first
        self.model_flight[id(ring)].append(pages)

    @precondition(lambda self: any(self.model_flight.values()))
    @rule(data=st.data())
    def complete(self, data: st.DataObject) -> None:
        busy = [r for r in self.rings if self.model_flight[id(r)]]
        ring = data.draw(st.sampled_from(busy))
        reqs = self.model_flight[id(ring)]
        pages = reqs.pop(data.draw(st.integers(0, len(reqs) - 1)))
        ring.put_pages(pages)
        self.model_pool[id(ring)].extend(pages)

    @rule(i=st.integers(0, 3), had_io=st.booleans())
    def loop_pass(self, i: int, had_io: bool) -> None:
        ring = self.rings[i]
        target = self._target(ring)
        model = self.model_pool[id(ring)]
        before = len(model)
        freed = ring.loop_pass(self.clock.now_ns(), had_io=had_io, woken=ring.wake_pending)
        keep = min(before, target)
        assert freed == before - keep
        del model[keep:]
        assert len(ring.pool) == keep

    @rule(dev=st.sampled_from(["a", "b"]), everyone=st.booleans())
    def pressure(self, dev: str, everyone: bool) -> None:
        now = self.clock.now_ns()
        end = now + self.params.buffer_squeeze_duration_ms * NS_PER_MS
        targets = ["a", "b"] if everyone else [dev]
        if everyone:
            self.bus.reclaim_memory(now)
        else:
            self.bus.devices[dev].reclaim_memory(now)
        if self.params.squeeze_scope == "global":
            self.model_global_end = end
        else:
            for name in targets:
                self.model_end[name] = end
        for ring in self.rings:
            wanted = self.params.squeeze_wake and ring.device.name in targets
            assert ring.wake_pending or not wanted
            if not self.params.squeeze_wake:
                assert not ring.wake_pending

    @rule(ms=st.sampled_from([0.5, 1, 5, 9, 10, 50, 100, 250]))
    def tick(self, ms: float) -> None:
        self.clock.advance_ms(ms)

    @invariant()
    def pools_match_and_in_flight_is_never_freed(self) -> None:
        if not hasattr(self, "rings"):
            return
        in_flight = {p for reqs in self.model_flight.values() for req in reqs for p in req}
        released = set(self.alloc.released_ids())  # freed and not handed out again
        pooled = {p for m in self.model_pool.values() for p in m}
        assert not in_flight & released, "an in-flight page was freed"
        assert not pooled & released, "a pooled page was freed but kept in the pool"
        for ring in self.rings:
            model = self.model_pool[id(ring)]
            assert ring.pool.free_page_ids() == model[::-1]
            assert ring.pool.in_flight == sum(len(r) for r in self.model_flight[id(ring)])
        assert self.alloc.live_pages == len(pooled) + len(in_flight)

    @invariant()
    def duration_zero_never_squeezes(self) -> None:
        if hasattr(self, "bus") and self.params.buffer_squeeze_duration_ms == 0:
            assert all(not d.squeezed(self.clock.now_ns()) for d in self.bus.devices.values())


TestKernelModel = KernelModel.TestCase
TestKernelModel.settings = settings(max_examples=300, stateful_step_count=60, deadline=None)
