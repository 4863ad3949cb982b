"""The real engine: continuous batching over one llama.cpp model and context.

This is the only module that imports ``llama_cpp``. One model, one context with
``n_seq_max = slots`` (every slot is a sequence id with its own part of the KV
cache: ``context_size`` cells each), and one loop:

1. requests that arrived join free slots (prompt rendered and tokenized);
2. cancelled requests end (their KV cells are freed) before anything else runs;
3. every slot whose logits came out of the last decode samples one token through
   its own sampler chain; text pieces go out (one frame per request per step),
   finished requests end (end of generation, ``max_tokens``, stop string, context);
4. the next batch is assembled: one token for each generating slot first, then
   prompt chunks of prefilling slots up to ``n_batch``;
5. ``llama_decode`` runs once (ctypes releases the GIL: the I/O thread goes on).

Native handles (model, context, batch, samplers) are freed explicitly in
``close()`` and when swapped, never left to ``__del__``.
"""

from __future__ import annotations

import ctypes
import json
import logging
import math
import os
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import llama_cpp as lc
import llama_cpp.llama_cpp as lcc

from paddler._core import BatchBuilder, TextAssembler
from paddler.agent.chat_template import ChatTemplate, ChatTemplateError
from paddler.agent.engine import CANCELLED_CODE, Engine, EventSink
from paddler.broker.desired_state import DEFAULT_INFERENCE_PARAMETERS
from paddler.errors import EngineError
from paddler.protocol.messages import AgentStatus
from paddler.protocol.requests import is_embedding_request

log = logging.getLogger("paddler.agent")
native_log = logging.getLogger("paddler.agent.llama_cpp")

CACHE_TYPES = {
    "F32": 0,
    "F16": 1,
    "Q4_0": 2,
    "Q4_1": 3,
    "Q5_0": 6,
    "Q5_1": 7,
    "Q8_0": 8,
    "IQ4_NL": 20,
    "BF16": 30,
}
POOLING_TYPES = {"Unspecified": -1, "None": 0, "Mean": 1, "Cls": 2, "Last": 3, "Rank": 4}

_n_ctx_seq = lcc._lib.llama_n_ctx_seq
_n_ctx_seq.argtypes = [lcc.llama_context_p_ctypes]
_n_ctx_seq.restype = ctypes.c_uint32

# ggml_log_level: 0 none, 1 debug, 2 info, 3 warn, 4 error, 5 continuation
_NATIVE_LEVELS = {1: logging.DEBUG, 2: logging.DEBUG, 3: logging.WARNING, 4: logging.ERROR}


