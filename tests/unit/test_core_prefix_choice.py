"""The ``prefix`` choice of agent against a brute-force reference, in both ``_core``
builds: no slot is ever oversubscribed, the load bound holds, and the deepest
matching prefix among the agents within the bound wins."""

from __future__ import annotations

from types import ModuleType
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

AGENTS = [f"agent-{i}".encode() for i in range(5)]
_LONG = list(range(100, 124))
TREE = {
    "a": _LONG,
    "b": [*_LONG[:2], 23, 24],
    "c": [31, 32, 33],
    "d": [*_LONG[:12], *range(300, 312)],
}
"""Four prompt chains; ``a`` and ``b`` share their first two pieces, ``a`` and ``d``
their first twelve. ``a`` and ``d`` are 24 deep: far deeper than a few steps down
from the deepest match, so a choice that gives up on the depths between the deepest
match and the shallowest (the system prompt) is caught."""
DEEPEST = max(len(chain) for chain in TREE.values())


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
        st.integers(0, DEEPEST),
    ),
    st.tuples(
        st.just("choose"),
        st.sampled_from(sorted(TREE)),
        st.integers(0, DEEPEST),
        st.integers(0, 3),
    ),
    st.tuples(st.just("release"), st.sampled_from(AGENTS)),
    st.tuples(st.just("acquire"), st.sampled_from(AGENTS)),
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


def _check_choice(
    registry: Any,
    agents: dict[bytes, list[Any]],
    held: dict[bytes, dict[int, list[int]]],
    chain: list[int],
    slack: int,
) -> bytes | None:
    """``registry.choose_prefix(chain, slack)`` checked against the reference: agent ->
    [slots_total, ready, in_flight] and agent -> {slot: its chain}. The agent chosen."""
    chosen, matched = registry.choose_prefix(chain, slack)
    free = {a: v for a, v in agents.items() if v[1] and v[2] < v[0]}  # ready, a free slot
    if not free:
        assert chosen is None
        return None
    assert chosen in free, "an agent without a free slot was chosen"
    least = min(v[2] for v in free.values())
    within = {a: v for a, v in free.items() if v[2] <= least + slack}
    depths = {a: _deepest(held.get(a, {}), chain) for a in within}
    deepest = max(depths.values())
    assert matched == deepest, f"matched {matched}, the deepest within the bound is {deepest}"
    if deepest:
        assert chosen in within and depths[chosen] == deepest
        # ties among the deepest: the fewest in flight
        assert agents[chosen][2] == min(agents[a][2] for a in within if depths[a] == deepest)
    else:
        assert chosen == registry.choose()
    assert isinstance(chosen, bytes)
    return chosen


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
        elif op == "acquire":
            (agent,) = args
            if agent in agents and agents[agent][1] and agents[agent][2] < agents[agent][0]:
                registry.acquire(agent)
                agents[agent][2] += 1
        else:
            name, depth, slack = args
            chosen = _check_choice(registry, agents, held, _chain(name, depth), slack)
            if chosen is not None:
                registry.acquire(chosen)
                agents[chosen][2] += 1
    # the index forgets what removed agents held
    assert registry.held_fingerprints() == sum(
        len(chain) for agent in agents for chain in held.get(agent, {}).values()
    )


fleet = st.lists(
    st.tuples(
        st.integers(0, 4),  # slots
        st.integers(0, 4),  # requests in flight (at most the slots)
        st.integers(0, 9).map(lambda roll: roll > 0),  # ready, mostly
        # what its slots hold: (chain, depth) each
        st.lists(st.tuples(st.sampled_from(sorted(TREE)), st.integers(0, DEEPEST)), max_size=3),
    ),
    min_size=1,
    max_size=len(AGENTS),
)


@settings(max_examples=1500, deadline=None)
@given(
    fleet=fleet,
    name=st.sampled_from(sorted(TREE)),
    depth=st.integers(0, DEEPEST),
    slack=st.integers(0, 3),
)
def test_prefix_choice_on_any_fleet_matches_the_reference(
    slots_impl: ModuleType, fleet: list[Any], name: str, depth: int, slack: int
) -> None:
    """One choice on a fleet built at once, so loaded agents holding deep chains next
    to idle ones holding shallow parts of them (which steps of single operations
    rarely reach) are the common case."""
    registry = slots_impl.Registry()
    agents: dict[bytes, list[Any]] = {}
    held: dict[bytes, dict[int, list[int]]] = {}
    for agent, (slots, in_flight, ready, chains) in zip(AGENTS, fleet, strict=False):
        registry.add(agent, slots, True)
        in_flight = min(in_flight, slots)
        for _ in range(in_flight):
            registry.acquire(agent)
        registry.update(agent, slots, ready)
        agents[agent] = [slots, ready, in_flight]
        held[agent] = {}
        for slot, (chain_name, chain_depth) in enumerate(chains):
            registry.hold(agent, slot, _chain(chain_name, chain_depth))
            held[agent][slot] = _chain(chain_name, chain_depth)
    _check_choice(registry, agents, held, _chain(name, depth), slack)


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


def test_the_deepest_prefix_within_the_bound_wins_however_far_below(
    slots_impl: ModuleType,
) -> None:
    """The deepest holder is too busy; of the others, the one holding 5 pieces of the
    conversation wins over the least loaded one holding its system prompt only, even
    15 pieces below the deepest match."""
    registry = slots_impl.Registry()
    chain = list(range(100, 120))
    for agent in (b"A", b"B", b"D"):
        registry.add(agent, 8, True)
    registry.hold(b"A", 0, chain)  # the whole conversation, but too busy
    registry.hold(b"B", 0, chain[:5])
    registry.hold(b"D", 0, chain[:1])
    for _ in range(5):
        registry.acquire(b"A")
    registry.acquire(b"B")  # 1 in flight: within slack 2 of D's 0
    assert registry.choose_prefix(chain, 2) == (b"B", 5)
    assert registry.choose_prefix(chain, 0) == (b"D", 1)  # B is beyond slack 0
    # every depth between the deepest match and the system prompt is found
    for depth in range(2, 20):
        registry.hold(b"B", 0, chain[:depth])
        assert registry.choose_prefix(chain, 2) == (b"B", depth)
    # and the deepest match itself, once its holder is within the bound again
    for _ in range(3):
        registry.release(b"A")
    assert registry.choose_prefix(chain, 2) == (b"A", 20)
