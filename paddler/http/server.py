"""Running the HTTP services: gunicorn with ``asgi`` workers, as a child process."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys

from paddler.errors import ConfigurationError
from paddler.http.app import CONFIG_ENV, HttpConfig
from paddler.http.settings import HttpSettings

log = logging.getLogger("paddler.http")

GRACEFUL_TIMEOUT_S = 3


def split_address(address: str, flag: str) -> tuple[str, int]:
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigurationError(flag, f"expected host:port, got {address!r}")
    return host.strip("[]"), int(port)


def http_config(settings: HttpSettings, clients_addr: str) -> HttpConfig:
    apps: dict[str, str] = {}
    for name, address in settings.addresses().items():
        _, port = split_address(address, f"--{name}-addr")
        if str(port) in apps:
            raise ConfigurationError(
                f"--{name}-addr", f"port {port} is already used by the {apps[str(port)]} service"
            )
        apps[str(port)] = name
    cors = {
        "inference": list(settings.inference_cors_allowed_host),
        "openai": list(settings.inference_cors_allowed_host),
        "management": list(settings.management_cors_allowed_host),
    }
    return HttpConfig(clients_addr, apps, settings.max_request_body_bytes, cors)


def gunicorn_command(settings: HttpSettings, log_level: str) -> list[str]:
    command = [
        sys.executable,
        "-m",
        "gunicorn",
        "paddler.http.app:get_app()",
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
    return command


class HttpServer:
    """gunicorn in its own process group; stopped with the balancer."""

    def __init__(self, settings: HttpSettings, clients_addr: str, log_level: str = "info") -> None:
        self.settings = settings
        env = dict(os.environ)
        env[CONFIG_ENV] = http_config(settings, clients_addr).to_env()
        self.process = subprocess.Popen(
            gunicorn_command(settings, log_level if log_level != "info" else "warning"),
            env=env,
            start_new_session=True,
        )
        log.info(
            "HTTP: %s (%d workers)",
            ", ".join(f"{name} on {addr}" for name, addr in settings.addresses().items()),
            settings.http_workers,
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
