"""The real engine, by its historical import path.

The engine lives in ``paddler.agent.llama`` (one concept per module: native handles,
sampler chains, embedder, model loading, scheduler). This module keeps the names
other code imports from here: ``LlamaEngine``, ``LlamaModel``, ``resolve_local``,
and ``lc`` (the ``llama_cpp`` module the native layer calls through, which tests
patch to simulate native failures).
"""

from __future__ import annotations

from paddler.agent.llama.embedder import Embedder, normalize
from paddler.agent.llama.loading import LoadedModel, ModelResolver, resolve_local
from paddler.agent.llama.native import (
    CACHE_TYPES,
    POOLING_TYPES,
    LlamaBatch,
    LlamaContext,
    LlamaModel,
    SamplerChain,
    lc,
)
from paddler.agent.llama.sampling import GrammarError, build_sampler, grammar_text, schema_problem
from paddler.agent.llama.scheduler import LlamaEngine

__all__ = [
    "CACHE_TYPES",
    "POOLING_TYPES",
    "Embedder",
    "GrammarError",
    "LlamaBatch",
    "LlamaContext",
    "LlamaEngine",
    "LlamaModel",
    "LoadedModel",
    "ModelResolver",
    "SamplerChain",
    "build_sampler",
    "grammar_text",
    "lc",
    "normalize",
    "resolve_local",
    "schema_problem",
]
