"""Tool calls in a model's output: which format a model uses, where its calls are in
the text it streams, what they parse to, and a grammar that makes it call a tool.

Each model family writes its calls its own way; the format is read from the chat
template (the template shows the model how its calls look):

- ``hermes`` (Hermes 2 Pro, Qwen 2.5, Qwen 3 and the many templates that copied
  them): ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``, one block per
  call. Templates with no known marker are taken as this format.
- ``llama3`` (Llama 3.1, 3.2, 3.3): a JSON object ``{"name": ..., "parameters":
  {...}}`` as the whole answer, or after ``<|python_tag|>``; several separated by
  ``;``.
- ``mistral`` (Mistral Nemo, Small, Large...): ``[TOOL_CALLS][{"name": ...,
  "arguments": {...}, "id": ...}]``, or the newer ``[TOOL_CALLS]name[ARGS]{...}``.
- ``deepseek`` (DeepSeek R1, V3, V3.1): ``<tool calls begin>`` then per call
  ``<tool call begin>function<tool sep>name`` and the arguments in a fenced JSON
  block (V3.1: ``name<tool sep>{...}``), ``<tool call end>``, then ``<tool calls
  end>`` (each marker written with DeepSeek's fullwidth bars and lower blocks, see
  ``DEEPSEEK_CALLS_BEGIN``).
- ``granite`` (IBM Granite 3.x): ``<|tool_call|>[{"name": ..., "arguments": {...}}]``.

``ToolCallSplitter`` cuts the answer text into content and tool-call blocks as it
streams (holding back what could be the start of a marker, like the reasoning
splitter); ``parse_block`` turns a finished block into calls, checked against the
tools' schemas; ``forced_grammar`` is the GBNF that makes the model write a call
in its format (``tool_choice`` required or named).
"""

from __future__ import annotations

import dataclasses
import json
import re
import secrets
import string
from dataclasses import dataclass
from typing import Any

from paddler.protocol.nesting import MAX_JSON_DEPTH, json_depth_exceeds
from paddler.protocol.tool_calls import (
    PARSE_FAILED,
    PARSED,
    UNRECOGNIZED_FORMAT,
    VALIDATION_FAILED,
    ToolCall,
    ToolCallOutcome,
)

CONTENT = 0
REASONING = 1
TOOL_CALL = 2
"""Segment kinds of the text a request streams."""

_BAR = "\uff5c"  # DeepSeek's markers use the fullwidth vertical line
_LOW = "\u2581"  # and the lower one-eighth block for spaces
DEEPSEEK_CALLS_BEGIN = f"<{_BAR}tool{_LOW}calls{_LOW}begin{_BAR}>"
DEEPSEEK_CALLS_END = f"<{_BAR}tool{_LOW}calls{_LOW}end{_BAR}>"
DEEPSEEK_CALL_BEGIN = f"<{_BAR}tool{_LOW}call{_LOW}begin{_BAR}>"
DEEPSEEK_CALL_END = f"<{_BAR}tool{_LOW}call{_LOW}end{_BAR}>"
DEEPSEEK_SEP = f"<{_BAR}tool{_LOW}sep{_BAR}>"

_ALPHANUMERIC = string.ascii_letters + string.digits


@dataclass(frozen=True)
class ToolFormat:
    """How one family of models writes its tool calls."""

    name: str
    openings: tuple[str, ...]
    """Markers that open a block of calls."""
    closing: str | None
    """The marker that closes a block (``None``: the block runs to the end)."""
    json_at_start: bool = False
    """An answer that starts with ``{`` is a block (Llama 3's bare JSON calls)."""
    markers: tuple[str, ...] = ()
    """Every marker of the format (tokens to render even when they are control
    tokens, which llama.cpp otherwise renders as nothing)."""
    fenced: bool = False
    """DeepSeek R1's calls: ``function<tool sep>name`` and the arguments in a fenced
    JSON block (V3.1 writes ``name<tool sep>{...}``)."""
    id_length: int = 0
    """Ids of this format's calls: ``call_`` and 24 characters, or exactly this
    many letters and digits (Mistral's templates refuse any other id)."""

    def call_id(self) -> str:
        if self.id_length:
            return "".join(secrets.choice(_ALPHANUMERIC) for _ in range(self.id_length))
        return "call_" + "".join(secrets.choice(_ALPHANUMERIC) for _ in range(24))


