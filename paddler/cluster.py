"""``paddler cluster``: a balancer and N agents on this machine, in one command."""

from __future__ import annotations

import dataclasses
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field, fields
from typing import Any
from urllib.parse import urlparse

from paddler.broker.settings import BrokerSettings
from paddler.curve import PrivateKeys
from paddler.errors import BrokerUnreachable, ConfigurationError, PaddlerError
from paddler.http.admin.config import reachable_address
from paddler.http.settings import CLUSTER_PANEL_ADDR, HttpSettings
from paddler.lifetime import die_with_parent
from paddler.settings import env_name, flag_name, option

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


def _model_host_flags(source: dict[str, Any]) -> list[str]:
    """The host of a ``--model`` URL, allowed on the agents even if it is not public
    (the operator named it)."""
    url = source.get("Url", {}).get("url") if isinstance(source, dict) else None
    host = urlparse(url).hostname if isinstance(url, str) else None
    return ["--allow-model-host", host] if host else []


class ClusterKeys:
    """Fresh CurveZMQ keys for one ``paddler cluster`` run, in a private folder
    removed at exit: the broker's, one per agent (allowed on the agent socket) and
    one for the cluster's own control client (allowed on the client socket)."""

    def __init__(self, agents: int) -> None:
        self.private = PrivateKeys("paddler-cluster-keys-")
        root = self.private.path
        self.broker_secret = self.private.make("broker")
        self.agent_secrets = [
            self.private.make(f"agent-{i + 1}", root / "agents") for i in range(agents)
        ]
        self.client_secret = self.private.make("client", root / "clients")
        self.broker_public = str(root / "broker.key")

    def broker_options(self) -> dict[str, Any]:
        root = self.private.path
        return {
            "curve_secret_key": str(self.broker_secret),
            "authorized_agent_keys": str(root / "agents"),
            "authorized_client_keys": str(root / "clients"),
        }

    def agent_flags(self, index: int) -> list[str]:
        return [
            "--broker-public-key",
            self.broker_public,
            "--curve-secret-key",
            str(self.agent_secrets[index]),
        ]

    def client_keys(self) -> tuple[str, str]:
        """``(broker public key file, control client's secret key file)``."""
        return self.broker_public, str(self.client_secret)

    def close(self) -> None:
        self.private.close()


def with_panel(http: HttpSettings) -> HttpSettings:
    """``paddler cluster`` serves the web admin panel at ``CLUSTER_PANEL_ADDR`` unless
    given another address, or ``off``."""
    if http.web_admin_panel_addr is None:
        return dataclasses.replace(http, web_admin_panel_addr=CLUSTER_PANEL_ADDR)
    return http


def _flags(settings: Any) -> list[str]:
    argv: list[str] = []
    for f in fields(settings):
        value = getattr(settings, f.name)
        if value is None or value is False or f.metadata.get("secret"):
            continue  # secrets go in the environment (_secret_env): ps shows command lines
        flag = flag_name(f.name)
        if value is True:
            argv.append(flag)
            continue
        if isinstance(value, list):
            for item in value:
                argv += [flag, str(item)]
        else:
            argv += [flag, str(value)]
    return argv


def _secret_env(http: HttpSettings) -> dict[str, str]:
    """The balancer's environment: ours, with the API keys (read from their files here,
    so a bad key stops the cluster before anything starts)."""
    from paddler.http.api_keys import read_api_keys

    env = dict(os.environ)
    for f in fields(http):
        if f.metadata.get("secret"):
            keys = read_api_keys(getattr(http, f.name), flag_name(f.name))
            if keys:
                env[env_name(f.name)] = " ".join(keys)  # click splits a list's value on spaces
            else:
                env.pop(env_name(f.name), None)
    return env


def _curve_env(broker: BrokerSettings) -> dict[str, str]:
    """The balancer's key paths also in its environment (the same values as its
    flags): its HTTP workers inherit them, and the web admin panel names the real
    files in its "add an agent" command (``paddler.http.admin.config.AgentKeys``)."""
    names = ("curve_secret_key", "authorized_agent_keys")
    return {env_name(name): value for name in names if (value := getattr(broker, name))}


