"""Paddler's own ``paddler-client`` reads the native API's tool-call outcomes: they are
in Paddler's shapes (arguments tagged ``ValidJson``, ``RawToolCallTokens``)."""

from __future__ import annotations

import json

from paddler_client.inference_message import InferenceMessageKind, parse_inference_client_message
from paddler_client.tool_call_arguments import ValidJson

from paddler.client.events import ToolCalls
from paddler.http.envelopes import generation_messages
from paddler.protocol.tool_calls import ToolCall, ToolCallOutcome


def _read(outcome: ToolCallOutcome):  # type: ignore[no-untyped-def]
    (envelope,) = generation_messages("r1", "agent-1", ToolCalls(outcome))
    return parse_inference_client_message(json.dumps(envelope))


def test_each_outcome_is_read_by_paddler_client() -> None:
    parsed = _read(ToolCallOutcome("parsed", [ToolCall("call_1", "get_weather", {"city": "Oslo"})]))
    assert parsed.kind == InferenceMessageKind.TOOL_CALL_PARSED
    (call,) = parsed.parsed_tool_calls
    assert (call.id, call.name, call.arguments) == (
        "call_1",
        "get_weather",
        ValidJson({"city": "Oslo"}),
    )
    failed = _read(ToolCallOutcome("validation_failed", errors=["city: is required"], text="t"))
    assert failed.kind == InferenceMessageKind.TOOL_CALL_VALIDATION_FAILED
    assert failed.error_message == "city: is required"
    broken = _read(ToolCallOutcome("parse_failed", errors=["not JSON"], text="t"))
    assert broken.kind == InferenceMessageKind.TOOL_CALL_PARSE_FAILED
    unknown = _read(ToolCallOutcome("unrecognized_format", errors=["no block"], text="<x>"))
    assert unknown.kind == InferenceMessageKind.UNRECOGNIZED_TOOL_CALL_FORMAT
    assert unknown.raw_tool_call_tokens is not None
    assert unknown.raw_tool_call_tokens.text == "<x>"
    assert unknown.raw_tool_call_tokens.ffi_error_message == "no block"
