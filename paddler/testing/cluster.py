"""A harness for tests and benchmarks that run the real thing: a balancer
process, agent processes, real sockets on loopback, free ports.

Every process started is terminated and reaped on ``close()``; every wait is
bounded.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

from paddler.client import Client

T = TypeVar("T")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_until(
    predicate: Callable[[], T | None],
    timeout_s: float = 10.0,
    interval_s: float = 0.02,
    what: str = "",
) -> T:
    """Poll ``predicate`` until it returns a truthy value; ``TimeoutError`` after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    last: Any = None
    while time.monotonic() < deadline:
        last = predicate()
        if last:
            return last  # type: ignore[no-any-return]
        time.sleep(interval_s)
    raise TimeoutError(f"not reached within {timeout_s} s: {what or predicate} (last: {last!r})")


class Process:
    def __init__(self, name: str, argv: list[str], log_dir: Path, env: dict[str, str]) -> None:
        self.name = name
        self.argv = argv
        self.log_path = log_dir / f"{name}.log"
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        self.popen = subprocess.Popen(
            argv, stdout=self._log, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def signal(self, signum: int) -> None:
        if self.alive():
            self.popen.send_signal(signum)

    def wait(self, timeout_s: float) -> int:
        return self.popen.wait(timeout=timeout_s)

    def stop(self, timeout_s: float = 5.0) -> int | None:
        if self.alive():
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(timeout=5)
        self._log.close()
        return self.popen.returncode

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")


class LocalCluster:
    """A balancer and fake-engine agents on this machine, for tests and benchmarks."""

    def __init__(self, log_dir: Path, **balancer_options: Any) -> None:
        self.log_dir = log_dir
        log_dir.mkdir(parents=True, exist_ok=True)
        self.agents_addr = f"tcp://127.0.0.1:{free_port()}"
        self.clients_addr = f"tcp://127.0.0.1:{free_port()}"
        for name in ("inference_addr", "management_addr"):
            balancer_options.setdefault(name, f"127.0.0.1:{free_port()}")
        balancer_options.setdefault("http_workers", 1)
        self.balancer_options = balancer_options
        self.inference_url = f"http://{balancer_options['inference_addr']}"
        self.management_url = f"http://{balancer_options['management_addr']}"
        openai = balancer_options.get("compat_openai_addr")
        self.openai_url = f"http://{openai}" if openai else None
        self.balancer: Process | None = None
        self.agents: dict[str, Process] = {}
        self.env = dict(os.environ)
        self.env.setdefault("PYTHONUNBUFFERED", "1")
        self._clients: list[Client] = []

    def start_balancer(self, name: str = "balancer") -> Process:
        argv = [
            sys.executable,
            "-m",
            "paddler",
            "balancer",
            "--agents-addr",
            self.agents_addr,
            "--clients-addr",
            self.clients_addr,
        ]
        for key, value in self.balancer_options.items():
            argv += ["--" + key.replace("_", "-"), str(value)]
        self.balancer = Process(name, argv, self.log_dir, self.env)
        return self.balancer

    def start_agent(
        self,
        name: str,
        slots: int = 2,
        step_ms: float = 5.0,
        tokens_per_step: int = 1,
        identity: str | None = None,
        **options: Any,
    ) -> Process:
        argv = [
            sys.executable,
            "-m",
            "paddler.testing.fake_agent",
            "--broker-addr",
            self.agents_addr,
            "--slots",
            str(slots),
            "--name",
            name,
            "--step-ms",
            str(step_ms),
            "--tokens-per-step",
            str(tokens_per_step),
        ]
        if identity:
            argv += ["--identity", identity]
        for key, value in options.items():
            argv += ["--" + key.replace("_", "-"), str(value)]
        process = Process(name, argv, self.log_dir, self.env)
        self.agents[name] = process
        return process

    def start_real_agent(
        self, name: str, slots: int = 2, threads: int = 1, **options: Any
    ) -> Process:
        """``paddler agent``: the real llama.cpp engine (the model comes with the desired state).

        Test agents download from local servers: they are started with
        ``--allow-model-host 127.0.0.1`` unless ``allow_model_host`` says otherwise (a list
        repeats the flag; ``None`` or an empty list leaves it out). An option whose value
        is a list is repeated the same way."""
        options.setdefault("allow_model_host", "127.0.0.1")
        argv = [
            sys.executable,
            "-m",
            "paddler",
            "agent",
            "--broker-addr",
            self.agents_addr,
            "--slots",
            str(slots),
            "--name",
            name,
            "--threads",
            str(threads),
        ]
        for key, value in options.items():
            for each in value if isinstance(value, list | tuple) else [value]:
                if each is not None:
                    argv += ["--" + key.replace("_", "-"), str(each)]
        process = Process(name, argv, self.log_dir, self.env)
        self.agents[name] = process
        return process

    def client(self, timeout_s: float = 10.0, **options: Any) -> Client:
        """A client of the balancer (``options``: the curve key files, if any)."""
        client = Client(self.clients_addr, timeout_s=timeout_s, **options)
        self._clients.append(client)
        return client

    def wait_for_agents(self, client: Client, count: int, timeout_s: float = 15.0) -> list[Any]:
        def registered() -> list[Any] | None:
            agents = client.agents()
            return agents if len(agents) == count else None

        return wait_until(registered, timeout_s, what=f"{count} agents registered")

    def wait_for_http(self, timeout_s: float = 20.0) -> None:
        """Until every HTTP service answers ``/health``."""
        import urllib.error
        import urllib.request

        def healthy(url: str) -> bool:
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=1) as response:
                    return bool(response.status == 200)
            except (urllib.error.URLError, OSError):
                return False

        for url in (self.inference_url, self.management_url, self.openai_url):
            if url:
                wait_until(partial(healthy, url), timeout_s, 0.05, f"{url}/health")

    def close(self) -> None:
        for client in self._clients:
            client.close()
        for process in self.agents.values():
            process.stop()
        if self.balancer is not None:
            self.balancer.stop()

    def __enter__(self) -> LocalCluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
