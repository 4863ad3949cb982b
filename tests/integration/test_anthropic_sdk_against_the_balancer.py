"""The official ``anthropic`` package against ``paddler balancer --compat-openai-addr``
with ``--inference-api-key``: a real agent with the tiny llama model and a Hermes-style
chat template (tools shown, calls in ``<tool_call>`` markers, tool results rendered).
``messages.create`` and ``messages.stream``, each with a tool round trip: a call
forced with ``tool_choice`` (the random model calls only when a grammar makes it),
then its ``tool_result`` sent back; the key as ``x-api-key`` or as a bearer token."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import anthropic
import httpx
import pytest

from paddler.testing.cluster import LocalCluster, free_port, real_model_cluster
from paddler.testing.tiny_model import write_tiny_llama

KEY = "anthropic-sdk-key_5e6f7a"
TEMPLATE = (
    "{% if tools %}Tools: {% for t in tools %}{{ t.function.name }} {% endfor %}"
    "Call with <tool_call></tool_call>.\n{% endif %}"
    "{% for m in messages %}"
    "{% if m.role == 'tool' %}result of {{ m.tool_call_id }}: {{ m.content }}\n"
    "{% elif m.tool_calls %}assistant: {{ m.content }}{% for c in m.tool_calls %}"
    '<tool_call>{"name": "{{ c.function.name }}", "arguments": {{ c.function.arguments }}}'
    "</tool_call>{% endfor %}\n"
    "{% else %}{{ m.role }}: {{ m.content }}\n{% endif %}"
    "{% endfor %}assistant: "
)
WEATHER = {
    "name": "get_weather",
    "description": "The weather in a city",
    "input_schema": {
        "type": "object",
        "properties": {"city": {"type": "string", "enum": ["Paris", "Oslo", "Lima"]}},
        "required": ["city"],
        "additionalProperties": False,
    },
}
FORCED = {"type": "tool", "name": "get_weather", "disable_parallel_tool_use": True}
QUESTION = [{"role": "user", "content": "What is the weather in Oslo?"}]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    model = write_tiny_llama(tmp_path_factory.mktemp("models") / "tiny.gguf")
    state = {
        "inference_parameters": {"context_size": 1024, "temperature": 0.0},
        "chat_template_override": TEMPLATE,
        "use_chat_template_override": True,
    }
    with real_model_cluster(
        tmp_path_factory.mktemp("anthropic-cluster"),
        model,
        state=state,
        compat_openai_addr=f"127.0.0.1:{free_port()}",
        inference_api_key=KEY,
    ) as cluster:
        yield cluster


def _sdk(cluster: LocalCluster, **options: Any) -> anthropic.Anthropic:
    options.setdefault("api_key", KEY)
    return anthropic.Anthropic(
        base_url=str(cluster.openai_url), max_retries=0, timeout=60.0, **options
    )


@pytest.fixture
def sdk(cluster: LocalCluster) -> Iterator[anthropic.Anthropic]:
    with _sdk(cluster) as client:
        yield client


def _tool_result(call: Any, text: str) -> list[dict[str, Any]]:
    return [{"type": "tool_result", "tool_use_id": call.id, "content": text}]


def _input_tokens(message: Any) -> int:
    usage = message.usage
    return int(usage.input_tokens + (usage.cache_read_input_tokens or 0))


def test_a_message_has_text_usage_and_stops_at_max_tokens(sdk) -> None:
    message = sdk.messages.create(model="tiny", max_tokens=12, messages=QUESTION)
    assert message.type == "message" and message.role == "assistant"
    assert message.id.startswith("msg_")
    assert message.model == "tiny"
    (block,) = message.content
    assert block.type == "text" and block.text
    assert message.stop_reason == "max_tokens"
    assert message.usage.output_tokens == 12
    assert _input_tokens(message) > 0
    # sampling fields Anthropic's newest SDK no longer types go in extra_body
    same = sdk.messages.create(
        model="tiny",
        max_tokens=12,
        messages=QUESTION,
        extra_body={"temperature": 0.0, "top_k": 1},
    )
    assert same.content[0].text == block.text  # greedy either way


def test_a_forced_tool_call_and_its_result_round_trip(sdk) -> None:
    called = sdk.messages.create(
        model="tiny", max_tokens=200, messages=QUESTION, tools=[WEATHER], tool_choice=FORCED
    )
    assert called.stop_reason == "tool_use"
    (call,) = [block for block in called.content if block.type == "tool_use"]
    assert call.name == "get_weather"
    assert call.input["city"] in ("Paris", "Oslo", "Lima")
    assert call.id
    history: list[Any] = [*QUESTION, {"role": "assistant", "content": called.content}]
    answers = {}
    for result in ("-3 C", "-3 C and snow, wind from the north at forty kilometres an hour"):
        answer = sdk.messages.create(
            model="tiny",
            max_tokens=8,
            messages=[*history, {"role": "user", "content": _tool_result(call, result)}],
            tools=[WEATHER],
        )
        assert answer.stop_reason in ("max_tokens", "end_turn", "tool_use")
        answers[result] = answer
    short, long = answers.values()
    # the result reached the prompt the template rendered
    assert _input_tokens(long) > _input_tokens(short)


def test_a_streamed_tool_round_trip_matches_the_whole_one(sdk) -> None:
    whole = sdk.messages.create(
        model="tiny", max_tokens=200, messages=QUESTION, tools=[WEATHER], tool_choice=FORCED
    )
    with sdk.messages.stream(
        model="tiny", max_tokens=200, messages=QUESTION, tools=[WEATHER], tool_choice=FORCED
    ) as stream:
        names = [event.type for event in stream]
        called = stream.get_final_message()
    assert names[0] == "message_start" and names[-1] == "message_stop"
    assert "input_json" in names  # the SDK's event for an input_json_delta
    assert called.stop_reason == "tool_use"
    assert [(b.type, getattr(b, "input", None)) for b in called.content] == [
        (b.type, getattr(b, "input", None)) for b in whole.content
    ]
    (call,) = [block for block in called.content if block.type == "tool_use"]
    assert called.usage.output_tokens == whole.usage.output_tokens
    messages: list[Any] = [
        *QUESTION,
        {"role": "assistant", "content": called.content},
        {"role": "user", "content": _tool_result(call, "-3 C")},
    ]
    with sdk.messages.stream(model="tiny", max_tokens=10, messages=messages) as stream:
        text = "".join(stream.text_stream)
        answer = stream.get_final_message()
    assert text and answer.content[0].text == text
    assert answer.stop_reason == "max_tokens" and answer.usage.output_tokens == 10
    again = sdk.messages.create(model="tiny", max_tokens=10, messages=messages)
    # the same answer in its shape; its words may differ: the second request reuses
    # the first one's KV cells, and the random model's near-equal logits can tip
    # either way between a prompt decoded in one batch and one continued from cells
    assert [block.type for block in again.content] == ["text"] and again.content[0].text
    assert again.stop_reason == "max_tokens" and again.usage.output_tokens == 10


def test_the_key_may_be_sent_as_x_api_key(cluster) -> None:
    with _sdk(cluster, api_key=None, default_headers={"x-api-key": KEY}) as sdk:
        message = sdk.messages.create(model="tiny", max_tokens=2, messages=QUESTION)
    assert message.usage.output_tokens == 2
    with (
        _sdk(cluster, api_key=None, default_headers={"x-api-key": "wrong-key"}) as sdk,
        pytest.raises(anthropic.AuthenticationError) as raised,
    ):
        sdk.messages.create(model="tiny", max_tokens=2, messages=QUESTION)
    body: Any = raised.value.body
    assert body["error"] == {"type": "authentication_error", "message": "invalid API key"}
    body = {"model": "tiny", "max_tokens": 2, "messages": QUESTION}
    missing = httpx.post(f"{cluster.openai_url}/v1/messages", json=body, timeout=10)
    assert missing.status_code == 401
    assert missing.json()["error"]["type"] == "authentication_error"


def test_the_models_take_the_key_as_x_api_key_too(cluster) -> None:
    """SDKs that send their key only as ``x-api-key`` list and retrieve models too."""
    with _sdk(cluster, api_key=None, default_headers={"x-api-key": KEY}) as sdk:
        (model,) = list(sdk.models.list())
        assert sdk.models.retrieve(model.id).id == model.id
    with (
        _sdk(cluster, api_key=None, default_headers={"x-api-key": "wrong-key"}) as sdk,
        pytest.raises(anthropic.AuthenticationError) as raised,
    ):
        sdk.models.list()
    body: Any = raised.value.body
    assert body["error"] == {"type": "authentication_error", "message": "invalid API key"}
    openai_shape = httpx.get(f"{cluster.openai_url}/v1/models", headers={"x-api-key": KEY})
    assert openai_shape.status_code == 200 and openai_shape.json()["object"] == "list"


def test_a_bad_request_names_the_field_in_anthropic_s_envelope(sdk) -> None:
    with pytest.raises(anthropic.BadRequestError) as raised:
        sdk.messages.create(
            model="tiny", max_tokens=5, messages=QUESTION, extra_body={"temperature": 2}
        )
    assert raised.value.status_code == 400
    body: Any = raised.value.body
    assert body["type"] == "error"
    assert body["error"]["type"] == "invalid_request_error"
    assert body["error"]["message"].startswith("temperature: ")


def test_count_tokens_counts_what_a_message_prefills(sdk) -> None:
    """``messages.count_tokens``: the agent renders and tokenizes the conversation as
    ``messages.create`` would, tools included, and prefills nothing."""
    plain = sdk.messages.count_tokens(model="tiny", messages=QUESTION)
    message = sdk.messages.create(model="tiny", max_tokens=4, messages=QUESTION)
    assert plain.input_tokens == _input_tokens(message) > 0
    with_tools = sdk.messages.count_tokens(model="tiny", messages=QUESTION, tools=[WEATHER])
    called = sdk.messages.create(
        model="tiny", max_tokens=4, messages=QUESTION, tools=[WEATHER], tool_choice=FORCED
    )
    assert with_tools.input_tokens == _input_tokens(called) > plain.input_tokens
    longer = [
        *QUESTION,
        {"role": "assistant", "content": "It is cold."},
        {"role": "user", "content": "And tomorrow in Lima?"},
    ]
    assert sdk.messages.count_tokens(model="tiny", messages=longer).input_tokens > (
        plain.input_tokens
    )
    with pytest.raises(anthropic.BadRequestError) as refused:
        sdk.messages.count_tokens(model="tiny", messages=QUESTION, extra_body={"max_tokens": 4})
    assert "max_tokens" in str(refused.value)


def test_models_list_and_retrieve_in_anthropic_s_shape(sdk) -> None:
    """``client.models``: the served model as Anthropic's ``ModelInfo`` (the SDK sends
    its ``anthropic-version`` header, which picks the shape)."""
    (model,) = list(sdk.models.list())
    assert model.type == "model" and model.display_name == model.id
    assert model.created_at.year >= 2024
    assert sdk.models.retrieve(model.id).id == model.id
    with pytest.raises(anthropic.NotFoundError):
        sdk.models.retrieve("no-such-model")
