"""Running the HTTP services: gunicorn with ``asgi`` workers, as a child process.

API keys reach the workers as digests in ``PADDLER_HTTP_CONFIG``; the key options'
own environment variables are removed from gunicorn's environment. TLS is gunicorn's
``--certfile``/``--keyfile``, for every address it binds.

Management gets a worker of its own. gunicorn runs ``--http-workers`` workers on every
address; with two or more, the hooks below (this module is also gunicorn's config,
``--config python:paddler.http.server``) make one of them listen only on the management
address and the others only on the inference and OpenAI addresses. A flood of inference
requests then queues in the inference workers' event loops and broker links, never in
front of ``/api/v1/agents`` or ``/metrics``. The split costs no process, so every
process of the balancer is still gunicorn's master or one of its workers, watched and
stopped as before; a worker that dies is replaced in the role it had. With one worker,
it serves all three services (there is nothing to split).

gunicorn reads every module-level name of this module that is one of its settings:
keep ``pre_fork`` and ``post_fork`` the only ones.
"""

from __future__ import annotations

import logging
import os
import signal
import ssl
import subprocess
import sys
from dataclasses import asdict, fields
from typing import TYPE_CHECKING, Any

from paddler.errors import ConfigurationError
from paddler.http.admin.config import AgentKeys, PanelSettings, panel_origins
from paddler.http.api_keys import ApiKeys, read_api_keys
from paddler.http.app import CONFIG_ENV, ROLE_ENV, HttpConfig
from paddler.http.settings import FLAGS, HttpSettings
from paddler.lifetime import die_with_parent
from paddler.settings import env_name

if TYPE_CHECKING:
    from paddler.broker.settings import BrokerSettings

log = logging.getLogger("paddler.http")

GRACEFUL_TIMEOUT_S = 3

MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": str(128 * 1024)}
"""glibc malloc settings of the gunicorn processes (an operator's own value wins; other C
libraries ignore them): a fixed mmap threshold, glibc's default without its dynamic raise.
Once glibc has freed one large mmapped block it raises the threshold and serves such
blocks from the heap, asyncio's 256 KiB socket reads among them (each shrunk to the
bytes read): under mixed load a worker's heap then grew by free holes, its live memory
flat (RSS +11 to 17% per 10 minutes, still growing after 15; fixed: flat after a few
minutes, benchmarks/soak.py). The price: a socket read is an mmap (strace: 2.3 a request
in the soak's mix; about 20 us each alone, some 1% of a worker's CPU per request),
what a fresh worker pays anyway until glibc raises its threshold; side-by-side runs
could not tell the CPU per request apart (-7% to +5%, this machine's noise)."""


def split_address(address: str, flag: str) -> tuple[str, int]:
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigurationError(flag, f"expected host:port, got {address!r}")
    return host.strip("[]"), int(port)


def http_config(
    settings: HttpSettings,
    clients_addr: str,
    curve_keys: list[str] | None = None,
    broker: BrokerSettings | None = None,
) -> HttpConfig:
    """The workers' configuration; ``broker``: the balancer's settings the web admin
    panel shows (its buffer's bounds, the agents address, whether curve is on)."""
    apps: dict[str, str] = {}
    for name, address in settings.addresses().items():
        _, port = split_address(address, FLAGS[name])
        if str(port) in apps:
            raise ConfigurationError(
                FLAGS[name], f"port {port} is already used by the {apps[str(port)]} service"
            )
        apps[str(port)] = name
    # the panel's page calls inference and management from its own origin
    tls = bool(settings.tls_cert)
    panel_addr = settings.panel_addr
    from_panel = panel_origins(panel_addr, tls) if panel_addr else []
    inference_origins = list(dict.fromkeys([*settings.inference_cors_allowed_host, *from_panel]))
    cors = {
        "inference": inference_origins,
        "openai": list(settings.inference_cors_allowed_host),
        "management": list(dict.fromkeys([*settings.management_cors_allowed_host, *from_panel])),
    }
    config = HttpConfig(clients_addr, apps, settings.max_request_body_bytes, cors)
    inference_keys = ApiKeys.of(
        read_api_keys(settings.inference_api_key, "--inference-api-key")
    ).hex()
    config.api_keys = {
        "inference": inference_keys,
        "openai": inference_keys,
        "management": ApiKeys.of(
            read_api_keys(settings.management_api_key, "--management-api-key")
        ).hex(),
    }
    check_tls(settings)
    config.curve_keys = curve_keys
    if panel_addr:
        config.panel = panel_settings(settings, config, broker).to_dict()
    return config


def panel_settings(
    settings: HttpSettings, config: HttpConfig, broker: BrokerSettings | None
) -> PanelSettings:
    """What the web admin panel tells the browser: addresses, whether keys are needed
    (never the keys), the buffer's bounds."""
    facts: dict[str, Any] = {}
    if broker is not None:
        facts = {
            "agents_addr": broker.agents_addr,
            "curve": broker.curve_secret_key is not None,
            "max_buffered_requests": broker.max_buffered_requests,
            "buffered_request_timeout_ms": broker.buffered_request_timeout,
            "inference_item_timeout_ms": broker.inference_item_timeout,
        }
        keys = AgentKeys.of(broker.curve_secret_key, broker.authorized_agent_keys)
        if keys.broker_public_key is not None:  # the real paths for "add an agent"
            facts |= asdict(keys)
    return PanelSettings(
        inference_addr=settings.inference_addr,
        management_addr=settings.management_addr,
        openai_addr=settings.compat_openai_addr,
        panel_addr=settings.panel_addr,
        tls=bool(settings.tls_cert),
        inference_api_key=bool(config.api_keys.get("inference")),
        management_api_key=bool(config.api_keys.get("management")),
        **facts,
    )


