"""Settings of the broker, declared once with help text (the CLI is built from them)."""

from __future__ import annotations

from dataclasses import dataclass, field

from paddler.settings import option


@dataclass(frozen=True)
class BrokerSettings:
    agents_addr: str = field(
        default="tcp://127.0.0.1:8070",
        metadata=option("ZeroMQ address the broker binds for agents (ROUTER)."),
    )
    clients_addr: str = field(
        default="tcp://127.0.0.1:8071",
        metadata=option(
            "ZeroMQ address the broker binds for clients (ROUTER): HTTP workers, paddler.client."
        ),
    )
    max_buffered_requests: int = field(
        default=30,
        metadata=option(
            "How many requests may wait for a free slot; beyond it requests fail at once "
            "with 503 'Buffered requests overflow'.",
            minimum=0,
        ),
    )
    buffered_request_timeout: int = field(
        default=10_000,
        metadata=option(
            "Milliseconds a request may wait in the buffer for a free slot before it fails "
            "with 504.",
            minimum=1,
        ),
    )
    inference_item_timeout: int = field(
        default=30_000,
        metadata=option(
            "Milliseconds an agent may go without sending a token for a request before "
            "the request fails with 504.",
            minimum=1,
        ),
    )
    max_continuations: int = field(
        default=2,
        metadata=option(
            "How many times a request whose agent is lost mid-stream may continue on "
            "another agent (from its prompt and the tokens already streamed, invisibly "
            "to its client); past that, or with 0, it fails with 502 AgentLost.",
            minimum=0,
        ),
    )
    state_database: str = field(
        default="memory://",
        metadata=option(
            "Where the desired state and the stored responses of the OpenAI Responses API "
            "are kept: memory:// or the path of an SQLite database file."
        ),
    )
    max_stored_responses: int = field(
        default=1000,
        metadata=option(
            "How many responses of the OpenAI Responses API (store: true) the balancer "
            "keeps in --state-database, for previous_response_id and GET /v1/responses/{id}; "
            "the oldest are forgotten first to make room; 0 keeps none.",
            minimum=0,
        ),
    )
    max_stored_response_bytes: int = field(
        default=1 << 20,
        metadata=option(
            "The largest stored response in bytes, with the conversation it continues; "
            "a larger one is answered but not kept (its 'store' says false).",
            minimum=1024,
        ),
    )
    stored_responses_bytes: int = field(
        default=64 << 20,
        metadata=option(
            "Bytes all stored responses may take together; the oldest are forgotten "
            "first to make room.",
            minimum=1024,
        ),
    )
    heartbeat_interval: int = field(
        default=1000,
        metadata=option(
            "Milliseconds between heartbeats; a peer silent for 3 intervals is dead.",
            minimum=50,
        ),
    )

    dispatch_policy: str = field(
        default="prefix",
        metadata=option(
            "How to pick an agent: 'prefix' (a free slot on the agent whose slots hold "
            "the longest start of the prompt, unless it is 2 requests busier than the "
            "least busy; else as slots), 'slots' (a free slot on the agent with the "
            "fewest requests in flight) or 'round-robin' (the next agent in turn, slots "
            "or not: only for comparison benchmarks; agents queue what they cannot start).",
            choices=("slots", "prefix", "round-robin"),
        ),
    )

    curve_secret_key: str | None = field(
        default=None,
        metadata=option(
            "The broker's CurveZMQ secret key file (NAME.key_secret from 'paddler keys "
            "generate'): encrypts and authenticates both sockets."
        ),
    )
    authorized_agent_keys: str | None = field(
        default=None,
        metadata=option(
            "With curve: a folder of agents' public keys (*.key) allowed on the agent "
            "socket; keys added to it take effect without a restart."
        ),
    )
    authorized_client_keys: str | None = field(
        default=None,
        metadata=option(
            "With curve: a folder of clients' public keys (*.key) allowed on the client "
            "socket (the balancer's own HTTP workers are always allowed)."
        ),
    )
    allow_insecure_network: bool = field(
        default=False,
        metadata=option(
            "Bind a non-loopback address without curve (anyone who reaches it can "
            "register agents and submit requests)."
        ),
    )

    @property
    def buffered_request_timeout_s(self) -> float:
        return self.buffered_request_timeout / 1000.0

    @property
    def inference_item_timeout_s(self) -> float:
        return self.inference_item_timeout / 1000.0

    @property
    def heartbeat_interval_s(self) -> float:
        return self.heartbeat_interval / 1000.0
