"""Agent engine benchmark: aggregate decode throughput at 1, 4, 8, 16 concurrent requests.

Side by side, on the same ~20M-parameter random-weight model (written by
``paddler.testing.tiny_model``), the same threads and the same batch shapes:

- **bare**: a loop that only calls ``llama_decode`` (prefill of every prompt, then one
  token per sequence per step): the physical limit on this machine;
- **engine**: ``LlamaEngine`` in-process (sampling, text, stop checks, bookkeeping);
- **broker**: a balancer, a ``paddler agent`` process and the ZMQ client library:
  the gain the engine delivers end to end;
- **serial**: llama-cpp-python's ``Llama`` generating the requests one after another,
  which is what its own server offers.

Overhead of the engine = 1 - engine tokens/s / bare tokens/s (target < 5% at 8 and 16).
Usage: ``python -m benchmarks.engine [--quick]``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchmarks.common import RESULTS, machine, summary_ms, write_result

CONCURRENCY = (1, 4, 8, 16)
PRESET = {"n_embd": 512, "n_layer": 6, "n_head": 8, "n_head_kv": 4, "n_ff": 1376}
PROMPT = "the quick brown fox jumps over the lazy dog and then"
TARGET_OVERHEAD = 0.05


def model_path() -> Path:
    from paddler.testing.tiny_model import cache_dir, write_tiny_llama

    path = cache_dir() / "bench-llama-20m.gguf"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        write_tiny_llama(path, **PRESET)
    return path


def threads() -> int:
    return os.cpu_count() or 1


def bare(path: Path, n: int, tokens: int) -> dict[str, Any]:
    import llama_cpp as lc

    from paddler.agent.llama_engine import LlamaModel

    with LlamaModel(path) as model:
        params = lc.llama_context_default_params()
        params.n_ctx = 512 * n
        params.n_batch = 2048
        params.n_ubatch = 512
        params.n_seq_max = n
        params.n_threads = params.n_threads_batch = threads()
        params.kv_unified = False
        params.type_k = params.type_v = 1
        context = lc.llama_init_from_model(model.ptr, params)
        batch = lc.llama_batch_init(2048, 0, 1)
        prompt = model.tokenize(PROMPT, add_special=True)
        try:
            started = time.perf_counter()
            batch.n_tokens = 0
            for seq in range(n):
                for pos, token in enumerate(prompt):
                    i = batch.n_tokens
                    batch.token[i] = token
                    batch.pos[i] = pos
                    batch.n_seq_id[i] = 1
                    batch.seq_id[i][0] = seq
                    batch.logits[i] = pos == len(prompt) - 1
                    batch.n_tokens += 1
            assert lc.llama_decode(context, batch) == 0
            first = time.perf_counter() - started
            for step in range(tokens - 1):
                for seq in range(n):
                    batch.token[seq] = 100 + seq
                    batch.pos[seq] = len(prompt) + step
                    batch.n_seq_id[seq] = 1
                    batch.seq_id[seq][0] = seq
                    batch.logits[seq] = 1
                batch.n_tokens = n
                assert lc.llama_decode(context, batch) == 0
            elapsed = time.perf_counter() - started
        finally:
            lc.llama_batch_free(batch)
            lc.llama_free(context)
    return {"tokens_per_s": round(n * tokens / elapsed, 1), "ttft_ms": round(first * 1000, 2)}


def engine(
    path: Path,
    n: int,
    tokens: int,
    options: dict[str, Any] | None = None,
    asks: Callable[[int], bool] | None = None,
) -> dict[str, Any]:
    """The in-process engine; ``options``: added to every request (e.g. logprobs), or
    only to those ``asks`` says (by index). ``per_request``: each request's tokens/s
    from the start to its end."""
    from paddler.agent.llama_engine import LlamaEngine
    from paddler.protocol.requests import validate_request

    class Sink:
        def __init__(self) -> None:
            self.first: dict[int, float] = {}
            self.count = 0
            self.entries = 0
            self.rates: dict[int, float] = {}

        def tokens(self, request_id: int, pieces: list[str], token_ids: Any = None) -> None:
            self.first.setdefault(request_id, time.perf_counter())

        def logprobs(self, request_id: int, entries: list[dict[str, Any]]) -> None:
            self.entries += len(entries)

        def done(self, request_id: int, usage: dict[str, int], stop_sequence: Any = None) -> None:
            self.count += usage["content_tokens"]
            self.rates[request_id] = usage["content_tokens"] / (time.perf_counter() - started)

        def error(self, request_id: int, code: int, kind: str, description: str) -> None:
            raise RuntimeError(description)

        def flush(self) -> None:
            pass

    llama = LlamaEngine(n, n_threads=threads(), resolver=lambda source, progress: path)
    try:
        llama.apply_state(
            {
                "model": {"LocalToAgent": str(path)},
                "inference_parameters": {
                    "context_size": 512,
                    "temperature": 0.0,
                    "penalty_repeat": 1.0,
                    "penalty_presence": 0.0,
                    "k_cache_dtype": "F16",
                    "v_cache_dtype": "F16",
                },
            }
        )
        sink = Sink()
        started = time.perf_counter()
        for request_id in range(n):
            llama.admit(
                request_id,
                validate_request(
                    {
                        "raw_prompt": PROMPT,
                        "max_tokens": tokens,
                        "temperature": 0.0,
                        **(options or {} if asks is None or asks(request_id) else {}),
                    }
                ),
            )
        while llama.active_count():
            llama.step(sink)
        elapsed = time.perf_counter() - started
    finally:
        llama.close()
    ttfts = [t - started for t in sink.first.values()]
    return {
        "tokens_per_s": round(sink.count / elapsed, 1),
        "ttft_ms": summary_ms(ttfts)["p50_ms"],
        "per_request": sink.rates,
    }


LOGPROBS_ROUNDS = 5
ASKED = {"logprobs": True, "top_logprobs": 5}


def logprobs_cost(path: Path, tokens: int) -> dict[str, Any]:
    """8 concurrent requests in process, none, all and half of them asking for
    log-probabilities (5 alternatives), ``LOGPROBS_ROUNDS`` rounds in rotated orders;
    medians. ``quiet``: the tokens/s of each request that did not ask, when half ask,
    against the same requests when none asks (they share every step with the askers)."""
    n = 8
    runs: dict[str, list[dict[str, Any]]] = {"off": [], "on": [], "mixed": []}
    order = ["off", "on", "mixed"]
    for round_ in range(LOGPROBS_ROUNDS):
        for key in order[round_ % 3 :] + order[: round_ % 3]:
            if key == "off":
                runs[key].append(engine(path, n, tokens))
            elif key == "on":
                runs[key].append(engine(path, n, tokens, ASKED))
            else:
                runs[key].append(engine(path, n, tokens, ASKED, asks=lambda i: i % 2 == 1))

    def quiet(run: dict[str, Any]) -> float:
        rates = [rate for index, rate in run["per_request"].items() if index % 2 == 0]
        return sum(rates) / len(rates)

    def median(values: list[float]) -> float:
        return round(sorted(values)[len(values) // 2], 1)

    return {
        "rounds": LOGPROBS_ROUNDS,
        "off": {"tokens_per_s": median([r["tokens_per_s"] for r in runs["off"]])},
        "on": {"tokens_per_s": median([r["tokens_per_s"] for r in runs["on"]])},
        "mixed": {"tokens_per_s": median([r["tokens_per_s"] for r in runs["mixed"]])},
        "quiet_off_per_request": median([quiet(r) for r in runs["off"]]),
        "quiet_mixed_per_request": median([quiet(r) for r in runs["mixed"]]),
    }


def serial(path: Path, n: int, tokens: int) -> dict[str, Any]:
    import llama_cpp

    llm = llama_cpp.Llama(
        model_path=str(path),
        n_ctx=512,
        n_threads=threads(),
        n_threads_batch=threads(),
        verbose=False,
    )
    try:
        started = time.perf_counter()
        first: list[float] = []
        count = 0
        for _ in range(n):
            llm.reset()
            t0 = time.perf_counter()
            for i, chunk in enumerate(
                llm.create_completion(PROMPT, max_tokens=tokens, temperature=0.0, stream=True)
            ):
                if i == 0:
                    first.append(time.perf_counter() - started)
                count += 1 if chunk["choices"][0]["text"] is not None else 0
            del t0
        elapsed = time.perf_counter() - started
    finally:
        llm.close()
    return {"tokens_per_s": round(n * tokens / elapsed, 1), "ttft_ms": summary_ms(first)["p50_ms"]}


def through_broker(path: Path, n: int, tokens: int, log_dir: Path) -> dict[str, Any]:
    from paddler.client import AsyncClient, Done, Failed, Tokens
    from paddler.testing.cluster import LocalCluster, wait_until

    cluster = LocalCluster(log_dir / f"broker-{n}", max_buffered_requests=100)
    cluster.start_balancer()
    cluster.start_real_agent("bench", slots=n, threads=threads())
    try:
        control = cluster.client(timeout_s=30)
        control.put_desired_state(
            {
                "model": {"LocalToAgent": str(path)},
                "inference_parameters": {
                    "context_size": 512,
                    "temperature": 0.0,
                    "penalty_repeat": 1.0,
                    "penalty_presence": 0.0,
                    "k_cache_dtype": "F16",
                    "v_cache_dtype": "F16",
                },
            }
        )
        wait_until(
            lambda: (a := control.agents()) and a[0]["ready"], timeout_s=60, what="agent ready"
        )
        # the balancer's HTTP workers boot beside it: measure after they are up, not
        # while their imports take a core from the agent
        cluster.wait_for_http()

        async def run() -> tuple[float, list[float], int]:
            async with await AsyncClient.connect(cluster.clients_addr, timeout_s=60) as client:
                started = time.perf_counter()
                firsts: list[float] = []
                total = 0

                async def one() -> None:
                    nonlocal total
                    stream = await client.continue_from_raw_prompt(
                        PROMPT, max_tokens=tokens, temperature=0.0
                    )
                    seen = False
                    async for event in stream:
                        if isinstance(event, Tokens) and not seen:
                            seen = True
                            firsts.append(time.perf_counter() - started)
                        elif isinstance(event, Done):
                            total += event.usage.content_tokens
                        elif isinstance(event, Failed):
                            raise RuntimeError(event)

                await asyncio.gather(*(one() for _ in range(n)))
                return time.perf_counter() - started, firsts, total

        elapsed, firsts, total = asyncio.run(run())
    finally:
        cluster.close()
    return {"tokens_per_s": round(total / elapsed, 1), "ttft_ms": summary_ms(firsts)["p50_ms"]}


def report(result: dict[str, Any]) -> str:
    lines = [
        "## Agent engine",
        "",
        f"Model: {result['model_parameters']} random-weight llama, {result['threads']} threads, "
        f"{result['tokens']} tokens per request.",
        "",
        "| concurrent | bare tok/s | engine tok/s | engine overhead | via broker tok/s "
        "| serial Llama tok/s | engine TTFT p50 | broker TTFT p50 |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in result["rows"]:
        overhead = row["engine_overhead"]
        flag = ""
        if row["concurrency"] in (8, 16):
            flag = " (met)" if overhead < TARGET_OVERHEAD else " (NOT met: target < 5%)"
        lines.append(
            f"| {row['concurrency']} | {row['bare']['tokens_per_s']} | "
            f"{row['engine']['tokens_per_s']} | {overhead:.1%}{flag} | "
            f"{row['broker']['tokens_per_s']} | {row['serial']['tokens_per_s']} | "
            f"{row['engine']['ttft_ms']} ms | {row['broker']['ttft_ms']} ms |"
        )
    logprobs = result.get("logprobs")
    if logprobs:
        cost = 1 - logprobs["on"]["tokens_per_s"] / logprobs["off"]["tokens_per_s"]
        lines += [
            "",
            f"Log-probabilities at 8 concurrent (in process): {logprobs['off']['tokens_per_s']} "
            f"tok/s when no request asks, {logprobs['on']['tokens_per_s']} tok/s when every "
            f"request asks for them with 5 alternatives ({cost:.1%} slower).",
        ]
        if "quiet_mixed_per_request" in logprobs:
            off, mixed = logprobs["quiet_off_per_request"], logprobs["quiet_mixed_per_request"]
            lines[-1] += (
                f" With 4 of the 8 asking, each of the 4 that do not ask made {mixed} tok/s "
                f"against {off} tok/s when none asks ({mixed / off - 1:+.1%}; the "
                "log-softmax runs only for a slot that asked, but on the engine thread, in "
                "the steps every busy slot shares). Medians of "
                f"{logprobs['rounds']} rounds in rotated orders."
            )
    rows = {r["concurrency"]: r for r in result["rows"]}
    if 1 in rows and 8 in rows:
        gain_bare = rows[8]["bare"]["tokens_per_s"] / rows[1]["bare"]["tokens_per_s"]
        gain_broker = rows[8]["broker"]["tokens_per_s"] / rows[1]["broker"]["tokens_per_s"]
        lines += [
            "",
            f"Gain from 1 to 8 concurrent: bare loop {gain_bare:.1f}x, "
            f"end to end through the broker {gain_broker:.1f}x.",
        ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument(
        "--only-logprobs",
        action="store_true",
        help="measure the log-probabilities' cost again, keep the rest of engine.json",
    )
    args = parser.parse_args()
    path = model_path()
    tokens = 32 if args.quick else 96
    if args.only_logprobs:
        kept = json.loads((RESULTS / "engine.json").read_text())
        kept["logprobs"] = logprobs_cost(path, kept["tokens"])
        kept["logprobs_machine"] = machine()
        kept["summary_markdown"] = report(kept)
        write_result("engine", kept)
        print(kept["summary_markdown"])
        return
    rows = []
    with tempfile.TemporaryDirectory(prefix="paddler-bench-") as tmp:
        for n in (1, 8) if args.quick else CONCURRENCY:
            row: dict[str, Any] = {"concurrency": n}
            row["bare"] = bare(path, n, tokens)
            row["engine"] = engine(path, n, tokens)
            row["engine"].pop("per_request")
            row["broker"] = through_broker(path, n, tokens, Path(tmp))
            row["serial"] = serial(path, n, tokens)
            row["engine_overhead"] = round(
                1 - row["engine"]["tokens_per_s"] / row["bare"]["tokens_per_s"], 4
            )
            rows.append(row)
            print(row, flush=True)
    logprobs = logprobs_cost(path, tokens)
    print({"logprobs": logprobs}, flush=True)
    result = {
        "logprobs": logprobs,
        "benchmark": "engine",
        "quick": args.quick,
        "machine": machine(),
        "model_parameters": "18.4M",
        "threads": threads(),
        "tokens": tokens,
        "rows": rows,
    }
    result["summary_markdown"] = report(result)
    path_out = write_result("engine", result)
    print(result["summary_markdown"])
    print(f"written {path_out}")


if __name__ == "__main__":
    main()