def _encrypted_key() -> bytes:
    raise ConfigurationError(
        "--tls-key", "the private key is encrypted; give it unencrypted (mode 0600)"
    )


def check_tls(settings: HttpSettings) -> None:
    """Both ``--tls-cert`` and ``--tls-key`` or neither; readable; a certificate and its key."""
    cert, key = settings.tls_cert, settings.tls_key
    if cert is None and key is None:
        return
    if cert is None or key is None:
        given, missing = ("--tls-cert", "--tls-key") if key is None else ("--tls-key", "--tls-cert")
        raise ConfigurationError(
            missing, f"{given} needs {missing} too: give both for HTTPS, or neither"
        )
    for flag, path in (("--tls-cert", cert), ("--tls-key", key)):
        try:
            with open(path, "rb") as file:
                file.read(1)
        except OSError as exc:
            raise ConfigurationError(flag, f"cannot read {path}: {exc.strerror or exc}") from None
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        context.load_cert_chain(cert, key, password=_encrypted_key)
    except (ssl.SSLError, OSError) as exc:
        raise ConfigurationError(
            "--tls-cert", f"{cert} and {key} are not a PEM certificate and its private key: {exc}"
        ) from None


def gunicorn_command(settings: HttpSettings, log_level: str) -> list[str]:
    command = [
        sys.executable,
        "-m",
        "gunicorn",
        "paddler.http.app:get_app()",
        "--config",
        f"python:{__name__}",  # pre_fork and post_fork: the workers' roles
        "--worker-class",
        "asgi",
        "--workers",
        str(settings.http_workers),
        "--graceful-timeout",
        str(GRACEFUL_TIMEOUT_S),
        "--timeout",
        "30",
        "--keep-alive",
        "5",
        "--log-level",
        log_level,
        "--access-logfile",
        "-" if log_level == "debug" else "/dev/null",
        "--error-logfile",
        "-",
    ]
    for address in settings.addresses().values():
        command += ["--bind", address]
    if settings.tls_cert and settings.tls_key:
        command += ["--certfile", settings.tls_cert, "--keyfile", settings.tls_key]
    return command


def role_of_new_worker(workers: int, roles: list[str]) -> str:
    """The role of a worker about to start, next to running workers of ``roles``:
    ``management`` when no running worker has it (the first one, or the replacement of
    a management worker that died), ``services`` otherwise; ``all`` when one worker
    serves everything."""
    if workers < 2:
        return "all"
    return "services" if "management" in roles else "management"


def pre_fork(arbiter: Any, worker: Any) -> None:
    """gunicorn hook, in the master before it forks a worker: choose the worker's role."""
    roles = [getattr(running, "paddler_role", "") for running in arbiter.WORKERS.values()]
    worker.paddler_role = role_of_new_worker(arbiter.num_workers, roles)


def post_fork(arbiter: Any, worker: Any) -> None:
    """gunicorn hook, in a new worker before it serves: keep only its role's listeners
    and tell ``get_app()`` its role. The listeners it closes are this process's copies:
    they stay open in the master and the other workers."""
    role = getattr(worker, "paddler_role", "all")
    os.environ[ROLE_ENV] = role
    ports = {int(port) for port in HttpConfig.from_env(os.environ[CONFIG_ENV]).apps_of(role)}
    kept = []
    for listener in worker.sockets:
        if listener.sock.getsockname()[1] in ports:
            kept.append(listener)
        else:
            listener.sock.close()
    worker.sockets = kept
    log.debug("worker %d serves %s on ports %s", os.getpid(), role, sorted(ports))


def gunicorn_env(config: HttpConfig) -> dict[str, str]:
    """This process's environment without the secret settings, plus the HTTP config and
    ``MALLOC_ENV``."""
    secret = {env_name(f.name) for f in fields(HttpSettings) if f.metadata.get("secret")}
    env = {name: value for name, value in os.environ.items() if name not in secret}
    env[CONFIG_ENV] = config.to_env()
    for name, value in MALLOC_ENV.items():
        env.setdefault(name, value)
    return env


class HttpServer:
    """gunicorn in its own process group; stopped with the balancer, and killed with it
    (``PR_SET_PDEATHSIG``; its workers follow their master)."""

    def __init__(
        self,
        settings: HttpSettings,
        clients_addr: str,
        log_level: str = "info",
        curve_keys: list[str] | None = None,
        broker: BrokerSettings | None = None,
    ) -> None:
        self.settings = settings
        config = http_config(settings, clients_addr, curve_keys, broker)
        self.process = subprocess.Popen(
            gunicorn_command(settings, log_level if log_level != "info" else "warning"),
            env=gunicorn_env(config),
            start_new_session=True,  # a Ctrl-C reaches the balancer, which stops gunicorn
            preexec_fn=die_with_parent(),  # and a balancer killed with SIGKILL takes it along
        )
        keyed = [name for name in settings.addresses() if config.api_keys.get(name)]
        workers = settings.http_workers
        log.info(
            "HTTP%s: %s (%s; API keys required by: %s)",
            "S" if settings.tls_cert else "",
            ", ".join(f"{name} on {addr}" for name, addr in settings.addresses().items()),
            f"1 worker for management, {workers - 1} for the others"
            if workers > 1
            else "1 worker for every service",
            ", ".join(keyed) or "none",
        )

    def alive(self) -> bool:
        return self.process.poll() is None

    def stop(self, timeout_s: float = 4.0) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout=5)
