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
    broker_public_key: str | None = field(
        default=None,
        metadata=option(
            "The balancer's CurveZMQ public key file (its NAME.key): with "
            "--curve-secret-key, the connection is encrypted and authenticated."
        ),
    )
    curve_secret_key: str | None = field(
        default=None,
        metadata=option(
            "This agent's CurveZMQ secret key file (NAME.key_secret from 'paddler keys "
            "generate'); its public key must be in the balancer's --authorized-agent-keys."
        ),
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
    # -- model sources under the operator's control (paddler.agent.source_rules) --
    model_dir: list[str] = field(
        default_factory=list,
        metadata=option(
            "A folder LocalToAgent models must lie in (paths are resolved, symlinks "
            "included, before the check); repeat for more. None given: any file on this "
            "machine can be loaded.",
            multiple=True,
        ),
    )
    allow_model_host: list[str] = field(
        default_factory=list,
        metadata=option(
            "A host models may be downloaded from although its address is loopback, "
            "private, link-local or otherwise not public: a name, an address or a network "
            "(10.0.0.0/8); '*' allows every host. Repeat for more. Public hosts are always "
            "allowed.",
            multiple=True,
        ),
    )
    max_model_bytes: int = field(
        default=0,
        metadata=option(
            "The largest model file downloaded, in bytes; a larger one stops and becomes "
            "an issue (0: no limit).",
            minimum=0,
        ),
    )
    model_stall_timeout: int = field(
        default=60_000,
        metadata=option(
            "Milliseconds within which every 64 KiB of a model download must arrive "
            "(counted over the whole download, not per read); a slower download stops "
            "and becomes an issue.",
            minimum=1,
        ),
    )
