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

A new desired state drains the running requests first, then swaps the model
(``paddler.agent.llama.loading``). Native handles are closed explicitly: a request's
sampler chain when it ends, the model and its context when swapped or in ``close()``.
A model that must be downloaded is fetched by a thread of its own (``ModelFetch``):
meanwhile the engine has no model (requests end with ``AgentUnavailable``), its
status carries the download's progress, and a newer desired state cancels the
download and is applied at once. The engine thread loads the downloaded file at its
next ``step`` or ``take_status_change`` (the worker calls that at least every
``IDLE_POLL_MS``).
"""

from __future__ import annotations

import logging
import operator
import os
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from paddler.agent.chat_template import ChatTemplateError
from paddler.agent.engine import Engine, EventSink
from paddler.agent.llama.embedder import EmbeddingJob
from paddler.agent.llama.loading import (
    LoadedModel,
    ModelResolver,
    apply_model_state,
    begin_model_state,
    load_resolved,
    needs_download,
    resolve_local,
    source_failed,
    state_key,
    takes_cancel,
)
from paddler.agent.llama.native import LlamaModel
from paddler.agent.llama.prompt import forces_tool_call, prompt_tokens
from paddler.agent.llama.sampling import (
    GrammarError,
    build_sampler,
    schema_problem,
    token_logprobs,
)
from paddler.agent.llama.slot import Slot, shared_prefix
from paddler.agent.llama.status import Downloads, StatusBoard
from paddler.agent.reasoning import ReasoningSplitter, thinking_markers
from paddler.agent.tool_calls import (
    CONTENT,
    REASONING,
    TOOL_CALL,
    ToolCallSplitter,
    forced_grammar,
    parse_block,
    tool_format,
)
from paddler.errors import EngineError, ProtocolError
from paddler.protocol.kinds import CANCELLED_CODE
from paddler.protocol.messages import AgentStatus
from paddler.protocol.prefixes import held_fingerprints
from paddler.protocol.requests import continued_tokens, is_embedding_request
from paddler.protocol.tool_calls import forced_tool, uses_tools

log = logging.getLogger("paddler.agent")

SPLIT_COST_TOKENS = 256
"""What a free slot next to the busy ones is worth, in prompt tokens prefilled again.

