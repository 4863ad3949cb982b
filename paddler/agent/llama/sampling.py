"""A request's sampler chain: grammar, penalties, top-k, top-p, min-p, temperature, seed.

Grammars come as GBNF or as a JSON schema (converted to GBNF). The converter cannot
express every constraint of a schema (number ranges, for one), so the output of a
JSON-schema request is checked against the schema at its end (``schema_problem``).
"""

from __future__ import annotations

import json
from typing import Any

from paddler.agent.llama.native import LlamaModel, SamplerChain, json_schema_to_gbnf


class GrammarError(Exception):
    """A request's grammar that cannot constrain the output; ``kind`` is the error kind
    the request ends with (``GrammarSyntaxError``, ``GrammarInitializationFailed``)."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


def grammar_text(grammar: dict[str, Any]) -> tuple[str, str]:
    """GBNF rules and root of a request's grammar (JSON schemas are converted)."""
    if grammar["type"] == "gbnf":
        return grammar["grammar"], grammar.get("root", "root")
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
) -> SamplerChain:
    """A sampler chain for one request: grammar, penalties, top-k, top-p, min-p,
    temperature (0 = greedy), seeded distribution. The caller closes it; on an error
    (``GrammarError`` included) it is closed here."""

    def pick(name: str) -> Any:
        value = request.get(name)
        return parameters[name] if value is None else value

    chain = SamplerChain()
    try:
        grammar = request.get("grammar")
        if grammar is not None:
            rules, root = grammar_text(grammar)
            if not chain.add_grammar(model, rules, root):
                raise GrammarError("GrammarSyntaxError", "llama.cpp could not parse the grammar")
        last_n = parameters["penalty_last_n"]
        if last_n < 0:
            last_n = n_ctx_seq
        if last_n and (
            parameters["penalty_repeat"] != 1.0
            or parameters["penalty_frequency"] != 0.0
            or parameters["penalty_presence"] != 0.0
        ):
            chain.add_penalties(
                model,
                last_n,
                parameters["penalty_repeat"],
                parameters["penalty_frequency"],
                parameters["penalty_presence"],
            )
        temperature = float(pick("temperature"))
        if temperature <= 0.0:
            chain.add_greedy()
        else:
            top_k = int(pick("top_k"))
            if top_k > 0:
                chain.add_top_k(top_k)
            chain.add_top_p(float(pick("top_p")), 1)
            chain.add_min_p(float(pick("min_p")), 1)
            chain.add_temperature(temperature)
            chain.add_distribution(request.get("seed"))
        return chain
    except BaseException:
        chain.close()
        raise
