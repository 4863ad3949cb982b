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
