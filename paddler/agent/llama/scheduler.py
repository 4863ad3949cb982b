"""``LlamaEngine``: continuous batching over one llama.cpp model and context.

One model, one context with ``n_seq_max = slots`` (every slot is a sequence id with
its own part of the KV cache: ``context_size`` cells each), and one loop:

1. requests that arrived join free slots (prompt rendered and tokenized): each takes
   the free slot whose kept tokens share the longest prefix with its prompt, weighed
   against keeping the busy slots' sequence ids consecutive (``SPLIT_COST_TOKENS``;
   ties: the least recently used); the slot's KV cells past that prefix are freed and
   only the rest of the prompt is prefilled (``cached_prompt_tokens`` in the usage);
2. cancelled requests end (their KV cells are freed) before anything else runs;
3. every slot whose logits came out of the last decode samples one token through
   its own sampler chain; text pieces go out (one frame per request per step),
   finished requests end (end of generation, ``max_tokens``, stop string, context);
4. one document of one embedding request is embedded (``EmbeddingJob``: one
   ``llama_decode`` of at most ``embedding_batch_size`` tokens on the embedding
   context; the requests take turns), so a batch of a thousand documents costs a
   concurrent stream one document's decode per token, not a pause;
5. the next batch is assembled in slot order: each generating slot's token, and
   prefilling slots' prompt chunks in the room of ``n_batch`` the generating slots
   leave (a long prompt is prefilled over several steps while the others generate);
6. ``llama_decode`` runs once (ctypes releases the GIL: the I/O thread goes on).

Each text piece goes out with the ids of the tokens it is the text of (a token whose
text is held back goes with the next piece): the broker keeps them, and if this
agent is lost another one continues the request from its prompt plus those tokens
(``continuation``: replayed through the sampler chain and the text assembler, see
``paddler.agent.engine``).

Faults stay with the request they hit. An exception while admitting, sampling,
detokenizing, emitting or finishing one request ends that request with an error
(``SamplerError``, ``DetokenizationFailed``, ``EngineFault``: the kinds are listed in
``paddler.agent.engine``), frees its slot and KV cells, and the step goes on for the
others. A failed ``llama_decode`` is handled by its return code: 1 (no room in the KV
cache) takes the step again with half the prompt chunks, and only when a batch of
decode tokens alone does not fit ends the request holding the most cells
(``KvCacheExhausted``); any other code ends the requests whose tokens were in that
batch (``DecodeFailed``). An exception that escapes ``step`` is the worker's to
handle: it ends every request and calls ``reset`` (``paddler.agent.worker``).
The model it runs on, its swaps and downloads are ``paddler.agent.llama.swap``'s.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from typing import Any

from paddler.agent.chat_template import ChatTemplateError
from paddler.agent.engine import EventSink
from paddler.agent.llama.admission import (
    SPLIT_COST_TOKENS,
    best_slot,
    continuation_problem,
    reuse,
    thinking_splitter,
    tool_call_grammar,
)
from paddler.agent.llama.batching import assemble, in_batch, roll_back
from paddler.agent.llama.embedder import EmbeddingJob
from paddler.agent.llama.loading import LoadedModel, ModelResolver, resolve_local
from paddler.agent.llama.output import emit, keep_budget, split
from paddler.agent.llama.prompt import prompt_tokens
from paddler.agent.llama.sampling import (
    GrammarError,
    build_sampler,
    schema_problem,
    token_logprobs,
)
from paddler.agent.llama.slot import Slot
from paddler.agent.llama.swap import FETCH_STOP_WAIT_S, ModelSwap
from paddler.agent.tool_calls import ToolCallSplitter, tool_format
from paddler.errors import EngineError, ProtocolError
from paddler.protocol.kinds import CANCELLED_CODE
from paddler.protocol.prefixes import held_fingerprints
from paddler.protocol.requests import continued_tokens, is_embedding_request
from paddler.protocol.tool_calls import uses_tools

__all__ = ["SPLIT_COST_TOKENS", "LlamaEngine"]

log = logging.getLogger("paddler.agent")


class _RequestFault(Exception):
    """One request's failure inside a step, with the error kind it ends with."""

    def __init__(self, kind: str, cause: BaseException) -> None:
        super().__init__(f"{type(cause).__name__}: {cause}")
        self.kind = kind


