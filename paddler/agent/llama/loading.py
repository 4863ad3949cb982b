"""A desired state turned into a loaded model: resolve its source, load the model,
create the context and batch, pick the chat template, report every stage.

A load that fails half way frees what it already holds (model, context, batch: one
``ExitStack``) and becomes an issue in the agent's status; the engine keeps running
without a model.

A source that may download (``Url``, ``HuggingFace``: ``needs_download``) is resolved
by a ``ModelFetch``, on a thread of its own, so the engine thread keeps stepping (and
answering) meanwhile; the engine loads the file once the fetch has finished
(``load_resolved``). A fetch is cancelled by a newer desired state: the download
stops between two chunks (a blocked read is cut off), and its partial file stays to
be resumed. A local path is resolved on the engine thread: it is one ``stat``.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from paddler._core import BatchBuilder
from paddler.agent.chat_template import ChatTemplate, ChatTemplateError
from paddler.agent.llama.embedder import Embedder
from paddler.agent.llama.native import (
    CACHE_TYPE_F16,
    CACHE_TYPES,
    LlamaBatch,
    LlamaContext,
    LlamaModel,
)
from paddler.errors import EngineError
from paddler.protocol.desired_state import DEFAULT_INFERENCE_PARAMETERS

if TYPE_CHECKING:
    from paddler.agent.source_rules import ModelSourceRules

log = logging.getLogger("paddler.agent")

ProgressCallback = Callable[[int, int | None, str], None]
"""``progress(current_bytes, total_bytes_or_None, filename)`` while a model downloads."""

ModelResolver = Callable[..., Path | None]
"""Turns the ``model`` of a desired state into a local file (``None``: no model):
called as ``resolver(source, progress)``, and, when it has a ``cancel`` parameter
(as ``resolve_local`` and ``model_resolver``'s have), a download is given
``cancel=<threading.Event>`` too: set, the download stops (``DownloadCancelled``)."""


def resolve_local(
    source: Any, progress: ProgressCallback, cancel: threading.Event | None = None
) -> Path | None:
    """Resolve a model source with ``paddler.agent.model_source``."""
    from paddler.agent.model_source import resolve_model

    return resolve_model(source, progress=progress, show_progress=True, cancel=cancel)


def model_resolver(rules: ModelSourceRules) -> ModelResolver:
    """A resolver that applies the operator's rules (``ModelSourceRules.from_settings``)."""
    from paddler.agent.model_source import resolve_model

    if not rules.model_dirs:
        log.warning("no --model-dir given: a LocalToAgent model may name any file here")

    def resolve(
        source: Any, progress: ProgressCallback, cancel: threading.Event | None = None
    ) -> Path | None:
        return resolve_model(
            source, progress=progress, show_progress=True, rules=rules, cancel=cancel
        )

    return resolve


def takes_cancel(resolver: ModelResolver) -> bool:
    """Whether ``resolver`` takes a ``cancel`` event (see ``ModelResolver``)."""
    try:
        parameters = inspect.signature(resolver).parameters
    except (TypeError, ValueError):  # a builtin or a C callable: no signature to read
        return False
    return "cancel" in parameters


def needs_download(source: Any) -> bool:
    """Whether resolving ``source`` may download (a ``Url`` or ``HuggingFace`` model):
    then a ``ModelFetch`` resolves it off the engine thread."""
    return isinstance(source, dict) and ("Url" in source or "HuggingFace" in source)


def state_key(state: dict[str, Any] | None) -> Any:
    """What of a desired state needs a reload when it changes."""
    if state is None:
        return None
    return (
        repr(state.get("model")),
        repr(sorted(state.get("inference_parameters", {}).items())),
        state.get("chat_template_override") if state.get("use_chat_template_override") else None,
    )


@dataclass
class LoadedModel:
    """A model ready to serve: its context (one sequence per slot), its batch, and the
    embedder, created on the first embedding request."""

    model: LlamaModel
    context: LlamaContext
    batch: LlamaBatch
    builder: BatchBuilder
    n_batch: int
    n_ctx_seq: int
    parameters: dict[str, Any]
    template: ChatTemplate | None
    template_issue: dict[str, Any] | None
    handles: contextlib.ExitStack
    """Closes the batch, the context and the model, in that order."""
    embedder: Embedder | None = None

    def open_embedder(self, n_threads: int) -> Embedder:
        """The embedder, created now if needed (raises ``EngineError`` if it cannot be)."""
        if self.embedder is None:
            self.embedder = Embedder(self.model, self.parameters, n_threads)
        return self.embedder

    def close(self) -> None:
        if self.embedder is not None:
            self.embedder.close()
            self.embedder = None
        self.handles.close()


def load_model(
    path: Path,
    state: dict[str, Any],
    parameters: dict[str, Any],
    *,
    slots_total: int,
    n_threads: int,
) -> LoadedModel:
    """Load ``path`` for ``slots_total`` slots; on any error nothing stays allocated."""
    with contextlib.ExitStack() as stack:
        model = stack.enter_context(LlamaModel(path, parameters["n_gpu_layers"]))
        context = stack.enter_context(_open_context(model, parameters, slots_total, n_threads))
        n_batch = context.n_batch
        batch = stack.enter_context(LlamaBatch(n_batch))
        template, issue = choose_template(model, state)
        return LoadedModel(
            model=model,
            context=context,
            batch=batch,
            builder=BatchBuilder(batch.struct, n_batch),
            n_batch=n_batch,
            n_ctx_seq=context.n_ctx_seq,
            parameters=parameters,
            template=template,
            template_issue=issue,
            handles=stack.pop_all(),
        )
    raise AssertionError("unreachable")  # mypy: an ExitStack may swallow exceptions


def _open_context(
    model: LlamaModel, parameters: dict[str, Any], slots_total: int, n_threads: int
) -> LlamaContext:
    """One sequence per slot, ``context_size`` cells each; an F16 KV cache when the
    quantized one cannot be created here."""

    def create(type_k: int, type_v: int) -> LlamaContext:
        return LlamaContext(
            model,
            n_ctx=parameters["context_size"] * slots_total,
            n_batch=parameters["n_batch"],
            n_ubatch=min(parameters["n_batch"], 512),
            n_seq_max=slots_total,
            n_threads=n_threads,
            kv_unified=False,
            type_k=type_k,
            type_v=type_v,
        )

    type_k = CACHE_TYPES[parameters["k_cache_dtype"]]
    type_v = CACHE_TYPES[parameters["v_cache_dtype"]]
    try:
        return create(type_k, type_v)
    except EngineError:
        if type_k == CACHE_TYPE_F16 and type_v == CACHE_TYPE_F16:
            raise
    log.warning("quantized KV cache not supported here; using F16")
    return create(CACHE_TYPE_F16, CACHE_TYPE_F16)


def choose_template(
    model: LlamaModel, state: dict[str, Any]
) -> tuple[ChatTemplate | None, dict[str, Any] | None]:
    """The chat template (the override, else the model's) or the issue why there is none."""
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


def apply_model_state(
    state: dict[str, Any] | None,
    *,
    resolver: ModelResolver,
    progress: ProgressCallback,
    set_status: Callable[..., None],
    slots_total: int,
    n_threads: int,
) -> LoadedModel | None:
    """Resolve and load the model of ``state`` (the previous one is already closed),
    reporting each stage with ``set_status(**agent_status_changes)``. ``None`` when
    the state names no model or the model cannot be had: then the status says why.
    The source is resolved here, on the caller's thread (``ModelFetch`` resolves one
    on a thread of its own)."""
    if not begin_model_state(state, set_status):
        return None
    assert state is not None
    try:
        path = resolver(state["model"], progress)
    except Exception as exc:
        source_failed(state, exc, set_status)
        return None
    return load_resolved(
        state, path, set_status=set_status, slots_total=slots_total, n_threads=n_threads
    )


def begin_model_state(state: dict[str, Any] | None, set_status: Callable[..., None]) -> bool:
    """Report that ``state`` is being applied; ``False`` (and the state applied) when
    it names no model."""
    if state is None or state.get("model", "None") == "None":
        set_status(ready=False, model_path=None, issues=[], state_application_status="Applied")
        return False
    set_status(ready=False, issues=[], state_application_status="Fresh")
    return True


def source_failed(
    state: dict[str, Any], exc: BaseException, set_status: Callable[..., None]
) -> None:
    """Report a model source that could not become a file (its issue, or
    ``ModelCannotBeLoaded`` for an error that carries none)."""
    issue = getattr(exc, "issue", None) or {
        "ModelCannotBeLoaded": {"model_path": str(state["model"]), "error": str(exc)}
    }
    log.error("cannot get the model: %s", exc)
    set_status(issues=[issue], state_application_status="AttemptedAndNotAppliable")


def load_resolved(
    state: dict[str, Any],
    path: Path | None,
    *,
    set_status: Callable[..., None],
    slots_total: int,
    n_threads: int,
) -> LoadedModel | None:
    """Load the file the model source of ``state`` resolved to, and report it."""
    parameters = {**DEFAULT_INFERENCE_PARAMETERS, **state.get("inference_parameters", {})}
    if path is None:
        set_status(model_path=None, state_application_status="Applied")
        return None
    try:
        loaded = load_model(path, state, parameters, slots_total=slots_total, n_threads=n_threads)
    except Exception as exc:
        log.error("cannot load the model %s: %s", path, exc)
        set_status(
            model_path=str(path),
            issues=[{"ModelCannotBeLoaded": {"model_path": str(path), "error": str(exc)}}],
            state_application_status="AttemptedAndNotAppliable",
        )
        return None
    set_status(
        ready=True,
        model_path=str(path),
        issues=[loaded.template_issue] if loaded.template_issue else [],
        state_application_status="Applied",
        uses_chat_template_override=bool(state.get("use_chat_template_override")),
    )
    log.info("model %s loaded: %d slots of %d tokens", path, slots_total, loaded.n_ctx_seq)
    return loaded


def _no_progress(current: int, total: int | None, filename: str) -> None:
    return None


PREDECESSOR_WAIT_S = 30.0
"""How long a fetch waits for the cancelled ones before it to stop (they hold the
lock of the file they were downloading, which a fetch of the same URL needs)."""


class ModelFetch:
    """The model source of one desired state, resolved on a thread of its own.

    ``start(progress)`` starts the thread (``progress`` hears the download on that
    thread); ``finished`` tells when it ended, and then ``path``
    (``None``: no model) or ``error`` is its outcome. ``cancel`` stops a download
    between two chunks (the resolver must take ``cancel``: see ``ModelResolver``;
    one that does not runs to its end and its outcome is dropped). A fetch first
    waits (at most ``PREDECESSOR_WAIT_S`` each) for the cancelled fetches ``after``.
    """

    def __init__(
        self,
        state: dict[str, Any],
        resolver: ModelResolver,
        *,
        cancellable: bool,
        after: Sequence[ModelFetch] = (),
    ) -> None:
        self.state = state
        self.path: Path | None = None
        self.error: BaseException | None = None
        self.cancelled = threading.Event()
        self._resolver = resolver
        self._progress: ProgressCallback = _no_progress
        self._cancellable = cancellable
        self._after = tuple(after)
        self._finished = threading.Event()
        self._thread = threading.Thread(
            target=self._run, name="paddler-model-download", daemon=True
        )

    def start(self, progress: ProgressCallback) -> None:
        self._progress = progress
        self._thread.start()

    @property
    def finished(self) -> bool:
        return self._finished.is_set()

    def cancel(self) -> None:
        """Ask the download to stop; returns at once (``join`` waits)."""
        self.cancelled.set()

    def join(self, timeout_s: float) -> bool:
        """Wait at most ``timeout_s`` for the thread to end; ``True`` if it did."""
        if self._thread.ident is None:  # never started
            return True
        self._thread.join(timeout_s)
        return not self._thread.is_alive()

    def _run(self) -> None:
        try:
            for earlier in self._after:
                if not earlier.join(PREDECESSOR_WAIT_S):
                    log.warning("a cancelled model download is still running")
            if self.cancelled.is_set():
                return
            source = self.state["model"]
            if self._cancellable:
                self.path = self._resolver(source, self._progress, cancel=self.cancelled)
            else:
                self.path = self._resolver(source, self._progress)
        except BaseException as exc:  # reported by the engine thread, or dropped if cancelled
            self.error = exc
        finally:
            self._finished.set()
