"""Message kinds and the protocol version."""

from __future__ import annotations

from enum import IntEnum

PROTOCOL_VERSION = 3
"""3: ``BATCH`` messages (several messages in one, ``paddler.protocol.codec.batched``).
2: tool-call text and outcomes (``TOOL_CALL``, ``TOOL_CALLS``), ``Done``'s
``stop_sequence``, stored responses. Agents and clients of another version are
refused at registration and at their first ping, with a message that says so."""

CANCELLED_CODE = 499
"""The code of a request that ends because its client cancelled it (nginx's 499)."""


class Kind(IntEnum):
    """The first byte of every header frame."""

    # any direction: several messages in one (paddler.protocol.codec.batched)
    BATCH = 9
    # agent -> broker
    REGISTER = 1
    AGENT_STATUS = 2
    HEARTBEAT = 3  # both ways, agents and broker
    DEREGISTER = 4
    SLOT_PREFIXES = 5  # what some slots' KV caches hold now (paddler.protocol.prefixes)
    # agent -> broker -> client (forwarded with only the header rewritten)
    TOKENS = 10
    DONE = 11
    ERROR = 12  # also broker -> client and broker -> agent
    EMBEDDING = 13  # one document's result of an embedding request
    LOGPROBS = 14  # log-probabilities of the tokens of the TOKENS frame that follows
    REASONING = 15  # like TOKENS: text a thinking model wrote as its reasoning
    TOOL_CALL = 16  # like TOKENS: the text of a tool call (markers included)
    TOOL_CALLS = 17  # what one tool-call block parsed to (paddler.protocol.tool_calls)
    # broker -> agent
    REGISTERED = 20
    DISPATCH = 22
    CANCEL = 23  # also client -> broker
    DESIRED_STATE = 24
    REREGISTER = 25
    AGENT_QUERY = 26  # broker -> agent: model metadata, chat template override
    AGENT_ANSWER = 27  # agent -> broker
    # client -> broker
    SUBMIT = 30
    PING = 31
    GET_AGENTS = 32
    GET_BUFFERED = 33
    GET_DESIRED_STATE = 34
    PUT_DESIRED_STATE = 35
    GET_APPLICABLE_STATE = 36
    GET_AGENT_INFO = 37
    GET_METRICS = 38
    # broker -> client
    PONG = 40
    AGENTS = 41
    BUFFERED = 42
    STATE = 43
    ACK = 44
    DISPATCHED = 45  # the request left the buffer for an agent
    AGENT_INFO = 46
    METRICS = 47
    # client -> broker: responses kept for the OpenAI Responses API (paddler.broker.store)
    PUT_RESPONSE = 50
    GET_RESPONSE = 51
    DELETE_RESPONSE = 52
    # broker -> client
    STORED_RESPONSE = 53


KNOWN_KINDS = frozenset(int(k) for k in Kind)
