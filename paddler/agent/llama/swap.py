"""The engine's model: a desired state applied (drained first, then swapped), a
model that must be downloaded fetched on a thread of its own and loaded on the engine
thread when it arrives, and the agent's status while all that happens.

``LlamaEngine`` (``paddler.agent.llama.scheduler``) is one of these: the loop over
the slots is there, the model it runs on is here.

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
import os
from collections.abc import Callable
from typing import Any

from paddler.agent.engine import Engine
from paddler.agent.llama.loading import (
    LoadedModel,
    ModelResolver,
    apply_model_state,
    begin_model_state,
    load_resolved,
    needs_download,
    source_failed,
    state_key,
    takes_cancel,
)
from paddler.agent.llama.native import LlamaModel
from paddler.agent.llama.status import Downloads, StatusBoard
from paddler.protocol.messages import AgentStatus

log = logging.getLogger("paddler.agent")

FETCH_STOP_WAIT_S = 5.0
"""How long ``close`` waits for cancelled downloads to stop."""


class ModelSwap(Engine):
    """The model half of an engine; subclasses serve requests on ``_loaded``, say
    how many are active (a swap waits for none) and drop what their slots keep
    when the model goes (``_cells_dropped``)."""

    def __init__(self, slots_total: int, n_threads: int | None, resolver: ModelResolver) -> None:
        self.slots_total = slots_total
        self.n_threads = n_threads or os.cpu_count() or 1
        self.resolver = resolver
        self.status_listener: Callable[[], None] | None = None
        self._loaded: LoadedModel | None = None
        self._pending_state: dict[str, Any] | None = None
        self._has_pending_state = False
        self._applied_key: Any = ("never",)
        self._applied_state: dict[str, Any] | None = None
        self._board = StatusBoard(slots_total)
        self._downloads = Downloads(self._board, resolver, takes_cancel(resolver))

    def _cells_dropped(self) -> None:
        """The context is gone: nothing any slot kept is in a KV cache now."""

    # ------------------------------------------------------------------- status

    def status(self) -> AgentStatus:
        return self._board.snapshot()

    def _set_status(self, **changes: Any) -> None:
        self._board.set(**changes)

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
        self._cells_dropped()
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

    def _drop_model(self) -> None:
        """Forget the model and every state (after a fault): closes the model
        (a failure is logged) and stops its download; nothing is applied."""
        self._downloads.cancel()
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