HERMES = ToolFormat(
    "hermes", ("<tool_call>",), "</tool_call>", markers=("<tool_call>", "</tool_call>")
)
LLAMA3 = ToolFormat(
    "llama3", ("<|python_tag|>",), None, json_at_start=True, markers=("<|python_tag|>",)
)
MISTRAL = ToolFormat(
    "mistral", ("[TOOL_CALLS]",), None, markers=("[TOOL_CALLS]", "[ARGS]", "[CALL_ID]"), id_length=9
)
DEEPSEEK = ToolFormat(
    "deepseek",
    (DEEPSEEK_CALLS_BEGIN,),
    DEEPSEEK_CALLS_END,
    markers=(
        DEEPSEEK_CALLS_BEGIN,
        DEEPSEEK_CALLS_END,
        DEEPSEEK_CALL_BEGIN,
        DEEPSEEK_CALL_END,
        DEEPSEEK_SEP,
    ),
)
DEEPSEEK_R1 = dataclasses.replace(DEEPSEEK, fenced=True)
GRANITE = ToolFormat("granite", ("<|tool_call|>",), None, markers=("<|tool_call|>",))
FORMATS = {f.name: f for f in (HERMES, LLAMA3, MISTRAL, DEEPSEEK, GRANITE)}


def tool_format(template_source: str | None) -> ToolFormat:
    """The format a chat template's model writes its calls in (``hermes`` when the
    template shows none of the known markers)."""
    source = template_source or ""
    if DEEPSEEK_CALLS_BEGIN in source:
        return DEEPSEEK_R1 if "```json" in source else DEEPSEEK
    if "[TOOL_CALLS]" in source:
        return MISTRAL
    if "<|tool_call|>" in source:
        return GRANITE
    if "<tool_call>" in source:
        return HERMES
    if "<|python_tag|>" in source or ("ipython" in source and '"parameters"' in source):
        return LLAMA3
    return HERMES


_ARGUMENTS_AS_OBJECT = re.compile(r"arguments\s*\|\s*(tojson|items|dictsort)")


def template_messages(template_source: str | None, messages: list[dict[str, Any]]) -> list[Any]:
    """The messages as the template wants them: OpenAI sends a call's arguments as a
    JSON string; templates that write them with ``tojson`` (or iterate them) need the
    object, the others the string as it came."""
    if not template_source or not _ARGUMENTS_AS_OBJECT.search(template_source):
        return messages
    out: list[Any] = []
    for message in messages:
        calls = message.get("tool_calls") if isinstance(message, dict) else None
        if isinstance(calls, list):
            message = {**message, "tool_calls": [_with_object_arguments(c) for c in calls]}
        out.append(message)
    return out


def _with_object_arguments(call: Any) -> Any:
    if not isinstance(call, dict) or not isinstance(call.get("function"), dict):
        return call
    arguments = call["function"].get("arguments")
    if isinstance(arguments, str):
        try:
            value = json.loads(arguments)
        except ValueError:
            return call
        if isinstance(value, dict):
            return {**call, "function": {**call["function"], "arguments": value}}
    return call


# ------------------------------------------------------------------- splitting


