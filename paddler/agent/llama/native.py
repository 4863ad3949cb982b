"""Native llama.cpp handles: the only module that imports ``llama_cpp``.

Each handle (model, context, batch, sampler chain) is a small class that owns one
native allocation, frees it in ``close()`` (idempotent) and is a context manager,
so a caller composing several of them (``contextlib.ExitStack``) frees what it got
when a later step fails. Nothing is left to ``__del__``.

Functions are looked up on the ``llama_cpp`` module at call time (``lc.llama_decode``,
not a bound copy): tests patch them there to simulate native failures.
"""

from __future__ import annotations

import ctypes
import logging
from pathlib import Path
from typing import Any

import llama_cpp as lc
import llama_cpp.llama_cpp as lcc

from paddler.errors import EngineError

__all__ = [
    "CACHE_TYPES",
    "CACHE_TYPE_F16",
    "POOLING_TYPES",
    "LlamaBatch",
    "LlamaContext",
    "LlamaModel",
    "SamplerChain",
    "json_schema_to_gbnf",
    "lc",
]

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
"""``ggml_type`` of each KV cache dtype a desired state may name."""

CACHE_TYPE_F16 = CACHE_TYPES["F16"]

POOLING_TYPES = {"Unspecified": -1, "None": 0, "Mean": 1, "Cls": 2, "Last": 3, "Rank": 4}
"""``llama_pooling_type`` of each pooling a desired state may name."""

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
    """Route llama.cpp's log into ``logging`` and initialise the backend, once."""
    global _backend_ready
    if not _backend_ready:
        lcc.llama_log_set(_route_native_log, ctypes.c_void_p(0))
        lc.llama_backend_init()
        _backend_ready = True


def json_schema_to_gbnf(schema: str) -> str:
    """llama-cpp-python's JSON schema to GBNF converter (raises many types on bad input)."""
    from llama_cpp.llama_grammar import json_schema_to_gbnf as convert

    return str(convert(schema))


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
        try:
            self.vocab = lc.llama_model_get_vocab(self.ptr)
            self.n_vocab = int(lc.llama_vocab_n_tokens(self.vocab))
            self.n_embd = int(lc.llama_model_n_embd(self.ptr))
            self.has_encoder = bool(lc.llama_model_has_encoder(self.ptr))
            self._pieces: dict[int, bytes] = {}
            self._eog: dict[int, bool] = {}
            self._markers: dict[tuple[str, ...], dict[int, bytes]] = {}
            self.metadata = self._read_metadata()
            self.bos_token = self.token_text(lc.llama_vocab_bos(self.vocab))
            self.eos_token = self.token_text(lc.llama_vocab_eos(self.vocab))
            self.add_bos = bool(lc.llama_vocab_get_add_bos(self.vocab))
        except BaseException:
            self.close()
            raise

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

    def marker_tokens(self, markers: tuple[str, ...]) -> dict[int, bytes]:
        """The tokens that are each one of ``markers`` whole (control tokens such as
        Mistral's ``[TOOL_CALLS]``, which ``piece`` renders as nothing), with the
        marker's bytes. Cached per marker set."""
        cache = self._markers
        found = cache.get(markers)
        if found is None:
            found = {}
            for marker in markers:
                tokens = self.tokenize(marker, add_special=False, parse_special=True)
                if len(tokens) == 1:
                    found[tokens[0]] = marker.encode()
            cache[markers] = found
        return found

    def is_eog(self, token: int) -> bool:
        """Whether ``token`` ends a generation. Cached per token: asked once per
        generated token, where a ctypes call costs more than a dict lookup."""
        eog = self._eog.get(token)
        if eog is None:
            eog = self._eog[token] = bool(lc.llama_vocab_is_eog(self.vocab, token))
        return eog

    def close(self) -> None:
        if self.ptr:
            lc.llama_model_free(self.ptr)
            self.ptr = None

    def __enter__(self) -> LlamaModel:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ----------------------------------------------------------------------------- context


