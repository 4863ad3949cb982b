"""Paddler's own Python client (``paddler-client`` from PyPI) against ``paddler balancer``
and real llama.cpp agents on the tiny model."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from paddler_client import ClientInference, ClientManagement
from paddler_client.balancer_desired_state import BalancerDesiredState
from paddler_client.continue_from_conversation_history_params import (
    ContinueFromConversationHistoryParams,
)
from paddler_client.continue_from_raw_prompt_params import ContinueFromRawPromptParams
from paddler_client.conversation_message import ConversationMessage
from paddler_client.generate_embedding_batch_params import GenerateEmbeddingBatchParams

from paddler.testing.cluster import wait_until
from paddler.testing.tiny_model import write_tiny_llama


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_llama(tmp_path_factory.mktemp("models") / "tiny.gguf")


def _conversation(max_tokens: int) -> ContinueFromConversationHistoryParams:
    return ContinueFromConversationHistoryParams(
        add_generation_prompt=True,
        conversation_history=[ConversationMessage(role="user", content="Say hello.")],
        enable_thinking=False,
        max_tokens=max_tokens,
    )


async def _collect(stream) -> tuple[str, object]:
    text = []
    async for message in stream:
        if message.is_token:
            text.append(message.token)
        if message.is_terminal:
            return "".join(text), message
    raise AssertionError("the stream ended without a terminal message")


def test_paddler_client_drives_the_whole_native_api(make_cluster, model) -> None:
    cluster = make_cluster()
    cluster.start_balancer()
    cluster.wait_for_http()
    cluster.start_real_agent("llama", slots=2)
    cluster.wait_for_agents(cluster.client(), 1)

    async def run() -> None:
        async with (
            ClientManagement(cluster.management_url) as management,
            ClientInference(cluster.inference_url) as inference,
        ):
            assert await management.get_health() == "OK"
            assert await inference.get_health() == "OK"

            # desired state: get, modify, put (the client's own model round trip)
            state = await management.get_balancer_desired_state()
            payload = state.model_dump(mode="json", by_alias=True)
            payload["model"] = {"LocalToAgent": str(model)}
            payload["inference_parameters"]["context_size"] = 512
            payload["inference_parameters"]["enable_embeddings"] = True
            payload["chat_template_override"] = None
            await management.put_balancer_desired_state(
                BalancerDesiredState.model_validate(payload)
            )
            stored = await management.get_balancer_desired_state()
            assert stored.model_dump(mode="json")["model"] == {"LocalToAgent": str(model)}

            async def ready() -> None:
                async for snapshot in management.agents_stream():
                    agents = snapshot.agents
                    if (
                        agents
                        and agents[0].model_path == str(model)
                        and not agents[0].issues
                        and agents[0].state_application_status.value == "Applied"
                    ):
                        return

            await asyncio.wait_for(ready(), 20)
            agents = (await management.get_agents()).agents
            assert [(a.name, a.slots_total) for a in agents] == [("llama", 2)]
            agent_id = agents[0].id
            metadata = await management.get_model_metadata(agent_id)
            assert metadata is not None and metadata.metadata["general.architecture"] == "llama"
            assert await management.get_chat_template_override(agent_id) is None
            assert (await management.get_buffered_requests()).buffered_requests_current == 0

            # HTTP NDJSON conversation stream
            text, last = await _collect(
                inference.post_continue_from_conversation_history(_conversation(5))
            )
            assert last.is_done and last.summary.usage.content_tokens == 5
            assert text and last.generated_by == "llama"

            # WebSocket: raw prompt and conversation, concurrently on the pool
            raw = await inference.continue_from_raw_prompt(
                ContinueFromRawPromptParams(raw_prompt="The meaning of life is", max_tokens=6)
            )
            chat = await inference.continue_from_conversation_history(_conversation(4))
            (raw_text, raw_last), (chat_text, chat_last) = await asyncio.gather(
                _collect(raw), _collect(chat)
            )
            assert raw_last.is_done and raw_last.summary.usage.content_tokens == 6
            assert chat_last.is_done and chat_last.summary.usage.content_tokens == 4
            assert raw_text and chat_text

            # embeddings over HTTP
            messages = []
            async for message in inference.generate_embedding_batch(
                GenerateEmbeddingBatchParams(
                    input_batch=[{"id": "a", "content": "hello"}, {"id": "b", "content": "world"}],
                    normalization_method="L2",
                )
            ):
                messages.append(message)
                if message.is_terminal:
                    break
            embeddings = [m.embedding_data for m in messages if m.embedding_data is not None]
            assert sorted(e.source_document_id for e in embeddings) == ["a", "b"]
            assert all(len(e.embedding) == 64 for e in embeddings)
            assert messages[-1].kind.value == "embedding_done"

            # buffered requests stream and metrics
            async for snapshot in management.buffered_requests_stream():
                assert snapshot.buffered_requests_current == 0
                break
            metrics = await management.get_metrics()
            assert "paddler_slots_total 2" in metrics
            assert 'paddler_requests_total{outcome="done"}' in metrics

    asyncio.run(run())
    wait_until(lambda: cluster.client().agents()[0]["slots_processing"] == 0, what="slots free")
