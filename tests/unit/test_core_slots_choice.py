"""The registry's choice of agent, against a brute-force reference, in both implementations.

``Registry`` keeps the agents with a free slot in a heap; ``BruteForceRegistry`` below
is the registry as it was before that: a dict of agents and a linear scan in ``choose``
and ``free_slots``. Random sequences of every operation (registration, update, removal,
acquire with and without ``force``, release, choose-and-acquire) run through both, with
many agents and slot counts, and after every step the choice and the free slots agree.
"""

from __future__ import annotations

from types import ModuleType
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st


class BruteForceRegistry:
    """The choice rule, stated as a scan: among ready agents with in_flight < slots_total,
    the fewest in flight; ties to the oldest stamp (registration, each acquire, each release)."""

    def __init__(self) -> None:
        self.agents: dict[bytes, list[Any]] = {}  # id -> [slots_total, ready, in_flight, stamp]
        self.clock = 0

    def tick(self) -> int:
        self.clock += 1
        return self.clock

    def add(self, agent_id: bytes, slots_total: int, ready: bool) -> None:
        agent = self.agents.get(agent_id)
        if agent is None:
            self.agents[agent_id] = [slots_total, ready, 0, self.tick()]
        else:
            agent[0], agent[1] = slots_total, ready

    def has_free_slot(self, agent_id: bytes) -> bool:
        slots_total, ready, in_flight, _ = self.agents[agent_id]
        return bool(ready and in_flight < slots_total)

    def acquire(self, agent_id: bytes) -> None:
        agent = self.agents[agent_id]
        agent[2] += 1
        agent[3] = self.tick()

    def release(self, agent_id: bytes) -> None:
        agent = self.agents[agent_id]
        agent[2] -= 1
        agent[3] = self.tick()

    def choose(self) -> bytes | None:
        best: bytes | None = None
        for agent_id, (_, _, in_flight, stamp) in self.agents.items():
            if not self.has_free_slot(agent_id):
                continue
            if best is None or (in_flight, stamp) < tuple(self.agents[best][2:]):
                best = agent_id
        return best

    def free_slots(self) -> int:
        return sum(
            slots_total - in_flight
            for agent_id, (slots_total, _, in_flight, _) in self.agents.items()
            if self.has_free_slot(agent_id)
        )


AGENTS = 40
agent_ids = st.integers(0, AGENTS - 1).map(lambda i: b"agent-%d" % i)
OPS = st.one_of(
    st.tuples(st.just("add"), agent_ids, st.integers(0, 6), st.booleans()),
    st.tuples(st.just("update"), agent_ids, st.integers(0, 6), st.booleans()),
    st.tuples(st.just("remove"), agent_ids),
    st.tuples(st.just("acquire"), agent_ids, st.booleans()),
    st.tuples(st.just("release"), agent_ids),
    st.tuples(st.just("choose_and_acquire")),
    st.tuples(st.just("choose_and_acquire")),
    st.tuples(st.just("release_chosen")),
)


def run_and_compare(impl: ModuleType, setup: list[tuple[Any, ...]], ops: list[Any]) -> None:
    registry = impl.Registry()
    model = BruteForceRegistry()
    chosen: list[bytes] = []  # agents handed a request by choose_and_acquire, oldest first

    def check() -> None:
        assert registry.choose() == model.choose()
        assert registry.free_slots() == model.free_slots()
        assert len(registry) == len(model.agents)

    for agent_id, slots_total, ready in setup:
        registry.add(agent_id, slots_total, ready)
        model.add(agent_id, slots_total, ready)
    check()
    for op, *args in ops:
        if op == "add":
            registry.add(*args)
            model.add(*args)
        elif op == "update":
            agent_id = args[0]
            if agent_id in model.agents:
                registry.update(*args)
                model.add(*args)
            else:
                with pytest.raises(KeyError):
                    registry.update(*args)
        elif op == "remove":
            assert registry.remove(args[0]) is (model.agents.pop(args[0], None) is not None)
        elif op == "acquire":
            agent_id, force = args
            if agent_id not in model.agents:
                with pytest.raises(KeyError):
                    registry.acquire(agent_id, force)
            elif force or model.has_free_slot(agent_id):
                registry.acquire(agent_id, force)
                model.acquire(agent_id)
            else:
                with pytest.raises(impl.SlotError):
                    registry.acquire(agent_id, force)
        elif op == "release" or (op == "release_chosen" and chosen):
            agent_id = args[0] if op == "release" else chosen.pop(0)
            if agent_id not in model.agents:
                assert registry.release(agent_id) is False
            elif model.agents[agent_id][2] == 0:
                with pytest.raises(impl.SlotError):
                    registry.release(agent_id)
            else:
                assert registry.release(agent_id) is True
                model.release(agent_id)
        elif op == "choose_and_acquire":
            expected = model.choose()
            assert registry.choose_and_acquire() == expected
            if expected is not None:
                model.acquire(expected)
                chosen.append(expected)
        check()
    for agent_id, (slots_total, ready, in_flight, _) in model.agents.items():
        assert registry.in_flight(agent_id) == in_flight
        assert registry.slots_total(agent_id) == slots_total
        assert registry.is_ready(agent_id) is ready


