"""``LlamaEngine``: continuous batching over one llama.cpp model and context.

One model, one context with ``n_seq_max = slots`` (every slot is a sequence id with
its own part of the KV cache: ``context_size`` cells each), and one loop:

1. requests that arrived join free slots (prompt rendered and tokenized);
2. cancelled requests end (their KV cells are freed) before anything else runs;
3. every slot whose logits came out of the last decode samples one token through
   its own sampler chain; text pieces go out (one frame per request per step),
   finished requests end (end of generation, ``max_tokens``, stop string, context);
4. the next batch is assembled: one token for each generating slot first, then
   prompt chunks of prefilling slots up to ``n_batch``;
5. ``llama_decode`` runs once (ctypes releases the GIL: the I/O thread goes on).

A new desired state drains the running requests first, then swaps the model
(``paddler.agent.llama.loading``). Native handles are closed explicitly: a request's
sampler chain when it ends, the model and its context when swapped or in ``close()``.
"""

from __future__ import annotations

import logging
import os
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from paddler.agent.chat_template import ChatTemplateError
from paddler.agent.engine import CANCELLED_CODE, Engine, EventSink
from paddler.agent.llama.embedder import embed_documents
from paddler.agent.llama.loading import (
    LoadedModel,
    ModelResolver,
    apply_model_state,
    resolve_local,
    state_key,
)
from paddler.agent.llama.native import LlamaModel
from paddler.agent.llama.prompt import prompt_tokens
from paddler.agent.llama.sampling import GrammarError, build_sampler, schema_problem
from paddler.agent.llama.slot import Slot
from paddler.errors import EngineError
from paddler.protocol.messages import AgentStatus
from paddler.protocol.requests import is_embedding_request

log = logging.getLogger("paddler.agent")