def refuse_own_keys(broker: BrokerSettings) -> None:
    """``paddler cluster`` makes its own keys for its balancer, agents and control
    client; keys of the operator's would leave its agents outside (they could not
    join), so they are refused."""
    for flag, value in (
        ("--curve-secret-key", broker.curve_secret_key),
        ("--authorized-agent-keys", broker.authorized_agent_keys),
        ("--authorized-client-keys", broker.authorized_client_keys),
    ):
        if value:
            raise ConfigurationError(
                flag,
                "paddler cluster turns CurveZMQ on with fresh keys of its own (its agents "
                "get theirs); to use your own keys, run paddler balancer and paddler agent",
            )


def run_cluster(
    cluster: ClusterSettings, broker: BrokerSettings, http: HttpSettings, log_level: str
) -> int:
    """Run the balancer and the agents until SIGINT/SIGTERM, restarting an agent that
    stops (see ``Child``). When the balancer stops, the agents are stopped and the
    cluster exits with 1: it is the one owner of the cluster's state (desired state,
    requests), so restarting it in place could put back a model an operator has since
    changed; an outer supervisor (systemd, docker) restarts the whole command cleanly,
    as every child dies with this process (``paddler.lifetime``)."""
    refuse_own_keys(broker)
    source, notice = model_source(cluster.model)
    http = with_panel(http)
    if notice:
        print(notice, flush=True)
    threads = cluster.agent_threads or max(1, (os.cpu_count() or 1) // cluster.agents)
    python = [sys.executable, "-m", "paddler"]
    children: list[Child] = []
    stop = threading.Event()
    keys = ClusterKeys(cluster.agents)
    broker = dataclasses.replace(broker, **keys.broker_options())

    def handler(signum: int, frame: object) -> None:
        stop.set()

    signal.signal(signal.SIGINT, handler)
    signal.signal(signal.SIGTERM, handler)
    try:
        balancer = Child(
            "the balancer",
            [*python, "balancer", *_flags(broker), *_flags(http), "--log-level", log_level],
            env={**_secret_env(http), **_curve_env(broker)},
        )
        children.append(balancer)
        balancer.start()
        for index in range(cluster.agents):
            agent = Child(
                f"agent-{index + 1}",
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
                    *keys.agent_flags(index),
                    *_model_host_flags(source),
                ],
            )
            children.append(agent)
            agent.start()
        _apply_model(broker.clients_addr, source, balancer, stop, keys.client_keys())
        if not stop.is_set():
            _announce(http, cluster)
        while not stop.is_set():
            status = balancer.exit_status()
            if status is not None:
                log.error("the balancer stopped (%s); stopping the agents", status)
                return 1
            now = time.monotonic()
            for child in children[1:]:
                child.supervise(now)
            stop.wait(0.2)
        return 0
    finally:
        _stop_all(children)
        keys.close()


RESTART_DELAY_S = 1.0
"""How long a stopped agent waits before its first restart; doubled at each restart."""
MAX_RESTART_DELAY_S = 30.0
HEALTHY_AFTER_S = 60.0
"""An agent that ran this long before it stopped starts over at ``RESTART_DELAY_S``."""


def describe_exit(returncode: int) -> str:
    if returncode < 0:
        try:
            return f"killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"killed by signal {-returncode}"
    return f"exit status {returncode}"