_FAULT_TEXT = {
    "SamplerError": "sampling failed",
    "DetokenizationFailed": "turning a token into text failed",
    "EngineFault": "the engine failed on this request",
}


class LlamaEngine(ModelSwap):
    def __init__(
        self,
        slots_total: int,
        *,
        n_threads: int | None = None,
        resolver: ModelResolver = resolve_local,
    ) -> None:
        super().__init__(slots_total, n_threads, resolver)
        self._slots = [Slot(seq_id) for seq_id in range(slots_total)]
        self._by_request: dict[int, Slot] = {}
        self._held: dict[int, list[int]] = {}
        """Slots whose kept cells changed, and what they hold now (``take_held``)."""
        self._incoming: deque[tuple[int, dict[str, Any]]] = deque()
        self._embedding: deque[EmbeddingJob] = deque()
        """Embedding requests in progress, in turn order."""
        self._cancelled_waiting: set[int] = set()
        self.decode_steps = 0
        self._step_clock = 0.0
        """``time.monotonic()`` when the current step began sampling: paced text
        (``text_interval_ms``) is timed by it."""
        self.embedding_decodes = 0
        """Decodes on the embedding context (one document each) so far."""

    def take_held(self) -> dict[int, list[int]]:
        held, self._held = self._held, {}
        return held

    def _cells_dropped(self) -> None:
        for slot in self._slots:
            slot.stale = False  # a new context: no cells left behind, nothing kept
            slot.kv = []
            self._held[slot.seq_id] = []

    # ------------------------------------------------------------------ requests

    def admit(self, request_id: int, request: dict[str, Any]) -> None:
        self._incoming.append((request_id, request))

    def cancel(self, request_id: int) -> None:
        slot = self._by_request.get(request_id)
        if slot is not None:
            slot.cancelled = True
            return
        for job in self._embedding:
            if job.request_id == request_id:
                job.cancelled = True
                return
        if any(rid == request_id for rid, _ in self._incoming):
            self._cancelled_waiting.add(request_id)

    def active_count(self) -> int:
        return len(self._by_request) + len(self._incoming) + len(self._embedding)

    def _prompt_tokens(self, loaded: LoadedModel, request: dict[str, Any]) -> list[int]:
        return prompt_tokens(loaded.model, loaded.template, request)

    def _start(self, sink: EventSink, loaded: LoadedModel) -> None:
        """Move arrived requests into free slots; one that fails to start ends alone."""
        if not self._incoming:
            return
        free = [slot for slot in self._slots if not slot.busy and self._reclaimed(loaded, slot)]
        while self._incoming and free:
            request_id, request = self._incoming.popleft()
            try:
                self._start_one(sink, loaded, request_id, request, free)
            except Exception as exc:
                slot = self._by_request.get(request_id)
                if slot is None:
                    self._report_fault(sink, request_id, "EngineFault", exc)
                else:
                    self._fault(sink, loaded, slot, exc)

    def _start_one(
        self,
        sink: EventSink,
        loaded: LoadedModel,
        request_id: int,
        request: dict[str, Any],
        free: list[Slot],
    ) -> None:
        if request_id in self._cancelled_waiting:
            self._cancelled_waiting.discard(request_id)
            sink.error(request_id, CANCELLED_CODE, "Cancelled", "cancelled by the client")
            return
        if is_embedding_request(request):
            self._embed(sink, loaded, request_id, request)
            return
        try:
            prompt = self._prompt_tokens(loaded, request)
        except ChatTemplateError as exc:
            sink.error(request_id, 400, "ChatTemplateError", str(exc))
            return
        if not prompt:
            sink.error(request_id, 400, "InvalidRequest", "the prompt is empty")
            return
        if request.get("count_only"):
            sink.done(request_id, {"prompt_tokens": len(prompt), "content_tokens": 0})
            return
        try:
            generated = continued_tokens(request)
        except ProtocolError as exc:
            sink.error(request_id, 400, "InvalidContinuation", str(exc))
            return
        if len(prompt) + len(generated) >= loaded.n_ctx_seq:
            sink.error(
                request_id,
                400,
                "PromptTooLong",
                f"the prompt has {len(prompt) + len(generated)} tokens; a slot holds "
                f"{loaded.n_ctx_seq} (raise inference_parameters.context_size or shorten "
                "the prompt)",
            )
            return
        problem = continuation_problem(loaded.model, generated)
        if problem:
            sink.error(request_id, 400, "InvalidContinuation", problem)
            return
        tools = uses_tools(request)
        fmt = tool_format(loaded.template.source if loaded.template else None) if tools else None
        try:
            forced = tool_call_grammar(fmt, request)
            sampler = build_sampler(
                loaded.model, loaded.parameters, request, loaded.n_ctx_seq, forced
            )
        except GrammarError as exc:
            sink.error(request_id, 400, exc.kind, str(exc))
            return
        busy = {slot.seq_id for slot in self._by_request.values()}
        slot = best_slot(free, prompt + generated if generated else prompt, busy)
        try:
            slot.assign(request_id, request, prompt, sampler, generated)
        except BaseException:
            slot.sampler = sampler  # closed by release, however far assign got
            slot.release()
            raise
        free.remove(slot)
        self._by_request[request_id] = slot
        slot.splitter = thinking_splitter(loaded, request, prompt)
        if fmt is not None:
            slot.tools = ToolCallSplitter(fmt)
            slot.markers = loaded.model.marker_tokens(fmt.markers)
        reuse(loaded, slot)
        if generated:
            self._replay(sink, loaded, slot, generated)

    def _replay(
        self, sink: EventSink, loaded: LoadedModel, slot: Slot, generated: list[int]
    ) -> None:
        """Bring a continued request's sampler chain (grammar, penalties) and text
        assembler (UTF-8, stop strings) to where the lost agent left them; the text
        is not sent again (its client has it)."""
        sampler = slot.sampler
        assert sampler is not None
        model = loaded.model
        for index, token in enumerate(generated):
            if not sampler.allows(token):
                sink.error(
                    slot.request_id,
                    400,
                    "InvalidContinuation",
                    f"continued token {index} ({token}) is refused by the request's grammar",
                )
                self._finish(loaded, slot)
                return
            sampler.accept(token)
            slot.uncounted += 1
            split(slot, slot.text.push(slot.markers.get(token) or model.piece(token)))
        if slot.tools is not None:
            slot.tools.finished.clear()  # parsed and sent by the agent that was lost
        log.info(
            "request %d continues a stream begun on another agent: %d tokens generated there",
            slot.request_id,
            len(generated),
        )
        if slot.text.stopped or slot.generated >= slot.max_tokens:
            self._done(sink, loaded, slot)

    def _reclaimed(self, loaded: LoadedModel, slot: Slot) -> bool:
        """``True`` when a free slot holds no KV cells (freeing ones left behind now)."""
        if not slot.stale:
            return True
        try:
            loaded.context.forget(slot.seq_id)
        except Exception as exc:
            log.debug("slot %d still holds KV cells: %s", slot.seq_id, exc)
            return False
        slot.stale = False
        slot.kv = []
        return True

    def _embed(
        self, sink: EventSink, loaded: LoadedModel, request_id: int, request: dict[str, Any]
    ) -> None:
        """Start embedding the documents of a request, one per step from this one on
        (``_embed_step``); each document's result goes out as soon as it is computed."""
        if not loaded.parameters["enable_embeddings"]:
            sink.error(
                request_id,
                400,
                "EmbeddingsDisabled",
                "embeddings are off; set inference_parameters.enable_embeddings",
            )
            return
        try:
            loaded.open_embedder(self.n_threads)
        except EngineError as exc:
            sink.error(request_id, 500, "EmbeddingsUnavailable", str(exc))
            return
        self._embedding.append(EmbeddingJob(request_id, request))

    def _embed_step(self, sink: EventSink, loaded: LoadedModel) -> None:
        """Embed one document (one decode at most) of the embedding request whose turn
        it is; a failure ends that request alone."""
        if not self._embedding:
            return
        job = self._embedding.popleft()
        embedder = loaded.embedder
        if embedder is None:  # opened when the job started, closed only with the model
            self._report_fault(sink, job.request_id, "EngineFault", EngineError("no embedder"))
            return
        decodes = embedder.decodes
        try:
            ended = job.advance(sink, embedder)
        except Exception as exc:
            self._report_fault(sink, job.request_id, "EngineFault", exc)
            ended = True
        finally:
            self.embedding_decodes += embedder.decodes - decodes
        if not ended:
            self._embedding.append(job)

    def _finish(
        self, loaded: LoadedModel, slot: Slot, keep: bool = True, answered: bool = False
    ) -> None:
        """Free a slot and its sampler chain. Its KV cells stay for a later prompt
        that starts the same way, unless ``keep`` is false (cells in doubt, or wanted
        back); ``answered``: the request ended with its whole answer, which the cells
        hold too (for the fingerprints). A request that ended before its prompt was
        all prefilled (cancelled, failed) leaves cells holding only part of it: the
        slot reports that it holds nothing (the kept tokens still serve the agent's
        own reuse), so the balancer sends no request here for a prefix it lacks.
        Never raises: a failure is logged, and cells that could not be freed are
        freed before the slot is reused."""
        self._by_request.pop(slot.request_id, None)
        slot.last_used = self.decode_steps
        if keep and slot.request is not None and slot.prefilled >= len(slot.prompt):
            try:
                answer = "".join(slot.answer) if answered else None
                self._held[slot.seq_id] = held_fingerprints(slot.request, answer)
            except Exception:
                log.exception("fingerprinting what slot %d holds failed", slot.seq_id)
                self._held[slot.seq_id] = []
        else:
            self._held[slot.seq_id] = []
        if not keep:
            slot.kv = []
            try:
                loaded.context.forget(slot.seq_id)
            except Exception:
                log.exception(
                    "freeing the KV cells of slot %d failed; again before reuse", slot.seq_id
                )
                slot.stale = True
        try:
            slot.release()
        except Exception:
            log.exception("closing the sampler chain of slot %d failed", slot.seq_id)

    def _report_fault(
        self, sink: EventSink, request_id: int, kind: str, exc: BaseException
    ) -> None:
        log.error("request %d failed (%s); the others go on", request_id, kind, exc_info=exc)
        sink.error(request_id, 500, kind, f"{_FAULT_TEXT[kind]}: {type(exc).__name__}: {exc}")

    def _fault(self, sink: EventSink, loaded: LoadedModel, slot: Slot, exc: Exception) -> None:
        """End the request of ``slot`` after ``exc`` and free the slot."""
        if isinstance(exc, _RequestFault):
            kind = exc.kind
            cause: BaseException = exc.__cause__ or exc
        else:
            kind = "EngineFault"
            cause = exc
        request_id = slot.request_id
        if self._by_request.get(request_id) is not slot:
            log.error("a fault after request %d ended", request_id, exc_info=cause)
            return
        try:
            self._report_fault(sink, request_id, kind, cause)
        finally:
            self._finish(loaded, slot)

    def _done(self, sink: EventSink, loaded: LoadedModel, slot: Slot) -> None:
        emit(sink, slot, slot.text.finish(), self._step_clock, last=True)
        if slot.output is not None:
            problem = schema_problem(slot.schema, "".join(slot.output))
            if problem:
                sink.error(slot.request_id, 422, "GrammarRejectedModelOutput", problem)
                self._finish(loaded, slot)
                return
        usage = {
            "prompt_tokens": slot.prompt_tokens,
            "content_tokens": slot.generated - slot.reasoning_tokens - slot.tool_call_tokens,
        }
        if slot.reasoning_tokens:
            usage["reasoning_tokens"] = slot.reasoning_tokens
        if slot.tool_call_tokens:
            usage["tool_call_tokens"] = slot.tool_call_tokens
        if slot.cached:  # absent is 0
            usage["cached_prompt_tokens"] = min(slot.cached, slot.prompt_tokens)
        stop = slot.text.stopped_by
        if stop is None:
            sink.done(slot.request_id, usage)
        else:
            sink.done(slot.request_id, usage, stop_sequence=stop)
        self._finish(loaded, slot, answered=not slot.replay)

    def _fail_all(self, sink: EventSink, code: int, kind: str, message: str) -> None:
        while self._incoming:
            request_id, _ = self._incoming.popleft()
            sink.error(request_id, code, kind, message)
        self._cancelled_waiting.clear()
        while self._embedding:
            sink.error(self._embedding.popleft().request_id, code, kind, message)
        for slot in list(self._by_request.values()):
            sink.error(slot.request_id, code, kind, message)
            if self._loaded is not None:
                self._finish(self._loaded, slot)

    # ---------------------------------------------------------------------- step

    def step(self, sink: EventSink) -> None:
        self._collect_fetch()
        loaded = self._loaded
        if loaded is None:
            why = " (it is downloading it)" if self._downloads.current is not None else ""
            self._fail_all(sink, 503, "AgentUnavailable", f"the agent has no model loaded{why}")
            if self._has_pending_state:
                self._swap()
            return
        # 1. cancellations first: a cancelled request gets no further decode step
        for slot in list(self._by_request.values()):
            if slot.cancelled:
                sink.error(slot.request_id, CANCELLED_CODE, "Cancelled", "cancelled by the client")
                self._finish(loaded, slot)
        if self._embedding and any(job.cancelled for job in self._embedding):
            for job in [job for job in self._embedding if job.cancelled]:
                self._embedding.remove(job)
                sink.error(job.request_id, CANCELLED_CODE, "Cancelled", "cancelled by the client")
        if not self._has_pending_state:
            self._start(sink, loaded)
        # 2. sample every slot that has logits from the last decode
        self._step_clock = time.monotonic()  # one reading for the step's paced text
        for slot in list(self._by_request.values()):
            if slot.logits_index < 0 or slot.sampler is None:
                continue
            try:
                self._advance(sink, loaded, slot)
            except Exception as exc:
                self._fault(sink, loaded, slot, exc)
        # 3. one document of one embedding request
        self._embed_step(sink, loaded)
        sink.flush()  # the text of this step goes out before the decode
        # 4. assemble (decode tokens first, then prompt chunks) and 5. decode once
        if not self._decode(sink, loaded):
            if self._has_pending_state and not self._by_request and not self._embedding:
                self._swap()
            return
        if (
            self._has_pending_state
            and not self._by_request
            and not self._incoming
            and not self._embedding
        ):
            self._swap()

    def _advance(self, sink: EventSink, loaded: LoadedModel, slot: Slot) -> None:
        """Sample a slot's next token from its logits, send its text, end it if done."""
        assert slot.sampler is not None
        if slot.replay:  # a continued request: its next token is known and was sent
            slot.next_token = slot.replay.pop()
            slot.logits_index = -1
            return
        if slot.splitter is not None and slot.splitter.inside and not slot.budget_spent:
            keep_budget(loaded, slot)
        try:
            if slot.forced:
                token = slot.forced.pop()
                slot.sampler.accept(token)
            else:
                token = slot.sampler.sample(loaded.context, slot.logits_index)
        except Exception as exc:
            raise _RequestFault("SamplerError", exc) from exc
        model = loaded.model
        if model.is_eog(token):
            slot.logits_index = -1
            self._done(sink, loaded, slot)
            return
        if slot.top_logprobs >= 0:
            try:
                slot.unsent_logprobs.append(
                    token_logprobs(loaded, slot.logits_index, token, slot.top_logprobs)
                )
            except Exception as exc:
                raise _RequestFault("SamplerError", exc) from exc
        slot.logits_index = -1
        slot.generated += 1
        slot.unsent.append(token)
        try:
            text = slot.text.push(slot.markers.get(token) or model.piece(token))
        except Exception as exc:
            raise _RequestFault("DetokenizationFailed", exc) from exc
        slot.uncounted += 1
        emit(sink, slot, text, self._step_clock)
        if (
            slot.text.stopped
            or slot.generated >= slot.max_tokens
            or slot.n_past + 1 >= loaded.n_ctx_seq
        ):
            self._done(sink, loaded, slot)
            return
        slot.next_token = token

    def _decode(self, sink: EventSink, loaded: LoadedModel) -> bool:
        """Assemble and decode the step's batch; ``False`` when there was nothing to do.

        When llama.cpp finds no room in the KV cache (1) for a batch with prompt
        chunks, the step is taken again with half the prompt tokens (down to none,
        while there are decode tokens); what still fails goes to ``_decode_failed``.
        """
        prefill_limit = loaded.n_batch
        while True:
            prefilled = assemble(loaded, list(self._by_request.values()), prefill_limit)
            if loaded.builder.n_tokens == 0:
                return False
            self.decode_steps += 1
            result = loaded.context.decode(loaded.batch)
            if result == 0:
                return True
            decode_tokens = loaded.builder.n_tokens - prefilled
            if result == 1 and prefilled and (prefilled > 1 or decode_tokens):
                roll_back(in_batch(list(self._by_request.values())))
                prefill_limit = prefilled // 2
                log.info(
                    "no room in the KV cache for %d prompt tokens; trying %d",
                    prefilled,
                    prefill_limit,
                )
                continue
            self._decode_failed(sink, loaded, result)
            return True

    def _decode_failed(self, sink: EventSink, loaded: LoadedModel, result: int) -> None:
        """End the fewest requests possible after a failed decode.

        1 (no room in the KV cache, even without prompt chunks): llama.cpp kept the
        cache as it was, so the request holding the most cells (in the batch or
        not) ends and the others take this step again. Other codes (2: aborted,
        negative: error) may leave part of the batch in the cache: every request in
        the batch ends (its cells are freed) and the others go on.
        """
        in_this = in_batch(list(self._by_request.values()))
        if result != 1:
            log.error(
                "llama_decode returned %d; ending the %d requests of its batch",
                result,
                len(in_this),
            )
            for slot in in_this:
                sink.error(slot.request_id, 500, "DecodeFailed", f"llama_decode returned {result}")
                self._finish(loaded, slot, keep=False)  # part of the batch may be in
            return
        roll_back(in_this)
        holders = [s for s in self._by_request.values() if s.n_past > 0] or in_this
        if holders:
            victim = max(holders, key=lambda s: s.n_past)
            sink.error(
                victim.request_id,
                503,
                "KvCacheExhausted",
                f"the KV cache is full; this request held {victim.n_past} tokens",
            )
            self._finish(loaded, victim, keep=False)
        log.warning("decode found no room in the KV cache; one request ended")

    def reset(self, state: dict[str, Any] | None) -> None:
        """Start again from nothing after a fault escaped ``step``: every request is
        dropped without a word (the worker has ended them), every native handle is
        closed (failures are logged), then ``state`` is loaded as at start."""
        self._incoming.clear()
        self._cancelled_waiting.clear()
        self._by_request.clear()
        self._embedding.clear()
        for slot in self._slots:
            try:
                slot.release()
            except Exception:
                log.exception("closing the sampler chain of slot %d failed", slot.seq_id)
        self._slots = [Slot(seq_id) for seq_id in range(self.slots_total)]
        self._held = {slot.seq_id: [] for slot in self._slots}
        self._drop_model()
        self.apply_state(state)

    def close(self) -> None:
        self._embedding.clear()
        self._downloads.stop_all(FETCH_STOP_WAIT_S)
        if self._loaded is not None:
            for slot in list(self._by_request.values()):
                self._finish(self._loaded, slot)
            self._loaded.close()
            self._loaded = None
