"""A deterministic engine with no model: each step sleeps ``step_ms`` (like a
decode that releases the GIL) and gives every request ``tokens_per_step`` pieces,
after an optional ``first_token_delay_ms`` per request (a slow prefill, or a stall).
Embedding requests get a small made-up vector per document at the next step.

Piece ``i`` of a request is ``"t{i} "`` (token id ``i``); a request ends after
``max_tokens`` pieces with usage counting the whitespace-separated words of its
prompt. A continued request (``continuation``) given ``k`` tokens (``0..k-1`` when
another fake engine generated them) goes on with piece ``k``, as the real engine
goes on from the tokens another agent generated.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from paddler.agent.engine import Engine, EventSink
from paddler.protocol.kinds import CANCELLED_CODE
from paddler.protocol.messages import AgentStatus
from paddler.protocol.requests import continued_tokens, is_embedding_request

PIECES = [f"t{i} " for i in range(4096)]


def _logprobs(index: int, top: int) -> dict[str, Any]:
    """A made-up entry for piece ``index``: it had probability 1/2, and the
    alternatives each half the one before."""

    def entry(text: str, logprob: float) -> dict[str, Any]:
        return {"token": text, "logprob": logprob, "bytes": list(text.encode())}

    piece = PIECES[index % 4096]
    alternatives = [entry(piece, -0.6931)] + [
        entry(f"alt{k} ", -0.6931 * (k + 2)) for k in range(max(0, top - 1))
    ]
    return {**entry(piece, -0.6931), "top_logprobs": alternatives[:top]}


@dataclass(slots=True)
class _Request:
    max_tokens: int
    prompt_tokens: int
    ready_at: float = 0.0
    produced: int = 0
    cancelled: bool = False
    top_logprobs: int = -1
    """-1: no log-probabilities asked."""


class FakeEngine(Engine):
    def __init__(
        self,
        slots_total: int,
        step_ms: float = 5.0,
        tokens_per_step: int = 1,
        first_token_delay_ms: float = 0.0,
        token_ids: bool = True,
    ) -> None:
        self.slots_total = slots_total
        self.first_token_delay_s = first_token_delay_ms / 1000.0
        self.step_s = step_ms / 1000.0
        self.tokens_per_step = tokens_per_step
        self.token_ids = token_ids
        """Send each piece's token id, as the real engine does (``False``: text only)."""
        self.requests: dict[int, _Request] = {}
        self.embeddings: dict[int, dict[str, Any]] = {}
        self.counted: dict[int, int] = {}
        """Requests with ``count_only``: their prompt's word count, ended next step."""
        self.state: dict[str, Any] | None = None

    def apply_state(self, state: dict[str, Any] | None) -> None:
        self.state = state

    def status(self) -> AgentStatus:
        model = (self.state or {}).get("model", "None")
        path = model.get("LocalToAgent") if isinstance(model, dict) else None
        return AgentStatus(
            slots_total=self.slots_total,
            ready=True,
            desired_slots_total=self.slots_total,
            model_path=path or "fake",
            state_application_status="Applied",
        )

    def describe(self, what: str) -> Any:
        if what == "model_metadata":
            return {"metadata": {"general.architecture": "fake", "general.name": "fake engine"}}
        if what == "chat_template_override" and (self.state or {}).get(
            "use_chat_template_override"
        ):
            return (self.state or {}).get("chat_template_override")
        return None

    def admit(self, request_id: int, request: dict[str, Any]) -> None:
        if is_embedding_request(request):
            self.embeddings[request_id] = request
            return
        prompt = request.get("raw_prompt")
        if prompt is None:
            prompt = " ".join(str(m.get("content", "")) for m in request["conversation_history"])
        if request.get("count_only"):
            self.counted[request_id] = len(prompt.split())
            return
        generated = continued_tokens(request)
        self.requests[request_id] = _Request(
            request["max_tokens"],
            len(prompt.split()),
            ready_at=time.monotonic() + self.first_token_delay_s,
            produced=len(generated),
            top_logprobs=request.get("top_logprobs", 0) if request.get("logprobs") else -1,
        )

    def cancel(self, request_id: int) -> None:
        request = self.requests.get(request_id)
        if request is not None:
            request.cancelled = True

    def active_count(self) -> int:
        return len(self.requests) + len(self.embeddings) + len(self.counted)

    def step(self, sink: EventSink) -> None:
        for request_id, embedding in self.embeddings.items():
            for document in embedding["input_batch"]:
                content = document["content"]
                vector = [float(len(content)), float(sum(map(ord, content)) % 97), 1.0, 0.0]
                sink.embedding(
                    request_id,
                    {
                        "Embedding": {
                            "embedding": vector,
                            "normalization_method": embedding["normalization_method"],
                            "pooling_type": "Last",
                            "source_document_id": document["id"],
                        }
                    },
                )
            sink.done(request_id, {"prompt_tokens": len(embedding["input_batch"])})
        self.embeddings.clear()
        for request_id, count in self.counted.items():
            sink.done(request_id, {"prompt_tokens": count, "content_tokens": 0})
        self.counted.clear()
        # cancellations end at once, queued or running
        for request_id in [rid for rid, r in self.requests.items() if r.cancelled]:
            sink.error(request_id, CANCELLED_CODE, "Cancelled", "cancelled by the client")
            del self.requests[request_id]
        sink.flush()
        if self.step_s > 0:
            time.sleep(self.step_s)
        finished = []
        now = time.monotonic()
        # like a real engine: at most ``slots_total`` requests run, the rest wait
        for request_id, request in list(self.requests.items())[: self.slots_total]:
            if now < request.ready_at:
                continue  # still "prefilling"
            start = request.produced
            end = min(request.max_tokens, start + self.tokens_per_step)
            if request.top_logprobs >= 0:
                sink.logprobs(
                    request_id, [_logprobs(i, request.top_logprobs) for i in range(start, end)]
                )
            sink.tokens(
                request_id,
                [PIECES[i % 4096] for i in range(start, end)],
                range(start, end) if self.token_ids else None,
            )
            request.produced = end
            if end >= request.max_tokens:
                sink.done(
                    request_id,
                    {"prompt_tokens": request.prompt_tokens, "content_tokens": request.produced},
                )
                finished.append(request_id)
        for request_id in finished:
            del self.requests[request_id]
