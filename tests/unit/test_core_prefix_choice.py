"""The ``prefix`` choice of agent against a brute-force reference, in both ``_core``
builds: no slot is ever oversubscribed, the load bound holds, and the deepest
matching prefix among the agents within the bound wins."""

from __future__ import annotations

from types import ModuleType
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

AGENTS = [f"agent-{i}".encode() for i in range(5)]
TREE = {
    "a": [11, 12, 13, 14, 15, 16],
    "b": [11, 12, 23, 24],
    "c": [31, 32, 33],
}
"""Three prompt chains; ``a`` and ``b`` share their first two pieces."""


def _chain(name: str, depth: int) -> list[int]:
    return TREE[name][:depth]


step = st.one_of(
    st.tuples(st.just("add"), st.sampled_from(AGENTS), st.integers(0, 3), st.booleans()),
    st.tuples(st.just("remove"), st.sampled_from(AGENTS)),
    st.tuples(
        st.just("hold"),
        st.sampled_from(AGENTS),
        st.integers(0, 3),
        st.sampled_from(sorted(TREE)),
        st.integers(0, 6),
    ),
    st.tuples(
        st.just("choose"), st.sampled_from(sorted(TREE)), st.integers(0, 6), st.integers(0, 3)
    ),
    st.tuples(st.just("release"), st.sampled_from(AGENTS)),
)


def _deepest(held: dict[int, list[int]], chain: list[int]) -> int:
    """How deep ``chain`` matches what an agent's slots hold."""
    best = 0
    for kept in held.values():
        depth = 0
        for mine, theirs in zip(chain, kept, strict=False):
            if mine != theirs:
                break
            depth += 1
        best = max(best, depth)
    return best


@settings(max_examples=800, deadline=None)
@given(steps=st.lists(step, max_size=60))
def test_prefix_choice_matches_the_reference(slots_impl: ModuleType, steps: list[Any]) -> None:
    registry = slots_impl.Registry()
    # reference: agent -> [slots_total, ready, in_flight], and what each slot holds
    agents: dict[bytes, list[Any]] = {}
    held: dict[bytes, dict[int, list[int]]] = {}
    for op, *args in steps:
        if op == "add":
            agent, slots, ready = args
            registry.add(agent, slots, ready)
            in_flight = agents[agent][2] if agent in agents else 0
            agents[agent] = [slots, ready, in_flight]
            held.setdefault(agent, {})
        elif op == "remove":
            (agent,) = args
            registry.remove(agent)
            agents.pop(agent, None)
            held.pop(agent, None)
        elif op == "hold":
            agent, slot, name, depth = args
            registry.hold(agent, slot, _chain(name, depth))
            if agent in agents:
                held[agent][slot] = _chain(name, depth)
        elif op == "release":
            (agent,) = args
            if agent in agents and agents[agent][2] > 0:
                registry.release(agent)
                agents[agent][2] -= 1
        else:
            name, depth, slack = args
            chain = _chain(name, depth)
            chosen, matched = registry.choose_prefix(chain, slack)
            free = {
                a: v for a, v in agents.items() if v[1] and v[2] < v[0]
            }  # ready with a free slot
            if not free:
                assert chosen is None
                continue
            assert chosen in free, "an agent without a free slot was chosen"
            least = min(v[2] for v in free.values())
            within = {a: v for a, v in free.items() if v[2] <= least + slack}
            depths = {a: _deepest(held.get(a, {}), chain) for a in within}
            deepest = max(depths.values())
            assert matched == deepest
            if deepest:
                assert chosen in within and depths[chosen] == deepest
                # ties among the deepest: the fewest in flight
                assert agents[chosen][2] == min(
                    agents[a][2] for a in within if depths[a] == deepest
                )
            else:
                assert chosen == registry.choose()
            registry.acquire(chosen)
            agents[chosen][2] += 1
    # the index forgets what removed agents held
    assert registry.held_fingerprints() == sum(
        len(chain) for agent in agents for chain in held.get(agent, {}).values()
    )


def test_a_removed_agent_leaves_nothing_in_the_index(slots_impl: ModuleType) -> None:
    registry = slots_impl.Registry()
    registry.add(b"a", 0, False)
    registry.hold(b"a", 0, [31, 32])
    registry.remove(b"a")
    assert registry.held_fingerprints() == 0
    registry.add(b"a", 1, True)  # back, holding nothing: no match
    assert registry.choose_prefix([31], 0) == (b"a", 0)


def test_a_long_conversation_still_finds_its_system_prompt(slots_impl: ModuleType) -> None:
    registry = slots_impl.Registry()
    chain = list(range(100, 120))  # a 20-message conversation
    registry.add(b"busy", 8, True)
    registry.add(b"warm", 8, True)
    registry.add(b"cold", 8, True)
    registry.hold(b"busy", 0, chain)  # the whole conversation, but too busy
    registry.hold(b"warm", 0, chain[:1])  # its system prompt only
    for _ in range(5):
        registry.acquire(b"busy")
    registry.acquire(b"warm")  # so the least loaded is "cold", which holds nothing
    assert registry.choose_prefix(chain, 2) == (b"warm", 1)


def test_a_prefix_every_agent_holds_goes_to_the_least_loaded_at_once(
    slots_impl: ModuleType,
) -> None:
    registry = slots_impl.Registry()
    for index in range(50):
        agent = f"agent-{index}".encode()
        registry.add(agent, 4, True)
        registry.hold(agent, 0, [7, 8])
        if index:
            registry.acquire(agent)
    assert registry.choose_prefix([7, 8, 9], 2) == (b"agent-0", 2)