class LlamaContext:
    """A llama.cpp context (KV cache, logits, embeddings) on a model.

    ``None`` for ``kv_unified``, ``type_k``, ``type_v`` and ``pooling_type`` keeps
    llama.cpp's default. ``purpose`` names the context in the error raised when
    llama.cpp cannot create it (``"llama.cpp could not create <purpose>"``).
    """

    def __init__(
        self,
        model: LlamaModel,
        *,
        n_ctx: int,
        n_batch: int,
        n_ubatch: int,
        n_seq_max: int,
        n_threads: int,
        kv_unified: bool | None = None,
        type_k: int | None = None,
        type_v: int | None = None,
        embeddings: bool = False,
        pooling_type: int | None = None,
        purpose: str = "a context",
    ) -> None:
        params = lc.llama_context_default_params()
        params.n_ctx = n_ctx
        params.n_batch = n_batch
        params.n_ubatch = n_ubatch
        params.n_seq_max = n_seq_max
        params.n_threads = params.n_threads_batch = n_threads
        params.no_perf = True
        if kv_unified is not None:
            params.kv_unified = kv_unified
        if type_k is not None:
            params.type_k = type_k
        if type_v is not None:
            params.type_v = type_v
        if embeddings:
            params.embeddings = True
        if pooling_type is not None:
            params.pooling_type = pooling_type
        self.ptr = lc.llama_init_from_model(model.ptr, params)
        if not self.ptr:
            raise EngineError(f"llama.cpp could not create {purpose}")
        self.memory = lc.llama_get_memory(self.ptr)

    @property
    def n_batch(self) -> int:
        return int(lc.llama_n_batch(self.ptr))

    @property
    def n_ubatch(self) -> int:
        return int(lc.llama_n_ubatch(self.ptr))

    @property
    def n_ctx_seq(self) -> int:
        """KV cells of one sequence."""
        return int(_n_ctx_seq(self.ptr))

    def decode(self, batch: LlamaBatch) -> int:
        """``llama_decode``: 0 on success (ctypes releases the GIL meanwhile)."""
        return int(lc.llama_decode(self.ptr, batch.struct))

    def encode(self, batch: LlamaBatch) -> int:
        """``llama_encode`` (encoder models): 0 on success."""
        return int(lc.llama_encode(self.ptr, batch.struct))

    def forget(self, seq_id: int) -> None:
        """Free every KV cell of a sequence."""
        lc.llama_memory_seq_rm(self.memory, seq_id, -1, -1)

    def trim(self, seq_id: int, keep: int) -> bool:
        """Free the KV cells of a sequence from position ``keep`` on; ``False`` if the
        model's memory cannot drop part of a sequence (then nothing was freed)."""
        return bool(lc.llama_memory_seq_rm(self.memory, seq_id, keep, -1))

    def clear(self) -> None:
        """Free every KV cell."""
        lc.llama_memory_clear(self.memory, True)

    def logits(self, index: int, n_vocab: int) -> Any:
        """The logits at ``index`` of the last decode, as a numpy view (valid until the
        next decode)."""
        import numpy as np

        pointer = lc.llama_get_logits_ith(self.ptr, index)
        if not pointer:
            raise EngineError(f"no logits at batch index {index}")
        return np.ctypeslib.as_array(pointer, shape=(n_vocab,))

    def pooled_embedding(self, seq_id: int, last_index: int, width: int) -> list[float] | None:
        """The pooled embedding of a sequence (else the one at ``last_index``), or ``None``."""
        values = lc.llama_get_embeddings_seq(self.ptr, seq_id)
        if not values:
            values = lc.llama_get_embeddings_ith(self.ptr, last_index)
        if not values:
            return None
        return [float(values[i]) for i in range(width)]

    def close(self) -> None:
        if self.ptr:
            lc.llama_free(self.ptr)
            self.ptr = None
            self.memory = None

    def __enter__(self) -> LlamaContext:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ----------------------------------------------------------------------------- batch


