"""Slot bookkeeping of the broker: ``Registry``, ``RequestBuffer`` and ``InFlight``.

Every test runs against both implementations (``slots_impl``: ``c`` and ``py``).
The property-based tests drive the implementation and a small reference model
built from plain lists and dicts with the same operations, and compare them.
"""

from __future__ import annotations

import os
from types import ModuleType
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

STATEFUL_SETTINGS = settings(max_examples=200, stateful_step_count=50, deadline=None)

# --------------------------------------------------------------------------------------
# The live implementation
# --------------------------------------------------------------------------------------


def test_live_implementation_follows_environment() -> None:
    import paddler._core as core

    no_extensions = os.environ.get("PADDLER_NO_EXTENSIONS", "") not in ("", "0")
    assert ("py" if no_extensions else "c") == core.IMPLEMENTATION
    assert core.slots.COMPILED is (core.IMPLEMENTATION == "c")
    assert core.Registry is core.slots.Registry
    assert core.RequestBuffer is core.slots.RequestBuffer
    assert core.InFlight is core.slots.InFlight
    assert core.SlotError is core.slots.SlotError


def test_fixture_gives_the_requested_implementation(
    slots_impl: ModuleType, request: pytest.FixtureRequest
) -> None:
    expected = request.node.callspec.params["slots_impl"] == "c"
    assert slots_impl.COMPILED is expected
    assert issubclass(slots_impl.SlotError, Exception)


# --------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------

AGENT_IDS = [b"a", b"b", b"c", b"d", b"e"]


class RegistryModel:
    """Reference registry: agents in a dict, acquisitions in a list."""

    def __init__(self) -> None:
        self.agents: dict[bytes, dict[str, Any]] = {}
        self.clock = 0
        self.outstanding: list[bytes] = []
        """One entry per acquisition not yet released, on a registered agent."""
        self.orphans: list[bytes] = []
        """Acquisitions whose agent was removed (and not registered again)."""

    def tick(self) -> int:
        self.clock += 1
        return self.clock

    def add(self, agent_id: bytes, slots_total: int, ready: bool) -> None:
        agent = self.agents.get(agent_id)
        if agent is None:
            self.agents[agent_id] = {
                "slots_total": slots_total,
                "ready": ready,
                "in_flight": 0,
                "stamp": self.tick(),
            }
            # The broker forgets the requests of an agent it removed before the
            # same id can come back; releasing them would hit the new agent.
            self.orphans = [a for a in self.orphans if a != agent_id]
        else:
            agent["slots_total"] = slots_total
            agent["ready"] = ready

    def remove(self, agent_id: bytes) -> bool:
        if agent_id not in self.agents:
            return False
        del self.agents[agent_id]
        self.orphans += [a for a in self.outstanding if a == agent_id]
        self.outstanding = [a for a in self.outstanding if a != agent_id]
        return True

    def can_acquire(self, agent_id: bytes) -> bool:
        agent = self.agents[agent_id]
        return bool(agent["ready"] and agent["in_flight"] < agent["slots_total"])

    def eligible(self) -> list[bytes]:
        return [agent_id for agent_id in self.agents if self.can_acquire(agent_id)]

    def choose(self) -> bytes | None:
        eligible = self.eligible()
        if not eligible:
            return None
        return min(eligible, key=lambda a: (self.agents[a]["in_flight"], self.agents[a]["stamp"]))

    def acquire(self, agent_id: bytes) -> None:
        agent = self.agents[agent_id]
        agent["in_flight"] += 1
        agent["stamp"] = self.tick()
        self.outstanding.append(agent_id)

    def release(self, index: int) -> bytes:
        agent_id = self.outstanding.pop(index)
        agent = self.agents[agent_id]
        agent["in_flight"] -= 1
        agent["stamp"] = self.tick()
        return agent_id

    def free_slots(self) -> int:
        return sum(
            a["slots_total"] - a["in_flight"]
            for a in self.agents.values()
            if a["ready"] and a["in_flight"] < a["slots_total"]
        )


