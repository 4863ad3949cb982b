"""Tools a request offers the model, and what a tool-call block parsed to.

A generation request may carry ``tools`` (OpenAI's function tools), a
``tool_choice`` and ``parallel_tool_calls`` (``false`` is kept to by the grammar of
a forced choice, so with ``auto`` it is refused). The agent shows the tools to the model
through its chat template, streams the text of each call the model writes as
``TOOL_CALL`` frames, and sends one ``TOOL_CALLS`` frame per block it parsed
(``ToolCallOutcome``): the calls, or why there are none. The outcomes are
Paddler's: resolved (``parsed``), unrecognized format, parse failed, validation
failed. An outcome that is not ``parsed`` keeps the block's text, so nothing the
model wrote is lost.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Annotated, Any, ClassVar, Literal

from pydantic import AfterValidator, Discriminator, Field
from pydantic_core import PydanticCustomError

from paddler.errors import ProtocolError
from paddler.protocol.grammar_limits import json_schema_problem
from paddler.protocol.shapes import Says, Shape, member_tag

MAX_TOOLS = 128
MAX_TOOL_NAME = 64
MAX_DESCRIPTION = 8192

PARSED = "parsed"
PARSE_FAILED = "parse_failed"
VALIDATION_FAILED = "validation_failed"
UNRECOGNIZED_FORMAT = "unrecognized_format"
OUTCOMES = (PARSED, PARSE_FAILED, VALIDATION_FAILED, UNRECOGNIZED_FORMAT)

NAME_MESSAGE = f"must be 1 to {MAX_TOOL_NAME} letters, digits, '_', '-' or '.'"


def _tool_name(name: str) -> str:
    if not (
        0 < len(name) <= MAX_TOOL_NAME
        and name.isascii()
        and all(c.isalnum() or c in "_-." for c in name)
    ):
        raise PydanticCustomError("tool_name", NAME_MESSAGE)
    return name


def _schema_within_limits(schema: dict[str, Any]) -> dict[str, Any]:
    """A tool's parameters become a grammar (for a forced call) and the schema its
    calls are checked against: the limits of every JSON schema grammar apply."""
    try:
        problem = json_schema_problem(json.dumps(schema))
    except (RecursionError, ValueError):
        problem = "nests too deep"
    if problem:
        raise PydanticCustomError("grammar_limit", "{problem}", {"problem": problem})
    return schema


ToolName = Annotated[str, AfterValidator(_tool_name), Says(NAME_MESSAGE)]


class FunctionSpec(Shape):
    """What a function tool is: its name, what it does, the JSON schema of its
    arguments (an object; none: any object)."""

    SAYS: ClassVar[str] = "must be an object with a 'name'"

    name: ToolName
    description: (
        Annotated[str, Field(max_length=MAX_DESCRIPTION), Says("must be a string")] | None
    ) = None
    parameters: (
        Annotated[
            dict[str, Any],
            AfterValidator(_schema_within_limits),
            Says("must be a JSON Schema object"),
        ]
        | None
    ) = None
    strict: Annotated[bool, Says("must be true or false")] | None = None


class Tool(Shape):
    """One tool: ``{"type": "function", "function": {...}}``."""

    SAYS: ClassVar[str] = "must be an object with 'type' and 'function'"

    type: Annotated[Literal["function"], Says("must be 'function' (the only kind of tool)")]
    function: FunctionSpec


Tools = Annotated[
    list[Tool],
    Field(max_length=MAX_TOOLS),
    Says("must be a list of tools", too_long=f"has more than {MAX_TOOLS} tools"),
]


class NamedFunction(Shape):
    SAYS: ClassVar[str] = "must be an object with a 'name'"

    name: ToolName


class NamedToolChoice(Shape):
    """``{"type": "function", "function": {"name": ...}}``: call this tool."""

    SAYS: ClassVar[str] = "must be an object with 'type' and 'function'"

    type: Annotated[Literal["function"], Says("must be 'function'")]
    function: NamedFunction


TOOL_CHOICE_MESSAGE = "must be 'auto', 'none', 'required' or {'type': 'function', ...}"


def _choice_tag(value: Any) -> str | None:
    if isinstance(value, str):
        return "~mode"
    if isinstance(value, dict | NamedToolChoice):
        return "~named"
    return None


ToolChoice = Annotated[
    Annotated[Literal["auto", "none", "required"], member_tag("~mode"), Says(TOOL_CHOICE_MESSAGE)]
    | Annotated[NamedToolChoice, member_tag("~named")],
    Discriminator(_choice_tag),
    Says(TOOL_CHOICE_MESSAGE),
]
"""``auto``: the model may call tools or answer; ``none``: the tools are not shown;
``required``: the model must call at least one; named: it must call that one (the
last two are enforced with a grammar)."""


def forced_tool(tool_choice: Any) -> str | None:
    """The name of the tool a request's ``tool_choice`` (wire form) forces, if any."""
    if isinstance(tool_choice, dict):
        function = tool_choice.get("function")
        name = function.get("name") if isinstance(function, dict) else None
        if isinstance(name, str):
            return name
    return None


def uses_tools(request: dict[str, Any]) -> bool:
    """Whether a request shows tools to the model (and so parses its calls)."""
    return bool(request.get("tools")) and request.get("tool_choice", "auto") != "none"


