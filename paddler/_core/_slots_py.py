"""Slot bookkeeping of the broker: agent registry, choice of agent, FIFO buffer, in-flight table.

This pure-Python module is the specification. The same file is compiled by
Cython as ``paddler._core._slots_c`` (a symlink to this file); both must agree
on every test. Keep it free of I/O and clocks: times come in as arguments.
"""

from __future__ import annotations

import heapq
from collections import deque

try:  # pragma: no cover - tells whether this copy of the module is compiled
    import cython

    COMPILED: bool = bool(cython.compiled)
except ImportError:  # pragma: no cover
    COMPILED = False


class SlotError(Exception):
    """A slot operation that would break the bookkeeping (oversubscribe, release twice)."""


class _Agent:
    __slots__ = ("agent_id", "in_flight", "index", "ready", "slots_total", "stamp")

    def __init__(self, agent_id: bytes, slots_total: int, ready: bool, stamp: int) -> None:
        self.agent_id = agent_id
        self.slots_total = slots_total
        self.ready = ready
        self.in_flight = 0
        self.stamp = stamp
        self.index = -1  # position in ``Registry._eligible``; -1 while no slot is free


def _has_free_slot(agent: _Agent) -> bool:
    return agent.ready and agent.in_flight < agent.slots_total


def _free_slots_of(agent: _Agent) -> int:
    return agent.slots_total - agent.in_flight if _has_free_slot(agent) else 0


def _goes_first(a: _Agent, b: _Agent) -> bool:
    """Whether ``a`` is chosen before ``b``: fewer in flight, then the older stamp.

    Stamps are unique (one clock tick each), so this is a strict total order.
    """
    return a.in_flight < b.in_flight or (a.in_flight == b.in_flight and a.stamp < b.stamp)