class ToolCallSplitter:
    """Cuts answer text into content and tool-call blocks as it streams. Blocks keep
    their markers (the tool-call text is what the model wrote); each block that ends
    is kept in ``finished`` until taken."""

    def __init__(self, fmt: ToolFormat, forced: bool = False) -> None:
        self.format = fmt
        self.inside = forced
        """Whether the text now is a tool-call block."""
        self._block: list[str] = []
        self._pending = ""
        self._at_start = True
        self._hold_space = True
        """Whitespace here is held: before a block it is the block's (a model writes
        newlines between its calls), before other text it is content."""
        self._blocks = 0
        self.finished: list[str] = []
        """Blocks that ended, oldest first."""

    def push(self, text: str) -> list[tuple[int, str]]:
        """Add text; the segments ``(kind, text)`` that can be sent now."""
        out: list[tuple[int, str]] = []
        text = self._pending + text
        self._pending = ""
        fmt = self.format
        while text:
            if self.inside:
                if fmt.closing is None:
                    self._add(out, TOOL_CALL, text)
                    return out
                index = text.find(fmt.closing)
                if index < 0:
                    hold = _held(text, (fmt.closing,))
                    self._add(out, TOOL_CALL, text[: len(text) - hold])
                    self._pending = text[len(text) - hold :]
                    return out
                end = index + len(fmt.closing)
                self._add(out, TOOL_CALL, text[:end])
                self.finished.append("".join(self._block))
                self._blocks += 1
                self._block = []
                self.inside = False
                self._hold_space = True
                text = text[end:]
                continue
            if self._at_start and fmt.json_at_start:
                stripped = text.lstrip()
                if not stripped:
                    self._pending = text  # whitespace: the answer has not started yet
                    return out
                self._at_start = False
                if stripped.startswith("{"):
                    self.inside = True
                    self._add(out, TOOL_CALL, text)
                    return out
            self._at_start = False
            if self._hold_space:
                stripped = text.lstrip()
                if not stripped or any(m.startswith(stripped) for m in fmt.openings):
                    self._pending = text  # whitespace, or whitespace and a marker's start
                    return out
                self._hold_space = False
                if any(stripped.startswith(m) for m in fmt.openings):
                    self._add(out, TOOL_CALL, text[: len(text) - len(stripped)])
                    self.inside = True
                    text = stripped
                    continue
            found = [(text.find(m), m) for m in fmt.openings if m in text]
            if not found:
                hold = _held(text, fmt.openings)
                self._add(out, CONTENT, text[: len(text) - hold])
                self._pending = text[len(text) - hold :]
                return out
            index, _ = min(found)
            self._add(out, CONTENT, text[:index])
            self.inside = True
            text = text[index:]
        return out

    def finish(self) -> list[tuple[int, str]]:
        """What is still held back, at the end; a block still open ends here."""
        out: list[tuple[int, str]] = []
        pending, self._pending = self._pending, ""
        if pending:
            if self.inside:
                self._add(out, TOOL_CALL, pending)
            elif self._blocks and not pending.strip():  # the space after the last call
                out.append((TOOL_CALL, pending))
                if self.finished:
                    self.finished[-1] += pending
            else:
                self._add(out, CONTENT, pending)
        if self.inside and self._block:
            self.finished.append("".join(self._block))
            self._blocks += 1
            self._block = []
        return out

    def _add(self, out: list[tuple[int, str]], kind: int, text: str) -> None:
        if not text:
            return
        if kind == TOOL_CALL:
            self._block.append(text)
        if out and out[-1][0] == kind:
            out[-1] = (kind, out[-1][1] + text)
        else:
            out.append((kind, text))


def _held(text: str, markers: tuple[str, ...]) -> int:
    """How many characters at the end of ``text`` could start one of ``markers``."""
    longest = 0
    for marker in markers:
        for size in range(min(len(marker) - 1, len(text)), longest, -1):
            if text.endswith(marker[:size]):
                longest = size
                break
    return longest


# --------------------------------------------------------------------- parsing


class _Unrecognized(Exception):
    pass


class _ParseFailed(Exception):
    pass


def _json(text: str) -> Any:
    if json_depth_exceeds(text):
        raise _ParseFailed(f"the call nests deeper than {MAX_JSON_DEPTH} levels")
    try:
        return json.loads(text)
    except ValueError as exc:
        raise _ParseFailed(f"the call is not valid JSON ({exc})") from exc


def _json_values(text: str) -> list[Any]:
    """Every JSON value in ``text``, separated by whitespace, ``;`` or ``,``."""
    if json_depth_exceeds(text):
        raise _ParseFailed(f"the call nests deeper than {MAX_JSON_DEPTH} levels")
    decoder = json.JSONDecoder()
    values: list[Any] = []
    index = 0
    while True:
        while index < len(text) and text[index] in " \t\r\n;,":
            index += 1
        if index >= len(text):
            return values
        try:
            value, index = decoder.raw_decode(text, index)
        except ValueError as exc:
            raise _ParseFailed(f"the call is not valid JSON ({exc})") from exc
        values.append(value)


def _call_of(
    value: Any, argument_keys: tuple[str, ...] = ("arguments", "parameters")
) -> tuple[str, Any]:
    """``(name, arguments)`` of one call object."""
    if not isinstance(value, dict) or not isinstance(value.get("name"), str):
        raise _Unrecognized("a call must be a JSON object with a string 'name'")
    for key in argument_keys:
        if key in value:
            return value["name"], value[key]
    return value["name"], {}


def _arguments(name: str, arguments: Any) -> dict[str, Any]:
    if isinstance(arguments, str):  # some models write the arguments as a JSON string
        arguments = _json(arguments) if arguments.strip() else {}
    if not isinstance(arguments, dict):
        raise _ParseFailed(f"the arguments of {name!r} are not a JSON object")
    return arguments