def registry_machine(impl: ModuleType) -> type[RuleBasedStateMachine]:
    agent_ids = st.sampled_from(AGENT_IDS)
    slot_counts = st.integers(0, 4)

    class RegistryMachine(RuleBasedStateMachine):
        def __init__(self) -> None:
            super().__init__()
            self.registry = impl.Registry()
            self.model = RegistryModel()

        @rule(agent_id=agent_ids, slots_total=slot_counts, ready=st.booleans())
        def add(self, agent_id: bytes, slots_total: int, ready: bool) -> None:
            self.registry.add(agent_id, slots_total, ready)
            self.model.add(agent_id, slots_total, ready)

        @rule(agent_id=agent_ids, slots_total=st.integers(-3, -1), ready=st.booleans())
        def add_negative_slots(self, agent_id: bytes, slots_total: int, ready: bool) -> None:
            with pytest.raises(impl.SlotError):
                self.registry.add(agent_id, slots_total, ready)

        @rule(agent_id=agent_ids, slots_total=slot_counts, ready=st.booleans())
        def update(self, agent_id: bytes, slots_total: int, ready: bool) -> None:
            if agent_id in self.model.agents:
                self.registry.update(agent_id, slots_total, ready)
                self.model.add(agent_id, slots_total, ready)
            else:
                with pytest.raises(KeyError):
                    self.registry.update(agent_id, slots_total, ready)

        @rule(agent_id=agent_ids)
        def remove(self, agent_id: bytes) -> None:
            assert self.registry.remove(agent_id) is self.model.remove(agent_id)

        @rule()
        def choose_and_acquire(self) -> None:
            expected = self.model.choose()
            chosen = self.registry.choose_and_acquire()
            assert chosen == expected
            if chosen is not None:
                self.model.acquire(chosen)
                assert self.registry.in_flight(chosen) <= self.registry.slots_total(chosen)

        @rule(agent_id=agent_ids)
        def acquire(self, agent_id: bytes) -> None:
            if agent_id not in self.model.agents:
                with pytest.raises(KeyError):
                    self.registry.acquire(agent_id)
            elif self.model.can_acquire(agent_id):
                self.registry.acquire(agent_id)
                self.model.acquire(agent_id)
                assert self.registry.in_flight(agent_id) <= self.registry.slots_total(agent_id)
            else:
                before = self.registry.in_flight(agent_id)
                with pytest.raises(impl.SlotError):
                    self.registry.acquire(agent_id)
                assert self.registry.in_flight(agent_id) == before

        @precondition(lambda self: self.model.outstanding)
        @rule(data=st.data())
        def release(self, data: st.DataObject) -> None:
            index = data.draw(st.integers(0, len(self.model.outstanding) - 1), label="index")
            agent_id = self.model.outstanding[index]
            assert self.registry.release(agent_id) is True
            self.model.release(index)

        @precondition(lambda self: self.model.orphans)
        @rule(data=st.data())
        def release_orphan(self, data: st.DataObject) -> None:
            index = data.draw(st.integers(0, len(self.model.orphans) - 1), label="index")
            agent_id = self.model.orphans.pop(index)
            assert self.registry.release(agent_id) is False

        @rule(agent_id=agent_ids)
        def release_without_acquisition(self, agent_id: bytes) -> None:
            agent = self.model.agents.get(agent_id)
            if agent is None:
                assert self.registry.release(agent_id) is False
            elif agent["in_flight"] == 0:
                with pytest.raises(impl.SlotError):
                    self.registry.release(agent_id)

        @invariant()
        def agents_match(self) -> None:
            registry, model = self.registry, self.model
            assert len(registry) == len(model.agents)
            assert sorted(registry.agent_ids()) == sorted(model.agents)
            for agent_id in AGENT_IDS:
                assert (agent_id in registry) is (agent_id in model.agents)
            for agent_id, agent in model.agents.items():
                assert registry.in_flight(agent_id) == agent["in_flight"]
                assert registry.slots_total(agent_id) == agent["slots_total"]
                assert registry.is_ready(agent_id) is agent["ready"]
            assert registry.free_slots() == model.free_slots()

        @invariant()
        def no_leak(self) -> None:
            total = sum(self.registry.in_flight(a) for a in self.registry.agent_ids())
            assert total == len(self.model.outstanding)

        @invariant()
        def choice_matches(self) -> None:
            chosen = self.registry.choose()
            eligible = self.model.eligible()
            assert (chosen is None) is (not eligible)
            if chosen is not None:
                assert chosen in eligible
                fewest = min(self.model.agents[a]["in_flight"] for a in eligible)
                assert self.registry.in_flight(chosen) == fewest
            assert chosen == self.model.choose()

    return RegistryMachine