class Registry:
    """Agents and their slots. The broker's count of requests in flight is the truth.

    ``choose`` picks, among ready agents with a free slot, the one with the fewest
    requests in flight; ties go to the agent idle longest (the oldest stamp, where
    a stamp is taken at registration, at each acquire and at each release).

    The agents with a free slot are kept in a binary min-heap ordered by
    ``_goes_first``, each agent knowing its position in it, so ``choose`` reads the
    root in O(1) and every change of an agent moves it in O(log n). The free slots
    are a running total, kept by every change.

    The prefix index (``hold``, ``choose_prefix``) knows which agents hold which
    prefix fingerprints (``paddler.protocol.prefixes``) in their slots' KV caches:
    for each fingerprint, how many slots of each agent hold it.
    """

    def __init__(self) -> None:
        self._agents: dict[bytes, _Agent] = {}
        self._eligible: list[_Agent] = []
        self._free_slots = 0
        self._clock = 0
        self._rotation = 0
        self._holders: dict[int, dict[bytes, int]] = {}
        """Fingerprint -> {agent: slots of that agent holding it}."""
        self._held: dict[bytes, dict[int, list[int]]] = {}
        """Agent -> {slot: its fingerprint chain}."""

    def _tick(self) -> int:
        self._clock += 1
        return self._clock

    # -- the heap of agents with a free slot -------------------------------------

    def _sift_up(self, index: int) -> int:
        """Move the agent at ``index`` towards the root while it goes first; its new index."""
        heap = self._eligible
        agent = heap[index]
        while index > 0:
            parent_index = (index - 1) // 2
            parent = heap[parent_index]
            if not _goes_first(agent, parent):
                break
            heap[index] = parent
            parent.index = index
            index = parent_index
        heap[index] = agent
        agent.index = index
        return index

    def _sift_down(self, index: int) -> None:
        """Move the agent at ``index`` towards the leaves while a child goes first."""
        heap = self._eligible
        size = len(heap)
        agent = heap[index]
        while True:
            child_index = 2 * index + 1
            if child_index >= size:
                break
            child = heap[child_index]
            if child_index + 1 < size:
                right = heap[child_index + 1]
                if _goes_first(right, child):
                    child_index += 1
                    child = right
            if not _goes_first(child, agent):
                break
            heap[index] = child
            child.index = index
            index = child_index
        heap[index] = agent
        agent.index = index

    def _insert(self, agent: _Agent) -> None:
        heap = self._eligible
        agent.index = len(heap)
        heap.append(agent)
        self._sift_up(agent.index)

    def _remove(self, agent: _Agent) -> None:
        heap = self._eligible
        index = agent.index
        agent.index = -1
        last = heap.pop()
        if last is not agent:  # the last agent fills the hole, then finds its place
            heap[index] = last
            last.index = index
            self._sift_down(self._sift_up(index))

    def _reposition(self, agent: _Agent) -> None:
        """After any change of ``agent``: in the heap at its place if it has a free
        slot, out of the heap if not."""
        if _has_free_slot(agent):
            if agent.index < 0:
                self._insert(agent)
            else:
                self._sift_down(self._sift_up(agent.index))
        elif agent.index >= 0:
            self._remove(agent)

    # -- registration ------------------------------------------------------------

    def add(self, agent_id: bytes, slots_total: int, ready: bool) -> None:
        """Register an agent, or update it if known (its in-flight count is kept)."""
        if slots_total < 0:
            raise SlotError(f"slots_total must be >= 0, got {slots_total}")
        agent = self._agents.get(agent_id)
        if agent is None:
            agent = self._agents[agent_id] = _Agent(agent_id, slots_total, ready, self._tick())
        else:
            before = _free_slots_of(agent)
            agent.slots_total = slots_total
            agent.ready = ready
            self._free_slots -= before
        self._free_slots += _free_slots_of(agent)
        self._reposition(agent)

    def update(self, agent_id: bytes, slots_total: int, ready: bool) -> None:
        if agent_id not in self._agents:
            raise KeyError(agent_id)
        self.add(agent_id, slots_total, ready)

    def remove(self, agent_id: bytes) -> bool:
        if agent_id not in self._agents:
            return False
        for slot in list(self._held.get(agent_id, {})):
            self.hold(agent_id, slot, [])  # while it is registered: hold ignores others
        self._held.pop(agent_id, None)
        agent = self._agents.pop(agent_id)
        if agent.index >= 0:
            self._free_slots -= agent.slots_total - agent.in_flight
            self._remove(agent)
        return True

    def __contains__(self, agent_id: object) -> bool:
        return agent_id in self._agents

    def __len__(self) -> int:
        return len(self._agents)

    def agent_ids(self) -> list[bytes]:
        return list(self._agents)

    def in_flight(self, agent_id: bytes) -> int:
        return self._agents[agent_id].in_flight

    def slots_total(self, agent_id: bytes) -> int:
        return self._agents[agent_id].slots_total

    def is_ready(self, agent_id: bytes) -> bool:
        return self._agents[agent_id].ready

    def free_slots(self) -> int:
        """Free slots summed over ready agents."""
        return self._free_slots

    # -- choice and slots --------------------------------------------------------

    def choose(self) -> bytes | None:
        """The agent the next request should go to, or ``None`` if no slot is free."""
        if not self._eligible:
            return None
        agent: _Agent = self._eligible[0]
        return agent.agent_id

    def next_in_rotation(self) -> bytes | None:
        """Round robin over ready agents, free slot or not (only for comparison
        benchmarks: it is what a slot-unaware load balancer does)."""
        ready = [agent_id for agent_id, agent in self._agents.items() if agent.ready]
        if not ready:
            return None
        self._rotation += 1
        return ready[self._rotation % len(ready)]

    def acquire(self, agent_id: bytes, force: bool = False) -> None:
        """Take a slot; ``force`` takes one even past ``slots_total`` (round robin)."""
        agent = self._agents[agent_id]
        had_free_slot = agent.index >= 0  # the heap holds exactly the agents with a free slot
        if not force and not had_free_slot:
            raise SlotError(f"agent {agent_id!r} has no free slot")
        agent.in_flight += 1
        agent.stamp = self._tick()
        if had_free_slot:
            self._free_slots -= 1
            if agent.in_flight < agent.slots_total:
                # more in flight, newer stamp: it can only move away from the root
                self._sift_down(agent.index)
            else:
                self._remove(agent)

    def release(self, agent_id: bytes) -> bool:
        """Free one slot; ``False`` if the agent is gone (its slots left with it)."""
        agent = self._agents.get(agent_id)
        if agent is None:
            return False
        if agent.in_flight <= 0:
            raise SlotError(f"agent {agent_id!r} has no slot in use")
        agent.in_flight -= 1
        agent.stamp = self._tick()
        if agent.index >= 0:
            self._free_slots += 1
            # fewer in flight: it can only move towards the root
            self._sift_up(agent.index)
        elif _has_free_slot(agent):
            # it had none free, so it was at slots_total exactly: now one is free
            self._free_slots += 1
            self._insert(agent)
        return True

    def choose_and_acquire(self) -> bytes | None:
        agent_id = self.choose()
        if agent_id is not None:
            self.acquire(agent_id)
        return agent_id

    # -- prefixes ----------------------------------------------------------------

    def hold(self, agent_id: bytes, slot: int, fingerprints: list[int]) -> None:
        """Slot ``slot`` of a registered agent now holds the prefix ``fingerprints``
        (a chain, shortest first; empty: nothing). Unknown agents are ignored."""
        if agent_id not in self._agents:
            return
        held = self._held.setdefault(agent_id, {})
        holders = self._holders
        for fingerprint in held.pop(slot, ()):
            counts = holders.get(fingerprint)
            if counts is None:
                continue
            left = counts.get(agent_id, 0) - 1
            if left > 0:
                counts[agent_id] = left
            else:
                counts.pop(agent_id, None)
                if not counts:
                    del holders[fingerprint]
        if fingerprints:
            held[slot] = list(fingerprints)
            for fingerprint in fingerprints:
                counts = holders.get(fingerprint)
                if counts is None:
                    holders[fingerprint] = {agent_id: 1}
                else:
                    counts[agent_id] = counts.get(agent_id, 0) + 1

    def held_fingerprints(self) -> int:
        """Fingerprints held, counted once per slot (the index's size)."""
        return sum(len(chain) for slots in self._held.values() for chain in slots.values())

    def _pick_holder(
        self, counts: dict[bytes, int] | None, best: bytes, bound: int
    ) -> _Agent | None:
        """Among the agents in ``counts`` (the holders of one fingerprint) with a free
        slot and at most ``bound`` requests in flight, the one ``choose`` would take;
        ``None`` if there is none. ``best`` is the ``choose`` agent: when it holds the
        fingerprint it is the pick at once, with no scan of the holders."""
        if counts is None:
            return None
        agents = self._agents
        if best in counts:
            agent: _Agent = agents[best]
            return agent
        pick: _Agent | None = None
        for agent_id in counts:
            holder: _Agent | None = agents.get(agent_id)
            if holder is None or holder.index < 0 or holder.in_flight > bound:
                continue
            if pick is None or _goes_first(holder, pick):
                pick = holder
        return pick

    def choose_prefix(self, fingerprints: list[int], slack: int) -> tuple[bytes | None, int]:
        """The agent for a request whose prompt has the chain ``fingerprints``, and
        how deep its prefix matched there (0: no match, the ``choose`` agent).

        Among agents with a free slot whose requests in flight are at most ``slack``
        more than the least loaded one's, the one holding the deepest prefix (ties:
        as ``choose``). The bound keeps one hot prefix from piling every request on
        one agent while others idle.

        A holder of a chain's fingerprint holds every one before it, so "some agent
        holds depth ``d``" and "some agent within the bound holds depth ``d``" are
        both true up to a depth and false past it: each is found by binary search.
        First the deepest depth held anywhere (a dict lookup per step); its holders
        are scanned, and when one is within the bound (the common case) it is the
        pick. Otherwise the deepest depth held within the bound lies below, and a
        second binary search finds it, scanning the holders of at most
        log2(depth) + 1 fingerprints. When the least loaded agent holds a depth, it
        is the pick there at once: a prefix every agent holds costs no scan of them
        all."""
        best = self.choose()
        if best is None or not fingerprints or not self._holders:
            return best, 0
        holders = self._holders
        bound = self._agents[best].in_flight + slack
        low, high = 0, len(fingerprints)  # the deepest held depth is in [low, high]
        while low < high:
            middle = (low + high + 1) // 2
            if fingerprints[middle - 1] in holders:
                low = middle
            else:
                high = middle - 1
        if low == 0:
            return best, 0
        pick = self._pick_holder(holders.get(fingerprints[low - 1]), best, bound)
        if pick is not None:
            return pick.agent_id, low
        # No holder of the deepest match is within the bound: the deepest depth held
        # within it is shallower. Search [0, that depth - 1]; ``low`` only ever moves
        # to a depth whose pick is found, and ``pick`` is always the pick of ``low``.
        low, high = 0, low - 1
        while low < high:
            middle = (low + high + 1) // 2
            found = self._pick_holder(holders.get(fingerprints[middle - 1]), best, bound)
            if found is not None:
                low = middle
                pick = found
            else:
                high = middle - 1
        if pick is None:  # low is 0: no depth is held within the bound
            return best, 0
        return pick.agent_id, low

    def choose_prefix_and_acquire(
        self, fingerprints: list[int], slack: int
    ) -> tuple[bytes | None, int]:
        agent_id, depth = self.choose_prefix(fingerprints, slack)
        if agent_id is not None:
            self.acquire(agent_id)
        return agent_id, depth

    def __repr__(self) -> str:
        busy = sum(a.in_flight for a in self._agents.values())
        total = sum(a.slots_total for a in self._agents.values())
        return f"<Registry agents={len(self._agents)} slots={busy}/{total}>"