def _strip(text: str, prefix: str, suffix: str | None) -> str:
    text = text.strip()
    if text.startswith(prefix):
        text = text[len(prefix) :]
    if suffix is not None and text.endswith(suffix):
        text = text[: -len(suffix)]
    return text.strip()


def _parse_hermes(block: str) -> list[tuple[str, Any]]:
    inner = _strip(block, "<tool_call>", "</tool_call>")
    if not inner.startswith("{"):
        raise _Unrecognized("a <tool_call> block must hold a JSON object")
    return [_call_of(_json(inner))]


def _parse_llama3(block: str) -> list[tuple[str, Any]]:
    inner = _strip(block, "<|python_tag|>", None)
    if not inner.startswith("{"):
        raise _Unrecognized("a Llama 3 call must be a JSON object")
    return [_call_of(v, ("parameters", "arguments")) for v in _json_values(inner)]


_MISTRAL_NEW = re.compile(r"^([A-Za-z0-9_.\-]+)(?:\[CALL_ID\]([A-Za-z0-9]+))?\[ARGS\](.*)$", re.S)


def _parse_mistral(block: str) -> list[tuple[str, Any]]:
    calls: list[tuple[str, Any]] = []
    for part in block.split("[TOOL_CALLS]"):
        part = part.strip()
        if not part:
            continue
        if part.startswith("["):
            values = _json(part)
            if not isinstance(values, list):
                raise _Unrecognized("[TOOL_CALLS] must be followed by a JSON array of calls")
            calls.extend(_call_of(v) for v in values)
            continue
        match = _MISTRAL_NEW.match(part)
        if match is None:
            raise _Unrecognized("[TOOL_CALLS] must be followed by a JSON array or name[ARGS]{...}")
        calls.append((match.group(1), _json(match.group(3).strip())))
    if not calls:
        raise _Unrecognized("[TOOL_CALLS] holds no call")
    return calls


_DEEPSEEK_CALL = re.compile(
    re.escape(DEEPSEEK_CALL_BEGIN)
    + r"(?:(?:function)?"
    + re.escape(DEEPSEEK_SEP)
    + r")?\s*([^\n<]+?)\s*(?:"
    + re.escape(DEEPSEEK_SEP)
    + r"|\n)\s*(.*?)\s*"
    + re.escape(DEEPSEEK_CALL_END),
    re.S,
)


def _parse_deepseek(block: str) -> list[tuple[str, Any]]:
    inner = _strip(block, DEEPSEEK_CALLS_BEGIN, DEEPSEEK_CALLS_END)
    calls: list[tuple[str, Any]] = []
    for match in _DEEPSEEK_CALL.finditer(inner):
        arguments = match.group(2).strip()
        if arguments.startswith("```"):
            arguments = arguments.removeprefix("```json").removeprefix("```").removesuffix("```")
        calls.append((match.group(1).strip(), _json(arguments.strip())))
    if not calls:
        if DEEPSEEK_CALL_BEGIN in inner and DEEPSEEK_CALL_END not in inner:
            raise _ParseFailed(f"the call ends before its {DEEPSEEK_CALL_END}")
        raise _Unrecognized(f"no {DEEPSEEK_CALL_BEGIN}...{DEEPSEEK_CALL_END} call in the block")
    return calls


def _parse_granite(block: str) -> list[tuple[str, Any]]:
    inner = _strip(block, "<|tool_call|>", None)
    if not inner.startswith("["):
        raise _Unrecognized("<|tool_call|> must be followed by a JSON array of calls")
    values = _json(inner)
    if not isinstance(values, list):
        raise _Unrecognized("<|tool_call|> must be followed by a JSON array of calls")
    return [_call_of(v) for v in values]


_PARSERS = {
    "hermes": _parse_hermes,
    "llama3": _parse_llama3,
    "mistral": _parse_mistral,
    "deepseek": _parse_deepseek,
    "granite": _parse_granite,
}


def parse_block(fmt: ToolFormat, block: str, tools: list[dict[str, Any]]) -> ToolCallOutcome:
    """What one block of tool-call text is: its calls, checked against ``tools``
    (names and argument schemas), or why it has none."""
    try:
        found = _PARSERS[fmt.name](block)
        calls = [(name, _arguments(name, arguments)) for name, arguments in found]
    except _Unrecognized as exc:
        return ToolCallOutcome(
            UNRECOGNIZED_FORMAT, errors=[f"{fmt.name} format: {exc}"], text=block
        )
    except _ParseFailed as exc:
        return ToolCallOutcome(PARSE_FAILED, errors=[str(exc)], text=block)
    errors = validation_errors(calls, tools)
    if errors:
        return ToolCallOutcome(VALIDATION_FAILED, errors=errors, text=block)
    return ToolCallOutcome(
        PARSED, [ToolCall(fmt.call_id(), name, args) for name, args in calls], text=block
    )


