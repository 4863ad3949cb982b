"""A harness for tests and benchmarks that run the real thing: a balancer
process, agent processes, real sockets on loopback, free ports.

Every process started is terminated and reaped on ``close()``; every wait is
bounded.
"""

from __future__ import annotations

import contextlib
import http.client
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections import deque
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

from paddler.client import Client

T = TypeVar("T")


RECENT_PORTS = 4096
"""How many of the ports it handed out ``free_port`` remembers, and does not hand out again."""

# Process-wide on purpose: every caller of ``free_port`` (a cluster picks five ports,
# tests pick more for their own servers) must get ports distinct from the others'.
_recent_ports: deque[int] = deque(maxlen=RECENT_PORTS)
_recent_ports_lock = threading.Lock()


def free_port() -> int:
    """A TCP port of 127.0.0.1 that nothing listens on, and that this process was not
    given by an earlier call (of the last ``RECENT_PORTS``).

    The port is only free until someone binds it, and the kernel may well give the
    same port to the next ``bind(0)``: without the memory, two services of one cluster
    sometimes got the same port (about one cluster in two thousand), and the balancer
    exited at once ("port ... is already used") or gunicorn could not bind."""
    with _recent_ports_lock, contextlib.ExitStack() as held:
        while True:
            # a port given before is kept bound while looking on: the next is another
            s = held.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
            if port not in _recent_ports:
                _recent_ports.append(port)
                return port


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


def health_answer(url: str, timeout_s: float) -> tuple[int | None, str]:
    """What ``GET {url}/health`` answers: the status (None without one) and a short
    description (the status and body, or why there was no answer)."""
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=timeout_s) as response:
            status = int(response.status)
            return status, f"{status} {response.read(300).decode(errors='replace')!r}"
    except urllib.error.HTTPError as exc:
        return exc.code, f"{exc.code} {exc.read(300).decode(errors='replace')!r}"
    except urllib.error.URLError as exc:
        return None, f"no answer: {exc.reason}"
    except (OSError, http.client.HTTPException) as exc:  # a timeout; not HTTP on the port
        return None, f"no answer: {type(exc).__name__}: {exc}"


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
        """Until every HTTP service answers ``/health`` with 200. ``TimeoutError`` says
        what ``/health`` last answered; a balancer that exits fails the wait at once,
        with its exit code and the end of its log."""
        for url in (self.inference_url, self.management_url, self.openai_url):
            if url:
                self._wait_for_health(url, timeout_s)

    def _wait_for_health(self, url: str, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        last = "nothing yet"
        while True:
            # /health may wait up to ~3 s for its first check of the broker: give it the time
            status, last = health_answer(url, max(0.1, min(5.0, deadline - time.monotonic())))
            if status == 200:
                return
            balancer = self.balancer
            if balancer is not None and not balancer.alive():
                raise RuntimeError(
                    f"{url}/health: the balancer exited with code {balancer.popen.returncode}"
                    f" (/health last answered: {last}); the end of its log:\n"
                    f"{balancer.log_path.read_text(errors='replace')[-2000:]}"
                )
            if time.monotonic() >= deadline:
                raise TimeoutError(
                    f"not reached within {timeout_s} s: {url}/health answers 200"
                    f" (it last answered: {last})"
                )
            time.sleep(0.05)

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


@contextlib.contextmanager
def real_model_cluster(
    log_dir: Path, model: Path, slots: int = 2, state: dict[str, Any] | None = None, **options: Any
) -> Iterator[LocalCluster]:
    """A balancer (``options``) and one real agent with ``slots``, serving ``model``
    with the rest of the desired state (``state``: inference parameters, a chat
    template override...), ready when this yields; stopped after. If it fails, the
    end of every process log is printed (pytest shows it with the failure)."""
    cluster = LocalCluster(log_dir, **options)
    try:
        cluster.start_balancer()
        cluster.wait_for_http()
        cluster.start_real_agent("llama", slots=slots)
        client = cluster.client()
        client.put_desired_state({"model": {"LocalToAgent": str(model)}, **(state or {})})
        wait_until(
            lambda: (
                len(agents := client.agents()) == 1
                and agents[0]["ready"]
                and agents[0]["model_path"] == str(model)
            ),
            timeout_s=30,
            what="the agent ready with the model",
        )
        yield cluster
    except BaseException:
        print_log_tails(cluster.log_dir)
        raise
    finally:
        cluster.close()


def print_log_tails(log_dir: Path, chars: int = 4000) -> None:
    """The end of every process log in ``log_dir`` (pytest shows it with a failure)."""
    for path in sorted(log_dir.glob("*.log")):
        print(f"----- {path.name}\n{path.read_text(errors='replace')[-chars:]}")
