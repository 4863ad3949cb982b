from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from paddler.testing.cluster import LocalCluster, free_port, real_model_cluster
from paddler.testing.tiny_model import write_tiny_llama

pytestmark = pytest.mark.integration

TOOLS_TEMPLATE = """
{%- if tools %}<|im_start|>system
You may call functions: {% for t in tools %}{{ t | tojson }}{% endfor %}
Call them as <tool_call>{"name": ..., "arguments": ...}</tool_call><|im_end|>
{% endif %}
{%- for m in messages %}
{%- if m.role == 'assistant' and m.tool_calls %}<|im_start|>assistant
{% for c in m.tool_calls %}
{%- if c.function.arguments is string %}{{ raise_exception('not an object') }}{% endif %}
<tool_call>{"name": "{{ c.function.name }}", "arguments": {{ c.function.arguments|tojson }}}
</tool_call>
{%- endfor %}<|im_end|>
{% elif m.role == 'tool' %}<|im_start|>user
<tool_response>{{ m.content }}</tool_response><|im_end|>
{% else %}<|im_start|>{{ m.role }}
{{ m.content }}<|im_end|>
{% endif %}
{%- endfor %}
{%- if add_generation_prompt %}<|im_start|>assistant
{% endif %}"""
"""A Qwen-style chat template that shows the tools, and renders an assistant's calls
(whose arguments it takes as an object: a string raises) and the tools' results: the
tiny model carries any template, and writes real calls when a ``tool_choice`` forces
them."""

CLUSTERS = pytest.StashKey[list[LocalCluster]]()
"""The clusters a test started, for its report."""


@pytest.fixture
def make_cluster(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Any]:
    """Start clusters on free ports; everything started is stopped at the end. The
    report of a failed test shows the end of every process log, and so does that of a
    failed setup (a fixture that starts a cluster)."""
    clusters: list[LocalCluster] = []
    request.node.stash[CLUSTERS] = clusters

    def make(**balancer_options: Any) -> LocalCluster:
        cluster = LocalCluster(tmp_path / f"cluster{len(clusters)}", **balancer_options)
        clusters.append(cluster)
        return cluster

    yield make
    for cluster in clusters:
        cluster.close()


@pytest.fixture(scope="module")
def tools_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    """A balancer serving the OpenAI-compatible API and one real agent (2 slots) with
    the tiny model, greedy, and ``TOOLS_TEMPLATE``: tool calls through the SDKs (one
    per test module that asks)."""
    model = write_tiny_llama(tmp_path_factory.mktemp("models") / "tiny.gguf")
    state = {
        "inference_parameters": {"context_size": 2048, "temperature": 0.0},
        "chat_template_override": {"content": TOOLS_TEMPLATE},
        "use_chat_template_override": True,
    }
    with real_model_cluster(
        tmp_path_factory.mktemp("tools-cluster"),
        model,
        state=state,
        compat_openai_addr=f"127.0.0.1:{free_port()}",
        inference_addr=f"127.0.0.1:{free_port()}",
        management_addr=f"127.0.0.1:{free_port()}",
    ) as cluster:
        yield cluster


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    report = yield
    if report.failed and report.when in ("setup", "call"):
        for cluster in item.stash.get(CLUSTERS, []):
            for path in sorted(cluster.log_dir.glob("*.log")):
                log = path.read_text(errors="replace")[-4000:]
                report.sections.append((f"{cluster.log_dir.name}/{path.name}", log))
    return report