def validation_errors(
    calls: list[tuple[str, dict[str, Any]]], tools: list[dict[str, Any]]
) -> list[str]:
    """Why each call does not fit the tools: an unknown name, arguments that do not
    match the tool's schema."""
    from paddler.agent.llama.sampling import instance_problem  # jsonschema, RE2: lazily

    schemas = {
        tool["function"]["name"]: tool["function"].get("parameters")
        for tool in tools
        if isinstance(tool, dict) and isinstance(tool.get("function"), dict)
    }
    errors: list[str] = []
    for name, arguments in calls:
        if name not in schemas:
            errors.append(f"{name!r} is not one of the tools ({', '.join(sorted(schemas))})")
            continue
        schema = schemas[name]
        if schema is None:
            continue
        problem = instance_problem(schema, arguments)
        if problem:
            what, why = problem
            what = what.replace("does not", "do not").replace("the schema", "its schema")
            errors.append(f"the arguments of {name!r} {what}: {why}")
    return errors


# --------------------------------------------------------------------- grammar


def _literal(text: str) -> str:
    return json.dumps(text, ensure_ascii=False)


def forced_grammar(
    fmt: ToolFormat, tools: list[dict[str, Any]], only: str | None, parallel: bool
) -> str:
    """GBNF for an answer that is tool calls in ``fmt`` and nothing else: a call of
    ``only`` (a named tool choice) or of any of ``tools``; more than one when
    ``parallel``."""
    from llama_cpp.llama_grammar import SchemaConverter

    converter = SchemaConverter(  # type: ignore[no-untyped-call]
        prop_order={}, allow_fetch=False, dotall=False, raw_pattern=False
    )
    chosen = [
        tool["function"] for tool in tools if only is None or tool["function"]["name"] == only
    ]
    calls: list[str] = []
    lines: list[str] = []
    for index, function in enumerate(chosen):
        schema = function.get("parameters") or {"type": "object"}
        schema = converter.resolve_refs(schema, f"tool{index}")
        arguments = converter.visit(schema, f"tool{index}-args")  # type: ignore[no-untyped-call]
        name = function["name"]
        if fmt.name == "deepseek" and fmt.fenced:
            call = (
                f"{_literal(DEEPSEEK_CALL_BEGIN + 'function' + DEEPSEEK_SEP + name)} "
                f'"\\n```json\\n" {arguments} "\\n```" {_literal(DEEPSEEK_CALL_END)}'
            )
        elif fmt.name == "deepseek":
            call = (
                f"{_literal(DEEPSEEK_CALL_BEGIN + name + DEEPSEEK_SEP)} "
                f"{arguments} {_literal(DEEPSEEK_CALL_END)}"
            )
        else:
            key = "parameters" if fmt.name == "llama3" else "arguments"
            call = (
                f'"{{" space {_literal(json.dumps("name"))} space ":" space '
                f'{_literal(json.dumps(name))} space "," space '
                f'{_literal(json.dumps(key))} space ":" space {arguments} "}}" space'
            )
        lines.append(f"tool{index}-call ::= {call}")
        calls.append(f"tool{index}-call")
    lines.append(f"call ::= {' | '.join(calls)}")
    more = parallel
    if fmt.name == "hermes":
        block = '"<tool_call>\\n" call "\\n</tool_call>"'
        root = f'{block} ( "\\n" {block} )*' if more else block
    elif fmt.name == "llama3":
        root = 'call ( ";" " "? call )*' if more else "call"
    elif fmt.name == "mistral":
        root = '"[TOOL_CALLS][" call ( "," " "? call )* "]"' if more else '"[TOOL_CALLS][" call "]"'
    elif fmt.name == "granite":
        root = (
            '"<|tool_call|>[" call ( "," " "? call )* "]"' if more else '"<|tool_call|>[" call "]"'
        )
    else:  # deepseek
        inner = 'call ( "\\n" call )*' if more else "call"
        root = f"{_literal(DEEPSEEK_CALLS_BEGIN)} {inner} {_literal(DEEPSEEK_CALLS_END)}"
    lines.append(f"root ::= {root}")
    rules: str = converter.format_grammar()  # type: ignore[no-untyped-call]
    return rules + "\n" + "\n".join(lines) + "\n"