@lcc.llama_log_callback  # type: ignore[untyped-decorator]
def _route_native_log(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
    message = text.decode("utf-8", "replace").rstrip()
    if message:
        native_log.log(_NATIVE_LEVELS.get(level, logging.DEBUG), "%s", message)


_backend_ready = False


def _init_backend() -> None:
    global _backend_ready
    if not _backend_ready:
        lcc.llama_log_set(_route_native_log, ctypes.c_void_p(0))
        lc.llama_backend_init()
        _backend_ready = True


# ----------------------------------------------------------------------------- model


class LlamaModel:
    """A loaded GGUF model and its vocabulary."""

    def __init__(self, path: Path, n_gpu_layers: int = 0) -> None:
        _init_backend()
        params = lc.llama_model_default_params()
        params.n_gpu_layers = n_gpu_layers
        self.path = path
        self.ptr = lc.llama_model_load_from_file(str(path).encode(), params)
        if not self.ptr:
            raise EngineError(f"llama.cpp could not load {path}")
        self.vocab = lc.llama_model_get_vocab(self.ptr)
        self.n_vocab = lc.llama_vocab_n_tokens(self.vocab)
        self.n_embd = lc.llama_model_n_embd(self.ptr)
        self._pieces: dict[int, bytes] = {}
        self.metadata = self._read_metadata()
        self.bos_token = self.token_text(lc.llama_vocab_bos(self.vocab))
        self.eos_token = self.token_text(lc.llama_vocab_eos(self.vocab))
        self.add_bos = bool(lc.llama_vocab_get_add_bos(self.vocab))

    def _read_metadata(self) -> dict[str, str]:
        out: dict[str, str] = {}
        buffer = ctypes.create_string_buffer(65536)
        for index in range(lc.llama_model_meta_count(self.ptr)):
            size = lc.llama_model_meta_key_by_index(self.ptr, index, buffer, len(buffer))
            if size < 0:
                continue
            key = buffer.value.decode("utf-8", "replace")
            size = lc.llama_model_meta_val_str_by_index(self.ptr, index, buffer, len(buffer))
            if size >= len(buffer):  # long values (chat templates): read in full
                large = ctypes.create_string_buffer(size + 1)
                lc.llama_model_meta_val_str_by_index(self.ptr, index, large, len(large))
                out[key] = large.value.decode("utf-8", "replace")
            elif size >= 0:
                out[key] = buffer.value.decode("utf-8", "replace")
        return out

    def token_text(self, token: int) -> str:
        if token < 0:
            return ""
        text = lc.llama_vocab_get_text(self.vocab, token)
        return text.decode("utf-8", "replace") if text else ""

    def tokenize(self, text: str, add_special: bool, parse_special: bool = True) -> list[int]:
        data = text.encode("utf-8")
        capacity = len(data) + 8
        tokens = (lc.llama_token * capacity)()
        count = lc.llama_tokenize(
            self.vocab, data, len(data), tokens, capacity, add_special, parse_special
        )
        if count < 0:
            capacity = -count
            tokens = (lc.llama_token * capacity)()
            count = lc.llama_tokenize(
                self.vocab, data, len(data), tokens, capacity, add_special, parse_special
            )
        return list(tokens[:count])

    def piece(self, token: int) -> bytes:
        """The bytes a token stands for (control tokens: none). Cached per token."""
        cached = self._pieces.get(token)
        if cached is None:
            buffer = ctypes.create_string_buffer(64)
            size = lc.llama_token_to_piece(self.vocab, token, buffer, 64, 0, False)
            if size < 0:
                buffer = ctypes.create_string_buffer(-size)
                size = lc.llama_token_to_piece(self.vocab, token, buffer, -size, 0, False)
            cached = self._pieces[token] = buffer.raw[: max(size, 0)]
        return cached

    def is_eog(self, token: int) -> bool:
        return bool(lc.llama_vocab_is_eog(self.vocab, token))

    def close(self) -> None:
        if self.ptr:
            lc.llama_model_free(self.ptr)
            self.ptr = None

    def __enter__(self) -> LlamaModel:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ----------------------------------------------------------------------------- samplers


class GrammarError(Exception):
    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


def grammar_text(grammar: dict[str, Any]) -> tuple[str, str]:
    """GBNF rules and root of a request's grammar (JSON schemas are converted)."""
    if grammar["type"] == "gbnf":
        return grammar["grammar"], grammar.get("root", "root")
    from llama_cpp.llama_grammar import json_schema_to_gbnf

    try:
        json.loads(grammar["schema"])
    except json.JSONDecodeError as exc:
        raise GrammarError("GrammarSyntaxError", f"the JSON schema is not JSON: {exc}") from exc
    try:
        return json_schema_to_gbnf(grammar["schema"]), "root"
    except Exception as exc:  # the converter raises many types for bad schemas
        raise GrammarError(
            "GrammarInitializationFailed", f"cannot turn the JSON schema into a grammar: {exc}"
        ) from exc


def schema_problem(schema: Any, text: str) -> str | None:
    """Why ``text`` is not JSON valid under ``schema``, or ``None`` if it is."""
    import jsonschema

    try:
        jsonschema.validate(json.loads(text), schema)
    except json.JSONDecodeError as exc:
        return f"the output is not complete JSON ({exc}); raise max_tokens?"
    except jsonschema.ValidationError as exc:
        return f"the output does not match the schema: {exc.message}"
    except jsonschema.SchemaError as exc:
        return f"the schema is invalid: {exc.message}"
    return None


def build_sampler(
    model: LlamaModel, parameters: dict[str, Any], request: dict[str, Any], n_ctx_seq: int
) -> Any:
    """A sampler chain for one request: grammar, penalties, top-k, top-p, min-p,
    temperature (0 = greedy), seeded distribution. Caller frees it."""
    chain = lc.llama_sampler_chain_init(lc.llama_sampler_chain_default_params())

    def pick(name: str) -> Any:
        value = request.get(name)
        return parameters[name] if value is None else value

    try:
        grammar = request.get("grammar")
        if grammar is not None:
            rules, root = grammar_text(grammar)
            sampler = lc.llama_sampler_init_grammar(model.vocab, rules.encode(), root.encode())
            if not sampler:
                raise GrammarError("GrammarSyntaxError", "llama.cpp could not parse the grammar")
            lc.llama_sampler_chain_add(chain, sampler)
        last_n = parameters["penalty_last_n"]
        if last_n < 0:
            last_n = n_ctx_seq
        if last_n and (
            parameters["penalty_repeat"] != 1.0
            or parameters["penalty_frequency"] != 0.0
            or parameters["penalty_presence"] != 0.0
        ):
            lc.llama_sampler_chain_add(
                chain,
                lc.llama_sampler_init_penalties(
                    model.n_vocab,
                    last_n,
                    parameters["penalty_repeat"],
                    parameters["penalty_frequency"],
                    parameters["penalty_presence"],
                ),
            )
        temperature = float(pick("temperature"))
        if temperature <= 0.0:
            lc.llama_sampler_chain_add(chain, lc.llama_sampler_init_greedy())
            return chain
        top_k = int(pick("top_k"))
        if top_k > 0:
            lc.llama_sampler_chain_add(chain, lc.llama_sampler_init_top_k(top_k))
        lc.llama_sampler_chain_add(chain, lc.llama_sampler_init_top_p(float(pick("top_p")), 1))
        lc.llama_sampler_chain_add(chain, lc.llama_sampler_init_min_p(float(pick("min_p")), 1))
        lc.llama_sampler_chain_add(chain, lc.llama_sampler_init_temp(temperature))
        seed = request.get("seed")
        lc.llama_sampler_chain_add(
            chain, lc.llama_sampler_init_dist(lc.LLAMA_DEFAULT_SEED if seed is None else seed)
        )
        return chain
    except BaseException:
        lc.llama_sampler_free(chain)
        raise


# ----------------------------------------------------------------------------- slots


@dataclass
class _Slot:
    seq_id: int
    request_id: int = -1
    prompt: list[int] = field(default_factory=list)
    prefilled: int = 0
    n_past: int = 0
    generated: int = 0
    max_tokens: int = 0
    sampler: Any = None
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

    @property
    def busy(self) -> bool:
        return self.request_id >= 0


def normalize(vector: list[float], method: Any) -> list[float]:
    """``None``, ``L2`` (unit length) or ``{"RmsNorm": {"epsilon": e}}`` (unit RMS)."""
    if method == "L2":
        norm = math.sqrt(sum(v * v for v in vector))
        return [v / norm for v in vector] if norm > 0 else vector
    if isinstance(method, dict) and "RmsNorm" in method:
        epsilon = method["RmsNorm"]["epsilon"]
        scale = 1.0 / math.sqrt(sum(v * v for v in vector) / max(len(vector), 1) + epsilon)
        return [v * scale for v in vector]
    return vector


class _Embedder:
    """A second context on the same model with pooled embeddings on: one document
    per decode, the whole document in one micro-batch (pooling needs it)."""

    def __init__(self, model: LlamaModel, parameters: dict[str, Any], n_threads: int) -> None:
        self.model = model
        self.pooling_name = parameters["pooling_type"]
        size = max(parameters["embedding_batch_size"], 16)
        params = lc.llama_context_default_params()
        params.embeddings = True
        params.pooling_type = POOLING_TYPES[self.pooling_name]
        params.n_ctx = max(size, 256)
        params.n_batch = params.n_ubatch = size
        params.n_seq_max = 1
        params.n_threads = params.n_threads_batch = n_threads
        params.no_perf = True
        self.context = lc.llama_init_from_model(model.ptr, params)
        if not self.context:
            raise EngineError("llama.cpp could not create an embedding context")
        self.size = int(lc.llama_n_ubatch(self.context))
        self.batch = lc.llama_batch_init(self.size, 0, 1)
        self.builder = BatchBuilder(self.batch, self.size)
        self.memory = lc.llama_get_memory(self.context)
        self.encoder = bool(lc.llama_model_has_encoder(model.ptr))

    def embed(self, tokens: list[int]) -> list[float] | None:
        lc.llama_memory_clear(self.memory, True)
        self.builder.clear()
        for position, token in enumerate(tokens):
            self.builder.add(token, position, 0, True)
        run = lc.llama_encode if self.encoder else lc.llama_decode
        if run(self.context, self.batch) != 0:
            return None
        values = lc.llama_get_embeddings_seq(self.context, 0)
        if not values:
            values = lc.llama_get_embeddings_ith(self.context, len(tokens) - 1)
        if not values:
            return None
        return [float(values[i]) for i in range(self.model.n_embd)]

    def close(self) -> None:
        if self.batch is not None:
            lc.llama_batch_free(self.batch)
            self.batch = None
        if self.context:
            lc.llama_free(self.context)
            self.context = None


@dataclass
class _Loaded:
    model: LlamaModel
    context: Any
    batch: Any
    builder: Any
    n_batch: int
    n_ctx_seq: int
    parameters: dict[str, Any]
    template: ChatTemplate | None
    template_issue: dict[str, Any] | None
    memory: Any
    embedder: _Embedder | None = None

    def close(self) -> None:
        if self.embedder is not None:
            self.embedder.close()
            self.embedder = None
        if self.batch is not None:
            lc.llama_batch_free(self.batch)
            self.batch = None
        if self.context:
            lc.llama_free(self.context)
            self.context = None
        self.model.close()


def _state_key(state: dict[str, Any] | None) -> Any:
    if state is None:
        return None
    return (
        repr(state.get("model")),
        repr(sorted(state.get("inference_parameters", {}).items())),
        state.get("chat_template_override") if state.get("use_chat_template_override") else None,
    )


ModelResolver = Callable[[Any, Callable[[int, int | None, str], None]], Path | None]


def resolve_local(source: Any, progress: Callable[[int, int | None, str], None]) -> Path | None:
    """Resolve a model source with ``paddler.agent.model_source``."""
    from paddler.agent.model_source import resolve_model

    return resolve_model(source, progress=progress, show_progress=True)


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
        self._loaded: _Loaded | None = None
        self._slots = [_Slot(seq_id) for seq_id in range(slots_total)]
        self._by_request: dict[int, _Slot] = {}
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
        if _state_key(state) == self._applied_key:
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
        key = _state_key(state)
        if self._loaded is not None:
            self._loaded.close()
            self._loaded = None
        self._applied_key = key
        self._applied_state = state
        if state is None or state.get("model", "None") == "None":
            self._set_status(
                ready=False, model_path=None, issues=[], state_application_status="Applied"
            )
            return
        parameters = {**DEFAULT_INFERENCE_PARAMETERS, **state.get("inference_parameters", {})}
        self._set_status(ready=False, issues=[], state_application_status="Fresh")
        try:
            path = self.resolver(state["model"], self._progress)
        except Exception as exc:
            issue = getattr(exc, "issue", None) or {
                "ModelCannotBeLoaded": {"model_path": str(state["model"]), "error": str(exc)}
            }
            log.error("cannot get the model: %s", exc)
            self._set_status(issues=[issue], state_application_status="AttemptedAndNotAppliable")
            return
        if path is None:
            self._set_status(model_path=None, state_application_status="Applied")
            return
        try:
            self._loaded = self._load(path, state, parameters)
        except Exception as exc:
            log.error("cannot load the model %s: %s", path, exc)
            self._set_status(
                model_path=str(path),
                issues=[{"ModelCannotBeLoaded": {"model_path": str(path), "error": str(exc)}}],
                state_application_status="AttemptedAndNotAppliable",
            )
            return
        issues = [self._loaded.template_issue] if self._loaded.template_issue else []
        self._set_status(
            ready=True,
            model_path=str(path),
            issues=issues,
            state_application_status="Applied",
            uses_chat_template_override=bool(state.get("use_chat_template_override")),
        )
        log.info(
            "model %s loaded: %d slots of %d tokens", path, self.slots_total, self._loaded.n_ctx_seq
        )

    def _load(self, path: Path, state: dict[str, Any], parameters: dict[str, Any]) -> _Loaded:
        model = LlamaModel(path, parameters["n_gpu_layers"])
        try:
            params = lc.llama_context_default_params()
            params.n_ctx = parameters["context_size"] * self.slots_total
            params.n_batch = parameters["n_batch"]
            params.n_ubatch = min(parameters["n_batch"], 512)
            params.n_seq_max = self.slots_total
            params.n_threads = self.n_threads
            params.n_threads_batch = self.n_threads
            params.kv_unified = False
            params.no_perf = True
            params.type_k = CACHE_TYPES[parameters["k_cache_dtype"]]
            params.type_v = CACHE_TYPES[parameters["v_cache_dtype"]]
            context = lc.llama_init_from_model(model.ptr, params)
            if not context and (params.type_k != 1 or params.type_v != 1):
                log.warning("quantized KV cache not supported here; using F16")
                params.type_k = params.type_v = 1
                context = lc.llama_init_from_model(model.ptr, params)
            if not context:
                raise EngineError("llama.cpp could not create a context")
            n_batch = int(lc.llama_n_batch(context))
            batch = lc.llama_batch_init(n_batch, 0, 1)
            template, issue = self._template(model, state)
            return _Loaded(
                model=model,
                context=context,
                batch=batch,
                builder=BatchBuilder(batch, n_batch),
                n_batch=n_batch,
                n_ctx_seq=int(_n_ctx_seq(context)),
                parameters=parameters,
                template=template,
                template_issue=issue,
                memory=lc.llama_get_memory(context),
            )
        except BaseException:
            model.close()
            raise

    def _template(
        self, model: LlamaModel, state: dict[str, Any]
    ) -> tuple[ChatTemplate | None, dict[str, Any] | None]:
        if state.get("use_chat_template_override"):
            source = (state.get("chat_template_override") or {}).get("content", "")
        else:
            source = model.metadata.get("tokenizer.chat_template", "")
        if not source:
            return None, {"UnableToFindChatTemplate": {"model_path": str(model.path)}}
        try:
            return ChatTemplate(source, model.bos_token, model.eos_token), None
        except ChatTemplateError as exc:
            return None, {"ChatTemplateDoesNotCompile": {"error": str(exc)}}

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

    def _prompt_tokens(self, loaded: _Loaded, request: dict[str, Any]) -> list[int]:
        model = loaded.model
        if "raw_prompt" in request:
            return model.tokenize(request["raw_prompt"], add_special=True)
        if loaded.template is None:
            raise ChatTemplateError(
                "this model has no chat template; set chat_template_override in the desired state"
            )
        text = loaded.template.render(
            request["conversation_history"],
            add_generation_prompt=request["add_generation_prompt"],
            enable_thinking=request["enable_thinking"],
            tools=request.get("tools"),
        )
        # the template usually writes the BOS itself: never add a second one
        starts_with_bos = bool(model.bos_token) and text.startswith(model.bos_token)
        return model.tokenize(text, add_special=model.add_bos and not starts_with_bos)

    def _start(self, sink: EventSink, loaded: _Loaded) -> None:
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
            slot.request_id = request_id
            slot.prompt = prompt
            slot.prefilled = 0
            slot.n_past = 0
            slot.generated = 0
            slot.max_tokens = request["max_tokens"]
            slot.sampler = sampler
            slot.text = TextAssembler(request.get("stop") or [])
            slot.logits_index = -1
            slot.next_token = -1
            slot.cancelled = False
            grammar = request.get("grammar")
            slot.schema = None
            slot.output = None
            if grammar is not None and grammar["type"] == "json_schema":
                slot.schema = json.loads(grammar["schema"])
                slot.output = []
            self._by_request[request_id] = slot

    def _embed(
        self, sink: EventSink, loaded: _Loaded, request_id: int, request: dict[str, Any]
    ) -> None:
        """Embed every document of a request; each document's result goes out at once."""
        parameters = loaded.parameters
        if not parameters["enable_embeddings"]:
            sink.error(
                request_id,
                400,
                "EmbeddingsDisabled",
                "embeddings are off; set inference_parameters.enable_embeddings",
            )
            return
        if loaded.embedder is None:
            try:
                loaded.embedder = _Embedder(loaded.model, parameters, self.n_threads)
            except EngineError as exc:
                sink.error(request_id, 500, "EmbeddingsUnavailable", str(exc))
                return
        embedder = loaded.embedder
        method = request["normalization_method"]
        prompt_tokens = 0
        for document in request["input_batch"]:
            tokens = loaded.model.tokenize(document["content"], add_special=True)
            if len(tokens) > embedder.size:
                sink.embedding(
                    request_id,
                    {
                        "DocumentExceedsBatchSize": {
                            "document_tokens": len(tokens),
                            "embedding_batch_size": embedder.size,
                            "source_document_id": document["id"],
                        }
                    },
                )
                continue
            vector = embedder.embed(tokens)
            if vector is None:
                sink.embedding(request_id, {"Error": f"document {document['id']!r} failed"})
                continue
            prompt_tokens += len(tokens)
            sink.embedding(
                request_id,
                {
                    "Embedding": {
                        "embedding": normalize(vector, method),
                        "normalization_method": method,
                        "pooling_type": embedder.pooling_name,
                        "source_document_id": document["id"],
                    }
                },
            )
        sink.done(request_id, {"prompt_tokens": prompt_tokens})

    def _finish(self, loaded: _Loaded, slot: _Slot) -> None:
        lc.llama_memory_seq_rm(loaded.memory, slot.seq_id, -1, -1)
        if slot.sampler is not None:
            lc.llama_sampler_free(slot.sampler)
        del self._by_request[slot.request_id]
        slot.request_id = -1
        slot.sampler = None
        slot.text = None
        slot.prompt = []
        slot.logits_index = -1
        slot.next_token = -1

    def _emit(self, sink: EventSink, slot: _Slot, text: str) -> None:
        if text:
            sink.tokens(slot.request_id, [text])
            if slot.output is not None:
                slot.output.append(text)

    def _done(self, sink: EventSink, loaded: _Loaded, slot: _Slot) -> None:
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
            if slot.logits_index < 0:
                continue
            token = lc.llama_sampler_sample(slot.sampler, context, slot.logits_index)
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
        result = lc.llama_decode(context, loaded.batch)
        if result != 0:
            self._decode_failed(sink, loaded, result)
        if self._has_pending_state and not self._by_request and not self._incoming:
            self._swap()

    def _decode_failed(self, sink: EventSink, loaded: _Loaded, result: int) -> None:
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