PARALLEL_MESSAGE = (
    "false is only enforced with tool_choice 'required' or a named function (a grammar "
    "then allows one call); with 'auto' the model may write several calls"
)


def parallel_problem(tools: Any, tool_choice: Any, parallel_tool_calls: Any) -> str | None:
    """Why ``parallel_tool_calls`` cannot be honoured, if it cannot: ``false`` is kept
    to only by the grammar of a forced choice; with ``auto`` (and tools to call) the
    model may write any number of calls. With no tools, or ``none``, no call comes."""
    if parallel_tool_calls is False and tools and tool_choice == "auto":
        return PARALLEL_MESSAGE
    return None


def tool_choice_problem(request: dict[str, Any]) -> tuple[str, str] | None:
    """``(field, sentence)`` when a request's tool choice (or its
    ``parallel_tool_calls``) cannot be honoured."""
    choice = request.get("tool_choice", "auto")
    if choice == "auto":
        problem = parallel_problem(
            request.get("tools"), choice, request.get("parallel_tool_calls", True)
        )
        return None if problem is None else ("parallel_tool_calls", problem)
    if choice == "none":
        return None
    tools = request.get("tools") or []
    if not tools:
        return "tool_choice", "needs tools to choose from"
    if request.get("grammar") is not None:
        return "tool_choice", "a forced tool call cannot be combined with a grammar"
    name = forced_tool(choice)
    if name is not None and not any(
        isinstance(tool, dict) and tool.get("function", {}).get("name") == name for tool in tools
    ):
        return "tool_choice", f"names {name!r}, which is not one of the tools"
    return None


# ---------------------------------------------------------------- outcomes


@dataclass(frozen=True, slots=True)
class ToolCall:
    """One call: its id (made by the agent, in the shape the model's template
    accepts back), the tool's name and the arguments (a JSON object)."""

    id: str
    name: str
    arguments: dict[str, Any]

    @property
    def arguments_json(self) -> str:
        """The arguments as OpenAI puts them on the wire: a JSON string."""
        return json.dumps(self.arguments, ensure_ascii=False)

    def to_body(self) -> dict[str, Any]:
        return {"id": self.id, "name": self.name, "arguments": self.arguments}


@dataclass(frozen=True, slots=True)
class ToolCallOutcome:
    """What one block of tool-call text became: ``outcome`` is one of ``OUTCOMES``;
    ``calls`` when ``parsed``; ``errors`` say why not otherwise; ``text``: the
    block as the model wrote it."""

    outcome: str
    calls: list[ToolCall] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    text: str = ""

    @property
    def parsed(self) -> bool:
        return self.outcome == PARSED

    def to_body(self) -> dict[str, Any]:
        return {
            "outcome": self.outcome,
            "calls": [call.to_body() for call in self.calls],
            "errors": self.errors,
            "text": self.text,
        }

    @classmethod
    def from_body(cls, body: Any) -> ToolCallOutcome:
        if not isinstance(body, dict):
            raise ProtocolError("ToolCalls: body must be a map")
        outcome = body.get("outcome")
        calls = body.get("calls")
        errors = body.get("errors")
        text = body.get("text")
        if (
            outcome not in OUTCOMES
            or not isinstance(calls, list)
            or not isinstance(errors, list)
            or not all(isinstance(e, str) for e in errors)
            or not isinstance(text, str)
        ):
            raise ProtocolError("ToolCalls: body must have outcome, calls, errors and text")
        parsed: list[ToolCall] = []
        for call in calls:
            if (
                not isinstance(call, dict)
                or not isinstance(call.get("id"), str)
                or not isinstance(call.get("name"), str)
                or not isinstance(call.get("arguments"), dict)
            ):
                raise ProtocolError("ToolCalls: each call must have id, name and arguments")
            parsed.append(ToolCall(call["id"], call["name"], call["arguments"]))
        return cls(outcome, parsed, list(errors), text)

    def native(self) -> dict[str, Any]:
        """The outcome as Paddler's ``GeneratedToken`` variant, in Paddler's shapes (its
        ``paddler-client`` reads them): a parsed call's arguments tagged ``ValidJson``
        (they are, once parsed and checked), an unrecognized block as
        ``RawToolCallTokens`` (``text``, ``ffi_error_message``)."""
        if self.outcome == PARSED:
            return {
                "ToolCallParsed": [
                    {"id": call.id, "name": call.name, "arguments": {"ValidJson": call.arguments}}
                    for call in self.calls
                ]
            }
        if self.outcome == VALIDATION_FAILED:
            return {"ToolCallValidationFailed": self.errors}
        if self.outcome == PARSE_FAILED:
            return {"ToolCallParseFailed": "; ".join(self.errors)}
        return {
            "UnrecognizedToolCallFormat": {
                "text": self.text,
                "ffi_error_message": "; ".join(self.errors),
            }
        }


__all__ = [
    "MAX_TOOLS",
    "OUTCOMES",
    "PARALLEL_MESSAGE",
    "PARSED",
    "PARSE_FAILED",
    "UNRECOGNIZED_FORMAT",
    "VALIDATION_FAILED",
    "NamedToolChoice",
    "Tool",
    "ToolCall",
    "ToolCallOutcome",
    "ToolChoice",
    "Tools",
    "forced_tool",
    "parallel_problem",
    "tool_choice_problem",
    "uses_tools",
]