class RequestBuffer:
    """A bounded FIFO of request ids, each with a deadline, removable by id.

    Removal is lazy (stale entries are skipped when popped) and the queue is
    compacted when stale entries outnumber live ones, so every operation is
    amortized O(1) except deadline expiry, which is O(log n) per expired entry.
    """

    def __init__(self, capacity: int) -> None:
        if capacity < 0:
            raise ValueError("capacity must be >= 0")
        self.capacity = capacity
        self._order: deque[tuple[int, int]] = deque()
        self._live: dict[int, tuple[float, int]] = {}
        self._heap: list[tuple[float, int, int]] = []
        self._seq = 0

    def __len__(self) -> int:
        return len(self._live)

    def __contains__(self, request_id: object) -> bool:
        return request_id in self._live

    def _insert(self, request_id: int, deadline: float, front: bool) -> None:
        if not deadline == deadline or deadline in (float("inf"), float("-inf")):
            raise ValueError(f"deadline must be a finite number, got {deadline!r}")
        if request_id in self._live:
            raise ValueError(f"request {request_id} is already buffered")
        self._seq += 1
        seq = self._seq
        self._live[request_id] = (deadline, seq)
        if front:
            self._order.appendleft((request_id, seq))
        else:
            self._order.append((request_id, seq))
        heapq.heappush(self._heap, (deadline, seq, request_id))

    def push(self, request_id: int, deadline: float) -> bool:
        """Append at the back; ``False`` (and nothing stored) when the buffer is full."""
        if len(self._live) >= self.capacity:
            return False
        self._insert(request_id, deadline, False)
        return True

    def push_front(self, request_id: int, deadline: float) -> None:
        """Put a request back at the head (a re-dispatch); it may exceed the capacity."""
        self._insert(request_id, deadline, True)

    def pop(self) -> int | None:
        """The oldest live request id, removed; ``None`` when empty."""
        order = self._order
        live = self._live
        while order:
            request_id, seq = order.popleft()
            entry = live.get(request_id)
            if entry is not None and entry[1] == seq:
                del live[request_id]
                # popped entries stay in the deadline heap until they surface there
                if len(self._heap) > 2 * len(live) + 64:
                    self._compact()
                return request_id
        return None

    def peek(self) -> int | None:
        order = self._order
        live = self._live
        while order:
            request_id, seq = order[0]
            entry = live.get(request_id)
            if entry is not None and entry[1] == seq:
                return request_id
            order.popleft()
        return None

    def remove(self, request_id: int) -> bool:
        if self._live.pop(request_id, None) is None:
            return False
        if max(len(self._order), len(self._heap)) > 2 * len(self._live) + 64:
            self._compact()
        return True

    def _compact(self) -> None:
        live = self._live
        self._order = deque(e for e in self._order if live.get(e[0], (0.0, -1))[1] == e[1])
        self._heap = [e for e in self._heap if live.get(e[2], (0.0, -1))[1] == e[1]]
        heapq.heapify(self._heap)

    def next_deadline(self) -> float | None:
        heap = self._heap
        live = self._live
        while heap:
            deadline, seq, request_id = heap[0]
            entry = live.get(request_id)
            if entry is not None and entry[1] == seq:
                return deadline
            heapq.heappop(heap)
        return None

    def pop_expired(self, now: float) -> list[int]:
        """Remove and return, oldest deadline first, the requests whose deadline is <= now."""
        expired: list[int] = []
        heap = self._heap
        live = self._live
        while heap and heap[0][0] <= now:
            _, seq, request_id = heapq.heappop(heap)
            entry = live.get(request_id)
            if entry is not None and entry[1] == seq:
                del live[request_id]
                expired.append(request_id)
        if expired and max(len(self._order), len(heap)) > 2 * len(live) + 64:
            self._compact()
        return expired

    def ids(self) -> list[int]:
        """Live request ids in FIFO order."""
        live = self._live
        return [rid for rid, seq in self._order if live.get(rid, (0.0, -1))[1] == seq]

    def __repr__(self) -> str:
        return f"<RequestBuffer {len(self._live)}/{self.capacity}>"


