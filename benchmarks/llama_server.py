"""paddler against llama.cpp's own server (llama-server), side by side in one run.

llama-server is built once from the llama.cpp sources vendored in the sdist of the
llama-cpp-python version installed here (the llama.cpp our agents run), with CMake
(``cmake`` beside this Python, e.g. from PyPI, else on ``PATH``), and cached under the
benchmark cache (``$PADDLER_CACHE_DIR`` or ``~/.cache/paddler``, where the benchmark
model lives). If it cannot be built, the benchmark records why and measures paddler
alone.

Same model (the ~20M benchmark model, which never stops before ``max_tokens``), same
llama.cpp threads, same KV cache (F16, 512 cells per slot, one sequence per slot),
greedy sampling, 64 output tokens per request, closed loops of 1, 4, 8 and 16
concurrent clients (8 slots on both servers; 16 where 16 are concurrent):

- (a) non-streaming: paddler's OpenAI ``/v1/completions`` against llama-server's
  ``/completion``: aggregate tokens/s and request latency;
- (b) streaming: paddler's NDJSON (``/api/v1/continue_from_raw_prompt``) and OpenAI SSE
  against llama-server's SSE: tokens/s and time to first token;
- (c) in process: paddler's engine and the bare ``llama_decode`` loop
  (``benchmarks.engine``), so each loss shows where it happens;
- the thread split (the agent's llama.cpp threads 1 or 2 beside the balancer, and
  OpenMP's passive wait) and one 8-slot agent against two 4-slot agents, at 8 concurrent.

The client is plain ``http.client`` in threads, one keep-alive connection per client,
light enough for two cores. Usage: ``python -m benchmarks.llama_server [--quick]``.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import http.client
import importlib.metadata
import json
import os
import select
import shutil
import signal
import statistics
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from benchmarks.common import machine, percentile, write_result
from benchmarks.engine import PROMPT, bare, model_path, threads
from benchmarks.engine import engine as in_process
from paddler.testing.cluster import free_port, wait_until

TOKENS = 64
CONCURRENCY = (1, 4, 8, 16)
SLOTS = 8
CONTEXT_PER_SLOT = 512
INFERENCE_PARAMETERS = {
    "context_size": CONTEXT_PER_SLOT,
    "k_cache_dtype": "F16",
    "v_cache_dtype": "F16",
    "temperature": 0.0,
    "penalty_repeat": 1.0,
    "penalty_presence": 0.0,
}
"""paddler's desired state: llama-server's KV cache and no penalties (its defaults)."""

STREAMING = {"ndjson", "openai_sse", "completion_sse"}
"""Modes: paddler's openai, ndjson and openai_sse; llama-server's completion and
completion_sse."""


# --------------------------------------------------------------------------- build


def llama_cpp_version() -> str:
    return importlib.metadata.version("llama_cpp_python")


def build_root() -> Path:
    from paddler.testing.tiny_model import cache_dir

    return cache_dir() / f"llama-server-{llama_cpp_version()}"


def cmake_program() -> str | None:
    beside = Path(sys.executable).with_name("cmake")
    return str(beside) if beside.exists() else shutil.which("cmake")


@dataclass
class Build:
    binary: Path | None
    note: str
    """How the binary was had ("cached", "built in N s"), or why there is none."""
    version: str = ""


class BuildFailed(Exception):
    pass


def _runs(binary: Path) -> str | None:
    """``llama-server --version``'s first line, or None if it does not run."""
    if not binary.exists():
        return None
    try:
        done = subprocess.run(
            [str(binary), "--version"], capture_output=True, text=True, timeout=30, check=False
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    text = (done.stdout + done.stderr).strip()
    line = next((line for line in text.splitlines() if "version" in line), text[:200])
    return line.removeprefix("version:").strip() or None


def _step(argv: list[str], log: IO[str], cwd: Path | None = None) -> None:
    log.write(f"\n$ {' '.join(argv)}\n")
    log.flush()
    code = subprocess.run(argv, stdout=log, stderr=subprocess.STDOUT, cwd=cwd, check=False)
    if code.returncode != 0:
        raise BuildFailed(f"{Path(argv[0]).name} {argv[1]} ... exited with {code.returncode}")


def _sdist(root: Path, version: str, log: IO[str]) -> Path:
    found = sorted(root.glob(f"llama[_-]cpp[_-]python-{version}.tar.gz"))
    if not found:
        _step(
            [
                sys.executable,
                "-m",
                "pip",
                "download",
                f"llama-cpp-python=={version}",
                "--no-deps",
                "--no-binary",
                ":all:",
                "--dest",
                str(root),
            ],
            log,
        )
        found = sorted(root.glob(f"llama[_-]cpp[_-]python-{version}.tar.gz"))
    if not found:
        raise BuildFailed(f"pip download left no llama-cpp-python {version} sdist in {root}")
    return found[0]


def _unpack(archive: Path, into: Path) -> Path:
    """Only ``vendor/llama.cpp`` of the sdist; returns that folder."""
    shutil.rmtree(into, ignore_errors=True)
    into.mkdir(parents=True)
    with tarfile.open(archive) as tar:
        members = [m for m in tar.getmembers() if "/vendor/llama.cpp/" in m.name + "/"]
        tar.extractall(into, members=members, filter="data")
    found = sorted(into.glob("*/vendor/llama.cpp/CMakeLists.txt"))
    if not found:
        raise BuildFailed(f"{archive.name} has no vendor/llama.cpp/CMakeLists.txt")
    return found[0].parent


def build_llama_server(log: Callable[[str], None] = print) -> Build:
    """The cached llama-server, built first if it is not there (once: a lock file keeps
    two runs from building at the same time). Never raises for a failed build."""
    version = llama_cpp_version()
    root = build_root()
    binary = root / "llama-server"
    said = _runs(binary)
    if said:
        return Build(binary, "cached", said)
    cmake = cmake_program()
    if cmake is None:
        return Build(None, "no cmake (pip install cmake, or apt-get install cmake)")
    root.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    with open(root / "build.lock", "w") as lock, open(root / "build.log", "a") as out:
        fcntl.flock(lock, fcntl.LOCK_EX)
        said = _runs(binary)
        if said:  # another run built it while this one waited
            return Build(binary, "cached", said)
        log(f"building llama-server from llama-cpp-python {version}'s sdist (log: {out.name})")
        try:
            source = _unpack(_sdist(root, version, out), root / "src")
            build = root / "build"
            shutil.rmtree(build, ignore_errors=True)
            _step(
                [
                    cmake,
                    "-S",
                    str(source),
                    "-B",
                    str(build),
                    "-DCMAKE_BUILD_TYPE=Release",
                    "-DBUILD_SHARED_LIBS=OFF",
                    "-DGGML_NATIVE=ON",
                    "-DLLAMA_BUILD_SERVER=ON",
                    "-DLLAMA_BUILD_TESTS=OFF",
                    "-DLLAMA_BUILD_EXAMPLES=OFF",
                    "-DLLAMA_CURL=OFF",
                    "-DLLAMA_OPENSSL=OFF",
                    "-DLLAMA_BUILD_UI=OFF",
                    "-DLLAMA_USE_PREBUILT_UI=OFF",
                ],
                out,
            )
            jobs = str(os.cpu_count() or 1)
            _step([cmake, "--build", str(build), "--target", "llama-server", "-j", jobs], out)
            shutil.copy2(build / "bin" / "llama-server", binary)
        except (BuildFailed, OSError, tarfile.TarError) as exc:
            out.flush()
            tail = (root / "build.log").read_text(errors="replace").splitlines()[-12:]
            return Build(None, f"build failed: {exc}; end of {out.name}: " + " | ".join(tail))
        finally:
            # the binary is static: the sources and objects (hundreds of MB) can go
            shutil.rmtree(root / "src", ignore_errors=True)
            shutil.rmtree(root / "build", ignore_errors=True)
        said = _runs(binary)
        if not said:
            return Build(None, f"the built {binary} does not run")
        for archive in root.glob("*.tar.gz"):
            archive.unlink()
        return Build(binary, f"built in {time.monotonic() - started:.0f} s", said)


# --------------------------------------------------------------------------- servers


def _cpu_ticks(pid: int) -> int:
    """User + system clock ticks of a process, threads included (0 once it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0
    return int(fields[11]) + int(fields[12])


def _descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(parent, []).append(int(entry.name))
    out, todo = [], [pid]
    while todo:
        current = todo.pop()
        out.append(current)
        todo += children.get(current, [])
    return out


def _role(pid: int) -> str:
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return "gone"
    words = [a.decode(errors="replace") for a in argv]
    if "paddler" in words[:4]:  # python -m paddler <command> ...
        index = words.index("paddler") + 1
        return f"paddler {words[index]}" if index < len(words) else "paddler"
    if any("gunicorn" in w for w in words[:4]):
        return "gunicorn (HTTP)"
    return Path(words[0]).name or "other"


class Server:
    """A server process (and its children) on loopback, stopped by ``close``."""

    name = ""

    def __init__(self, argv: list[str], log_path: Path, env: dict[str, str] | None = None) -> None:
        self.log_path = log_path
        self._log = open(log_path, "ab")  # noqa: SIM115 - closed in close()
        self.popen = subprocess.Popen(
            argv, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True, env=env
        )
        LIVE.append(self)

    def check(self) -> None:
        if self.popen.poll() is not None:
            tail = self.log_path.read_text(errors="replace")[-1500:]
            raise RuntimeError(f"{self.name} exited ({self.popen.returncode}): {tail}")

    def cpu_by_role(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for pid in _descendants(self.popen.pid):
            role = _role(pid)
            out[role] = out.get(role, 0) + _cpu_ticks(pid)
        return out

    def close(self) -> None:
        if self in LIVE:
            LIVE.remove(self)
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(15)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.popen.pid, signal.SIGKILL)
                self.popen.wait(5)
        self._log.close()

    def request(self, mode: str) -> tuple[str, str, bytes]:
        """(host:port, path, body) of one request in ``mode``."""
        raise NotImplementedError


def _get_json(url: str, timeout_s: float = 2.0) -> Any:
    import urllib.request

    with urllib.request.urlopen(url, timeout=timeout_s) as response:
        return json.loads(response.read())


def _put_json(url: str, body: Any) -> None:
    import urllib.request

    request = urllib.request.Request(
        url,
        data=json.dumps(body).encode(),
        method="PUT",
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        response.read()


class LlamaServer(Server):
    name = "llama-server"

    def __init__(self, binary: Path, slots: int, n_threads: int, log_dir: Path) -> None:
        self.address = f"127.0.0.1:{free_port()}"
        host, port = self.address.split(":")
        self.argv = [
            str(binary),
            "--model",
            str(model_path()),
            "--host",
            host,
            "--port",
            port,
            "--parallel",
            str(slots),
            "--ctx-size",
            str(CONTEXT_PER_SLOT * slots),
            "--threads",
            str(n_threads),
            "--threads-batch",
            str(n_threads),
            "--cache-type-k",
            "f16",
            "--cache-type-v",
            "f16",
            "--no-webui",
        ]
        super().__init__(self.argv, log_dir / f"llama-server-{slots}-{n_threads}.log")

        def healthy() -> bool:
            self.check()
            try:
                return bool(_get_json(f"http://{self.address}/health").get("status") == "ok")
            except OSError:
                return False

        try:
            wait_until(healthy, timeout_s=60, interval_s=0.1, what="llama-server healthy")
        except BaseException:
            self.close()
            raise

    def request(self, mode: str) -> tuple[str, str, bytes]:
        body = {
            "prompt": PROMPT,
            "n_predict": TOKENS,
            "temperature": 0.0,
            "stream": mode == "completion_sse",
        }
        return self.address, "/completion", json.dumps(body).encode()


class PaddlerCluster(Server):
    """``paddler cluster`` with the benchmark model, on free loopback ports."""

    name = "paddler"

    def __init__(
        self,
        agents: int,
        slots: int,
        agent_threads: int,
        log_dir: Path,
        env: dict[str, str] | None = None,
        label: str = "",
    ) -> None:
        self.inference = f"127.0.0.1:{free_port()}"
        self.management = f"127.0.0.1:{free_port()}"
        self.openai = f"127.0.0.1:{free_port()}"
        self.argv = [
            sys.executable,
            "-m",
            "paddler",
            "cluster",
            "--agents",
            str(agents),
            "--slots",
            str(slots),
            "--agent-threads",
            str(agent_threads),
            "--model",
            str(model_path()),
            "--agents-addr",
            f"tcp://127.0.0.1:{free_port()}",
            "--clients-addr",
            f"tcp://127.0.0.1:{free_port()}",
            "--inference-addr",
            self.inference,
            "--management-addr",
            self.management,
            "--compat-openai-addr",
            self.openai,
            "--web-admin-panel-addr",
            "off",
            "--max-buffered-requests",
            "100",
            "--log-level",
            "warning",
        ]
        name = label or f"paddler-{agents}x{slots}-t{agent_threads}"
        super().__init__(self.argv, log_dir / f"{name}.log", env={**os.environ, **(env or {})})
        try:
            self._configure(agents)
        except BaseException:
            self.close()
            raise

    def _configure(self, agents: int) -> None:
        management = f"http://{self.management}"

        def state() -> dict[str, Any] | None:
            self.check()
            try:
                current = _get_json(f"{management}/api/v1/balancer_desired_state")
            except OSError:
                return None
            return current if current.get("model", {}).get("LocalToAgent") else None

        desired = wait_until(state, timeout_s=90, interval_s=0.1, what="the cluster's model set")
        desired["inference_parameters"].update(INFERENCE_PARAMETERS)
        _put_json(f"{management}/api/v1/balancer_desired_state", desired)

        def ready() -> bool:
            self.check()
            try:
                listed = _get_json(f"{management}/api/v1/agents")["agents"]
            except OSError:
                return False
            return len(listed) == agents and all(
                a["state_application_status"] == "Applied" and a["slots_total"] > 0 for a in listed
            )

        wait_until(ready, timeout_s=90, interval_s=0.1, what=f"{agents} agents applied the state")

        def small_context() -> bool:
            # "Applied" may still be the first state's: the new one is in force once a
            # prompt longer than a slot is refused for a slot of 512 cells (not 8192)
            self.check()
            host, port = self.inference.split(":")
            connection = http.client.HTTPConnection(host, int(port), timeout=30)
            body = {"raw_prompt": "word " * (2 * CONTEXT_PER_SLOT), "max_tokens": 1}
            try:
                connection.request("POST", "/api/v1/continue_from_raw_prompt", json.dumps(body))
                answer = connection.getresponse().read()
                return f"a slot holds {CONTEXT_PER_SLOT} ".encode() in answer
            except OSError:
                return False
            finally:
                connection.close()

        for _ in range(3 * agents):  # the balancer picks the agent: ask a few times
            wait_until(small_context, timeout_s=60, interval_s=0.2, what="the benchmark state")
        wait_until(
            lambda: _healthy(self.inference) and _healthy(self.openai),
            timeout_s=60,
            interval_s=0.1,
            what="HTTP services up",
        )

    def request(self, mode: str) -> tuple[str, str, bytes]:
        if mode == "ndjson":
            body: dict[str, Any] = {"raw_prompt": PROMPT, "max_tokens": TOKENS, "temperature": 0}
            return self.inference, "/api/v1/continue_from_raw_prompt", json.dumps(body).encode()
        body = {"model": "bench", "prompt": PROMPT, "max_tokens": TOKENS, "temperature": 0}
        if mode == "openai_sse":
            body.update(stream=True, stream_options={"include_usage": True})
        return self.openai, "/v1/completions", json.dumps(body).encode()


def _healthy(address: str) -> bool:
    import urllib.request

    try:
        with urllib.request.urlopen(f"http://{address}/health", timeout=2) as response:
            return bool(response.status == 200)
    except OSError:
        return False


# --------------------------------------------------------------------------- client


@dataclass
class Outcome:
    tokens: int
    first_s: float
    """Time to the first token (streaming) or to the whole answer."""
    total_s: float


def _read_answer(mode: str, response: http.client.HTTPResponse, sent: float) -> Outcome:
    """Reads one answer to its end; the tokens it says it generated."""
    if mode not in STREAMING:
        data = json.loads(response.read())
        now = time.perf_counter()
        if mode == "completion":
            tokens = int(data["tokens_predicted"])
        else:
            tokens = int(data["usage"]["completion_tokens"])
        return Outcome(tokens, now - sent, now - sent)
    first = 0.0
    tokens = 0
    buffer = b""
    while True:
        chunk = response.read1(65536)
        if not chunk:
            break
        if not first:
            first = time.perf_counter() - sent
        buffer += chunk
        *lines, buffer = buffer.split(b"\n")
        for line in lines:
            tokens = _count(mode, line, tokens)
    tokens = _count(mode, buffer, tokens)
    return Outcome(tokens, first, time.perf_counter() - sent)


def _count(mode: str, line: bytes, tokens: int) -> int:
    """``tokens`` after one line of a stream: the final usage where a stream has one."""
    if mode == "ndjson":
        if b'"Done"' in line:
            return int(json.loads(line)["Response"]["response"]["GeneratedToken"]["Done"]["usage"]
                       ["content_tokens"])  # fmt: skip
        if b'"Error"' in line or b'"error"' in line:
            raise RuntimeError(line.decode(errors="replace"))
        return tokens
    if not line.startswith(b"data: ") or line == b"data: [DONE]":
        return tokens
    if mode == "completion_sse":
        data = json.loads(line[6:])
        return int(data["tokens_predicted"]) if data.get("stop") else tokens
    if b'"usage"' in line:
        usage = json.loads(line[6:]).get("usage")
        return int(usage["completion_tokens"]) if usage else tokens
    if b'"error"' in line:
        raise RuntimeError(line.decode(errors="replace"))
    return tokens


def _send(
    connection: http.client.HTTPConnection, path: str, body: bytes, headers: dict[str, str]
) -> tuple[float, http.client.HTTPResponse]:
    """POSTs on a kept-alive connection, or on a new one where the server closed it, as
    curl and urllib3 do (llama-server closes its connection after a stream, a moment
    after the last chunk: a request sent in that moment is sent again)."""
    for attempt in (1, 2):
        if connection.sock is not None and select.select([connection.sock], [], [], 0)[0]:
            connection.close()
        reused = connection.sock is not None
        sent = time.perf_counter()
        try:
            connection.request("POST", path, body, headers)
            return sent, connection.getresponse()
        except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError):
            connection.close()
            if not reused or attempt == 2:
                raise
    raise AssertionError("unreachable")


# The machine may be shared (tests of other work, builds): a run during which other
# processes took more than FOREIGN_LIMIT cores is run again (at most ATTEMPTS times,
# after waiting up to QUIET_WAIT_S for the machine to calm down); the quietest attempt
# is kept, and the report says how many runs were noisy.
FOREIGN_LIMIT = 0.2
ATTEMPTS = 3
QUIET_WAIT_S = 60.0
LIVE: list[Server] = []
"""The servers running now: their CPU is ours, not foreign."""


@dataclass
class Noise:
    waited_s: float = 0.0
    repeated: int = 0
    noisy: int = 0


NOISE = Noise()


def _busy_ticks() -> int:
    """Clock ticks every CPU of the machine spent busy since boot."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return sum(fields[:8]) - fields[3] - fields[4]  # without idle and iowait


def _our_ticks() -> int:
    pids = {os.getpid()}
    for server in LIVE:
        pids.update(_descendants(server.popen.pid))
    return sum(_cpu_ticks(pid) for pid in pids)


def _foreign(busy: int, ours: int, seconds: float) -> float:
    """Cores other processes used since ``(busy, ours)`` were read ``seconds`` ago."""
    spent = (_busy_ticks() - busy) - (_our_ticks() - ours)
    return max(0.0, spent / os.sysconf("SC_CLK_TCK") / seconds)


def wait_quiet() -> None:
    """Until other processes use at most ``FOREIGN_LIMIT`` cores (half-second looks),
    or ``QUIET_WAIT_S`` has passed."""
    started = time.monotonic()
    while time.monotonic() - started < QUIET_WAIT_S:
        busy, ours = _busy_ticks(), _our_ticks()
        time.sleep(0.5)
        if _foreign(busy, ours, 0.5) <= FOREIGN_LIMIT:
            break
    NOISE.waited_s += time.monotonic() - started


def closed_loop(server: Server, mode: str, clients: int, duration_s: float) -> dict[str, Any]:
    """``clients`` threads, each with one keep-alive connection, sending requests back to
    back until ``duration_s`` has passed; the requests running then are finished. Like
    curl and urllib3, a client reconnects when the server has closed its connection."""
    address, path, body = server.request(mode)
    host, port = address.split(":")
    headers = {"Content-Type": "application/json"}
    outcomes: list[Outcome] = []
    failures: list[str] = []
    lock = threading.Lock()
    start = threading.Barrier(clients + 1)
    deadline = [0.0]

    def client() -> None:
        connection = http.client.HTTPConnection(host, int(port), timeout=120)
        mine: list[Outcome] = []
        try:
            start.wait()
            while time.perf_counter() < deadline[0]:
                sent, response = _send(connection, path, body, headers)
                if response.status != 200:
                    raise RuntimeError(f"{response.status} {response.read()[:300]!r}")
                mine.append(_read_answer(mode, response, sent))
        except Exception as exc:  # reported with the row: one failure fails the row
            with lock:
                failures.append(f"{type(exc).__name__}: {exc}")
        finally:
            connection.close()
            with lock:
                outcomes.extend(mine)

    workers = [threading.Thread(target=client, daemon=True) for _ in range(clients)]
    for worker in workers:
        worker.start()
    before = server.cpu_by_role()
    busy, ours = _busy_ticks(), _our_ticks()
    client_before = time.process_time()
    started = time.perf_counter()
    deadline[0] = started + duration_s
    start.wait()
    for worker in workers:
        worker.join(180)
    elapsed = time.perf_counter() - started
    client_cpu = time.process_time() - client_before
    after = server.cpu_by_role()
    foreign = _foreign(busy, ours, elapsed)
    if failures:
        raise RuntimeError(f"{server.name} {mode} at {clients}: {failures[0]}")
    ticks = os.sysconf("SC_CLK_TCK")
    cores = {
        role: round((after.get(role, 0) - before.get(role, 0)) / ticks / elapsed, 2)
        for role in sorted(set(after) | set(before))
    }
    cores["client (this process)"] = round(client_cpu / elapsed, 2)
    tokens = sum(o.tokens for o in outcomes)
    short = sum(1 for o in outcomes if o.tokens != TOKENS)
    first = [o.first_s * 1000 for o in outcomes]
    return {
        "requests": len(outcomes),
        "tokens": tokens,
        "short_answers": short,
        "seconds": round(elapsed, 3),
        "tokens_per_s": round(tokens / elapsed, 1),
        "first_p50_ms": round(percentile(first, 50), 2),
        "first_p99_ms": round(percentile(first, 99), 2),
        "cores": cores,
        "foreign_cores": round(foreign, 2),
    }


def guarded(server: Server, mode: str, clients: int, duration_s: float) -> dict[str, Any]:
    """``closed_loop`` on a quiet machine, run again when other processes took CPU."""
    best: dict[str, Any] | None = None
    for _ in range(ATTEMPTS):
        wait_quiet()
        row = closed_loop(server, mode, clients, duration_s)
        if row["foreign_cores"] <= FOREIGN_LIMIT:
            return row
        NOISE.repeated += 1
        if best is None or row["foreign_cores"] < best["foreign_cores"]:
            best = row
    assert best is not None
    NOISE.noisy += 1
    return {**best, "noisy": True}


def median_of(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The run of median tokens/s (its CPU use with it), the median latencies, and
    every run's tokens/s."""
    ordered = sorted(runs, key=lambda r: r["tokens_per_s"])
    out = dict(ordered[len(ordered) // 2])
    out["runs_tokens_per_s"] = [r["tokens_per_s"] for r in runs]
    out["runs_first_p50_ms"] = [r["first_p50_ms"] for r in runs]
    out["first_p50_ms"] = round(statistics.median(r["first_p50_ms"] for r in runs), 2)
    out["first_p99_ms"] = round(statistics.median(r["first_p99_ms"] for r in runs), 2)
    out["noisy_runs"] = sum(1 for r in runs if r.get("noisy"))
    return out


@dataclass
class Plan:
    concurrency: tuple[int, ...]
    duration_s: float
    repeats: int
    warmup_s: float
    split: bool = True
    settle_s: float = 1.0
    """A closed loop at the level and mode just before each measured one, not kept:
    the first run after a change of concurrency was up to a third slower on a cluster
    (964 then 1,353 tok/s at 8 right after runs at 1 and 4; cause not found), and
    every 8-concurrent run of a repeat comes right after the 4-concurrent ones."""


Rows = dict[str, dict[str, dict[str, dict[str, Any]]]]
"""{server name: {mode: {str(clients): median row}}}"""


def measure(pairs: list[tuple[Server, str]], plan: Plan, levels: tuple[int, ...]) -> Rows:
    """Every (server, mode) at every level, ``plan.repeats`` times; they take turns
    within each repeat, so a slow moment of the machine is shared between them, in
    the reverse order every other repeat, so that neither is always the first after
    a change of level or the one measured as the machine drifts one way."""
    for server, mode in pairs:
        closed_loop(server, mode, max(levels), plan.warmup_s)
    runs: dict[str, dict[str, dict[str, list[dict[str, Any]]]]] = {}
    for repeat in range(plan.repeats):
        for n in levels:
            for server, mode in pairs if repeat % 2 == 0 else pairs[::-1]:
                closed_loop(server, mode, n, plan.settle_s)
                row = guarded(server, mode, n, plan.duration_s)
                runs.setdefault(server.name, {}).setdefault(mode, {}).setdefault(str(n), [])
                runs[server.name][mode][str(n)].append(row)
                print(
                    f"  {server.name} {mode} x{n}: {row['tokens_per_s']} tok/s, "
                    f"first p50 {row['first_p50_ms']} ms, others {row['foreign_cores']} cores",
                    flush=True,
                )
    return {
        name: {
            mode: {n: median_of(rows) for n, rows in by_n.items()} for mode, by_n in modes.items()
        }
        for name, modes in runs.items()
    }


# --------------------------------------------------------------------------- runs


def served(build: Build, plan: Plan, log_dir: Path) -> Rows:
    """(a) and (b): both servers up together, taking turns at every concurrency; 8
    slots, 16 for 16 concurrent."""
    n_threads = threads()
    out: Rows = {"paddler": {}, "llama-server": {}}
    groups = [(SLOTS, tuple(n for n in plan.concurrency if n <= SLOTS))]
    if any(n > SLOTS for n in plan.concurrency):
        groups.append((16, tuple(n for n in plan.concurrency if n > SLOTS)))
    for slots, levels in groups:
        servers: list[Server] = []
        try:
            pairs: list[tuple[Server, str]] = []
            if build.binary is not None:
                print(f"llama-server -np {slots} -t {n_threads}", flush=True)
                llama = LlamaServer(build.binary, slots, n_threads, log_dir)
                servers.append(llama)
                pairs += [(llama, "completion"), (llama, "completion_sse")]
            print(
                f"paddler cluster --agents 1 --slots {slots} --agent-threads {n_threads}",
                flush=True,
            )
            cluster = PaddlerCluster(1, slots, n_threads, log_dir)
            servers.append(cluster)
            pairs[1:1] = [(cluster, "openai")]  # each paddler mode next to its llama twin
            pairs += [(cluster, "ndjson"), (cluster, "openai_sse")]
            for name, modes in measure(pairs, plan, levels).items():
                for mode, rows in modes.items():
                    out[name].setdefault(mode, {}).update(rows)
        finally:
            for server in servers:
                server.close()
    return out


def in_process_rows(plan: Plan) -> dict[str, Any]:
    """(c): the engine in this process and the bare decode loop, median of the repeats."""
    path = model_path()
    bare(path, 1, 8)  # a first context pays for the first touches of the model's pages
    out: dict[str, Any] = {"engine": {}, "bare": {}}
    for n in plan.concurrency:
        for name, function in (("engine", in_process), ("bare", bare)):
            runs = []
            for _ in range(plan.repeats):
                wait_quiet()
                runs.append(function(path, n, TOKENS))
            rates = [r["tokens_per_s"] for r in runs]
            out[name][str(n)] = {
                "tokens_per_s": statistics.median(rates),
                "runs_tokens_per_s": rates,
                "first_p50_ms": statistics.median(float(r["ttft_ms"]) for r in runs),
            }
        print(
            f"  in process x{n}: engine {out['engine'][str(n)]['tokens_per_s']}, "
            f"bare {out['bare'][str(n)]['tokens_per_s']} tok/s",
            flush=True,
        )
    return out


def _threads(n: int) -> str:
    return f"{n} thread" + ("" if n == 1 else "s")


def splits() -> list[tuple[str, int, int, int, dict[str, str]]]:
    """(label, agents, slots, threads of each agent, environment) of the thread split:
    first ``paddler cluster``'s default for one agent here (every core), then one thread
    fewer, OpenMP's passive wait, and two agents of 4 slots with half the cores each."""
    n = threads()
    half = max(1, n // 2)
    out: list[tuple[str, int, int, int, dict[str, str]]] = [
        (f"1 agent x 8 slots, {_threads(n)} (the default here)", 1, 8, n, {})
    ]
    if n > 1:
        out.append((f"1 agent x 8 slots, {_threads(n - 1)}", 1, 8, n - 1, {}))
    passive = {"OMP_WAIT_POLICY": "passive"}
    out.append((f"1 agent x 8 slots, {_threads(n)}, OMP_WAIT_POLICY=passive", 1, 8, n, passive))
    out.append((f"2 agents x 4 slots, {_threads(half)} each (the default)", 2, 4, half, {}))
    return out


def thread_split(build: Build, plan: Plan, log_dir: Path) -> dict[str, Any]:
    """Items 3-4 of issue 14: non-streaming OpenAI at 8 concurrent per configuration,
    and llama-server with 2 and 1 threads for reference; every configuration is up at
    once (idle, each costs nothing) and they take turns, like the servers above."""
    clients = 8
    servers: list[Server] = []
    pairs: list[tuple[Server, str]] = []
    try:
        for label, agents, slots, agent_threads, env in splits():
            print(f"split: {label}", flush=True)
            name = f"paddler-{agents}x{slots}-t{agent_threads}" + ("-passive" if env else "")
            cluster = PaddlerCluster(agents, slots, agent_threads, log_dir, env=env, label=name)
            cluster.name = label  # the key of its rows
            servers.append(cluster)
            pairs.append((cluster, "openai"))
        if build.binary is not None:
            for n_threads in sorted({threads(), 1}, reverse=True):
                print(f"split: llama-server -np {SLOTS} -t {n_threads}", flush=True)
                llama = LlamaServer(build.binary, SLOTS, n_threads, log_dir)
                llama.name = f"llama-server -np {SLOTS} -t {n_threads}"
                servers.append(llama)
                pairs.append((llama, "completion"))
        measured = measure(pairs, plan, (clients,))
    finally:
        for server in servers:
            server.close()
    rows = [
        {
            "server": "llama-server" if isinstance(server, LlamaServer) else "paddler",
            "label": server.name,
            **measured[server.name][mode][str(clients)],
        }
        for server, mode in pairs
    ]
    return {"clients": clients, "rows": rows}


def _bare_in_processes(shape: list[tuple[int, int]]) -> list[float]:
    """The bare loop in one process per ``(sequences, threads)`` of ``shape``, all
    started at the same moment: tokens/s of each."""
    start = time.time() + 3.0  # every process has loaded the model by then
    code = (
        "import json, sys, time\n"
        "from benchmarks import engine\n"
        "n, t, at = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])\n"
        "engine.threads = lambda: t\n"
        "path = engine.model_path()\n"
        "time.sleep(max(0.0, at - time.time()))\n"
        f"print(json.dumps(engine.bare(path, n, {TOKENS * 2})))\n"
    )
    root = str(Path(__file__).resolve().parent.parent)
    children = [
        subprocess.Popen(
            [sys.executable, "-c", code, str(n), str(t), str(start)],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            cwd=root,
            text=True,
        )
        for n, t in shape
    ]
    out = []
    for child in children:
        answer, _ = child.communicate(timeout=300)
        if child.returncode != 0:
            raise RuntimeError(f"a bare loop process failed ({child.returncode})")
        out.append(float(json.loads(answer.strip().splitlines()[-1])["tokens_per_s"]))
    return out


def bare_split(plan: Plan) -> dict[str, Any]:
    """Item 4's yardstick: what splitting the box costs llama.cpp itself. The bare
    loop with 8 sequences and every thread in one process, against two processes of
    4 sequences with half the threads each running at once; they take turns,
    ``plan.repeats`` times."""
    n = threads()
    half = max(1, n // 2)
    one: list[float] = []
    two: list[float] = []
    for _ in range(plan.repeats):
        wait_quiet()
        one.append(_bare_in_processes([(SLOTS, n)])[0])
        wait_quiet()
        two.append(sum(_bare_in_processes([(SLOTS // 2, half), (SLOTS // 2, half)])))
    ratios = [b / a for a, b in zip(one, two, strict=True)]
    print(f"  bare loop split: 1x{SLOTS} {one}, 2x{SLOTS // 2} {two}", flush=True)
    return {
        "one": {"label": f"1 process x {SLOTS} sequences, {_threads(n)}", "runs": one},
        "two": {
            "label": f"2 processes x {SLOTS // 2} sequences, {_threads(half)} each",
            "runs": two,
        },
        "ratio": round(statistics.median(ratios), 2),
        "ratios": [round(r, 2) for r in ratios],
    }


# --------------------------------------------------------------------------- report


def _ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:.2f}" if a and b else "n/a"


def paired(a: dict[str, Any] | None, b: dict[str, Any] | None, key: str = "tokens_per_s") -> str:
    """``a`` / ``b`` as the median of the ratios of their runs repeat by repeat (each
    pair measured a few seconds apart, so a slow minute of the machine cancels out);
    the ratio of the medians when the runs are not paired."""
    if not a or not b:
        return "n/a"
    runs_a, runs_b = a.get(f"runs_{key}"), b.get(f"runs_{key}")
    if runs_a and runs_b and len(runs_a) == len(runs_b) and all(runs_b):
        return f"{statistics.median(x / y for x, y in zip(runs_a, runs_b, strict=True)):.2f}"
    return _ratio(a.get(key), b.get(key))


def report(result: dict[str, Any]) -> str:
    build = result["build"]
    served_rows = result["served"]
    paddler, llama = served_rows["paddler"], served_rows["llama-server"]
    inproc = result["in_process"]
    levels = [str(n) for n in result["plan"]["concurrency"]]
    lines = [
        "## Against llama-server",
        "",
        f"llama-server: {build['version'] or 'not available'} ({build['note']}), built from the "
        f"llama.cpp vendored in llama-cpp-python {result['llama_cpp_python']}. Both servers: "
        f"the {result['model']} benchmark model, `-t {result['threads']}`, F16 KV cache of "
        f"{CONTEXT_PER_SLOT} cells per slot, greedy, {TOKENS} tokens per request; 8 slots "
        "(16 for 16 concurrent). paddler: `paddler cluster --agents 1` with its default HTTP "
        f"workers. Closed loops of {result['plan']['duration_s']:g} s, median of "
        f"{result['plan']['repeats']}; client: `http.client` in threads, one keep-alive "
        "connection each.",
        "",
        "Aggregate tokens/s, median of the runs (ratio paddler / llama-server: the median "
        "of the repeats' ratios, each pair measured seconds apart):",
        "",
        "| concurrent | llama-server /completion | paddler OpenAI | ratio "
        "| llama-server SSE | paddler NDJSON | ratio | paddler OpenAI SSE | ratio "
        "| engine in process | bare llama_decode |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]

    def row_of(table: dict[str, Any], mode: str, n: str) -> dict[str, Any] | None:
        row: dict[str, Any] | None = table.get(mode, {}).get(n)
        return row

    def tps(table: dict[str, Any], mode: str, n: str) -> float | None:
        row = table.get(mode, {}).get(n)
        return float(row["tokens_per_s"]) if row else None

    def ms(table: dict[str, Any], mode: str, n: str, key: str) -> float | None:
        row = table.get(mode, {}).get(n)
        return float(row[key]) if row else None

    def show(value: float | None, digits: int = 0) -> str:
        return "n/a" if value is None else f"{value:,.{digits}f}"

    def mark(table: dict[str, Any], mode: str, n: str) -> str:
        """``*`` when a run of the cell had other processes on the CPU (see below)."""
        row = table.get(mode, {}).get(n)
        return "*" if row and row.get("noisy_runs") else ""

    for n in levels:
        ls, lsse = tps(llama, "completion", n), tps(llama, "completion_sse", n)
        po, pn, ps = (
            tps(paddler, "openai", n),
            tps(paddler, "ndjson", n),
            tps(paddler, "openai_sse", n),
        )
        engine_tps = inproc["engine"][n]["tokens_per_s"]
        bare_tps = inproc["bare"][n]["tokens_per_s"]
        lines.append(
            f"| {n} | {show(ls)}{mark(llama, 'completion', n)} "
            f"| {show(po)}{mark(paddler, 'openai', n)} "
            f"| {paired(row_of(paddler, 'openai', n), row_of(llama, 'completion', n))} "
            f"| {show(lsse)}{mark(llama, 'completion_sse', n)} "
            f"| {show(pn)}{mark(paddler, 'ndjson', n)} "
            f"| {paired(row_of(paddler, 'ndjson', n), row_of(llama, 'completion_sse', n))} "
            f"| {show(ps)}{mark(paddler, 'openai_sse', n)} "
            f"| {paired(row_of(paddler, 'openai_sse', n), row_of(llama, 'completion_sse', n))} "
            f"| {show(engine_tps)} | {show(bare_tps)} |"
        )
    lines += [
        "",
        "Time to first token (streaming) p50 / p99 ms, and latency of a whole non-streaming "
        "request p50 / p99 ms:",
        "",
        "| concurrent | llama-server SSE TTFT | paddler NDJSON TTFT | ratio p50 "
        "| paddler OpenAI SSE TTFT | ratio p50 | llama-server /completion latency "
        "| paddler OpenAI latency | ratio p50 |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for n in levels:
        cells = []
        for table, mode in (
            (llama, "completion_sse"),
            (paddler, "ndjson"),
            (paddler, "openai_sse"),
            (llama, "completion"),
            (paddler, "openai"),
        ):
            p50, p99 = ms(table, mode, n, "first_p50_ms"), ms(table, mode, n, "first_p99_ms")
            cells.append(f"{show(p50, 1)} / {show(p99, 1)}{mark(table, mode, n)}")
        sse, completion = row_of(llama, "completion_sse", n), row_of(llama, "completion", n)

        def first(row: dict[str, Any] | None, base: dict[str, Any] | None) -> str:
            return paired(row, base, "first_p50_ms")

        lines.append(
            f"| {n} | {cells[0]} | {cells[1]} | {first(row_of(paddler, 'ndjson', n), sse)} | "
            f"{cells[2]} | {first(row_of(paddler, 'openai_sse', n), sse)} | {cells[3]} | "
            f"{cells[4]} | {first(row_of(paddler, 'openai', n), completion)} |"
        )
    eight = "8" if "8" in levels else levels[-1]
    row = paddler.get("openai", {}).get(eight)
    lrow = llama.get("completion", {}).get(eight)
    bare_8 = inproc["bare"][eight]["tokens_per_s"]
    steps = [
        ("bare llama_decode loop", bare_8),
        ("engine in process", inproc["engine"][eight]["tokens_per_s"]),
        ("paddler OpenAI non-streaming", tps(paddler, "openai", eight)),
        ("paddler NDJSON", tps(paddler, "ndjson", eight)),
        ("llama-server /completion", tps(llama, "completion", eight)),
    ]
    lines += [
        "",
        f"Where the tokens go at {eight} concurrent, as a share of the bare loop: "
        + ", ".join(f"{name} {_ratio(value, bare_8)}" for name, value in steps if value)
        + ". (In process: one wave of requests started together; served: closed loops.)",
    ]
    if row:
        cores = ", ".join(f"{k} {v}" for k, v in row["cores"].items() if v)
        lines += ["", f"CPU cores busy at {eight} concurrent, non-streaming: paddler: {cores}"]
        if lrow:
            lines[-1] += "; llama-server: " + ", ".join(
                f"{k} {v}" for k, v in lrow["cores"].items() if v
            )
        lines[-1] += "."
    split = result.get("split")
    if split:
        base = next((r for r in split["rows"] if r["server"] == "llama-server"), None)
        lines += [
            "",
            f"Threads and agents, non-streaming OpenAI at {split['clients']} concurrent "
            "(llama-server `/completion` for reference):",
            "",
            "| configuration | tok/s (runs) | ratio to paddler's default | ratio to "
            "llama-server -t 2 | latency p50 / p99 ms |",
            "|---|---:|---:|---:|---:|",
        ]
        default = split["rows"][0]  # what paddler cluster picks for one agent here
        for r in split["rows"]:
            ratio = paired(r, base)
            noisy = "*" if r.get("noisy_runs") else ""
            runs = ", ".join(f"{v:,.0f}" for v in r.get("runs_tokens_per_s", []))
            lines.append(
                f"| {r['label']} | {r['tokens_per_s']:,.0f}{noisy} ({runs}) | "
                f"{paired(r, default)} | {ratio} | "
                f"{r['first_p50_ms']:.1f} / {r['first_p99_ms']:.1f} |"
            )
    bare_rows = split.get("bare") if split else None
    if bare_rows:
        one, two = bare_rows["one"], bare_rows["two"]
        lines += [
            "",
            f"What the split costs llama.cpp itself: the bare `llama_decode` loop "
            f"({2 * TOKENS} tokens per sequence), {one['label']}: "
            + ", ".join(f"{v:,.0f}" for v in one["runs"])
            + f" tok/s; {two['label']}, at once: "
            + ", ".join(f"{v:,.0f}" for v in two["runs"])
            + f" tok/s together; ratio {bare_rows['ratio']:.2f} (runs "
            + ", ".join(f"{v:.2f}" for v in bare_rows["ratios"])
            + ").",
        ]
    short = sum(
        row["short_answers"]
        for table in (paddler, llama)
        for by_n in table.values()
        for row in by_n.values()
    )
    if short:
        lines += ["", f"Answers with fewer than {TOKENS} tokens: {short} (counted as they were)."]
    noise = result.get("noise")
    if noise:
        lines += [
            "",
            f"Other processes on the machine: {noise['runs_repeated']} runs were run again "
            f"because they took more than {noise['foreign_limit_cores']} cores during them "
            f"({noise['runs_noisy']} stayed noisy after {ATTEMPTS} attempts and are kept: "
            "their cells are marked *); "
            f"{noise['waited_s']:.0f} s spent waiting for a quiet machine.",
        ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    # stopped (bench.sh interrupted): the servers are stopped on the way out
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    if args.quick:
        plan = Plan((1, 8), duration_s=1.5, repeats=1, warmup_s=0.5, split=False, settle_s=0.5)
    else:
        plan = Plan(CONCURRENCY, duration_s=3.0, repeats=5, warmup_s=1.0)
    model_path()
    build = build_llama_server()
    print(f"llama-server: {build.note} {build.version}", flush=True)
    with tempfile.TemporaryDirectory(prefix="paddler-bench-") as tmp:
        log_dir = Path(tmp)
        served_rows = served(build, plan, log_dir)
        split = thread_split(build, plan, log_dir) if plan.split else None
    if split is not None:
        split["bare"] = bare_split(plan)
    print("in process", flush=True)
    inproc = in_process_rows(plan)
    result: dict[str, Any] = {
        "benchmark": "llama_server",
        "quick": args.quick,
        "machine": machine(),
        "llama_cpp_python": llama_cpp_version(),
        "build": {
            "note": build.note,
            "version": build.version,
            "binary": str(build.binary) if build.binary else None,
        },
        "model": "18.4M",
        "threads": threads(),
        "tokens": TOKENS,
        "plan": {
            "concurrency": list(plan.concurrency),
            "duration_s": plan.duration_s,
            "repeats": plan.repeats,
        },
        "served": served_rows,
        "in_process": inproc,
        "split": split,
        "noise": {
            "foreign_limit_cores": FOREIGN_LIMIT,
            "waited_s": round(NOISE.waited_s, 1),
            "runs_repeated": NOISE.repeated,
            "runs_noisy": NOISE.noisy,
        },
    }
    result["summary_markdown"] = report(result)
    path = write_result("llama_server", result)
    print(result["summary_markdown"])
    print(f"written {path}")


if __name__ == "__main__":
    main()