class LlamaEngine(Engine):
    def __init__(
        self,
        slots_total: int,
        *,
        n_threads: int | None = None,
        resolver: ModelResolver = resolve_local,
    ) -> None:
        self.slots_total = slots_total
        self.n_threads = n_threads or os.cpu_count() or 1
        self.resolver = resolver
        self.status_listener: Callable[[], None] | None = None
        self._loaded: LoadedModel | None = None
        self._slots = [Slot(seq_id) for seq_id in range(slots_total)]
        self._by_request: dict[int, Slot] = {}
        self._incoming: deque[tuple[int, dict[str, Any]]] = deque()
        self._cancelled_waiting: set[int] = set()
        self._pending_state: dict[str, Any] | None = None
        self._has_pending_state = False
        self._applied_key: Any = ("never",)
        self._applied_state: dict[str, Any] | None = None
        self._status = AgentStatus(slots_total=slots_total, desired_slots_total=slots_total)
        self._status_changed = False
        self._last_progress = 0.0
        self.decode_steps = 0

    # ------------------------------------------------------------------- status

    def status(self) -> AgentStatus:
        return AgentStatus(**self._status.to_body())

    def _set_status(self, **changes: Any) -> None:
        for name, value in changes.items():
            setattr(self._status, name, value)
        self._status_changed = True

    def take_status_change(self) -> bool:
        changed = self._status_changed
        self._status_changed = False
        return changed

    def _progress(self, current: int, total: int | None, filename: str) -> None:
        self._status.download_current = current
        self._status.download_total = total or 0
        self._status.download_filename = filename
        now = time.monotonic()
        if self.status_listener is not None and (
            now - self._last_progress > 0.2 or (total and current >= total)
        ):
            self._last_progress = now
            self.status_listener()

    def describe(self, what: str) -> Any:
        if what == "model_metadata":
            return {"metadata": dict(self._loaded.model.metadata)} if self._loaded else None
        if what == "chat_template_override":
            state = self._applied_state
            if state and state.get("use_chat_template_override"):
                return state.get("chat_template_override")
            return None
        return None

    @property
    def n_ctx_seq(self) -> int:
        """Tokens one slot holds (prompt and output), 0 without a model."""
        return self._loaded.n_ctx_seq if self._loaded else 0

    @property
    def model(self) -> LlamaModel | None:
        return self._loaded.model if self._loaded else None

    # ---------------------------------------------------------- desired state

    def apply_state(self, state: dict[str, Any] | None) -> None:
        if state_key(state) == self._applied_key:
            return
        self._pending_state = state
        self._has_pending_state = True
        if self.active_count():
            # drain: no new requests (ready=False), running ones finish, then swap
            self._set_status(ready=False)
            return
        self._swap()

    def _swap(self) -> None:
        state = self._pending_state
        self._has_pending_state = False
        self._pending_state = None
        if self._loaded is not None:
            self._loaded.close()
            self._loaded = None
        self._applied_key = state_key(state)
        self._applied_state = state
        self._loaded = apply_model_state(
            state,
            resolver=self.resolver,
            progress=self._progress,
            set_status=self._set_status,
            slots_total=self.slots_total,
            n_threads=self.n_threads,
        )

    # ------------------------------------------------------------------ requests

    def admit(self, request_id: int, request: dict[str, Any]) -> None:
        self._incoming.append((request_id, request))

    def cancel(self, request_id: int) -> None:
        slot = self._by_request.get(request_id)
        if slot is not None:
            slot.cancelled = True
        elif any(rid == request_id for rid, _ in self._incoming):
            self._cancelled_waiting.add(request_id)

    def active_count(self) -> int:
        return len(self._by_request) + len(self._incoming)

    def _prompt_tokens(self, loaded: LoadedModel, request: dict[str, Any]) -> list[int]:
        return prompt_tokens(loaded.model, loaded.template, request)

    def _start(self, sink: EventSink, loaded: LoadedModel) -> None:
        """Move arrived requests into free slots."""
        free = [slot for slot in self._slots if not slot.busy]
        while self._incoming and free:
            request_id, request = self._incoming.popleft()
            if request_id in self._cancelled_waiting:
                self._cancelled_waiting.discard(request_id)
                sink.error(request_id, CANCELLED_CODE, "Cancelled", "cancelled by the client")
                continue
            if is_embedding_request(request):
                self._embed(sink, loaded, request_id, request)
                continue
            try:
                prompt = self._prompt_tokens(loaded, request)
            except ChatTemplateError as exc:
                sink.error(request_id, 400, "ChatTemplateError", str(exc))
                continue
            if not prompt:
                sink.error(request_id, 400, "InvalidRequest", "the prompt is empty")
                continue
            if len(prompt) >= loaded.n_ctx_seq:
                sink.error(
                    request_id,
                    400,
                    "PromptTooLong",
                    f"the prompt has {len(prompt)} tokens; a slot holds {loaded.n_ctx_seq} "
                    "(raise inference_parameters.context_size or shorten the prompt)",
                )
                continue
            try:
                sampler = build_sampler(loaded.model, loaded.parameters, request, loaded.n_ctx_seq)
            except GrammarError as exc:
                sink.error(request_id, 400, exc.kind, str(exc))
                continue
            slot = free.pop(0)
            slot.assign(request_id, request, prompt, sampler)
            self._by_request[request_id] = slot

    def _embed(
        self, sink: EventSink, loaded: LoadedModel, request_id: int, request: dict[str, Any]
    ) -> None:
        """Embed every document of a request; each document's result goes out at once."""
        if not loaded.parameters["enable_embeddings"]:
            sink.error(
                request_id,
                400,
                "EmbeddingsDisabled",
                "embeddings are off; set inference_parameters.enable_embeddings",
            )
            return
        try:
            embedder = loaded.open_embedder(self.n_threads)
        except EngineError as exc:
            sink.error(request_id, 500, "EmbeddingsUnavailable", str(exc))
            return
        embed_documents(sink, embedder, request_id, request)

    def _finish(self, loaded: LoadedModel, slot: Slot) -> None:
        loaded.context.forget(slot.seq_id)
        del self._by_request[slot.request_id]
        slot.release()

    def _emit(self, sink: EventSink, slot: Slot, text: str) -> None:
        if text:
            sink.tokens(slot.request_id, [text])
            if slot.output is not None:
                slot.output.append(text)

    def _done(self, sink: EventSink, loaded: LoadedModel, slot: Slot) -> None:
        self._emit(sink, slot, slot.text.finish())
        if slot.output is not None:
            problem = schema_problem(slot.schema, "".join(slot.output))
            if problem:
                sink.error(slot.request_id, 422, "GrammarRejectedModelOutput", problem)
                self._finish(loaded, slot)
                return
        sink.done(
            slot.request_id,
            {"prompt_tokens": len(slot.prompt), "content_tokens": slot.generated},
        )
        self._finish(loaded, slot)

    def _fail_all(self, sink: EventSink, code: int, kind: str, message: str) -> None:
        while self._incoming:
            request_id, _ = self._incoming.popleft()
            sink.error(request_id, code, kind, message)
        self._cancelled_waiting.clear()
        for slot in list(self._by_request.values()):
            sink.error(slot.request_id, code, kind, message)
            if self._loaded is not None:
                self._finish(self._loaded, slot)

    # ---------------------------------------------------------------------- step

    def step(self, sink: EventSink) -> None:
        loaded = self._loaded
        if loaded is None:
            self._fail_all(sink, 503, "AgentUnavailable", "the agent has no model loaded")
            if self._has_pending_state:
                self._swap()
            return
        context = loaded.context
        model = loaded.model
        # 1. cancellations first: a cancelled request gets no further decode step
        for slot in list(self._by_request.values()):
            if slot.cancelled:
                sink.error(slot.request_id, CANCELLED_CODE, "Cancelled", "cancelled by the client")
                self._finish(loaded, slot)
        if not self._has_pending_state:
            self._start(sink, loaded)
        # 2. sample every slot that has logits from the last decode
        for slot in list(self._by_request.values()):
            if slot.logits_index < 0 or slot.sampler is None:
                continue
            token = slot.sampler.sample(context, slot.logits_index)
            slot.logits_index = -1
            if model.is_eog(token):
                self._done(sink, loaded, slot)
                continue
            slot.generated += 1
            self._emit(sink, slot, slot.text.push(model.piece(token)))
            if slot.text.stopped:
                self._done(sink, loaded, slot)
                continue
            if slot.generated >= slot.max_tokens or slot.n_past + 1 >= loaded.n_ctx_seq:
                self._done(sink, loaded, slot)
                continue
            slot.next_token = token
        # 3. assemble: decode tokens first, then prompt chunks
        builder = loaded.builder
        builder.clear()
        for slot in self._by_request.values():
            slot.step_prefill = 0
            slot.step_token = slot.next_token
            if slot.next_token >= 0:
                slot.logits_index = builder.add(slot.next_token, slot.n_past, slot.seq_id, True)
                slot.n_past += 1
                slot.next_token = -1
        room = loaded.n_batch - builder.n_tokens
        for slot in self._by_request.values():
            if room <= 0:
                break
            remaining = len(slot.prompt) - slot.prefilled
            if remaining <= 0:
                continue
            count = min(remaining, room)
            last = builder.add_span(
                slot.prompt,
                slot.prefilled,
                count,
                slot.n_past,
                slot.seq_id,
                count == remaining,
            )
            if count == remaining:
                slot.logits_index = last
            slot.prefilled += count
            slot.n_past += count
            slot.step_prefill = count
            room -= count
        if builder.n_tokens == 0:
            if self._has_pending_state and not self._by_request:
                self._swap()
            return
        # 4. one decode for every slot
        self.decode_steps += 1
        result = context.decode(loaded.batch)
        if result != 0:
            self._decode_failed(sink, loaded, result)
        if self._has_pending_state and not self._by_request and not self._incoming:
            self._swap()

    def _decode_failed(self, sink: EventSink, loaded: LoadedModel, result: int) -> None:
        """End the fewest requests possible after a failed decode.

        1 (no room in the KV cache): llama.cpp restored the cache, so the request
        holding the most cells ends and the others take this step again. Other
        failures may leave partial state: every request in the batch ends.
        """
        in_batch = [s for s in self._by_request.values() if s.step_token >= 0 or s.step_prefill]
        if result != 1:
            for slot in in_batch:
                sink.error(slot.request_id, 500, "DecodeFailed", f"llama_decode returned {result}")
                self._finish(loaded, slot)
            return
        for slot in in_batch:
            slot.logits_index = -1
            if slot.step_token >= 0:
                slot.n_past -= 1
                slot.next_token = slot.step_token
            slot.prefilled -= slot.step_prefill
            slot.n_past -= slot.step_prefill
            slot.step_token = -1
            slot.step_prefill = 0
        if in_batch:
            victim = max(in_batch, key=lambda s: s.n_past + s.step_prefill)
            sink.error(
                victim.request_id,
                503,
                "KvCacheExhausted",
                f"the KV cache is full; this request held {victim.n_past} tokens",
            )
            self._finish(loaded, victim)
        log.warning("decode found no room in the KV cache; one request ended")

    def close(self) -> None:
        if self._loaded is not None:
            for slot in list(self._by_request.values()):
                self._finish(self._loaded, slot)
            self._loaded.close()
            self._loaded = None
