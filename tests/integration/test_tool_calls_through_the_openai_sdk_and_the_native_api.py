"""Tool calls end to end: a real agent with the tiny model and a Qwen-style chat
template that shows the tools and renders calls and their results. The official
``openai`` package gets calls (forced with ``tool_choice`` so the random model makes
them) streamed and not, sends them back with their results, and the native API
streams ``ToolCallToken`` pieces and ``ToolCallParsed`` before ``Done``."""

from __future__ import annotations

import json
from typing import Any

import httpx
import openai
import pytest

from paddler.testing.cluster import LocalCluster

TOOLS: list[Any] = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "The weather in a city",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string", "enum": ["Paris", "Oslo"]}},
                "required": ["city"],
                "additionalProperties": False,
            },
        },
    },
    {
        "type": "function",
        "function": {
            "name": "get_time",
            "parameters": {
                "type": "object",
                "properties": {"zone": {"type": "string", "enum": ["UTC", "CET"]}},
                "required": ["zone"],
                "additionalProperties": False,
            },
        },
    },
]
QUESTION: list[Any] = [{"role": "user", "content": "What is the weather in Paris?"}]
NAMED: Any = {"type": "function", "function": {"name": "get_weather"}}


@pytest.fixture(scope="module")
def cluster(tools_cluster: LocalCluster) -> LocalCluster:
    return tools_cluster


def _sdk(cluster: LocalCluster) -> openai.OpenAI:
    return openai.OpenAI(
        base_url=f"{cluster.openai_url}/v1", api_key="unused", max_retries=0, timeout=60
    )


def test_a_named_tool_choice_returns_the_call(cluster) -> None:
    completion = _sdk(cluster).chat.completions.create(
        model="any",
        messages=QUESTION,
        tools=TOOLS,
        tool_choice=NAMED,
        parallel_tool_calls=False,
        max_tokens=200,
    )
    choice = completion.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None
    (call,) = choice.message.tool_calls or []
    assert call.type == "function" and call.id.startswith("call_")
    assert call.function.name == "get_weather"
    assert json.loads(call.function.arguments)["city"] in ("Paris", "Oslo")
    assert completion.usage is not None and completion.usage.completion_tokens > 0


def test_required_streams_calls_as_openai_does(cluster) -> None:
    stream = _sdk(cluster).chat.completions.create(
        model="any",
        messages=QUESTION,
        tools=TOOLS,
        tool_choice="required",
        parallel_tool_calls=False,
        max_tokens=200,
        stream=True,
        seed=3,
        temperature=1.0,
    )
    calls: dict[int, dict[str, str]] = {}
    reasons = []
    for chunk in stream:
        for choice in chunk.choices:
            for delta in choice.delta.tool_calls or []:
                call = calls.setdefault(delta.index, {"id": "", "name": "", "arguments": ""})
                call["id"] += delta.id or ""
                if delta.function is not None:
                    call["name"] += delta.function.name or ""
                    call["arguments"] += delta.function.arguments or ""
            if choice.finish_reason:
                reasons.append(choice.finish_reason)
    assert reasons == ["tool_calls"]
    assert len(calls) == 1
    call = calls[0]
    assert call["id"].startswith("call_") and call["name"] in ("get_weather", "get_time")
    assert isinstance(json.loads(call["arguments"]), dict)


def test_calls_and_their_results_go_back_through_the_template(cluster) -> None:
    sdk = _sdk(cluster)
    first = sdk.chat.completions.create(
        model="any", messages=QUESTION, tools=TOOLS, tool_choice=NAMED, max_tokens=200
    )
    message = first.choices[0].message
    (call,) = message.tool_calls or []
    history: list[Any] = [
        *QUESTION,
        message.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": call.id, "content": '{"temperature": 21}'},
    ]
    second = sdk.chat.completions.create(model="any", messages=history, tools=TOOLS, max_tokens=8)
    assert second.usage is not None and first.usage is not None
    # the call and its result are in the prompt now
    assert second.usage.prompt_tokens > first.usage.prompt_tokens + 10
    assert second.choices[0].finish_reason in ("stop", "length", "tool_calls")


def test_the_native_api_streams_tool_call_tokens_and_the_parsed_call(cluster) -> None:
    body = {
        "conversation_history": QUESTION,
        "tools": TOOLS,
        "tool_choice": NAMED,
        "parallel_tool_calls": False,
        "parse_tool_calls": True,
        "max_tokens": 200,
    }
    with httpx.stream(
        "POST",
        f"{cluster.inference_url}/api/v1/continue_from_conversation_history",
        json=body,
        timeout=60,
    ) as response:
        assert response.status_code == 200
        results = [
            json.loads(line)["Response"]["response"]["GeneratedToken"]
            for line in response.iter_lines()
            if line
        ]
    kinds = [next(iter(result)) for result in results]
    assert set(kinds) == {"ToolCallToken", "ToolCallParsed", "Done"}, kinds
    assert kinds[-2:] == ["ToolCallParsed", "Done"]
    text = "".join(r["ToolCallToken"] for r in results if "ToolCallToken" in r)
    assert text.startswith("<tool_call>") and text.endswith("</tool_call>")
    (call,) = results[-2]["ToolCallParsed"]
    assert call["name"] == "get_weather"
    assert call["arguments"]["ValidJson"]["city"] in ("Paris", "Oslo")
    assert results[-1]["Done"]["usage"]["tool_call_tokens"] > 0