def test_registry_state_machine(slots_impl: ModuleType) -> None:
    run_state_machine_as_test(registry_machine(slots_impl), settings=STATEFUL_SETTINGS)


def test_registry_empty(slots_impl: ModuleType) -> None:
    registry = slots_impl.Registry()
    assert len(registry) == 0
    assert registry.agent_ids() == []
    assert registry.choose() is None
    assert registry.choose_and_acquire() is None
    assert registry.free_slots() == 0
    assert b"a" not in registry
    assert repr(registry) == "<Registry agents=0 slots=0/0>"


def test_registry_prefers_fewest_in_flight_then_longest_idle(slots_impl: ModuleType) -> None:
    registry = slots_impl.Registry()
    registry.add(b"a", 2, True)
    registry.add(b"b", 2, True)
    assert registry.choose() == b"a"  # registered first
    assert registry.choose_and_acquire() == b"a"
    assert registry.choose_and_acquire() == b"b"  # fewer in flight
    assert registry.choose() == b"a"  # both at 1: a acquired longest ago
    assert registry.release(b"a") is True
    assert registry.choose() == b"a"  # a has 0 in flight
    assert registry.release(b"b") is True
    assert registry.choose() == b"a"  # both at 0: a released before b
    assert registry.choose_and_acquire() == b"a"
    assert registry.choose_and_acquire() == b"b"
    assert registry.choose_and_acquire() == b"a"
    assert registry.choose_and_acquire() == b"b"
    assert registry.choose_and_acquire() is None  # every slot taken
    assert registry.free_slots() == 0
    assert repr(registry) == "<Registry agents=2 slots=4/4>"


def test_registry_update_keeps_stamp_and_in_flight(slots_impl: ModuleType) -> None:
    registry = slots_impl.Registry()
    registry.add(b"a", 1, True)
    registry.add(b"b", 1, True)
    registry.update(b"b", 3, True)
    registry.add(b"b", 3, True)  # add of a known agent is an update
    assert registry.choose() == b"a"  # an update is no registration
    registry.acquire(b"b")
    registry.add(b"b", 3, False)
    assert registry.in_flight(b"b") == 1
    assert registry.is_ready(b"b") is False
    assert registry.slots_total(b"b") == 3


def test_registry_not_ready_or_full_agents_are_never_chosen(slots_impl: ModuleType) -> None:
    registry = slots_impl.Registry()
    registry.add(b"idle", 4, False)
    registry.add(b"none", 0, True)
    assert registry.choose() is None
    assert registry.free_slots() == 0
    for agent_id in (b"idle", b"none"):
        with pytest.raises(slots_impl.SlotError):
            registry.acquire(agent_id)
        assert registry.in_flight(agent_id) == 0
    registry.update(b"idle", 4, True)
    assert registry.choose() == b"idle"
    assert registry.free_slots() == 4


def test_registry_shrinking_below_in_flight(slots_impl: ModuleType) -> None:
    registry = slots_impl.Registry()
    registry.add(b"a", 3, True)
    for _ in range(3):
        registry.acquire(b"a")
    registry.update(b"a", 1, True)
    assert registry.in_flight(b"a") == 3
    assert registry.choose() is None
    assert registry.free_slots() == 0
    with pytest.raises(slots_impl.SlotError):
        registry.acquire(b"a")
    assert registry.release(b"a") is True
    assert registry.release(b"a") is True
    assert registry.choose() is None  # 1 in flight, 1 slot
    assert registry.release(b"a") is True
    assert registry.choose() == b"a"
    with pytest.raises(slots_impl.SlotError):
        registry.release(b"a")
    with pytest.raises(slots_impl.SlotError):
        registry.release(b"a")  # the failed release changed nothing
    assert registry.in_flight(b"a") == 0


def test_registry_errors(slots_impl: ModuleType) -> None:
    registry = slots_impl.Registry()
    with pytest.raises(slots_impl.SlotError):
        registry.add(b"a", -1, True)
    assert b"a" not in registry
    with pytest.raises(KeyError):
        registry.update(b"a", 1, True)
    with pytest.raises(KeyError):
        registry.acquire(b"a")
    with pytest.raises(KeyError):
        registry.in_flight(b"a")
    with pytest.raises(KeyError):
        registry.slots_total(b"a")
    with pytest.raises(KeyError):
        registry.is_ready(b"a")
    assert registry.release(b"a") is False
    assert registry.remove(b"a") is False
    registry.add(b"a", 1, True)
    with pytest.raises(slots_impl.SlotError):
        registry.add(b"a", -5, False)
    assert registry.slots_total(b"a") == 1
    assert registry.is_ready(b"a") is True