class InFlight:
    """Requests being served: request id -> agent id, and each agent's requests."""

    def __init__(self) -> None:
        self._agent_of: dict[int, bytes] = {}
        self._by_agent: dict[bytes, set[int]] = {}

    def __len__(self) -> int:
        return len(self._agent_of)

    def __contains__(self, request_id: object) -> bool:
        return request_id in self._agent_of

    def add(self, request_id: int, agent_id: bytes) -> None:
        if request_id in self._agent_of:
            raise ValueError(f"request {request_id} is already in flight")
        self._agent_of[request_id] = agent_id
        requests = self._by_agent.get(agent_id)
        if requests is None:
            requests = self._by_agent[agent_id] = set()
        requests.add(request_id)

    def agent_of(self, request_id: int) -> bytes | None:
        return self._agent_of.get(request_id)

    def remove(self, request_id: int) -> bytes | None:
        agent_id = self._agent_of.pop(request_id, None)
        if agent_id is not None:
            requests = self._by_agent[agent_id]
            requests.discard(request_id)
            if not requests:
                del self._by_agent[agent_id]
        return agent_id

    def of_agent(self, agent_id: bytes) -> list[int]:
        return sorted(self._by_agent.get(agent_id, ()))

    def count_of(self, agent_id: bytes) -> int:
        return len(self._by_agent.get(agent_id, ()))

    def __repr__(self) -> str:
        return f"<InFlight requests={len(self._agent_of)} agents={len(self._by_agent)}>"
