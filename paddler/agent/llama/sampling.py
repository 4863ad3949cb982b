"""A request's sampler chain: grammar, penalties, top-k, top-p, min-p, temperature, seed.

Grammars come as GBNF or as a JSON schema (converted to GBNF). The converter cannot
express every constraint of a schema (number ranges, for one), so the output of a
JSON-schema request is checked against the schema at its end (``schema_problem``).

Grammars are bounded (``paddler.protocol.grammar_limits``) before llama.cpp sees
them, here as at the HTTP layer and the broker: a frame sent straight to an agent
cannot crash it. The output check matches ``pattern`` and ``patternProperties`` with
RE2, never with Python's backtracking ``re``: a check holds the GIL, and
``^(a+)+$`` against a few dozen characters would stop the agent's heartbeats.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

from paddler.agent.llama.native import LlamaModel, SamplerChain, json_schema_to_gbnf
from paddler.protocol.grammar_limits import (
    gbnf_problem,
    json_schema_text_problem,
    linear_pattern,
    schema_patterns_problem,
)
from paddler.protocol.nesting import MAX_JSON_DEPTH, json_depth_exceeds


class GrammarError(Exception):
    """A request's sampling options that cannot be applied: a grammar that cannot
    constrain the output, a logit bias for a token the model lacks; ``kind`` is the
    error kind the request ends with (``GrammarSyntaxError``,
    ``GrammarInitializationFailed``, ``InvalidRequest``)."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


def grammar_text(grammar: dict[str, Any]) -> tuple[str, str]:
    """GBNF rules and root of a request's grammar (JSON schemas are converted),
    within the limits llama.cpp survives; ``GrammarError`` otherwise."""
    if grammar["type"] == "gbnf":
        problem = gbnf_problem(grammar["grammar"])
        if problem:
            raise GrammarError("GrammarSyntaxError", f"the grammar {problem}")
        return grammar["grammar"], grammar.get("root", "root")
    text = grammar["schema"]
    problem = json_schema_text_problem(text)
    if problem:
        raise GrammarError("GrammarSyntaxError", f"the JSON schema {problem}")
    try:
        schema = json.loads(text)
    except json.JSONDecodeError as exc:
        raise GrammarError("GrammarSyntaxError", f"the JSON schema is not JSON: {exc}") from exc
    problem = schema_patterns_problem(schema)
    if problem:
        raise GrammarError("GrammarInitializationFailed", f"the JSON schema {problem}")
    try:
        rules = json_schema_to_gbnf(text)
    except Exception as exc:  # the converter raises many types for bad schemas
        raise GrammarError(
            "GrammarInitializationFailed", f"cannot turn the JSON schema into a grammar: {exc}"
        ) from exc
    problem = gbnf_problem(rules)
    if problem:
        raise GrammarError(
            "GrammarInitializationFailed", f"the grammar made from the JSON schema {problem}"
        )
    return rules, "root"


# ------------------------------------------------------- the output check, in RE2


def _pattern(validator: Any, pattern: str, instance: Any, schema: Any) -> Iterator[Any]:
    from jsonschema import ValidationError

    if validator.is_type(instance, "string") and not linear_pattern(pattern).search(instance):
        shown = instance if len(instance) <= 80 else f"{instance[:80]}..."
        yield ValidationError(f"{shown!r} does not match {pattern!r}")


def _pattern_properties(
    validator: Any, patterns: dict[str, Any], instance: Any, schema: Any
) -> Iterator[Any]:
    if not validator.is_type(instance, "object"):
        return
    for pattern, subschema in patterns.items():
        regex = linear_pattern(pattern)
        for key, value in instance.items():
            if regex.search(key):
                yield from validator.descend(value, subschema, path=key, schema_path=pattern)


def _additional_properties(original: Any) -> Any:
    """jsonschema's ``additionalProperties``, which skips keys that match a
    ``patternProperties`` pattern: with RE2 where there are patterns."""
    from jsonschema import ValidationError

    def check(validator: Any, allowed: Any, instance: Any, schema: Any) -> Iterator[Any]:
        patterns = schema.get("patternProperties")
        if not patterns or not validator.is_type(instance, "object"):
            yield from original(validator, allowed, instance, schema)
            return
        properties = schema.get("properties", {})
        regexes = [linear_pattern(pattern) for pattern in patterns]
        extras = sorted(
            (
                key
                for key in instance
                if key not in properties and not any(r.search(key) for r in regexes)
            ),
            key=str,
        )
        if validator.is_type(allowed, "object"):
            for extra in extras:
                yield from validator.descend(instance[extra], allowed, path=extra)
        elif not allowed and extras:
            joined = ", ".join(repr(extra) for extra in extras)
            verb = "does" if len(extras) == 1 else "do"
            listed = ", ".join(repr(pattern) for pattern in sorted(patterns))
            yield ValidationError(f"{joined} {verb} not match any of the regexes: {listed}")

    return check


_LINEAR_VALIDATORS: dict[Any, Any] = {}


def _linear_validator(schema: Any) -> Any:
    """The jsonschema validator class for ``schema``'s draft, with every keyword that
    matches a regular expression on the instance run by RE2. (``unevaluatedProperties``
    next to ``patternProperties`` is refused before: ``schema_patterns_problem``.)"""
    import jsonschema

    base = jsonschema.validators.validator_for(schema)
    linear = _LINEAR_VALIDATORS.get(base)
    if linear is None:
        keywords = {"pattern": _pattern, "patternProperties": _pattern_properties}
        if "additionalProperties" in base.VALIDATORS:
            keywords["additionalProperties"] = _additional_properties(
                base.VALIDATORS["additionalProperties"]
            )
        linear = _LINEAR_VALIDATORS[base] = jsonschema.validators.extend(base, keywords)
    return linear


