"""The agents' side of the broker: registration (an agent is its key), the frames
of a stream (forwarded with their headers rewritten, their token ids kept for
continuation), the ends of requests, what slots hold (the prefix index), status
changes, and an agent's loss."""

from __future__ import annotations

import logging
from typing import Any

from paddler.broker.core import BrokerCore
from paddler.broker.records import AgentInfo, RequestRecord, error_frames
from paddler.curve import fingerprint
from paddler.errors import ProtocolError
from paddler.protocol.codec import HEADER, encode, unbatch, unpack_body
from paddler.protocol.kinds import KNOWN_KINDS, PROTOCOL_VERSION, Kind
from paddler.protocol.messages import AgentStatus, ErrorBody, Register
from paddler.protocol.prefixes import unpack_fingerprints

log = logging.getLogger("paddler.broker")

REREGISTER_MEMORY = 4096
"""Unknown peers remembered as told to register again (past that, the memory restarts)."""

ID_KEY_MEMORY = 4096
"""With curve: agent ids remembered with the key that registered them (the oldest
forgotten first), so that another key cannot register under them."""

_TOKENS = int(Kind.TOKENS)
_REGISTER = int(Kind.REGISTER)
_EMBEDDING = int(Kind.EMBEDDING)
_LOGPROBS = int(Kind.LOGPROBS)
_STREAMED = (_TOKENS, int(Kind.REASONING), int(Kind.TOOL_CALL), _EMBEDDING)
_FORWARDED = (_LOGPROBS, int(Kind.TOOL_CALLS))
"""Sent with the text of a stream, and forwarded as they are."""
"""What agents stream to clients (text frames carry their token ids)."""
_DONE = int(Kind.DONE)
_ERROR = int(Kind.ERROR)
_TERMINAL = (_DONE, _ERROR)
_ELSEWHERE = frozenset({"AgentUnavailable", "AgentEngineRestarted"})
"""Errors with which an agent gives a request back: one that has not started goes
back to the head of the buffer, one that has streamed continues elsewhere."""


def _label(info: AgentInfo) -> str:
    """An agent's label in per-agent series: its name, or its id without one."""
    return info.name or info.agent_id