Each slot is a sequence of its own KV stream (``kv_unified`` off, as llama-server
runs), and llama.cpp puts the sequences of such a cache into one ubatch only while
their ids are consecutive and rising in the batch (``split_equal`` with
``sequential``): busy slots 0, 2 and 5 make every decode step three ubatches, each
a pass over all the weights, and none reuses the last step's graph. Measured here at
4 concurrent requests on 8 slots: a step of 5.3-5.6 ms split against 3.3-3.7 ms
whole. A gap costs every step of every busy slot for as long as it lasts, a shorter
prefix costs its tokens once: a slot that would open a gap must hold this many more
tokens of the prompt than one that would not (one that closes a gap counts as much
again). The batch itself is assembled in slot order (``_assemble``)."""


_seq_id = operator.attrgetter("seq_id")


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

FETCH_STOP_WAIT_S = 5.0
"""How long ``close`` waits for cancelled downloads to stop."""


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
        self._held: dict[int, list[int]] = {}
        """Slots whose kept cells changed, and what they hold now (``take_held``)."""
        self._incoming: deque[tuple[int, dict[str, Any]]] = deque()
        self._embedding: deque[EmbeddingJob] = deque()
        """Embedding requests in progress, in turn order."""
        self._cancelled_waiting: set[int] = set()
        self._pending_state: dict[str, Any] | None = None
        self._has_pending_state = False
        self._applied_key: Any = ("never",)
        self._applied_state: dict[str, Any] | None = None
        self._board = StatusBoard(slots_total)
        self._downloads = Downloads(self._board, resolver, takes_cancel(resolver))
        self.decode_steps = 0
        self._step_clock = 0.0
        """``time.monotonic()`` when the current step began sampling: paced text
        (``text_interval_ms``) is timed by it."""
        self.embedding_decodes = 0
        """Decodes on the embedding context (one document each) so far."""

    # ------------------------------------------------------------------- status

    def status(self) -> AgentStatus:
        return self._board.snapshot()

    def _set_status(self, **changes: Any) -> None:
        self._board.set(**changes)

    def take_held(self) -> dict[int, list[int]]:
        held, self._held = self._held, {}
        return held

    def take_status_change(self) -> bool:
        """``True`` once after the status changed outside ``apply_state``; first loads
        a model whose download has finished (the worker calls this every loop)."""
        self._collect_fetch()
        return self._board.take_change()

    def _progress(self, current: int, total: int | None, filename: str) -> None:
        """Progress of a resolution on the engine thread (a local path: none, or a
        resolver that downloads what ``needs_download`` does not recognize)."""
        self._board.progress_now(current, total, filename, self.status_listener)

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
        self._downloads.cancel()
        loaded, self._loaded = self._loaded, None
        if loaded is not None:
            loaded.close()  # if this raises, no step uses the handles again
        self._applied_key = state_key(state)
        self._applied_state = state
        for slot in self._slots:
            slot.stale = False  # a new context: no cells left behind, nothing kept
            slot.kv = []
            self._held[slot.seq_id] = []
        if state is not None and needs_download(state.get("model")):
            self._start_fetch(state)
            return
        self._loaded = apply_model_state(
            state,
            resolver=self.resolver,
            progress=self._progress,
            set_status=self._set_status,
            slots_total=self.slots_total,
            n_threads=self.n_threads,
        )

    def _start_fetch(self, state: dict[str, Any]) -> None:
        """Download the model of ``state`` on a thread of its own; the engine goes on
        without a model until ``_collect_fetch`` loads it."""
        begin_model_state(state, self._set_status)
        self._downloads.start(state)

    def _collect_fetch(self) -> None:
        """On the engine thread: load the model whose download finished, or report
        why it could not be had."""
        if self._has_pending_state:
            return  # a pending state replaces what the fetch got: no load for nothing
        fetch = self._downloads.take_finished()
        if fetch is None:
            return
        if fetch.error is not None:
            source_failed(fetch.state, fetch.error, self._set_status)
            return
        self._loaded = load_resolved(
            fetch.state,
            fetch.path,
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
        problem = self._continuation_problem(loaded.model, generated)
        if problem:
            sink.error(request_id, 400, "InvalidContinuation", problem)
            return
        tools = uses_tools(request)
        fmt = tool_format(loaded.template.source if loaded.template else None) if tools else None
        try:
            forced = self._forced_grammar(fmt, request)
            sampler = build_sampler(
                loaded.model, loaded.parameters, request, loaded.n_ctx_seq, forced
            )
        except GrammarError as exc:
            sink.error(request_id, 400, exc.kind, str(exc))
            return
        slot = self._best_slot(free, prompt + generated if generated else prompt)
        try:
            slot.assign(request_id, request, prompt, sampler, generated)
        except BaseException:
            slot.sampler = sampler  # closed by release, however far assign got
            slot.release()
            raise
        free.remove(slot)
        self._by_request[request_id] = slot
        slot.splitter = self._splitter(loaded, request, prompt)
        if fmt is not None:
            slot.tools = ToolCallSplitter(fmt)
            slot.markers = loaded.model.marker_tokens(fmt.markers)
        self._reuse(loaded, slot)
        if generated:
            self._replay(sink, loaded, slot, generated)

    @staticmethod
    def _forced_grammar(fmt: Any, request: dict[str, Any]) -> str | None:
        """GBNF that makes the answer a tool call, when ``tool_choice`` is required or
        names a tool (``GrammarError`` if the tools' schemas cannot become one)."""
        if fmt is None or not forces_tool_call(request):
            return None
        try:
            return forced_grammar(
                fmt,
                request["tools"],
                forced_tool(request["tool_choice"]),
                request.get("parallel_tool_calls", True),
            )
        except Exception as exc:  # the converter raises many types for bad schemas
            raise GrammarError(
                "GrammarInitializationFailed",
                f"cannot turn the tools' parameter schemas into a grammar: {exc}",
            ) from exc

    @staticmethod
    def _splitter(
        loaded: LoadedModel, request: dict[str, Any], prompt: list[int]
    ) -> ReasoningSplitter | None:
        """For a conversation with thinking on, when the template has markers: what
        tells its reasoning from its answer (inside the block already when the
        prompt opened it)."""
        if (
            not request.get("enable_thinking")
            or "conversation_history" not in request
            or forces_tool_call(request)
        ):
            return None
        markers = thinking_markers(loaded.template.source if loaded.template else None)
        if markers is None:
            return None
        model = loaded.model
        tail = b"".join(model.piece(token) for token in prompt[-8:])
        inside = tail.decode("utf-8", "replace").rstrip().endswith(markers[0])
        return ReasoningSplitter(*markers, inside=inside)

    def _best_slot(self, free: list[Slot], tokens: list[int]) -> Slot:
        """The free slot whose kept tokens share the longest prefix with ``tokens``,
        less ``SPLIT_COST_TOKENS`` for each run of consecutive busy slots it would add
        (+1 alone, 0 next to a busy slot, -1 between two); among equals, the one that
        adds fewer runs, then the one used least recently."""
        busy = {slot.seq_id for slot in self._by_request.values()}

        def score(slot: Slot) -> tuple[int, int, int]:
            runs = 1 - ((slot.seq_id - 1) in busy) - ((slot.seq_id + 1) in busy)
            return (
                shared_prefix(slot.kv, tokens) - SPLIT_COST_TOKENS * runs,
                -runs,
                -slot.last_used,
            )

        return max(free, key=score)

    def _reuse(self, loaded: LoadedModel, slot: Slot) -> None:
        """Keep the KV cells of the slot's kept tokens that start its new prompt and
        free the rest; prefilling starts after them. The last prompt token is always
        decoded again: its logits give the first token."""
        common = min(shared_prefix(slot.kv, slot.prompt), len(slot.prompt) - 1)
        if common < len(slot.kv):
            if not loaded.context.trim(slot.seq_id, common):
                loaded.context.forget(slot.seq_id)  # a memory that cannot cut a sequence
                common = 0
            del slot.kv[common:]
        slot.prefilled = slot.n_past = slot.cached = common

    @staticmethod
    def _continuation_problem(model: LlamaModel, generated: list[int]) -> str | None:
        """Why ``generated`` cannot be this model's output so far, if it cannot."""
        n_vocab = model.n_vocab
        for index, token in enumerate(generated):
            if not 0 <= token < n_vocab:
                return f"continued token {index} ({token}) is not in this model's vocabulary"
            if model.is_eog(token):
                return f"continued token {index} ({token}) ends generation"
        return None

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
            self._split(slot, slot.text.push(slot.markers.get(token) or model.piece(token)))
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
        hold too (for the fingerprints). Never raises: a failure is logged, and cells
        that could not be freed are freed before the slot is reused."""
        self._by_request.pop(slot.request_id, None)
        slot.last_used = self.decode_steps
        if keep and slot.request is not None:
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

    @staticmethod
    def _split(slot: Slot, text: str, last: bool = False) -> list[tuple[int, str]]:
        """``text`` as segments ``(kind, text)`` ready to send: ``CONTENT``,
        ``REASONING`` (a thinking request's reasoning) or ``TOOL_CALL`` (a request
        with tools: the text of its calls); ``last``: the end, nothing held."""
        splitter = slot.splitter
        if splitter is None:
            segments: list[tuple[int, str]] = [(CONTENT, text)] if text else []
        else:
            split = splitter.push(text) if text else []
            if last:
                split += splitter.finish()
            segments = [(REASONING if reasoning else CONTENT, part) for reasoning, part in split]
        tools = slot.tools
        if tools is not None:
            separated: list[tuple[int, str]] = []
            for kind, part in segments:
                if kind == CONTENT:
                    separated += tools.push(part)
                else:
                    separated.append((kind, part))
            if last:
                separated += tools.finish()
            segments = separated
        for kind, part in segments:
            if kind != REASONING:
                slot.answer.append(part)
                if kind == CONTENT and slot.output is not None:
                    slot.output.append(part)
        if slot.uncounted and (segments or last):
            LlamaEngine._count(slot, segments[-1][0] if segments else CONTENT)
        return segments

    @staticmethod
    def _paced(
        slot: Slot, segments: list[tuple[int, str]], last: bool, now: float
    ) -> list[tuple[int, str]] | None:
        """The segments to send now under the request's ``text_interval_ms`` (the held
        ones first, joined by kind), or ``None`` to hold them: the first text and the
        end go at once, the rest about once per interval.

        The flushes fall on a grid of the interval on the monotonic clock, not an
        interval after each slot's last: the paced slots with one interval flush in
        the same step, so their text costs the agent, the balancer and the HTTP
        workers one wakeup per interval, not one per step (16 slots flushing 100 ms
        apart each, out of phase, had text in nearly every step). A grid point less
        than half an interval away is skipped: frames are 0.5 to 1.5 intervals apart.
        ``now`` is the step's clock, one reading for every slot: a grid point that
        passed while the slots were sampled counts for all of them in the next step."""
        if not last:
            if not segments and not slot.held:
                return segments
            if now < slot.flush_at:
                slot.held += segments
                return None
            interval = slot.interval_s
            due = (now // interval + 1) * interval
            slot.flush_at = due if due - now >= interval / 2 else due + interval
        if not slot.held:
            return segments
        joined: list[tuple[int, str]] = []
        for kind, part in slot.held + segments:
            if joined and joined[-1][0] == kind:
                joined[-1] = (kind, joined[-1][1] + part)
            else:
                joined.append((kind, part))
        slot.held = []
        return joined

    @staticmethod
    def _keep_budget(loaded: LoadedModel, slot: Slot) -> None:
        """Close a reasoning block that used its request's ``reasoning_budget``: the
        next tokens are the closing marker (when the grammar, if any, allows them)."""
        request = slot.request
        budget = request.get("reasoning_budget") if request is not None else None
        if budget is None or slot.reasoning_tokens + slot.uncounted < budget:
            return
        slot.budget_spent = True
        splitter = slot.splitter
        model = loaded.model
        closing = model.tokenize(splitter.closing + "\n", add_special=False, parse_special=True)
        if closing and not model.piece(closing[0]).strip():
            del closing[0]  # a tokenizer's space before a word (SentencePiece's prefix)
        sampler = slot.sampler
        if sampler is not None and sampler.grammar is not None:
            log.info("request %d: no reasoning budget with a grammar", slot.request_id)
            return
        slot.forced = closing[::-1]
        log.debug("request %d: reasoning budget of %d tokens spent", slot.request_id, budget)

    @staticmethod
    def _count(slot: Slot, kind: int) -> None:
        """Count the tokens whose text just went out (held back text goes out later,
        with the text that decides what it is) as ``kind``."""
        if kind == REASONING:
            slot.reasoning_tokens += slot.uncounted
        elif kind == TOOL_CALL:
            slot.tool_call_tokens += slot.uncounted
        slot.uncounted = 0

    def _emit(self, sink: EventSink, slot: Slot, text: str, last: bool = False) -> None:
        """Send ``text`` with the ids of the tokens sampled since the last piece
        (reasoning, tool calls and answer apart); ids whose text is all held back
        wait. A tool-call block that ended is parsed and its outcome sent after it."""
        segments = self._split(slot, text, last)
        if slot.interval_s:
            paced = self._paced(slot, segments, last, self._step_clock)
            if paced is None:
                return  # held, with the ids and log-probabilities of their tokens
            segments = paced
        if segments:
            token_ids, slot.unsent = slot.unsent, []
            if slot.unsent_logprobs:
                logprobs, slot.unsent_logprobs = slot.unsent_logprobs, []
                sink.logprobs(slot.request_id, logprobs)
            for kind, part in segments:
                if kind == CONTENT:
                    sink.tokens(slot.request_id, [part], token_ids)
                elif kind == REASONING:
                    sink.reasoning(slot.request_id, [part], token_ids)
                else:
                    sink.tool_call(slot.request_id, [part], token_ids)
                token_ids = []
        tools = slot.tools
        if tools is not None and tools.finished:
            request = slot.request
            assert request is not None
            for block in tools.finished:
                outcome = parse_block(tools.format, block, request["tools"])
                if not outcome.parsed:
                    log.info(
                        "request %d: a tool call that is %s: %s",
                        slot.request_id,
                        outcome.outcome.replace("_", " "),
                        "; ".join(outcome.errors),
                    )
                if request.get("parse_tool_calls"):
                    sink.tool_calls(slot.request_id, outcome.to_body())
            tools.finished.clear()

    def _done(self, sink: EventSink, loaded: LoadedModel, slot: Slot) -> None:
        self._emit(sink, slot, slot.text.finish(), last=True)
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
            self._keep_budget(loaded, slot)
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
        self._emit(sink, slot, text)
        if (
            slot.text.stopped
            or slot.generated >= slot.max_tokens
            or slot.n_past + 1 >= loaded.n_ctx_seq
        ):
            self._done(sink, loaded, slot)
            return
        slot.next_token = token

    def _assemble(self, loaded: LoadedModel, prefill_limit: int) -> int:
        """Fill the batch in slot order (see ``SPLIT_COST_TOKENS``): each generating
        slot's token, and prompt chunks of at most ``prefill_limit`` tokens in all in
        the room the generating slots leave. Returns the prompt tokens added."""
        builder = loaded.builder
        builder.clear()
        slots = sorted(self._by_request.values(), key=_seq_id)
        generating = sum(1 for slot in slots if slot.next_token >= 0)
        room = min(loaded.n_batch - generating, prefill_limit)
        prefilled = 0
        for slot in slots:
            slot.step_prefill = 0
            slot.step_token = slot.next_token
            if slot.next_token >= 0:
                slot.logits_index = builder.add(slot.next_token, slot.n_past, slot.seq_id, True)
                slot.kv.append(slot.next_token)
                slot.n_past += 1
                slot.next_token = -1
            remaining = len(slot.prompt) - slot.prefilled
            if remaining <= 0 or room <= 0:
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
            slot.kv += slot.prompt[slot.prefilled : slot.prefilled + count]
            slot.prefilled += count
            slot.n_past += count
            slot.step_prefill = count
            room -= count
            prefilled += count
        return prefilled

    def _decode(self, sink: EventSink, loaded: LoadedModel) -> bool:
        """Assemble and decode the step's batch; ``False`` when there was nothing to do.

        When llama.cpp finds no room in the KV cache (1) for a batch with prompt
        chunks, the step is taken again with half the prompt tokens (down to none,
        while there are decode tokens); what still fails goes to ``_decode_failed``.
        """
        prefill_limit = loaded.n_batch
        while True:
            prefilled = self._assemble(loaded, prefill_limit)
            if loaded.builder.n_tokens == 0:
                return False
            self.decode_steps += 1
            result = loaded.context.decode(loaded.batch)
            if result == 0:
                return True
            decode_tokens = loaded.builder.n_tokens - prefilled
            if result == 1 and prefilled and (prefilled > 1 or decode_tokens):
                self._roll_back(self._in_batch())
                prefill_limit = prefilled // 2
                log.info(
                    "no room in the KV cache for %d prompt tokens; trying %d",
                    prefilled,
                    prefill_limit,
                )
                continue
            self._decode_failed(sink, loaded, result)
            return True

    def _in_batch(self) -> list[Slot]:
        return [s for s in self._by_request.values() if s.step_token >= 0 or s.step_prefill]

    def _roll_back(self, slots: list[Slot]) -> None:
        """Undo the current batch's progress of ``slots`` (llama.cpp kept none of it)."""
        for slot in slots:
            slot.logits_index = -1
            if slot.step_token >= 0:
                slot.n_past -= 1
                slot.next_token = slot.step_token
            slot.prefilled -= slot.step_prefill
            slot.n_past -= slot.step_prefill
            del slot.kv[slot.n_past :]
            slot.step_token = -1
            slot.step_prefill = 0

    def _decode_failed(self, sink: EventSink, loaded: LoadedModel, result: int) -> None:
        """End the fewest requests possible after a failed decode.

        1 (no room in the KV cache, even without prompt chunks): llama.cpp kept the
        cache as it was, so the request holding the most cells (in the batch or
        not) ends and the others take this step again. Other codes (2: aborted,
        negative: error) may leave part of the batch in the cache: every request in
        the batch ends (its cells are freed) and the others go on.
        """
        in_batch = self._in_batch()
        if result != 1:
            log.error(
                "llama_decode returned %d; ending the %d requests of its batch",
                result,
                len(in_batch),
            )
            for slot in in_batch:
                sink.error(slot.request_id, 500, "DecodeFailed", f"llama_decode returned {result}")
                self._finish(loaded, slot, keep=False)  # part of the batch may be in
            return
        self._roll_back(in_batch)
        holders = [s for s in self._by_request.values() if s.n_past > 0] or in_batch
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
        self._downloads.cancel()
        for slot in self._slots:
            try:
                slot.release()
            except Exception:
                log.exception("closing the sampler chain of slot %d failed", slot.seq_id)
        self._slots = [Slot(seq_id) for seq_id in range(self.slots_total)]
        self._held = {slot.seq_id: [] for slot in self._slots}
        loaded, self._loaded = self._loaded, None
        if loaded is not None:
            try:
                loaded.close()
            except Exception:
                log.exception("closing the model after an engine fault failed")
        self._pending_state = None
        self._has_pending_state = False
        self._applied_key = ("never",)
        self._applied_state = None
        self._board.reset()
        self.apply_state(state)

    def close(self) -> None:
        self._embedding.clear()
        self._downloads.stop_all(FETCH_STOP_WAIT_S)
        if self._loaded is not None:
            for slot in list(self._by_request.values()):
                self._finish(self._loaded, slot)
            self._loaded.close()
            self._loaded = None
