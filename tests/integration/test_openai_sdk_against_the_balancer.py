"""The official ``openai`` package against ``paddler balancer --compat-openai-addr``:
a real agent with the tiny llama model for chat, completions, embeddings and models;
fake-engine agents (slow, deterministic) for overflow, timeout and disconnects."""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest

from paddler.client import Dispatched
from paddler.testing.cluster import LocalCluster, free_port, real_model_cluster, wait_until
from paddler.testing.tiny_model import write_tiny_llama

N_EMBD = 64
"""Width of the default tiny model."""


def _addresses() -> dict[str, str]:
    return {
        "compat_openai_addr": f"127.0.0.1:{free_port()}",
        "inference_addr": f"127.0.0.1:{free_port()}",
        "management_addr": f"127.0.0.1:{free_port()}",
    }


def _sdk(cluster: LocalCluster, timeout_s: float = 60.0) -> openai.OpenAI:
    return openai.OpenAI(
        base_url=f"{cluster.openai_url}/v1", api_key="unused", max_retries=0, timeout=timeout_s
    )


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_llama(tmp_path_factory.mktemp("models") / "tiny.gguf")


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory, model: Path) -> Iterator[LocalCluster]:
    """A balancer serving the OpenAI API and one real agent with the tiny model
    (shared by the tests of this module that only read from it)."""
    parameters = {"context_size": 1024, "temperature": 0.0, "enable_embeddings": True}
    with real_model_cluster(
        tmp_path_factory.mktemp("openai-cluster"),
        model,
        state={"inference_parameters": parameters},
        **_addresses(),
    ) as cluster:
        yield cluster


@pytest.fixture
def sdk(llama: LocalCluster) -> Iterator[openai.OpenAI]:
    with _sdk(llama) as client:
        yield client


CHAT = [{"role": "user", "content": "Tell me a story about the sea."}]


def test_a_chat_completion_reports_usage_and_stops_at_the_length(sdk) -> None:
    completion = sdk.chat.completions.create(model="tiny", messages=CHAT, max_completion_tokens=12)
    assert completion.object == "chat.completion"
    assert completion.id.startswith("chatcmpl-")
    assert completion.model == "tiny"
    (choice,) = completion.choices
    assert choice.finish_reason == "length"
    assert choice.message.role == "assistant"
    assert choice.message.content
    usage = completion.usage
    assert usage is not None
    assert usage.completion_tokens == 12
    assert usage.prompt_tokens > 0
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    # the legacy field works the same
    legacy = sdk.chat.completions.create(model="tiny", messages=CHAT, max_tokens=5)
    assert legacy.usage is not None and legacy.usage.completion_tokens == 5
    assert legacy.choices[0].finish_reason == "length"
    # greedy: the same question gives the same start
    assert choice.message.content.startswith(legacy.choices[0].message.content or "?")