class AgentSide(BrokerCore):
    """What the broker does with the frames of its agents' socket."""

    def agent_batch(self, identity: bytes, frames: list[bytes], now: float) -> list[list[bytes]]:
        """The messages of a ``BATCH`` from an agent, to handle one by one; none (the
        batch dropped) if it is malformed. A registration in a batch is dropped: it
        needs the connection's key, which is the batch's."""
        try:
            messages = unbatch(frames)
        except ProtocolError as exc:
            self._drop("agent", identity, str(exc), now)
            return []
        kept = [message for message in messages if message[0][0] != _REGISTER]
        if len(kept) != len(messages):
            self._drop("agent", identity, "a registration inside a batch", now)
        return kept

    def on_agent_message(
        self, identity: bytes, frames: list[bytes], now: float, peer_key: bytes | None = None
    ) -> None:
        """One message from the agents socket (identity stripped). Never raises
        for bad input: malformed frames are logged and dropped. ``peer_key``: with
        curve, the public key the connection authenticated with (read for REGISTER)."""
        count = len(frames)
        if (count != 2 and count != 3) or len(frames[0]) != 9:
            self._drop("agent", identity, f"bad frame layout ({count} frames)", now)
            return
        kind, request_id = HEADER.unpack(frames[0])
        info = self.agents.get(identity)
        if info is not None:
            if peer_key is not None and peer_key != info.key:
                # libzmq keeps one connection per identity: the agent's is gone, and
                # another key's connection uses its id now. Nothing of it is accepted.
                self._id_taken(info, peer_key, now)
                if kind != _REGISTER:
                    return
                info = None
            else:
                info.last_heard = now
        if kind in _STREAMED:  # the hot path: forward, rewrite the header
            record = self.requests.get(request_id)
            if record is None or record.agent != identity:
                return
            if not record.cancelled:
                if record.started:
                    self.metrics.inter_token.observe(now - record.last_activity)
                else:
                    record.started = True
                    self.metrics.time_to_first_token.observe(now - record.submitted_at)
                self._send_client(
                    record.client, [HEADER.pack(kind, record.client_request_id), frames[1]]
                )
                if count == 3:  # the frame's token ids: int32 each
                    self.metrics.output_tokens += len(frames[2]) >> 2
                token_ids = record.token_ids
                if token_ids is not None:
                    if count == 3 and not len(frames[2]) & 3:  # whole int32 ids
                        token_ids += frames[2]
                    else:  # text without its tokens: the request cannot continue elsewhere
                        record.token_ids = None
            record.last_activity = now
            return
        if kind in _FORWARDED:  # with their tokens: forwarded as they are
            record = self.requests.get(request_id)
            if record is not None and record.agent == identity and not record.cancelled:
                self._send_client(
                    record.client, [HEADER.pack(kind, record.client_request_id), frames[1]]
                )
            return
        if count == 3:
            self._drop("agent", identity, "bad frame layout (3 frames, not tokens)", now)
            return
        try:
            if kind in _TERMINAL:
                self._on_terminal(identity, kind, request_id, frames[1], now)
            elif kind == Kind.REGISTER:
                self._on_register(identity, unpack_body(frames[1]), now, peer_key)
            elif info is None:
                # a frame from an agent we do not know (we restarted, or declared it
                # dead): one REREGISTER per interval, not one per stray frame
                asked = self._reregister_asked.get(identity)
                if kind in KNOWN_KINDS and (
                    asked is None or now - asked >= self.settings.heartbeat_interval_s
                ):
                    if len(self._reregister_asked) >= REREGISTER_MEMORY:
                        self._reregister_asked.clear()
                    self._reregister_asked[identity] = now
                    self._send_agent(identity, encode(Kind.REREGISTER, 0, {}))
            elif kind == Kind.HEARTBEAT:
                pass
            elif kind == Kind.SLOT_PREFIXES:
                self._on_held(info, unpack_body(frames[1]))
            elif kind == Kind.AGENT_STATUS:
                self._on_status(info, AgentStatus.from_body(unpack_body(frames[1])), now)
            elif kind == Kind.AGENT_ANSWER:
                self.client_queries.agent_answer(identity, request_id, frames[1])
            elif kind == Kind.DEREGISTER:
                log.info("agent %s (%s) deregistered", info.agent_id, info.name)
                self.remove_agent(identity, now, reason="deregistered")
            else:
                raise ProtocolError(f"kind {kind} is not valid from an agent")
        except ProtocolError as exc:
            self._drop("agent", identity, str(exc), now)

    def _on_register(
        self, identity: bytes, body: Any, now: float, peer_key: bytes | None = None
    ) -> None:
        register = Register.from_body(body)
        if register.version != PROTOCOL_VERSION:
            log.warning(
                "agent %s speaks protocol %s, this broker %s",
                identity.hex()[:16],
                register.version,
                PROTOCOL_VERSION,
            )
            self._send_agent(
                identity,
                error_frames(
                    0,
                    400,
                    "ProtocolVersionMismatch",
                    f"agent speaks protocol version {register.version}, this balancer speaks "
                    f"version {PROTOCOL_VERSION}; run the same paddler version on both",
                ),
            )
            return
        status = AgentStatus.from_body(register.status)
        key = fingerprint(peer_key) if peer_key else None
        bound = self._id_keys.get(identity)
        if peer_key is not None and bound is not None and bound != peer_key:
            # an agent is its key: another key cannot take over an agent's id
            log.warning(
                "refused a registration as agent %s with key %s: it registered with key %s",
                identity.hex()[:16],
                key,
                fingerprint(bound),
            )
            self._send_agent(
                identity,
                error_frames(
                    0, 403, "IdentityInUse", "this agent id is registered with another key"
                ),
            )
            return
        known = self.agents.get(identity)
        if known is not None:
            # The agent reconnected: what it had in flight is gone with its old session.
            self.remove_agent(identity, now, reason="re-registered")
        agent_id = identity.hex() if not identity.isascii() else identity.decode()
        self.agents[identity] = AgentInfo(
            identity, agent_id, register.name, status, now, key, peer_key
        )
        if peer_key is not None:
            if len(self._id_keys) >= ID_KEY_MEMORY and identity not in self._id_keys:
                self._id_keys.pop(next(iter(self._id_keys)))
            self._id_keys[identity] = peer_key
        self.registry.add(identity, status.slots_total, status.ready)
        log.info(
            "agent %s (%s) registered with %d slots%s",
            agent_id,
            register.name,
            status.slots_total,
            f", key {key}" if key else "",
        )
        self._send_agent(
            identity,
            encode(
                Kind.REGISTERED,
                0,
                {"agent_id": agent_id, "heartbeat_interval_ms": self.settings.heartbeat_interval},
            ),
        )
        if self.desired_state is not None:
            self._send_agent(identity, encode(Kind.DESIRED_STATE, 0, {"state": self.desired_state}))
        self.dispatch_buffered(now)

    def _id_taken(self, info: AgentInfo, peer_key: bytes, now: float) -> None:
        """A message under an agent's id came with another key than the one it
        registered with: the agent's connection is gone (its requests continue
        elsewhere) and the message is dropped."""
        log.warning(
            "agent %s (%s) registered with key %s, but its id now sends with key %s: "
            "the agent is gone and nothing from that connection is accepted",
            info.agent_id,
            info.name,
            info.key_fingerprint,
            fingerprint(peer_key),
        )
        self.metrics.dropped_frames += 1
        self.remove_agent(info.identity, now, reason="lost its id to another key")

    def _on_held(self, info: AgentInfo, body: Any) -> None:
        """What some slots of an agent hold now: the prefix index learns it. The whole
        frame is checked before any of it is used."""
        held = body.get("held") if isinstance(body, dict) else None
        if not isinstance(held, list) or len(held) > max(1, info.status.slots_total):
            raise ProtocolError("SlotPrefixes.held: expected a list of at most one per slot")
        chains = []
        for entry in held:
            if not (
                isinstance(entry, list)
                and len(entry) == 2
                and type(entry[0]) is int
                and 0 <= entry[0] < max(1, info.status.slots_total)
                and isinstance(entry[1], bytes)
            ):
                raise ProtocolError("SlotPrefixes.held: expected [slot, fingerprints] pairs")
            chains.append((entry[0], unpack_fingerprints(entry[1])))
        for slot, chain in chains:
            self.registry.hold(info.identity, slot, chain)

    def _on_status(self, info: AgentInfo, status: AgentStatus, now: float) -> None:
        info.status = status
        self.registry.update(info.identity, status.slots_total, status.ready)
        self.dispatch_buffered(now)

    def _on_terminal(
        self, identity: bytes, kind: int, request_id: int, body: bytes, now: float
    ) -> None:
        """The agent ended a request (DONE or ERROR): its slot is free again."""
        record = self.requests.get(request_id)
        if record is None or record.agent != identity:
            return
        try:  # ends are small: decoding them costs little
            value = unpack_body(body)
            error = ErrorBody.from_body(value) if kind == _ERROR else None
        except ProtocolError as exc:
            value = error = None
            if kind == _ERROR:
                # the agent is done with it all the same: the client gets our error
                self._drop("agent", identity, str(exc), now)
                self._fail(
                    record,
                    502,
                    "ProtocolError",
                    "the agent ended the request with a malformed error",
                )
        if error is not None and error.kind in _ELSEWHERE and not record.cancelled:
            # the agent gave it back (draining, reloading, its engine restarted)
            restarted = error.kind == "AgentEngineRestarted"
            if not (restarted and record.continuations >= self.settings.max_continuations):
                self._release(record)
                record.agent = None
                if not record.started:  # try another one from the start
                    if restarted:  # a request that breaks engines moves a bounded number of times
                        record.continuations += 1
                    record.buffered_at = now
                    self.buffer.push_front(
                        request_id, now + self.settings.buffered_request_timeout_s
                    )
                    self.dispatch_buffered(now)
                    return
                if self.continuations.add(record, now, f"agent gave it back ({error.kind})"):
                    self.dispatch_buffered(now)
                    return
        if not record.cancelled:
            self._send_client(record.client, [HEADER.pack(kind, record.client_request_id), body])
            record.cancelled = True
            self._settle(record, error.kind if error is not None else "done")
        info = self.agents.get(identity)
        if info is not None:
            self.metrics.count_agent_end(_label(info), kind, value)
        self._forget(record)
        self.dispatch_buffered(now)

    def remove_agent(self, identity: bytes, now: float, reason: str) -> None:
        """An agent is gone: streamed requests continue on another agent (or fail with
        502 when they cannot), unstarted ones go back to the head of the buffer, its
        slots leave the registry, and its series leave the metrics (unless another
        agent has its label). Safe for any identity."""
        info = self.agents.pop(identity, None)
        self.registry.remove(identity)
        orphans = self.in_flight.of_agent(identity)
        redispatch: list[RequestRecord] = []
        failed = continued = 0
        for request_id in orphans:
            self.in_flight.remove(request_id)
            record = self.requests.get(request_id)
            if record is None:
                # cannot happen while every request leaves through ``_forget``
                log.error("request %d was in flight on a lost agent but is unknown", request_id)
                continue
            record.agent = None
            if record.cancelled:
                self._forget(record)
            elif record.started:
                if self.continuations.add(record, now, f"agent {reason}"):
                    continued += 1
                    continue
                self._fail(record, 502, "AgentLost", f"agent {reason} while generating")
                self._forget(record)
                failed += 1
            else:
                redispatch.append(record)
        for record in reversed(redispatch):  # keep their order at the head of the buffer
            record.buffered_at = now
            if record.request_id not in self.buffer:
                self.buffer.push_front(
                    record.request_id, now + self.settings.buffered_request_timeout_s
                )
        if info is not None:
            label = _label(info)
            if all(_label(other) != label for other in self.agents.values()):
                self.metrics.forget_agent(label)
            if orphans or reason != "deregistered":
                log.warning(
                    "agent %s (%s) %s: %d requests continue elsewhere, %d failed, %d re-dispatched",
                    info.agent_id,
                    info.name,
                    reason,
                    continued,
                    failed,
                    len(redispatch),
                )
        self.dispatch_buffered(now)
