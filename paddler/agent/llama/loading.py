"""A desired state turned into a loaded model: resolve its source, load the model,
create the context and batch, pick the chat template, report every stage.

A load that fails half way frees what it already holds (model, context, batch: one
``ExitStack``) and becomes an issue in the agent's status; the engine keeps running
without a model.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
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

ModelResolver = Callable[[Any, ProgressCallback], Path | None]
"""Turns the ``model`` of a desired state into a local file (``None``: no model)."""


def resolve_local(source: Any, progress: ProgressCallback) -> Path | None:
    """Resolve a model source with ``paddler.agent.model_source``."""
    from paddler.agent.model_source import resolve_model

    return resolve_model(source, progress=progress, show_progress=True)


def model_resolver(rules: ModelSourceRules) -> ModelResolver:
    """A resolver that applies the operator's rules (``ModelSourceRules.from_settings``)."""
    from paddler.agent.model_source import resolve_model

    if not rules.model_dirs:
        log.warning("no --model-dir given: a LocalToAgent model may name any file here")

    def resolve(source: Any, progress: ProgressCallback) -> Path | None:
        return resolve_model(source, progress=progress, show_progress=True, rules=rules)

    return resolve


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
    the state names no model or the model cannot be had: then the status says why."""
    if state is None or state.get("model", "None") == "None":
        set_status(ready=False, model_path=None, issues=[], state_application_status="Applied")
        return None
    parameters = {**DEFAULT_INFERENCE_PARAMETERS, **state.get("inference_parameters", {})}
    set_status(ready=False, issues=[], state_application_status="Fresh")
    try:
        path = resolver(state["model"], progress)
    except Exception as exc:
        issue = getattr(exc, "issue", None) or {
            "ModelCannotBeLoaded": {"model_path": str(state["model"]), "error": str(exc)}
        }
        log.error("cannot get the model: %s", exc)
        set_status(issues=[issue], state_application_status="AttemptedAndNotAppliable")
        return None
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
