"""Running the HTTP services: gunicorn with ``asgi`` workers, as a child process.

API keys reach the workers as digests in ``PADDLER_HTTP_CONFIG``; the key options'
own environment variables are removed from gunicorn's environment. TLS is gunicorn's
``--certfile``/``--keyfile``, for every address it binds.
"""

from __future__ import annotations

import logging
import os
import signal
import ssl
import subprocess
import sys
from dataclasses import fields

from paddler.errors import ConfigurationError
from paddler.http.api_keys import ApiKeys, read_api_keys
from paddler.http.app import CONFIG_ENV, HttpConfig
from paddler.http.settings import HttpSettings
from paddler.lifetime import die_with_parent
from paddler.settings import env_name

log = logging.getLogger("paddler.http")

GRACEFUL_TIMEOUT_S = 3


def split_address(address: str, flag: str) -> tuple[str, int]:
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigurationError(flag, f"expected host:port, got {address!r}")
    return host.strip("[]"), int(port)


def http_config(
    settings: HttpSettings, clients_addr: str, curve_keys: list[str] | None = None
) -> HttpConfig:
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
    return config


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


def gunicorn_env(config: HttpConfig) -> dict[str, str]:
    """This process's environment without the secret settings, plus the HTTP config."""
    secret = {env_name(f.name) for f in fields(HttpSettings) if f.metadata.get("secret")}
    env = {name: value for name, value in os.environ.items() if name not in secret}
    env[CONFIG_ENV] = config.to_env()
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
    ) -> None:
        self.settings = settings
        config = http_config(settings, clients_addr, curve_keys)
        self.process = subprocess.Popen(
            gunicorn_command(settings, log_level if log_level != "info" else "warning"),
            env=gunicorn_env(config),
            start_new_session=True,  # a Ctrl-C reaches the balancer, which stops gunicorn
            preexec_fn=die_with_parent(),  # and a balancer killed with SIGKILL takes it along
        )
        keyed = [name for name in settings.addresses() if config.api_keys.get(name)]
        log.info(
            "HTTP%s: %s (%d workers; API keys required by: %s)",
            "S" if settings.tls_cert else "",
            ", ".join(f"{name} on {addr}" for name, addr in settings.addresses().items()),
            settings.http_workers,
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
