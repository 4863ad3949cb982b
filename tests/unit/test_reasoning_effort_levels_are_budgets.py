"""OpenAI's ``reasoning_effort`` (chat) and ``reasoning.effort`` (Responses) levels are
honoured as reasoning budgets: ``none`` turns thinking off, ``minimal``, ``low`` and
``medium`` allow 128, 512 and 2,048 reasoning tokens, ``high`` as many as the model
writes."""

from __future__ import annotations

import pytest

from paddler.http.openai.responses_body import ResponsesBody
from paddler.http.openai.schemas import EFFORT_BUDGETS, ChatCompletionBody
from paddler.protocol.shapes import check

MESSAGES = [{"role": "user", "content": "hi"}]


@pytest.mark.parametrize(
    ("effort", "thinking", "budget"),
    [
        ("none", False, None),
        ("minimal", True, 128),
        ("low", True, 512),
        ("medium", True, 2048),
        ("high", True, None),
        (None, True, None),
    ],
)
def test_chat_reasoning_effort(effort, thinking, budget) -> None:
    body = {"model": "m", "messages": MESSAGES}
    if effort is not None:
        body["reasoning_effort"] = effort
    request = check(ChatCompletionBody, body).to_request()
    assert request["enable_thinking"] is thinking
    assert request.get("reasoning_budget") == budget


def test_responses_reasoning_effort_is_the_same_budget() -> None:
    body = check(ResponsesBody, {"input": "hi", "reasoning": {"effort": "low"}})
    request = body.broker_request(body.input_messages([]))
    assert request["enable_thinking"] is True
    assert request["reasoning_budget"] == EFFORT_BUDGETS["low"] == 512


def test_with_a_response_format_a_level_turns_thinking_on_without_a_budget() -> None:
    body = {
        "model": "m",
        "messages": MESSAGES,
        "reasoning_effort": "low",
        "response_format": {"type": "json_object"},
    }
    request = check(ChatCompletionBody, body).to_request()
    assert request["enable_thinking"] is True and request.get("reasoning_budget") is None


def test_an_explicit_budget_with_a_grammar_is_refused_by_name() -> None:
    from paddler.errors import InvalidRequest
    from paddler.http.openai.anthropic_body import MessagesBody
    from paddler.http.openai.errors import OpenAIError
    from paddler.protocol.requests import validate_request

    grammar = {"type": "gbnf", "grammar": 'root ::= "a"', "root": "root"}
    with pytest.raises(InvalidRequest) as native:
        validate_request({"raw_prompt": "x", "grammar": grammar, "reasoning_budget": 8})
    assert native.value.field == "reasoning_budget"
    body = {
        "model": "m",
        "max_tokens": 100,
        "messages": MESSAGES,
        "thinking": {"type": "enabled", "budget_tokens": 50},
        "output_config": {"format": {"type": "json_schema", "schema": {"type": "object"}}},
    }
    with pytest.raises(OpenAIError) as anthropic:
        check(MessagesBody, body).to_request()
    assert anthropic.value.param == "thinking.budget_tokens"
