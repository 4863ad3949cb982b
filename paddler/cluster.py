"""``paddler cluster``: a balancer and N agents on this machine, in one command."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field, fields
from typing import Any

from paddler.broker.settings import BrokerSettings
from paddler.errors import BrokerUnreachable, PaddlerError
from paddler.http.settings import HttpSettings
from paddler.settings import flag_name, option

log = logging.getLogger("paddler.cluster")

STOP_TIMEOUT_S = 4.0


@dataclass(frozen=True)
class ClusterSettings:
    agents: int = field(default=2, metadata=option("How many agents to run.", minimum=1))
    slots: int = field(default=4, metadata=option("Slots of each agent.", minimum=1))
    model: str | None = field(
        default=None,
        metadata=option(
            "A GGUF model: a local path or an http(s) URL. Without it, paddler's tiny "
            "built-in demo model (random weights) is used."
        ),
    )
    agent_threads: int = field(
        default=0,
        metadata=option(
            "CPU threads of each agent (0: the cores shared among the agents).", minimum=0
        ),
    )


def model_source(model: str | None) -> tuple[dict[str, Any], str | None]:
    """The desired state's model for ``--model``, and a notice to print."""
    if model is None:
        from paddler.demo_model import default_model_path

        path = default_model_path()
        return {"LocalToAgent": str(path)}, (
            f"No --model given: using paddler's tiny built-in demo model at {path}. "
            "Its weights are random, so its text is gibberish; pass --model PATH for a real one."
        )
    if model.startswith(("http://", "https://")):
        return {"Url": {"url": model}}, None
    local = os.path.abspath(os.path.expanduser(model))
    if not os.path.isfile(local):
        raise PaddlerError(f"--model: {local} is not a file")
    return {"LocalToAgent": local}, None


def _flags(settings: Any) -> list[str]:
    argv: list[str] = []
    for f in fields(settings):
        value = getattr(settings, f.name)
        if value is None:
            continue
        flag = flag_name(f.name)
        if isinstance(value, list):
            for item in value:
                argv += [flag, str(item)]
        else:
            argv += [flag, str(value)]
    return argv


def run_cluster(
    cluster: ClusterSettings, broker: BrokerSettings, http: HttpSettings, log_level: str
) -> int:
    source, notice = model_source(cluster.model)
    if notice:
        print(notice, flush=True)
    threads = cluster.agent_threads or max(1, (os.cpu_count() or 1) // cluster.agents)
    python = [sys.executable, "-m", "paddler"]
    children: list[subprocess.Popen[bytes]] = []
    stop = threading.Event()

    def handler(signum: int, frame: object) -> None:
        stop.set()

    signal.signal(signal.SIGINT, handler)
    signal.signal(signal.SIGTERM, handler)
    try:
        children.append(
            subprocess.Popen(
                [*python, "balancer", *_flags(broker), *_flags(http), "--log-level", log_level],
                start_new_session=True,
            )
        )
        for index in range(cluster.agents):
            children.append(
                subprocess.Popen(
                    [
                        *python,
                        "agent",
                        "--broker-addr",
                        broker.agents_addr,
                        "--slots",
                        str(cluster.slots),
                        "--name",
                        f"agent-{index + 1}",
                        "--threads",
                        str(threads),
                        "--log-level",
                        log_level,
                    ],
                    start_new_session=True,
                )
            )
        _apply_model(broker.clients_addr, source, children, stop)
        if not stop.is_set():
            _announce(http, cluster)
        while not stop.is_set():
            if any(child.poll() is not None for child in children):
                log.error("a cluster process stopped; stopping the others")
                return 1
            stop.wait(0.2)
        return 0
    finally:
        _stop_all(children)


def _apply_model(
    clients_addr: str, source: dict[str, Any], children: list[Any], stop: threading.Event
) -> None:
    from paddler.client import Client

    deadline = time.monotonic() + 30
    while not stop.is_set():
        try:
            with Client(clients_addr, timeout_s=2) as client:
                state = client.desired_state()
                state["model"] = source
                client.put_desired_state(state)
                return
        except BrokerUnreachable:
            if time.monotonic() > deadline or children[0].poll() is not None:
                raise PaddlerError("the balancer did not start") from None


def _announce(http: HttpSettings, cluster: ClusterSettings) -> None:
    inference = http.inference_addr
    print(
        f"\npaddler cluster: {cluster.agents} agents x {cluster.slots} slots\n"
        f"  inference   http://{inference}\n"
        f"  management  http://{http.management_addr}\n"
        + (
            f"  OpenAI      http://{http.compat_openai_addr}/v1\n"
            if http.compat_openai_addr
            else ""
        )
        + "Try:\n"
        f"  curl -N http://{inference}/api/v1/continue_from_conversation_history \\\n"
        '    -d \'{"conversation_history": [{"role": "user", "content": "Hello!"}], '
        '"max_tokens": 32}\'\n',
        flush=True,
    )


def _stop_all(children: list[subprocess.Popen[bytes]]) -> None:
    for child in reversed(children):  # agents first: they deregister from the balancer
        if child.poll() is None:
            child.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + STOP_TIMEOUT_S
    for child in children:
        try:
            child.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            os.killpg(child.pid, signal.SIGKILL)
            child.wait(timeout=5)
