"""The shared load generator of the benchmarks.

Open loop: requests arrive as a Poisson process at a fixed rate (exponential gaps
from a seeded generator), whatever the system answers, so queueing shows up as
latency instead of being hidden by a client that waits. Each request's prompt and
output lengths come from a skewed mix: many short requests, some long ones.
Clients record, per request: time to first token, every inter-token gap, end to
end time, tokens, and the error kind if it failed.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from benchmarks.common import summary_ms
from paddler.client import AsyncClient, Failed, Tokens

WORDS = (
    "the", "quick", "brown", "fox", "jumps", "over", "the", "lazy", "dog", "while", "people",
    "watch", "and", "a", "cat", "sleeps", "in", "the", "warm", "sun", "near", "the", "old",
    "house",
)  # fmt: skip


@dataclass(frozen=True)
class RequestShape:
    prompt_words: int
    max_tokens: int


def request_mix(count: int, seed: int, long_fraction: float = 0.1) -> list[RequestShape]:
    """Many short requests and a few long ones; prompt lengths log-normal."""
    rng = random.Random(seed)
    shapes = []
    for _ in range(count):
        prompt = max(1, min(400, int(rng.lognormvariate(3.0, 0.8))))
        if rng.random() < long_fraction:
            output = rng.randint(150, 300)
        else:
            output = max(4, min(64, int(rng.lognormvariate(2.7, 0.5))))
        shapes.append(RequestShape(prompt, output))
    return shapes


def prompt_text(words: int, index: int) -> str:
    return " ".join(WORDS[(index + i) % len(WORDS)] for i in range(words))


def mean_output_tokens(shapes: list[RequestShape]) -> float:
    return sum(s.max_tokens for s in shapes) / max(len(shapes), 1)


@dataclass
class Outcome:
    ttft_s: float | None = None
    gaps_s: list[float] = field(default_factory=list)
    e2e_s: float | None = None
    tokens: int = 0
    error: str | None = None


async def one_request(client: AsyncClient, shape: RequestShape, index: int) -> Outcome:
    outcome = Outcome()
    started = time.perf_counter()
    last = started
    stream = await client.continue_from_raw_prompt(
        prompt_text(shape.prompt_words, index), max_tokens=shape.max_tokens, temperature=0.0
    )
    async for event in stream:
        if isinstance(event, Tokens):
            now = time.perf_counter()
            if outcome.ttft_s is None:
                outcome.ttft_s = now - started
            else:
                outcome.gaps_s.append(now - last)
            last = now
            outcome.tokens += len(event.pieces)
        elif isinstance(event, Failed):
            outcome.error = f"{event.code} {event.kind}"
    outcome.e2e_s = time.perf_counter() - started
    return outcome


async def open_loop(
    address: str, rate_per_s: float, duration_s: float, shapes: list[RequestShape], seed: int
) -> dict[str, Any]:
    """Send Poisson arrivals at ``rate_per_s`` for ``duration_s``; wait for all to end."""
    rng = random.Random(seed + 1)
    outcomes: list[Outcome] = []
    async with await AsyncClient.connect(address, timeout_s=60) as client:
        tasks = []
        started = time.perf_counter()
        next_at = started
        index = 0
        while next_at - started < duration_s:
            delay = next_at - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            shape = shapes[index % len(shapes)]
            tasks.append(asyncio.ensure_future(one_request(client, shape, index)))
            index += 1
            next_at += rng.expovariate(rate_per_s)
        outcomes = list(await asyncio.gather(*tasks))
        elapsed = time.perf_counter() - started
    return summarize(outcomes, elapsed, rate_per_s)


def summarize(outcomes: list[Outcome], elapsed_s: float, rate_per_s: float) -> dict[str, Any]:
    ok = [o for o in outcomes if o.error is None]
    errors = Counter(o.error for o in outcomes if o.error is not None)
    gaps = [g for o in ok for g in o.gaps_s]
    return {
        "offered_rate_per_s": rate_per_s,
        "requests": len(outcomes),
        "completed": len(ok),
        "errors": dict(errors),
        "output_tokens_per_s": round(sum(o.tokens for o in ok) / elapsed_s, 1),
        "ttft": summary_ms([o.ttft_s for o in ok if o.ttft_s is not None]),
        "itl": summary_ms(gaps),
        "e2e": summary_ms([o.e2e_s for o in ok if o.e2e_s is not None]),
        "elapsed_s": round(elapsed_s, 2),
    }
