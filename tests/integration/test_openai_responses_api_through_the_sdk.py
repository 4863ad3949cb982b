"""OpenAI's Responses API end to end: the official ``openai`` package against a
balancer and a real agent with the tiny model and a Qwen-style chat template that
shows tools and renders calls and their results (``tools_cluster``).
``client.responses.create`` and ``client.responses.stream`` (text, a JSON schema
parsed by the SDK, a function call forced with ``tool_choice`` so the random model
makes it), the call's output sent back with ``previous_response_id``, and the stored
responses read and deleted; their input items listed, a body's input tokens counted,
a cancel refused, and a conversation."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any, Literal

import openai
import pytest
from pydantic import BaseModel

from paddler.testing.cluster import LocalCluster

WEATHER: Any = {
    "type": "function",
    "name": "get_weather",
    "description": "The weather in a city",
    "parameters": {
        "type": "object",
        "properties": {"city": {"type": "string", "enum": ["Paris", "Oslo"]}},
        "required": ["city"],
        "additionalProperties": False,
    },
    "strict": True,
}
QUESTION = "Tell me a story about the sea."


class City(BaseModel):
    city: Literal["Paris", "Oslo"]


@pytest.fixture(scope="module")
def cluster(tools_cluster: LocalCluster) -> LocalCluster:
    return tools_cluster


@pytest.fixture
def sdk(cluster: LocalCluster) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(
        base_url=f"{cluster.openai_url}/v1", api_key="unused", max_retries=0, timeout=60
    ) as client:
        yield client


def test_a_response_and_the_same_response_streamed(sdk) -> None:
    response = sdk.responses.create(
        model="tiny", input=QUESTION, instructions="Be brief.", max_output_tokens=8
    )
    assert response.object == "response" and response.id.startswith("resp_")
    assert response.status == "incomplete"  # the random model never stops by itself
    assert response.incomplete_details is not None
    assert response.incomplete_details.reason == "max_output_tokens"
    assert response.output_text and response.model == "tiny"
    usage = response.usage
    assert usage is not None and usage.output_tokens == 8
    assert usage.total_tokens == usage.input_tokens + usage.output_tokens
    stream = sdk.responses.create(
        model="tiny", input=QUESTION, instructions="Be brief.", max_output_tokens=8, stream=True
    )
    events = list(stream)
    assert [e.sequence_number for e in events] == list(range(len(events)))
    kinds = [e.type for e in events]
    assert kinds[:4] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
    ]
    assert kinds[-4:] == [
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.incomplete",
    ]
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert text == response.output_text  # greedy: the same answer
    assert events[-1].response.output_text == text  # type: ignore[union-attr]


def test_a_json_schema_streams_and_the_sdk_parses_it(sdk) -> None:
    with sdk.responses.stream(model="tiny", input="Which city?", text_format=City) as stream:
        deltas = [e.delta for e in stream if e.type == "response.output_text.delta"]
        final = stream.get_final_response()
    assert final.status == "completed"
    assert isinstance(final.output_parsed, City)
    assert json.loads("".join(deltas)) == final.output_parsed.model_dump()


def test_a_function_call_round_trip_and_the_stored_responses(sdk) -> None:
    with sdk.responses.stream(
        model="tiny",
        input="What is the weather in Paris?",
        tools=[WEATHER],
        tool_choice={"type": "function", "name": "get_weather"},
        parallel_tool_calls=False,
    ) as stream:
        kinds = [event.type for event in stream]
        called = stream.get_final_response()
    assert "response.function_call_arguments.delta" in kinds
    assert "response.function_call_arguments.done" in kinds
    assert called.status == "completed"
    (call,) = called.output
    assert call.type == "function_call" and call.name == "get_weather"
    assert json.loads(call.arguments)["city"] in ("Paris", "Oslo")
    assert call.call_id and call.id and call.id.startswith("fc_")

    answered = sdk.responses.create(
        model="tiny",
        previous_response_id=called.id,
        input=[{"type": "function_call_output", "call_id": call.call_id, "output": "12 C"}],
        tools=[WEATHER],
        max_output_tokens=6,
    )
    assert answered.previous_response_id == called.id
    # the conversation went in again (the tools, the question, the call, its output)
    # and was rendered by the template, which takes the call's arguments as an object
    assert answered.usage is not None and called.usage is not None
    assert answered.usage.input_tokens > called.usage.input_tokens

    kept = sdk.responses.retrieve(answered.id)
    assert kept.model_dump() == answered.model_dump()
    sdk.responses.delete(answered.id)
    with pytest.raises(openai.NotFoundError):
        sdk.responses.retrieve(answered.id)
    with pytest.raises(openai.NotFoundError) as unknown:
        sdk.responses.create(model="tiny", previous_response_id=answered.id, input="And now?")
    assert unknown.value.body["param"] == "previous_response_id"  # type: ignore[index]


def test_previous_response_id_continues_the_conversation(sdk) -> None:
    first = sdk.responses.create(model="tiny", input="My name is Ada.", max_output_tokens=4)
    second = sdk.responses.create(
        model="tiny", previous_response_id=first.id, input="What is my name?", max_output_tokens=4
    )
    assert first.usage is not None and second.usage is not None
    assert second.usage.input_tokens > first.usage.input_tokens + first.usage.output_tokens
    unkept = sdk.responses.create(model="tiny", input="Hi", max_output_tokens=2, store=False)
    with pytest.raises(openai.NotFoundError):
        sdk.responses.retrieve(unkept.id)


def test_input_items_input_tokens_and_cancel(sdk) -> None:
    """``input_items.list`` pages through what a response was made from (the earlier
    turn's input and output first), ``input_tokens.count`` is the ``input_tokens`` a
    response with the same body reports, and ``cancel`` says why it cannot."""
    first = sdk.responses.create(
        model="tiny", input="My name is Ada.", instructions="Be brief.", max_output_tokens=4
    )
    second = sdk.responses.create(
        model="tiny", previous_response_id=first.id, input="What is my name?", max_output_tokens=4
    )
    listed = list(sdk.responses.input_items.list(second.id, order="asc", limit=1))
    assert [item.type for item in listed] == ["message", "message", "message"]
    assert [item.role for item in listed] == ["user", "assistant", "user"]  # type: ignore[union-attr]
    assert listed[1].id == first.output[0].id
    assert listed[2].content[0].text == "What is my name?"  # type: ignore[union-attr]
    newest = sdk.responses.input_items.list(second.id, limit=2)
    assert [item.id for item in newest.data] == [listed[2].id, listed[1].id]
    assert newest.has_more is True

    counted = sdk.responses.input_tokens.count(
        model="tiny", previous_response_id=first.id, input="What is my name?"
    )
    assert counted.object == "response.input_tokens"
    assert second.usage is not None and counted.input_tokens == second.usage.input_tokens
    with_tools = sdk.responses.input_tokens.count(
        model="tiny", input="What is the weather in Paris?", tools=[WEATHER]
    )
    without = sdk.responses.input_tokens.count(model="tiny", input="What is the weather in Paris?")
    assert with_tools.input_tokens > without.input_tokens > 0
    with pytest.raises(openai.BadRequestError) as refused:
        sdk.responses.input_tokens.count(
            model="tiny", input="Hi", extra_body={"max_output_tokens": 4}
        )
    assert refused.value.body["param"] == "max_output_tokens"  # type: ignore[index]

    with pytest.raises(openai.BadRequestError) as synchronous:
        sdk.responses.cancel(second.id)
    assert "synchronous" in str(synchronous.value)


def test_a_conversation_through_the_sdk(sdk) -> None:
    """``client.conversations``: created with an item, a response made in it sees the
    item (the prompt is longer) and adds its input and output, the items listed,
    added, read and removed, the conversation updated and deleted."""
    alone = sdk.responses.create(model="tiny", input="What is my name?", max_output_tokens=4)
    conversation = sdk.conversations.create(
        items=[{"type": "message", "role": "user", "content": "My name is Ada."}],
        metadata={"topic": "names"},
    )
    assert conversation.id.startswith("conv_") and conversation.metadata == {"topic": "names"}
    answered = sdk.responses.create(
        model="tiny", conversation=conversation.id, input="What is my name?", max_output_tokens=4
    )
    assert answered.conversation is not None and answered.conversation.id == conversation.id
    assert answered.usage is not None and alone.usage is not None
    assert answered.usage.input_tokens > alone.usage.input_tokens
    items = list(sdk.conversations.items.list(conversation.id, order="asc"))
    assert [item.type for item in items] == ["message", "message", "message"]
    assert items[2].id == answered.output[0].id
    counted = sdk.responses.input_tokens.count(
        model="tiny", conversation=conversation.id, input="And now?"
    )
    assert counted.input_tokens > answered.usage.input_tokens

    added = sdk.conversations.items.create(
        conversation.id, items=[{"type": "message", "role": "user", "content": "Thanks."}]
    )
    (thanks,) = added.data
    assert sdk.conversations.items.retrieve(thanks.id, conversation_id=conversation.id).id == (
        thanks.id
    )
    sdk.conversations.items.delete(thanks.id, conversation_id=conversation.id)
    assert len(list(sdk.conversations.items.list(conversation.id))) == 3
    updated = sdk.conversations.update(conversation.id, metadata={"topic": "other"})
    assert updated.metadata == {"topic": "other"}
    assert sdk.conversations.retrieve(conversation.id).metadata == {"topic": "other"}
    assert sdk.conversations.delete(conversation.id).deleted is True
    with pytest.raises(openai.NotFoundError):
        sdk.conversations.retrieve(conversation.id)


def test_what_this_server_does_not_do_is_a_400_naming_it(sdk) -> None:
    with pytest.raises(openai.BadRequestError) as refused:
        sdk.responses.create(model="tiny", input="Hi", tools=[{"type": "web_search"}])
    assert refused.value.body["param"] == "tools[0].type"  # type: ignore[index]