def test_registry_remove_and_register_again(slots_impl: ModuleType) -> None:
    registry = slots_impl.Registry()
    registry.add(b"a", 2, True)
    registry.add(b"b", 2, True)
    registry.acquire(b"a")
    registry.acquire(b"a")
    assert registry.remove(b"a") is True
    assert registry.remove(b"a") is False
    assert registry.release(b"a") is False  # its slots left with it
    assert registry.agent_ids() == [b"b"]
    registry.add(b"a", 2, True)
    assert registry.in_flight(b"a") == 0
    assert registry.choose() == b"b"  # a registered again after b
    assert registry.free_slots() == 4


# --------------------------------------------------------------------------------------
# RequestBuffer
# --------------------------------------------------------------------------------------

DEADLINES = st.integers(0, 40).map(lambda n: n / 2)  # exact halves: many ties
SMALL_IDS = st.integers(0, 15)


class BufferModel:
    """Reference buffer: a list in FIFO order and a dict of deadlines."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.queue: list[int] = []
        self.deadline: dict[int, tuple[float, int]] = {}
        self.seq = 0
        self.gone: set[int] = set()
        """Ids that were buffered and left (popped, removed, expired) and not pushed again."""

    def insert(self, request_id: int, deadline: float, front: bool) -> None:
        self.seq += 1
        self.deadline[request_id] = (deadline, self.seq)
        if front:
            self.queue.insert(0, request_id)
        else:
            self.queue.append(request_id)
        self.gone.discard(request_id)

    def discard(self, request_id: int) -> None:
        self.queue.remove(request_id)
        del self.deadline[request_id]
        self.gone.add(request_id)

    def expired(self, now: float) -> list[int]:
        due = [(d, seq, rid) for rid, (d, seq) in self.deadline.items() if d <= now]
        return [rid for _, _, rid in sorted(due)]

    def next_deadline(self) -> float | None:
        return min((d for d, _ in self.deadline.values()), default=None)


class BufferDriver:
    """Applies one operation to the buffer and the model and compares the outcomes."""

    def __init__(self, impl: ModuleType, capacity: int) -> None:
        self.buffer = impl.RequestBuffer(capacity)
        self.model = BufferModel(capacity)

    def push(self, request_id: int, deadline: float) -> None:
        model = self.model
        if len(model.queue) >= model.capacity:
            assert self.buffer.push(request_id, deadline) is False
        elif request_id in model.deadline:
            with pytest.raises(ValueError):
                self.buffer.push(request_id, deadline)
        else:
            assert self.buffer.push(request_id, deadline) is True
            model.insert(request_id, deadline, front=False)

    def push_front(self, request_id: int, deadline: float) -> None:
        if request_id in self.model.deadline:
            with pytest.raises(ValueError):
                self.buffer.push_front(request_id, deadline)
        else:
            assert self.buffer.push_front(request_id, deadline) is None
            self.model.insert(request_id, deadline, front=True)

    def pop(self) -> None:
        expected = self.model.queue[0] if self.model.queue else None
        assert self.buffer.pop() == expected
        if expected is not None:
            self.model.discard(expected)

    def peek(self) -> None:
        expected = self.model.queue[0] if self.model.queue else None
        assert self.buffer.peek() == expected

    def remove(self, request_id: int) -> None:
        present = request_id in self.model.deadline
        assert self.buffer.remove(request_id) is present
        if present:
            self.model.discard(request_id)

    def pop_expired(self, now: float) -> None:
        expected = self.model.expired(now)
        assert self.buffer.pop_expired(now) == expected
        for request_id in expected:
            self.model.discard(request_id)

    def next_deadline(self) -> None:
        assert self.buffer.next_deadline() == self.model.next_deadline()

    def check(self) -> None:
        buffer, model = self.buffer, self.model
        assert len(buffer) == len(model.queue)
        assert buffer.ids() == model.queue
        for request_id in model.queue:
            assert request_id in buffer
        for request_id in model.gone:
            assert request_id not in buffer


def buffer_machine(impl: ModuleType) -> type[RuleBasedStateMachine]:
    class RequestBufferMachine(RuleBasedStateMachine):
        driver: BufferDriver

        @initialize(capacity=st.one_of(st.integers(0, 4), st.integers(100, 250)))
        def create(self, capacity: int) -> None:
            self.driver = BufferDriver(impl, capacity)

        @rule(request_id=SMALL_IDS, deadline=DEADLINES)
        def push(self, request_id: int, deadline: float) -> None:
            self.driver.push(request_id, deadline)

        @rule(request_id=SMALL_IDS, deadline=DEADLINES)
        def push_front(self, request_id: int, deadline: float) -> None:
            self.driver.push_front(request_id, deadline)

        @rule(start=st.integers(0, 300), deadlines=st.lists(DEADLINES, min_size=1, max_size=120))
        def push_many(self, start: int, deadlines: list[float]) -> None:
            for offset, deadline in enumerate(deadlines):
                self.driver.push(start + offset, deadline)

        @precondition(lambda self: self.driver.model.gone)
        @rule(data=st.data(), deadline=DEADLINES, front=st.booleans())
        def push_again(self, data: st.DataObject, deadline: float, front: bool) -> None:
            gone = sorted(self.driver.model.gone)
            request_id = data.draw(st.sampled_from(gone), label="request_id")
            if front:
                self.driver.push_front(request_id, deadline)
            else:
                self.driver.push(request_id, deadline)

        @rule()
        def pop(self) -> None:
            self.driver.pop()

        @rule()
        def peek(self) -> None:
            self.driver.peek()

        @rule(request_id=SMALL_IDS)
        def remove(self, request_id: int) -> None:
            self.driver.remove(request_id)

        @precondition(lambda self: self.driver.model.queue)
        @rule(data=st.data())
        def remove_many(self, data: st.DataObject) -> None:
            live = list(self.driver.model.queue)
            victims = data.draw(st.lists(st.sampled_from(live), unique=True), label="victims")
            for request_id in victims:
                self.driver.remove(request_id)

        @rule(now=st.integers(-1, 41).map(lambda n: n / 2))
        def pop_expired(self, now: float) -> None:
            self.driver.pop_expired(now)

        @rule()
        def next_deadline(self) -> None:
            self.driver.next_deadline()

        @invariant()
        def matches_model(self) -> None:
            self.driver.check()

    return RequestBufferMachine


def test_request_buffer_state_machine(slots_impl: ModuleType) -> None:
    run_state_machine_as_test(buffer_machine(slots_impl), settings=STATEFUL_SETTINGS)


BUFFER_OPS = st.one_of(
    st.tuples(st.just("push"), st.integers(0, 250), DEADLINES),
    st.tuples(st.just("push_front"), st.integers(0, 250), DEADLINES),
    st.tuples(st.just("pop")),
    st.tuples(st.just("peek")),
    st.tuples(st.just("remove"), st.integers(0, 250)),
    st.tuples(st.just("pop_expired"), DEADLINES),
    st.tuples(st.just("next_deadline")),
)


@settings(max_examples=40, deadline=None)
@given(
    deadlines=st.lists(DEADLINES, min_size=200, max_size=200),
    order=st.permutations(range(200)),
    ops=st.lists(BUFFER_OPS, max_size=60),
)
def test_request_buffer_compaction_after_many_removes(
    slots_impl: ModuleType, deadlines: list[float], order: list[int], ops: list[tuple[Any, ...]]
) -> None:
    driver = BufferDriver(slots_impl, 200)
    for request_id, deadline in enumerate(deadlines):
        driver.push(request_id, deadline)
    driver.push(1000, 0.0)  # full: refused
    driver.check()
    for count, request_id in enumerate(order[:150], start=1):
        driver.remove(request_id)
        driver.remove(request_id)  # a second removal finds nothing
        if count % 25 == 0:
            driver.check()
    driver.check()
    # Removed ids are pushed again, some removed before the compaction (at the
    # 133rd removal) and some after it, whose stale entries are still queued.
    for request_id in order[125:150:2]:
        driver.push(request_id, 5.0)
    for request_id in order[126:150:2]:
        driver.push_front(request_id, 5.0)
    driver.check()
    for op, *args in ops:
        getattr(driver, op)(*args)
        driver.check()
    while driver.model.queue:
        driver.pop()
    driver.pop()
    driver.check()


def test_request_buffer_fifo_and_push_front(slots_impl: ModuleType) -> None:
    buffer = slots_impl.RequestBuffer(3)
    assert len(buffer) == 0
    assert buffer.pop() is None
    assert buffer.peek() is None
    assert buffer.next_deadline() is None
    assert buffer.push(1, 10.0) is True
    assert buffer.push(2, 5.0) is True
    assert buffer.push(3, 7.0) is True
    assert buffer.push(4, 1.0) is False  # full
    assert 4 not in buffer
    assert buffer.ids() == [1, 2, 3]
    buffer.push_front(5, 3.0)  # a re-dispatch may exceed the capacity
    assert len(buffer) == 4
    assert buffer.ids() == [5, 1, 2, 3]
    assert buffer.push(6, 1.0) is False
    assert buffer.peek() == 5
    assert buffer.next_deadline() == 3.0
    assert buffer.pop() == 5
    assert buffer.pop() == 1
    assert buffer.ids() == [2, 3]
    assert repr(buffer) == "<RequestBuffer 2/3>"


def test_request_buffer_duplicates_are_refused(slots_impl: ModuleType) -> None:
    buffer = slots_impl.RequestBuffer(5)
    assert buffer.push(1, 1.0)
    with pytest.raises(ValueError):
        buffer.push(1, 2.0)
    with pytest.raises(ValueError):
        buffer.push_front(1, 2.0)
    assert buffer.ids() == [1]
    assert buffer.next_deadline() == 1.0


def test_request_buffer_capacity_zero(slots_impl: ModuleType) -> None:
    buffer = slots_impl.RequestBuffer(0)
    assert buffer.push(1, 1.0) is False
    assert len(buffer) == 0
    buffer.push_front(1, 1.0)
    assert buffer.ids() == [1]
    with pytest.raises(ValueError):
        slots_impl.RequestBuffer(-1)


def test_request_buffer_pop_expired_orders_by_deadline_then_arrival(
    slots_impl: ModuleType,
) -> None:
    buffer = slots_impl.RequestBuffer(10)
    buffer.push(1, 5.0)
    buffer.push(2, 3.0)
    buffer.push(3, 5.0)
    buffer.push(4, 9.0)
    buffer.push_front(5, 3.0)
    assert buffer.pop_expired(2.9) == []
    assert buffer.pop_expired(5.0) == [2, 5, 1, 3]  # deadline <= now, ties by arrival
    assert buffer.ids() == [4]
    assert buffer.next_deadline() == 9.0
    assert buffer.pop_expired(100.0) == [4]
    assert len(buffer) == 0


def test_request_buffer_reused_ids_do_not_resurrect(slots_impl: ModuleType) -> None:
    buffer = slots_impl.RequestBuffer(10)
    for request_id in range(5):
        buffer.push(request_id, float(request_id))
    assert buffer.remove(1) is True
    assert buffer.remove(1) is False
    assert buffer.pop() == 0
    assert buffer.pop_expired(2.0) == [2]
    buffer.push(1, 50.0)
    buffer.push(0, 40.0)
    buffer.push_front(2, 60.0)
    assert buffer.ids() == [2, 3, 4, 1, 0]
    assert buffer.pop_expired(10.0) == [3, 4]  # the old deadlines of 0, 1 and 2 are gone
    assert buffer.next_deadline() == 40.0
    assert [buffer.pop(), buffer.pop(), buffer.pop(), buffer.pop()] == [2, 1, 0, None]


def test_request_buffer_compaction_example(slots_impl: ModuleType) -> None:
    buffer = slots_impl.RequestBuffer(200)
    for request_id in range(200):
        assert buffer.push(request_id, float(request_id % 7))
    removed = [i for i in range(200) if i % 4]
    assert len(removed) == 150
    for request_id in removed:
        assert buffer.remove(request_id) is True
    kept = list(range(0, 200, 4))
    assert buffer.ids() == kept
    assert len(buffer) == 50
    expected = sorted((i for i in kept if i % 7 <= 3), key=lambda i: (i % 7, i))
    assert buffer.pop_expired(3.0) == expected
    kept = [i for i in kept if i % 7 > 3]
    assert buffer.ids() == kept
    assert buffer.push(1, 100.0)
    buffer.push_front(2, 100.0)
    assert buffer.ids() == [2, *kept, 1]
    popped = []
    while (request_id := buffer.pop()) is not None:
        popped.append(request_id)
    assert popped == [2, *kept, 1]
    assert buffer.next_deadline() is None
    assert buffer.pop_expired(1000.0) == []


def test_request_buffer_stale_entries_stay_bounded(slots_impl: ModuleType) -> None:
    """Stale queue and heap entries are compacted once they outnumber live ones.

    Popped requests leave their deadline entry behind; one buffered request with
    an early deadline keeps ``next_deadline``/``pop_expired`` from dropping them.
    """
    buffer = slots_impl.RequestBuffer(4)
    buffer.push(-1, 1.0)  # stays buffered behind every re-dispatched request
    for request_id in range(2000):
        buffer.push_front(request_id, 1e9)
        assert buffer.pop() == request_id
        assert buffer.next_deadline() == 1.0
        assert buffer.pop_expired(0.5) == []
    assert buffer.ids() == [-1]
    assert len(buffer._order) <= 2 * len(buffer) + 64
    assert len(buffer._heap) <= 2 * len(buffer) + 64


# --------------------------------------------------------------------------------------
# InFlight
# --------------------------------------------------------------------------------------

INFLIGHT_OPS = st.lists(
    st.one_of(
        st.tuples(st.just("add"), st.integers(0, 20), st.sampled_from(AGENT_IDS)),
        st.tuples(st.just("remove"), st.integers(0, 20)),
    ),
    max_size=80,
)


@settings(max_examples=150, deadline=None)
@given(ops=INFLIGHT_OPS)
def test_in_flight_matches_dict(slots_impl: ModuleType, ops: list[tuple[Any, ...]]) -> None:
    table = slots_impl.InFlight()
    reference: dict[int, bytes] = {}
    for op, request_id, *rest in ops:
        if op == "add":
            (agent_id,) = rest
            if request_id in reference:
                with pytest.raises(ValueError):
                    table.add(request_id, agent_id)
            else:
                table.add(request_id, agent_id)
                reference[request_id] = agent_id
        else:
            assert table.remove(request_id) == reference.pop(request_id, None)
        assert len(table) == len(reference)
        for rid in range(21):
            assert (rid in table) is (rid in reference)
            assert table.agent_of(rid) == reference.get(rid)
        for agent_id in AGENT_IDS:
            mine = sorted(rid for rid, a in reference.items() if a == agent_id)
            assert table.of_agent(agent_id) == mine
            assert table.count_of(agent_id) == len(mine)


def test_in_flight_example(slots_impl: ModuleType) -> None:
    table = slots_impl.InFlight()
    assert len(table) == 0
    assert table.remove(1) is None
    assert table.agent_of(1) is None
    assert table.of_agent(b"a") == []
    assert table.count_of(b"a") == 0
    table.add(3, b"a")
    table.add(1, b"a")
    table.add(2, b"b")
    with pytest.raises(ValueError):
        table.add(1, b"b")
    assert table.agent_of(1) == b"a"  # the refused duplicate changed nothing
    assert table.of_agent(b"a") == [1, 3]
    assert table.of_agent(b"b") == [2]
    assert repr(table) == "<InFlight requests=3 agents=2>"
    assert table.remove(2) == b"b"
    assert table.count_of(b"b") == 0
    assert table.of_agent(b"b") == []
    assert repr(table) == "<InFlight requests=2 agents=1>"
    table.add(2, b"a")  # an id can be reused once it left
    assert table.of_agent(b"a") == [1, 2, 3]
    assert 2 in table
    assert len(table) == 3


def test_round_robin_rotates_over_ready_agents_past_their_slots(slots_impl: ModuleType) -> None:
    registry = slots_impl.Registry()
    registry.add(b"a", 1, True)
    registry.add(b"b", 1, True)
    registry.add(b"c", 1, False)
    chosen = []
    for _ in range(4):
        agent = registry.next_in_rotation()
        registry.acquire(agent, True)
        chosen.append(agent)
    assert sorted(chosen) == [b"a", b"a", b"b", b"b"]
    assert chosen[0] != chosen[1] and chosen[1] != chosen[2]
    assert registry.in_flight(b"a") == 2  # past its one slot: round robin does not look
    with pytest.raises(slots_impl.SlotError):
        registry.acquire(b"a")
    assert slots_impl.Registry().next_in_rotation() is None