def schema_problem(schema: Any, text: str) -> str | None:
    """Why ``text`` is not JSON valid under ``schema``, or ``None`` if it is. Linear
    in the output: no backtracking regular expression, no recursion past
    ``MAX_JSON_DEPTH`` levels."""
    if json_depth_exceeds(text):
        return f"the output nests deeper than {MAX_JSON_DEPTH} levels"
    try:
        instance = json.loads(text)
    except json.JSONDecodeError as exc:
        return f"the output is not complete JSON ({exc}); raise max_tokens?"
    problem = instance_problem(schema, instance)
    return None if problem is None else f"the output {problem[0]}: {problem[1]}"


def instance_problem(schema: Any, instance: Any) -> tuple[str, str] | None:
    """Why a decoded JSON value does not match ``schema``: ``(what, why)``, ``what``
    one of "does not match the schema", "could not be checked against the schema"
    (an invalid schema, an unresolvable ``$ref``, a pattern RE2 refuses); ``None``
    if it matches."""
    import jsonschema

    try:
        validator = _linear_validator(schema)
        validator.check_schema(schema)
        error = jsonschema.exceptions.best_match(validator(schema).iter_errors(instance))
    except jsonschema.SchemaError as exc:
        return "could not be checked against the schema", f"the schema is invalid: {exc.message}"
    except Exception as exc:  # an unresolvable $ref, a pattern RE2 refuses, recursion...
        return "could not be checked against the schema", str(exc)
    if error is not None:
        return "does not match the schema", error.message
    return None


BANNED = -100.0
"""OpenAI's bias that bans a token: applied as -inf, so not even a grammar's only
choice brings it back."""


def logit_biases(model: LlamaModel, biases: dict[str, float] | None) -> dict[int, float]:
    """``logit_bias`` with token ids as ints; ``GrammarError`` (kind ``InvalidRequest``)
    for an id out of this model's vocabulary."""
    out: dict[int, float] = {}
    for key, bias in (biases or {}).items():
        token = int(key)
        if token >= model.n_vocab:
            raise GrammarError(
                "InvalidRequest",
                f"logit_bias: token {token} is not in this model's vocabulary "
                f"(0 to {model.n_vocab - 1})",
            )
        out[token] = float("-inf") if bias <= BANNED else float(bias)
    return out


def build_sampler(
    model: LlamaModel,
    parameters: dict[str, Any],
    request: dict[str, Any],
    n_ctx_seq: int,
    forced: str | None = None,
) -> SamplerChain:
    """A sampler chain for one request: grammar, penalties, top-k, top-p, min-p,
    temperature (0 = greedy), seeded distribution. ``forced``: GBNF (root ``root``)
    that makes the answer a tool call, in place of the request's grammar. The caller
    closes it; on an error (``GrammarError`` included) it is closed here."""

    def pick(name: str) -> Any:
        value = request.get(name)
        return parameters[name] if value is None else value

    chain = SamplerChain()
    try:
        grammar = request.get("grammar")
        if forced is not None:
            grammar = {"type": "gbnf", "grammar": forced, "root": "root"}
        if grammar is not None:
            rules, root = grammar_text(grammar)
            if not chain.add_grammar(model, rules, root):
                raise GrammarError("GrammarSyntaxError", "llama.cpp could not parse the grammar")
        biases = logit_biases(model, request.get("logit_bias"))
        if biases:
            chain.add_logit_bias(model, biases)
        last_n = parameters["penalty_last_n"]
        if last_n < 0:
            last_n = n_ctx_seq
        frequency = request.get("frequency_penalty")
        if frequency is None:
            frequency = parameters["penalty_frequency"]
        presence = request.get("presence_penalty")
        if presence is None:
            presence = parameters["penalty_presence"]
        if last_n and (parameters["penalty_repeat"] != 1.0 or frequency != 0.0 or presence != 0.0):
            chain.add_penalties(
                model, last_n, parameters["penalty_repeat"], float(frequency), float(presence)
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


def _token_entry(model: LlamaModel, token: int, logprob: float) -> dict[str, Any]:
    piece = model.piece(token)
    return {
        "token": piece.decode("utf-8", "replace"),
        "logprob": logprob,
        "bytes": list(piece),
    }


def token_logprobs(loaded: Any, index: int, token: int, top: int) -> dict[str, Any]:
    """OpenAI's log-probability entry of ``token``, sampled from the logits at batch
    ``index``: the log-softmax of the model's logits (before temperature, penalties
    and grammar), with the ``top`` most likely tokens. Only for requests that ask."""
    import numpy as np

    model = loaded.model
    logits = loaded.context.logits(index, model.n_vocab)
    peak = float(logits.max())
    log_total = peak + float(np.log(np.exp(logits - peak, dtype=np.float64).sum()))
    entry = _token_entry(model, token, float(logits[token]) - log_total)
    alternatives = []
    if top:
        best = np.argpartition(logits, -top)[-top:]
        for candidate in best[np.argsort(-logits[best], kind="stable")]:
            alternatives.append(
                _token_entry(model, int(candidate), float(logits[candidate]) - log_total)
            )
    entry["top_logprobs"] = alternatives
    return entry