SETUP = st.lists(st.tuples(agent_ids, st.integers(0, 6), st.booleans()), max_size=AGENTS)


@settings(max_examples=300, deadline=None)
@given(setup=SETUP, ops=st.lists(OPS, max_size=150))
def test_choice_matches_brute_force(
    slots_impl: ModuleType, setup: list[tuple[Any, ...]], ops: list[Any]
) -> None:
    run_and_compare(slots_impl, setup, ops)


# Mostly traffic: requests dispatched and finished against a fleet that rarely changes.
TRAFFIC = st.one_of(
    st.tuples(st.just("choose_and_acquire")),
    st.tuples(st.just("choose_and_acquire")),
    st.tuples(st.just("release_chosen")),
    st.tuples(st.just("release_chosen")),
    st.tuples(st.just("release"), agent_ids),
    st.tuples(st.just("update"), agent_ids, st.integers(0, 6), st.booleans()),
)


@settings(max_examples=100, deadline=None)
@given(
    setup=st.lists(st.tuples(agent_ids, st.integers(1, 6), st.just(True)), min_size=AGENTS),
    ops=st.lists(TRAFFIC, min_size=100, max_size=400),
)
def test_choice_under_traffic_matches_brute_force(
    slots_impl: ModuleType, setup: list[tuple[Any, ...]], ops: list[Any]
) -> None:
    run_and_compare(slots_impl, setup, ops)


def test_an_agent_back_in_service_keeps_its_place_among_equals(slots_impl: ModuleType) -> None:
    """An update changes no stamp: an agent that becomes eligible again goes before
    agents with the same load that were stamped after it."""
    registry = slots_impl.Registry()
    for agent_id in (b"a", b"b", b"c"):
        registry.add(agent_id, 2, True)
    registry.update(b"a", 2, False)  # draining: out of the choice
    assert registry.choose() == b"b"
    registry.acquire(b"b")
    registry.release(b"b")  # b stamped after a and c
    registry.update(b"a", 2, True)
    assert registry.choose() == b"a"  # a was stamped before b and c
    registry.update(b"a", 0, True)  # no slots: out again
    assert registry.choose() == b"c"
    registry.update(b"a", 3, True)
    assert registry.choose() == b"a"
    assert registry.free_slots() == 7


def test_forced_acquisitions_past_the_slots_and_back(slots_impl: ModuleType) -> None:
    registry = slots_impl.Registry()
    registry.add(b"a", 1, True)
    registry.add(b"b", 2, True)
    registry.acquire(b"a", True)
    registry.acquire(b"a", True)  # round robin: past its one slot
    assert registry.free_slots() == 2
    assert registry.choose() == b"b"
    registry.acquire(b"b", True)
    registry.acquire(b"b", True)
    assert registry.choose() is None
    assert registry.free_slots() == 0
    assert registry.release(b"a") is True
    assert registry.choose() is None  # a: 1 in flight, 1 slot
    assert registry.release(b"a") is True
    assert registry.choose() == b"a"
    assert registry.release(b"b") is True
    assert registry.choose() == b"a"  # both at 0 and 1: a has fewer in flight
    assert registry.free_slots() == 2


def test_many_agents_choice_and_free_slots(slots_impl: ModuleType) -> None:
    """A fleet of 1,000 agents in the benchmark's shape, drained slot by slot."""
    registry = slots_impl.Registry()
    model = BruteForceRegistry()
    for i in range(1000):
        agent_id = b"agent-%d" % i
        registry.add(agent_id, 4, True)
        model.add(agent_id, 4, True)
        for _ in range(i % 4):
            registry.acquire(agent_id)
            model.acquire(agent_id)
    assert registry.free_slots() == model.free_slots() == 1000 * 4 - 1500
    for _ in range(2500):
        expected = model.choose()
        assert registry.choose_and_acquire() == expected
        assert expected is not None
        model.acquire(expected)
    assert registry.choose() is None
    assert registry.free_slots() == 0
