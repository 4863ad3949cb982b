"""What each compiled ``_core`` module buys over its pure-Python twin.

Both implementations are loaded in one process (``paddler._core.load``) and timed
side by side on the same inputs, interleaved, best of several repeats:

- ``slots``: a dispatch decision (choose-and-acquire, then release) with 10, 100 and
  1,000 agents;
- ``text``: assembling realistic token pieces (words, punctuation, multi-byte
  characters split across tokens) with 0, 1 and 3 stop strings;
- ``batch``: filling a ``llama_batch`` with a 512-token prompt chunk and 16 decode
  tokens.

A compiled module earns its place when it is clearly faster (>= 1.1x here).
"""

from __future__ import annotations

import argparse
import random
import time
from collections.abc import Callable
from typing import Any

from benchmarks.common import machine, write_result
from paddler._core import load

WORTH_IT = 1.1
"""The speedup below which a compiled module buys nothing worth a build."""


def best_us(call: Callable[[], int], repeats: int) -> float:
    """The best time per operation over ``repeats`` runs (``call`` returns its count)."""
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        count = call()
        best = min(best, (time.perf_counter() - started) / count * 1e6)
    return best


def slots_case(module: Any, agents: int, rounds: int) -> Callable[[], int]:
    registry = module.Registry()
    for i in range(agents):
        registry.add(b"agent-%d" % i, 4, True)
        for _ in range(i % 4):
            registry.acquire(b"agent-%d" % i)

    def run() -> int:
        for _ in range(rounds):
            agent = registry.choose_and_acquire()
            registry.release(agent)
        return rounds

    return run


def token_pieces(count: int) -> list[bytes]:
    """Byte pieces as a tokenizer gives them: words, spaces, punctuation, and
    multi-byte characters that are sometimes split across two tokens."""
    rng = random.Random(7)
    words = ["the", " model", " answered", ",", " quickly", ".", " über", " 東京", " ✓", "\n"]
    pieces: list[bytes] = []
    while len(pieces) < count:
        data = rng.choice(words).encode()
        if len(data) > 2 and rng.random() < 0.2:
            cut = rng.randrange(1, len(data))
            pieces += [data[:cut], data[cut:]]
        else:
            pieces.append(data)
    return pieces[:count]


def text_case(module: Any, stops: list[str], pieces: list[bytes]) -> Callable[[], int]:
    def run() -> int:
        assembler = module.TextAssembler(stops)
        for piece in pieces:
            assembler.push(piece)
        assembler.finish()
        return len(pieces)

    return run


def batch_case(module: Any, batch: Any, capacity: int, rounds: int) -> Callable[[], int]:
    prompt = list(range(1000, 1512))
    builder = module.BatchBuilder(batch, capacity)

    def run() -> int:
        for _ in range(rounds):
            builder.clear()
            builder.add_span(prompt, 0, len(prompt), 0, 0, True)
            for seq in range(16):
                builder.add(7, 600, seq + 1, True)
        return rounds * (len(prompt) + 16)

    return run


def measure(quick: bool) -> list[dict[str, Any]]:
    import llama_cpp

    repeats = 3 if quick else 7
    modules = {
        name: {impl: load(name, impl == "c") for impl in ("c", "py")}
        for name in ("slots", "text", "batch")
    }
    pieces = token_pieces(5_000 if quick else 20_000)
    capacity = 1024
    batch = llama_cpp.llama_batch_init(capacity, 0, 17)
    cases: list[tuple[str, str, Callable[[Any], Callable[[], int]]]] = []
    for agents in (10, 100, 1000):
        rounds = 2_000 if quick else 20_000
        cases.append(
            ("slots", f"dispatch decision, {agents} agents", _bind(slots_case, agents, rounds))
        )
    # stop strings that never occur: every piece is checked against them to the end
    for stops in ([], ["</s>"], ["</s>", "<|im_end|>", "User:"]):
        cases.append(
            ("text", f"token pieces, {len(stops)} stop strings", _bind_text(stops, pieces))
        )
    cases.append(
        (
            "batch",
            "512-token prompt chunk + 16 decode tokens",
            _bind(batch_case, batch, capacity, 50 if quick else 400),
        )
    )
    rows = []
    try:
        for name, case, make in cases:
            runs = {impl: make(modules[name][impl]) for impl in ("c", "py")}
            times = {impl: float("inf") for impl in runs}
            for _ in range(repeats):  # interleaved: both see the same machine
                for impl, run in runs.items():
                    times[impl] = min(times[impl], best_us(run, 1))
            rows.append(
                {
                    "module": name,
                    "case": case,
                    "c_us": round(times["c"], 4),
                    "py_us": round(times["py"], 4),
                    "speedup": round(times["py"] / times["c"], 2),
                }
            )
    finally:
        llama_cpp.llama_batch_free(batch)
    return rows


def _bind(factory: Callable[..., Callable[[], int]], *args: Any) -> Callable[[Any], Any]:
    return lambda module: factory(module, *args)


def _bind_text(stops: list[str], pieces: list[bytes]) -> Callable[[Any], Any]:
    return lambda module: text_case(module, stops, pieces)


def report(result: dict[str, Any]) -> str:
    lines = [
        "## Compiled `_core` against its twins",
        "",
        "| module | case | compiled µs/op | twin µs/op | speedup |",
        "|---|---|---:|---:|---:|",
    ]
    for row in result["rows"]:
        lines.append(
            f"| {row['module']} | {row['case']} | {row['c_us']} | {row['py_us']} | "
            f"{row['speedup']}x |"
        )
    lines.append("")
    for name in ("slots", "text", "batch"):
        best = max(r["speedup"] for r in result["rows"] if r["module"] == name)
        verdict = "earns its build" if best >= WORTH_IT else "buys nothing: drop it"
        lines.append(f"- `{name}`: up to {best}x — {verdict} (threshold {WORTH_IT}x).")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    result = {
        "benchmark": "core",
        "quick": args.quick,
        "machine": machine(),
        "rows": measure(args.quick),
    }
    result["summary_markdown"] = report(result)
    path = write_result("core", result)
    print(result["summary_markdown"])
    print(f"written {path}")


if __name__ == "__main__":
    main()