class Child:
    """One process of the cluster: its command line, and its restarts with
    exponential backoff (``RESTART_DELAY_S`` doubling up to ``MAX_RESTART_DELAY_S``).

    Started in a session of its own (a Ctrl-C reaches only ``paddler cluster``, which
    stops its children in order) and with a parent-death signal, so that nothing is
    left when ``paddler cluster`` itself is killed. Start and restart it from the main
    thread only (see ``paddler.lifetime``)."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> None:
        self.name = name
        self.argv = argv
        self.env = env
        self.popen: subprocess.Popen[bytes] | None = None
        self.started_at = 0.0
        self.delay_s = RESTART_DELAY_S
        self.restart_at: float | None = None
        self.restarts = 0

    def start(self) -> None:
        self.popen = subprocess.Popen(
            self.argv, env=self.env, start_new_session=True, preexec_fn=die_with_parent()
        )
        self.started_at = time.monotonic()
        self.restart_at = None

    def exit_status(self) -> str | None:
        """How the process ended, or ``None`` while it runs."""
        code = self.popen.poll() if self.popen is not None else None
        return None if code is None else describe_exit(code)

    def supervise(self, now: float) -> None:
        """Note that the process stopped, and start it again once its delay has passed."""
        if self.restart_at is None:
            status = self.exit_status()
            if status is None:
                return
            ran_s = now - self.started_at
            if ran_s >= HEALTHY_AFTER_S:
                self.delay_s = RESTART_DELAY_S
            log.warning(
                "%s (pid %s) stopped after %.1f s (%s); restarting it in %.0f s",
                self.name,
                self.pid,
                ran_s,
                status,
                self.delay_s,
            )
            self.restart_at = now + self.delay_s
            self.delay_s = min(self.delay_s * 2, MAX_RESTART_DELAY_S)
        elif now >= self.restart_at:
            try:
                self.start()
            except OSError as exc:  # no process: the same backoff, from now
                log.error(
                    "%s could not be restarted (%s); trying again in %.0f s",
                    self.name,
                    exc,
                    self.delay_s,
                )
                self.restart_at = now + self.delay_s
                self.delay_s = min(self.delay_s * 2, MAX_RESTART_DELAY_S)
                return
            self.restarts += 1
            log.warning("%s restarted (pid %s, restart %d)", self.name, self.pid, self.restarts)

    @property
    def pid(self) -> int | None:
        return self.popen.pid if self.popen is not None else None


def _apply_model(
    clients_addr: str,
    source: dict[str, Any],
    balancer: Child,
    stop: threading.Event,
    client_keys: tuple[str, str] | None,
) -> None:
    from paddler.client import Client

    deadline = time.monotonic() + 30
    while not stop.is_set():
        try:
            broker_key, secret_key = client_keys or (None, None)
            with Client(
                clients_addr,
                timeout_s=2,
                broker_public_key=broker_key,
                curve_secret_key=secret_key,
            ) as client:
                state = client.desired_state()
                state["model"] = source
                client.put_desired_state(state)
                return
        except BrokerUnreachable:
            if time.monotonic() > deadline or balancer.exit_status() is not None:
                raise PaddlerError("the balancer did not start") from None


def _announce(http: HttpSettings, cluster: ClusterSettings) -> None:
    inference = http.inference_addr
    scheme = "https" if http.tls_cert else "http"
    key = ' -H "Authorization: Bearer $KEY"' if http.inference_api_key else ""
    print(
        f"\npaddler cluster: {cluster.agents} agents x {cluster.slots} slots\n"
        f"  inference   {scheme}://{inference}\n"
        f"  management  {scheme}://{http.management_addr}\n"
        + (
            f"  OpenAI      {scheme}://{http.compat_openai_addr}/v1\n"
            if http.compat_openai_addr
            else ""
        )
        + (
            f"  admin panel {scheme}://{reachable_address(http.panel_addr, None)}/\n"
            if http.panel_addr
            else ""
        )
        + "Try:\n"
        f"  curl -N{key} {scheme}://{inference}/api/v1/continue_from_conversation_history \\\n"
        '    -d \'{"conversation_history": [{"role": "user", "content": "Hello!"}], '
        '"max_tokens": 32}\'\n',
        flush=True,
    )


def _stop_all(children: list[Child]) -> None:
    processes = [child.popen for child in children if child.popen is not None]
    for process in reversed(processes):  # agents first: they deregister from the balancer
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + STOP_TIMEOUT_S
    for process in processes:
        try:
            process.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=5)
