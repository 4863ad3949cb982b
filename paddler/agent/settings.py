"""Settings of an agent, declared once with help text (the CLI is built from them)."""

from __future__ import annotations

from dataclasses import dataclass, field

from paddler.settings import option


@dataclass(frozen=True)
class AgentSettings:
    broker_addr: str = field(
        default="tcp://127.0.0.1:8070",
        metadata=option("ZeroMQ address of the balancer's agent socket to connect to."),
    )
    slots: int = field(
        default=4,
        metadata=option(
            "How many requests this agent serves at once (llama.cpp sequences).", minimum=1
        ),
    )
    name: str | None = field(
        default=None,
        metadata=option("A name for this agent, shown in the agents list and in responses."),
    )
    threads: int = field(
        default=0,
        metadata=option("CPU threads llama.cpp uses for decoding (0: one per core).", minimum=0),
    )
    shutdown_timeout: int = field(
        default=10_000,
        metadata=option(
            "On SIGTERM, milliseconds to let running requests finish before they are cancelled.",
            minimum=0,
        ),
    )
