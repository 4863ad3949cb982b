"""A slot: one sequence id of the shared context and the request it serves."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from paddler._core import TextAssembler
from paddler.agent.llama.native import SamplerChain


@dataclass
class Slot:
    seq_id: int
    request_id: int = -1
    prompt: list[int] = field(default_factory=list)
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
    stale: bool = False
    """Its KV cells could not be freed when its last request ended: they are freed
    again before the slot serves another request (and it serves none until they are)."""

    @property
    def busy(self) -> bool:
        return self.request_id >= 0

    def assign(
        self, request_id: int, request: dict[str, Any], prompt: list[int], sampler: SamplerChain
    ) -> None:
        """Serve a request from its first prompt token; the slot owns ``sampler`` now."""
        self.request_id = request_id
        self.prompt = prompt
        self.prefilled = 0
        self.n_past = 0
        self.generated = 0
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
        self.logits_index = -1
        self.next_token = -1
        self.step_token = -1
        self.step_prefill = 0
        self.cancelled = False
        self.schema = None
        self.output = None
        if sampler is not None:
            sampler.close()