def test_a_streamed_chat_completion_with_usage(sdk) -> None:
    whole = sdk.chat.completions.create(model="tiny", messages=CHAT, max_completion_tokens=20)
    stream = sdk.chat.completions.create(
        model="tiny",
        messages=CHAT,
        max_completion_tokens=20,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert {chunk.object for chunk in chunks} == {"chat.completion.chunk"}
    assert len({chunk.id for chunk in chunks}) == 1
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == "length" and set(finishes[:-1]) == {None}
    usage_chunk = chunks[-1]
    assert usage_chunk.choices == [] and usage_chunk.usage is not None
    # the same usage; the second asking found its prompt cached in the slot
    streamed_usage = usage_chunk.usage.model_dump()
    assert streamed_usage.pop("prompt_tokens_details")["cached_tokens"] > 0
    whole_usage = whole.usage.model_dump()  # type: ignore[union-attr]
    whole_usage.pop("prompt_tokens_details")
    assert streamed_usage == whole_usage


def test_logprobs_of_a_chat_completion_streamed_and_not(sdk) -> None:
    whole = sdk.chat.completions.create(
        model="tiny", messages=CHAT, max_completion_tokens=10, logprobs=True, top_logprobs=3
    )
    choice = whole.choices[0]
    assert choice.logprobs is not None and choice.logprobs.content is not None
    entries = choice.logprobs.content
    assert len(entries) == 10
    assert "".join(entry.token for entry in entries) == choice.message.content
    for entry in entries:
        assert len(entry.top_logprobs) == 3 and entry.logprob <= 0
        assert entry.top_logprobs[0].token == entry.token  # greedy: the most likely
    stream = sdk.chat.completions.create(
        model="tiny",
        messages=CHAT,
        max_completion_tokens=10,
        logprobs=True,
        top_logprobs=3,
        stream=True,
    )
    streamed = [
        entry
        for chunk in stream
        for c in chunk.choices
        if c.logprobs is not None and c.logprobs.content
        for entry in c.logprobs.content
    ]
    assert [e.token for e in streamed] == [e.token for e in entries]
    plain = sdk.chat.completions.create(model="tiny", messages=CHAT, max_completion_tokens=3)
    assert plain.choices[0].logprobs is None


def test_the_same_seed_gives_the_same_text(sdk) -> None:
    def sample(seed: int) -> str:
        completion = sdk.chat.completions.create(
            model="tiny", messages=CHAT, max_completion_tokens=24, temperature=1.0, seed=seed
        )
        return completion.choices[0].message.content or ""

    first = sample(7)
    assert first and sample(7) == first
    assert any(sample(seed) != first for seed in (8, 9, 10))  # sampling does happen


def _middle(text: str) -> str:
    """Three characters from the middle of ``text``, not all blank."""
    start = len(text) // 2
    while not text[start : start + 3].strip():
        start += 1
    assert start + 3 <= len(text), text
    return text[start : start + 3]


def test_a_stop_string_ends_the_text_before_it(sdk) -> None:
    def complete(**options: Any) -> Any:
        return sdk.completions.create(
            model="tiny", prompt="The sea was", max_tokens=30, temperature=0, **options
        ).choices[0]

    free = complete()
    assert free.finish_reason == "length"
    text = free.text
    stop = _middle(text)
    stopped = complete(stop=[stop])
    assert stopped.text == text[: text.index(stop)]
    assert stopped.finish_reason == "stop"
    chat = sdk.chat.completions.create(
        model="tiny", messages=CHAT, max_completion_tokens=30, temperature=0
    )
    reply = chat.choices[0].message.content or ""
    stop = _middle(reply)
    cut = sdk.chat.completions.create(
        model="tiny", messages=CHAT, max_completion_tokens=30, temperature=0, stop=stop
    )
    assert cut.choices[0].message.content == reply[: reply.index(stop)]
    assert cut.choices[0].finish_reason == "stop"


def test_completions_streamed_and_not(sdk) -> None:
    completion = sdk.completions.create(model="tiny", prompt="Once upon a time", max_tokens=10)
    assert completion.object == "text_completion"
    (choice,) = completion.choices
    assert choice.finish_reason == "length" and choice.text
    assert completion.usage is not None and completion.usage.completion_tokens == 10
    stream = sdk.completions.create(
        model="tiny",
        prompt="Once upon a time",
        max_tokens=10,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == choice.text
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.total_tokens == completion.usage.total_tokens


def test_embeddings_have_the_model_s_width_and_unit_length(sdk) -> None:
    texts = ["the sea", "a story about a ship", "hello"]
    default = sdk.embeddings.create(model="tiny", input=texts)  # the SDK asks for base64
    floats = sdk.embeddings.create(model="tiny", input=texts, encoding_format="float")
    assert [d.index for d in default.data] == [0, 1, 2]
    for a, b in zip(default.data, floats.data, strict=True):
        assert len(a.embedding) == len(b.embedding) == N_EMBD
        assert math.isclose(math.sqrt(sum(x * x for x in b.embedding)), 1.0, rel_tol=1e-4)
        assert a.embedding == pytest.approx(b.embedding, abs=1e-6)
    assert floats.data[0].embedding != floats.data[1].embedding
    assert floats.usage.prompt_tokens > 0
    assert floats.usage.total_tokens == floats.usage.prompt_tokens
    single = sdk.embeddings.create(model="tiny", input="hello", encoding_format="float")
    assert single.data[0].embedding == pytest.approx(floats.data[2].embedding, abs=1e-5)


def test_the_models_list_shows_the_served_model(sdk) -> None:
    models = sdk.models.list()
    assert [m.id for m in models.data] == ["tiny.gguf"]
    assert models.data[0].owned_by == "paddler"
    assert sdk.models.retrieve("tiny.gguf").id == "tiny.gguf"
    with pytest.raises(openai.NotFoundError):
        sdk.models.retrieve("gpt-9")


def test_bad_requests_raise_bad_request_errors_naming_the_param(sdk) -> None:
    with pytest.raises(openai.BadRequestError) as raised:
        sdk.chat.completions.create(model="tiny", messages=CHAT, temperature=3)
    assert raised.value.status_code == 400
    assert raised.value.param == "temperature"
    assert raised.value.type == "invalid_request_error"
    with pytest.raises(openai.BadRequestError) as raised:
        sdk.chat.completions.create(model="tiny", messages=CHAT, n=2)
    assert raised.value.param == "n"
    with pytest.raises(openai.BadRequestError) as raised:
        sdk.embeddings.create(model="tiny", input=[[1, 2, 3]])
    assert raised.value.param == "input"


# ----------------------------------------------------------------- overload, timeout


def _slow_cluster(make_cluster: Any, **options: Any) -> LocalCluster:
    """A balancer with one 1-slot fake agent that takes 50 ms per token."""
    cluster: LocalCluster = make_cluster(**_addresses(), **options)
    cluster.start_balancer()
    cluster.wait_for_http()
    cluster.start_agent("slow", slots=1, step_ms=50)
    cluster.wait_for_agents(cluster.client(), 1)
    return cluster


def _busy(cluster: LocalCluster) -> Any:
    """Occupy the only slot with a long request."""
    running = cluster.client().continue_from_raw_prompt("busy", max_tokens=1000)
    assert isinstance(next(iter(running)), Dispatched)
    return running


def test_a_full_buffer_raises_503_with_retry_after(make_cluster) -> None:
    cluster = _slow_cluster(make_cluster, max_buffered_requests=0)
    running = _busy(cluster)
    with _sdk(cluster) as sdk:
        for stream in (False, True):
            started = time.monotonic()
            with pytest.raises(openai.APIStatusError) as raised:
                sdk.chat.completions.create(
                    model="m", messages=CHAT, max_completion_tokens=5, stream=stream
                )
            assert time.monotonic() - started < 2.0
            assert raised.value.status_code == 503
            assert isinstance(raised.value, openai.InternalServerError)
            assert raised.value.response.headers["retry-after"] == "1"
            assert raised.value.type == "server_error"
        with pytest.raises(openai.APIStatusError) as raised:
            sdk.embeddings.create(model="m", input="x")
        assert raised.value.status_code == 503
    running.cancel()


def test_a_request_that_waits_too_long_raises_504(make_cluster) -> None:
    cluster = _slow_cluster(make_cluster, buffered_request_timeout=300)
    running = _busy(cluster)
    with _sdk(cluster) as sdk:
        started = time.monotonic()
        with pytest.raises(openai.APIStatusError) as raised:
            sdk.completions.create(model="m", prompt="waits", max_tokens=5, stream=True)
        assert 0.25 <= time.monotonic() - started < 3.0
        assert raised.value.status_code == 504
        assert raised.value.code == "buffered_request_timeout"
    running.cancel()
    assert cluster.client().buffered_requests() == 0


def test_a_client_that_leaves_a_stream_frees_the_slot(make_cluster) -> None:
    cluster = _slow_cluster(make_cluster)
    control = cluster.client()
    with _sdk(cluster) as sdk:
        stream = sdk.chat.completions.create(
            model="m", messages=CHAT, max_completion_tokens=1000, stream=True
        )
        pieces = []
        for chunk in stream:
            pieces.append(chunk.choices[0].delta.content)
            if len(pieces) == 3:
                break
        assert control.agents()[0]["slots_processing"] == 1
        stream.close()
    assert pieces == ["", "t0 ", "t1 "]
    # 1000 tokens take 50 s: the slot frees at once only because the request was cancelled
    wait_until(lambda: control.agents()[0]["slots_processing"] == 0, timeout_s=5, what="slot freed")
    with _sdk(cluster) as sdk:
        after = sdk.completions.create(model="m", prompt="next", max_tokens=3)
    assert after.choices[0].text == "t0 t1 t2 "
