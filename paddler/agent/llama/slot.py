"""A slot: one sequence id of the shared context, the request it serves, and the
tokens its KV cells hold (kept after the request ends, for the next one to reuse)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from paddler._core import TextAssembler
from paddler.agent.llama.native import SamplerChain


def shared_prefix(a: list[int], b: list[int]) -> int:
    """How many tokens ``a`` and ``b`` share from the start (slice comparisons run
    in C: a binary search over them beats a Python loop over tokens)."""
    n = min(len(a), len(b))
    if a[:n] == b[:n]:
        return n
    low, high = 0, n - 1  # a[:high + 1] differs
    while low < high:
        middle = (low + high + 1) // 2
        if a[:middle] == b[:middle]:
            low = middle
        else:
            high = middle - 1
    return low


_NO_MARKERS: dict[int, bytes] = {}


@dataclass
class Slot:
    seq_id: int
    request_id: int = -1
    prompt: list[int] = field(default_factory=list)
    """What the slot prefills: the request's prompt."""
    replay: list[int] = field(default_factory=list)
    """A continued request: the tokens another agent generated, not decoded here yet
    (last first). They are decoded one a step, as they were generated, not prefilled
    as a prompt: llama.cpp's results differ in the last bits with the shape of the
    batch, and a greedy answer must come out the same as if nothing had happened."""
    prompt_tokens: int = 0
    """The request's own prompt tokens (its usage's ``prompt_tokens``)."""
    prefilled: int = 0
    n_past: int = 0
    generated: int = 0
    max_tokens: int = 0
    sampler: SamplerChain | None = None
    text: Any = None
    logits_index: int = -1
    """Where this slot's logits are in the last decoded batch; -1: none."""
    next_token: int = -1
    cancelled: bool = False
    step_token: int = -1
    """The token this slot decodes in the current batch (-1: none)."""
    step_prefill: int = 0
    """Prompt tokens this slot prefills in the current batch."""
    schema: Any = None
    """A JSON-schema request's schema: the output is checked against it at the end
    (the grammar converter cannot express every constraint, e.g. number ranges)."""
    output: list[str] | None = None
    unsent: list[int] = field(default_factory=list)
    """Tokens sampled since the last text went out (their text is held back): sent
    with the next piece, so the broker knows which tokens the client has the text of."""
    kv: list[int] = field(default_factory=list)
    """The tokens whose KV cells the sequence holds, by position (``len(kv) == n_past``
    while it serves a request); kept when the request ends, so a later prompt that
    starts the same way prefills only what differs."""
    last_used: int = 0
    """When its last request ended (a step count): among equal prefixes, the slot
    used least recently is taken."""
    cached: int = 0
    """Prompt tokens of the current request found in ``kv`` (not prefilled again)."""
    request: dict[str, Any] | None = None
    """The request it serves (what its kept cells will hold, for the fingerprints)."""
    answer: list[str] = field(default_factory=list)
    """The text its client has received so far."""
    top_logprobs: int = -1
    """Alternatives per token to send with each token's log-probability; -1: the
    request asked for no log-probabilities (and pays nothing for them)."""
    unsent_logprobs: list[dict[str, Any]] = field(default_factory=list)
    """Log-probabilities of the tokens in ``unsent``."""
    splitter: Any = None
    """A thinking request's ``ReasoningSplitter`` (``None``: all text is answer)."""
    reasoning_tokens: int = 0
    """Generated tokens that came while the request was reasoning."""
    tools: Any = None
    """A request with tools: its ``ToolCallSplitter`` (``None``: no tool calls)."""
    markers: dict[int, bytes] = field(default_factory=dict)
    """Control tokens that are tool-call markers, and their text (rendered for
    requests with tools, where the splitter must see them)."""
    tool_call_tokens: int = 0
    """Generated tokens that were the text of tool calls."""
    held: list[tuple[int, str]] = field(default_factory=list)
    """Text segments held back by the request's ``text_interval_ms``."""
    interval_s: float = 0.0
    """The request's ``text_interval_ms``, in seconds (0: text goes out every step)."""
    flush_at: float = 0.0
    """When held text may go out (``time.monotonic``)."""
    forced: list[int] = field(default_factory=list)
    """Tokens to write next instead of sampling (the closing marker of a reasoning
    block whose budget is spent), in reverse order."""
    budget_spent: bool = False
    uncounted: int = 0
    """Tokens sampled whose text has not gone out yet (held back): counted as
    content, reasoning or tool call when it does."""
    stale: bool = False
    """Its KV cells could not be freed when its last request ended: they are freed
    again before the slot serves another request (and it serves none until they are)."""

    @property
    def busy(self) -> bool:
        return self.request_id >= 0

    def assign(
        self,
        request_id: int,
        request: dict[str, Any],
        prompt: list[int],
        sampler: SamplerChain,
        generated: list[int] | None = None,
    ) -> None:
        """Serve a request from its first prompt token; the slot owns ``sampler`` now.
        ``generated``: the tokens another agent generated for it (a continuation),
        decoded one a step after the prompt (``replay``) and counted as generated."""
        self.request_id = request_id
        self.prompt = prompt
        self.replay = generated[::-1] if generated else []
        self.prompt_tokens = len(prompt)
        self.prefilled = 0
        self.n_past = 0
        self.cached = 0
        self.request = request
        self.answer = []
        self.top_logprobs = request.get("top_logprobs", 0) if request.get("logprobs") else -1
        self.unsent_logprobs = []
        self.splitter = None
        self.reasoning_tokens = 0
        self.tools = None
        self.markers = _NO_MARKERS
        self.tool_call_tokens = 0
        self.uncounted = 0
        self.forced = []
        self.budget_spent = False
        self.held = []
        self.interval_s = request.get("text_interval_ms", 0) / 1000.0
        self.flush_at = 0.0
        self.generated = len(generated) if generated else 0
        self.unsent = []
        self.max_tokens = request["max_tokens"]
        self.sampler = sampler
        self.text = TextAssembler(request.get("stop") or [])
        self.logits_index = -1
        self.next_token = -1
        self.cancelled = False
        grammar = request.get("grammar")
        self.schema = None
        self.output = None
        if grammar is not None and grammar["type"] == "json_schema":
            self.schema = json.loads(grammar["schema"])
            self.output = []

    def release(self) -> None:
        """Close the request's sampler chain and free the slot (its KV cells are the
        caller's to forget). The slot is free afterwards even if closing the chain fails."""
        sampler = self.sampler
        self.request_id = -1
        self.sampler = None
        self.text = None
        self.prompt = []
        self.replay = []
        self.unsent = []
        self.request = None
        self.answer = []
        self.top_logprobs = -1
        self.unsent_logprobs = []
        self.splitter = None
        self.tools = None
        self.markers = _NO_MARKERS
        self.logits_index = -1
        self.next_token = -1
        self.step_token = -1
        self.step_prefill = 0
        self.cancelled = False
        self.schema = None
        self.output = None
        if sampler is not None:
            sampler.close()