class LlamaBatch:
    """A ``llama_batch`` of ``capacity`` tokens, one sequence id each; ``struct`` is
    what ``paddler._core.BatchBuilder`` fills."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.struct: Any = lc.llama_batch_init(capacity, 0, 1)

    def close(self) -> None:
        if self.struct is not None:
            lc.llama_batch_free(self.struct)
            self.struct = None

    def __enter__(self) -> LlamaBatch:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ----------------------------------------------------------------------------- samplers


class SamplerChain:
    """A llama.cpp sampler chain; the samplers added to it are freed with it."""

    def __init__(self) -> None:
        self.ptr = lc.llama_sampler_chain_init(lc.llama_sampler_chain_default_params())
        self.grammar: Any = None
        """The chain's grammar sampler (owned by the chain), if it has one."""

    def _add(self, sampler: Any) -> None:
        lc.llama_sampler_chain_add(self.ptr, sampler)

    def add_grammar(self, model: LlamaModel, rules: str, root: str) -> bool:
        """Constrain the output by GBNF ``rules``; ``False`` if llama.cpp cannot parse them."""
        sampler = lc.llama_sampler_init_grammar(model.vocab, rules.encode(), root.encode())
        if not sampler:
            return False
        self._add(sampler)
        self.grammar = sampler
        return True

    def add_penalties(
        self, model: LlamaModel, last_n: int, repeat: float, frequency: float, presence: float
    ) -> None:
        self._add(
            lc.llama_sampler_init_penalties(model.n_vocab, last_n, repeat, frequency, presence)
        )

    def add_logit_bias(self, model: LlamaModel, biases: dict[int, float]) -> None:
        """Add ``biases`` to the logits of their tokens (-inf bans one)."""
        entries = (lc.llama_logit_bias * len(biases))(
            *(lc.llama_logit_bias(token=token, bias=bias) for token, bias in biases.items())
        )
        self._add(lc.llama_sampler_init_logit_bias(model.n_vocab, len(biases), entries))

    def add_greedy(self) -> None:
        self._add(lc.llama_sampler_init_greedy())

    def add_top_k(self, k: int) -> None:
        self._add(lc.llama_sampler_init_top_k(k))

    def add_top_p(self, p: float, min_keep: int) -> None:
        self._add(lc.llama_sampler_init_top_p(p, min_keep))

    def add_min_p(self, p: float, min_keep: int) -> None:
        self._add(lc.llama_sampler_init_min_p(p, min_keep))

    def add_temperature(self, temperature: float) -> None:
        self._add(lc.llama_sampler_init_temp(temperature))

    def add_distribution(self, seed: int | None) -> None:
        """Draw from the distribution; ``None``: llama.cpp picks a seed."""
        self._add(lc.llama_sampler_init_dist(lc.LLAMA_DEFAULT_SEED if seed is None else seed))

    def sample(self, context: LlamaContext, index: int) -> int:
        """Sample (and accept) a token from the logits at ``index`` of the last decode."""
        return int(lc.llama_sampler_sample(self.ptr, context.ptr, index))

    def allows(self, token: int) -> bool:
        """Whether the grammar (if any) lets ``token`` come next. Asked before
        ``accept``: llama.cpp's grammar aborts the process on a token it refuses."""
        if self.grammar is None:
            return True
        data = lc.llama_token_data(id=token, logit=0.0, p=0.0)
        candidates = lc.llama_token_data_array(
            data=ctypes.pointer(data), size=1, selected=-1, sorted=False
        )
        lc.llama_sampler_apply(self.grammar, ctypes.byref(candidates))
        return bool(data.logit != float("-inf"))

    def accept(self, token: int) -> None:
        """Let every sampler of the chain see ``token`` as if it had sampled it (the
        grammar advances, penalties remember it): replays a continued request."""
        lc.llama_sampler_accept(self.ptr, token)

    def close(self) -> None:
        if self.ptr:
            lc.llama_sampler_free(self.ptr)
            self.ptr = None
            self.grammar = None

    def __enter__(self) -> SamplerChain:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
