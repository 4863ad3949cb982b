"""The web admin panel in a real headless Chromium against a live ``paddler cluster``
on the tiny model (HTTPS, both API keys on): the panel asks for the keys, then its
dashboard follows the agents' slots (and their desired slots) live, its charts fill
from the balancer's own metrics (the queue depth too, with requests waiting), its
model page changes the desired state (a chat template override too, which the
dashboard then shows in use) and shows a validation error next to its field (a
nested one too), its playground streams a reply and stops one, sends the thinking
toggle and shows reasoning apart, offers embeddings only when they are on, and no
page logs a JavaScript error. One cluster and one browser for the module; the tests
run in order on one tab (``sessionStorage`` keeps the keys per tab). An agent
downloading its model gets a cluster of its own (``open_cluster``). The screenshots
of the README come from here (``PADDLER_SCREENSHOT_DIR=docs``)."""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from paddler.testing.cluster import wait_until
from paddler.testing.tiny_model import write_tiny_llama
from tests.browser.harness import (
    INFERENCE_KEY,
    MANAGEMENT_KEY,
    OpenCluster,
    PanelCluster,
    login,
    stop_process,
)
from tests.unit.slow_file_server import SlowFile, serve_slowly

pytestmark = [pytest.mark.integration, pytest.mark.browser]

TIMEOUT_MS = 20_000


class Console:
    """What the pages logged: errors, uncaught exceptions."""

    def __init__(self) -> None:
        self.errors: list[str] = []

    def watch(self, page: Any) -> None:
        page.on("console", self._console)
        page.on("pageerror", lambda error: self.errors.append(f"uncaught: {error}"))

    def _console(self, message: Any) -> None:
        if message.type in ("error", "assert"):
            where = message.location.get("url", "")
            self.errors.append(f"{message.text} ({where})")


@pytest.fixture(scope="module")
def console() -> Console:
    return Console()


@pytest.fixture(scope="module")
def context(browser: Any, panel_cluster: PanelCluster) -> Iterator[Any]:
    context = browser.new_context(
        ignore_https_errors=True,  # the cluster's certificate comes from a test CA
        viewport={"width": 1280, "height": 900},
    )
    context.set_default_timeout(TIMEOUT_MS)
    try:
        yield context
    finally:
        context.close()


@pytest.fixture(scope="module")
def page(context: Any, console: Console) -> Any:
    page = context.new_page()
    console.watch(page)
    return page


def shot(page: Any, cluster: PanelCluster, name: str) -> None:
    page.screenshot(path=str(cluster.screenshots / f"panel-{name}.png"), full_page=True)


def busy_slots(page: Any) -> list[int]:
    return [int(text) for text in page.get_by_test_id("slots-processing").all_inner_texts()]


def test_with_api_keys_on_the_panel_asks_for_them_keeps_them_in_the_tab_and_works(
    context: Any, page: Any, panel_cluster: PanelCluster
) -> None:
    # a wrong key is refused next to its field (in a tab of its own: its 401 is expected)
    other = context.new_page()
    other.goto(panel_cluster.panel)
    other.get_by_test_id("key-management").fill("not-the-key")
    other.get_by_test_id("key-inference").fill(INFERENCE_KEY)
    other.get_by_role("button", name="Continue").click()
    refused = other.locator('[data-error-for="key-management"]')
    refused.wait_for()
    assert "does not accept this key" in refused.inner_text()
    other.close()
    page.bring_to_front()  # Playwright's actions wait for animation frames: a foreground tab

    page.goto(panel_cluster.panel)
    form = page.get_by_test_id("keys-form")
    form.wait_for()
    assert "requires API keys" in form.inner_text()
    assert page.get_by_test_id("agents").count() == 0  # nothing before the keys
    login(page, panel_cluster)
    page.get_by_test_id("agents").locator("article.agent").nth(1).wait_for()
    stored = page.evaluate("() => JSON.parse(sessionStorage.getItem('paddler.api_keys'))")
    assert stored == {"management": MANAGEMENT_KEY, "inference": INFERENCE_KEY}
    assert page.evaluate("() => localStorage.length + document.cookie.length") == 0
    page.reload()  # the same tab keeps them: no question again
    page.get_by_test_id("agents").locator("article.agent").nth(1).wait_for()
    assert page.get_by_test_id("keys-form").count() == 0


def test_the_dashboard_lists_both_agents_and_their_slots_follow_running_requests(
    page: Any, panel_cluster: PanelCluster
) -> None:
    page.goto(f"{panel_cluster.panel}/#/")
    cards = page.locator("article.agent")
    cards.nth(1).wait_for()
    assert sorted(cards.locator("h3").all_inner_texts()) == ["agent-1", "agent-2"]
    assert page.get_by_test_id("agent-state").all_inner_texts() == ["ready", "ready"]
    assert busy_slots(page) == [0, 0]
    assert page.get_by_test_id("slots-total").all_inner_texts() == ["2", "2"]
    text = page.locator("main").inner_text()
    assert panel_cluster.inference in text and panel_cluster.management in text
    assert "Buffered requests 0 / 30" in page.get_by_test_id("buffered").inner_text()
    # "add an agent", with curve on (the cluster's own keys, in their real folder)
    keys = panel_cluster.keys
    assert keys is not None and (keys / "agents" / "agent-1.key").is_file()
    command = page.get_by_test_id("add-agent-command").inner_text()
    assert "paddler keys generate --out ~/paddler-keys my-agent\n" in command
    assert f"cp ~/paddler-keys/my-agent.key {keys}/agents/\n" in command
    assert "paddler agent --broker-addr tcp://127.0.0.1:" in command
    assert f"  --broker-public-key {keys}/broker.key \\\n" in command
    assert command.endswith("  --curve-secret-key ~/paddler-keys/my-agent.key_secret")

    errors: list[BaseException] = []

    def request() -> None:
        try:
            panel_cluster.generate(max_tokens=500)
        except BaseException as exc:
            errors.append(exc)

    # 6 requests for 4 slots: every slot busy, and some wait in the buffer
    threads = [threading.Thread(target=request) for _ in range(6)]
    for thread in threads:
        thread.start()
    try:
        page.wait_for_function(
            """() => [...document.querySelectorAll('[data-test=slots-processing]')]
                .reduce((sum, e) => sum + Number(e.textContent), 0) === 4 &&
                Number(document.querySelector('[data-test=buffered-current]').textContent) > 0"""
        )
        assert busy_slots(page) == [2, 2]
        shot(page, panel_cluster, "dashboard")
    finally:
        for thread in threads:
            thread.join(60)
    assert not errors
    page.wait_for_function(
        """() => [...document.querySelectorAll('[data-test=slots-processing]')]
            .every((e) => e.textContent === '0') &&
            document.querySelector('[data-test=buffered-current]').textContent === '0'"""
    )

    # the model details, when asked
    page.get_by_role("button", name="Model details: GGUF metadata, chat template").first.click()
    details = page.get_by_test_id("agent-details")
    details.get_by_text("paddler tiny llama").wait_for()
    assert "<|im_start|>" in details.inner_text()  # the model's own chat template


def _slots_figures(page: Any) -> dict[str, str]:
    """Each agent card's slots figure ("Slots processing P / T (desired D)"), by name."""
    cards = page.locator("article.agent")
    return {
        cards.nth(i).get_attribute("data-agent-name"): cards.nth(i)
        .locator(".slots-text")
        .inner_text()
        for i in range(cards.count())
    }


def test_the_dashboard_shows_each_agents_desired_slots_as_the_agents_list_says(
    page: Any, panel_cluster: PanelCluster
) -> None:
    """Slots processing / total / desired, as ``/api/v1/agents`` has them; and the
    desired figure is the agent's own, not its total (an agents stream, played to the
    page, with an agent asked for more slots than it has)."""
    page.goto(f"{panel_cluster.panel}/#/")
    page.locator("article.agent").nth(1).wait_for()
    agents = panel_cluster.agents()
    assert len(agents) == 2
    assert _slots_figures(page) == {
        a["name"]: f"Slots processing {a['slots_processing']} / {a['slots_total']} "
        f"(desired {a['desired_slots_total']})"
        for a in agents
    }

    resizing = [dict(a, desired_slots_total=a["slots_total"] + 3 * i) for i, a in enumerate(agents)]
    event = f"data: {json.dumps({'agents': resizing})}\n\n"

    def played(route: Any) -> None:
        if route.request.method != "GET":  # the CORS preflight: the balancer answers it
            route.continue_()
            return
        route.fulfill(
            status=200,
            headers={
                "Content-Type": "text/event-stream",
                "Access-Control-Allow-Origin": panel_cluster.panel,
            },
            body=event,
        )

    page.route("**/api/v1/agents/stream", played)
    try:
        page.reload()
        page.wait_for_function(
            "() => [...document.querySelectorAll('.slots-text')].some((e) => "
            "e.textContent.endsWith('(desired 5)'))"
        )
        assert _slots_figures(page) == {
            a["name"]: f"Slots processing {a['slots_processing']} / {a['slots_total']} "
            f"(desired {a['desired_slots_total']})"
            for a in resizing
        }
    finally:
        page.unroute("**/api/v1/agents/stream")
    page.reload()
    page.locator("article.agent").nth(1).wait_for()


def test_the_add_an_agent_command_runs_as_printed_and_the_agent_joins(
    page: Any, panel_cluster: PanelCluster
) -> None:
    """The command of the dashboard, for another name and keys folder, run as it is
    printed (keys, allowing the key, the agent): the agent joins the balancer with its
    curve key and shows up ready; stopped, it leaves."""
    page.goto(f"{panel_cluster.panel}/#/")
    command = page.get_by_test_id("add-agent-command")
    command.wait_for()
    folder = panel_cluster.folder / "added-agent"
    page.get_by_label("agent name", exact=True).fill("panel-added")
    page.get_by_label("slots", exact=True).fill("1")
    page.get_by_label("keys folder on the agent's host", exact=True).fill(str(folder / "keys"))
    text = command.inner_text()
    start = text.index("paddler agent ")
    setup, agent = text[:start], text[start:]
    assert f"paddler keys generate --out {folder}/keys panel-added\n" in setup
    assert f"--curve-secret-key {folder}/keys/panel-added.key_secret" in agent
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    subprocess.run(["bash", "-euc", setup], env=env, check=True, timeout=60)
    assert panel_cluster.keys is not None
    assert (panel_cluster.keys / "agents" / "panel-added.key").is_file()
    log = (folder / "agent.log").open("wb")
    process = subprocess.Popen(
        ["bash", "-c", f"exec {agent}"],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        page.wait_for_function(
            """() => [...document.querySelectorAll('article.agent')].some((card) =>
                card.dataset.agentName === 'panel-added' &&
                card.querySelector('[data-test=agent-state]').textContent === 'ready')""",
            timeout=90_000,
        )
        (added,) = [a for a in panel_cluster.agents() if a["name"] == "panel-added"]
        assert added["slots_total"] == 1 and added["key_fingerprint"]
    except BaseException:
        print((folder / "agent.log").read_text(errors="replace")[-4000:])
        raise
    finally:
        stop_process(process, 15)
        log.close()
    page.wait_for_function("() => document.querySelectorAll('article.agent').length === 2")


def test_agent_states_and_issues_are_put_in_words_and_never_become_markup(page: Any) -> None:
    """The dashboard's own modules, run in the page: what an agent's fields say about
    its state, and an issue carrying markup shown as text."""
    states = page.evaluate(
        """async () => {
            const { agentState } = await import('/static/dashboard.js');
            const agent = (fields) => ({ issues: [], model_path: '/m.gguf', download_total: 0,
                download_current: 0, download_filename: null, ...fields });
            return [
                agent({ state_application_status: 'Applied' }),
                agent({ state_application_status: 'Fresh' }),
                agent({ state_application_status: 'Fresh', download_filename: 'm.gguf',
                        download_total: 100, download_current: 40 }),
                agent({ state_application_status: 'AttemptedAndNotAppliable',
                        issues: [{ ModelFileDoesNotExist: { model_path: '/x' } }] }),
                agent({ state_application_status: 'Applied',
                        issues: [{ EngineFailed: { error: 'x', restarting: true } }] }),
            ].map((a) => agentState(a)[0]);
        }"""
    )
    assert states == ["ready", "loading", "downloading", "attention", "retrying"]
    shown = page.evaluate(
        """async () => {
            const { explainIssue } = await import('/static/issues.js');
            const hostile = '<img src=x onerror="window.pwned=1">';
            const known = explainIssue({ ModelFileDoesNotExist: { model_path: hostile } });
            const unknown = explainIssue({ [hostile]: { error: hostile } });
            document.body.append(known, unknown);
            await new Promise((resolve) => setTimeout(resolve, 200));
            return {
                text: known.textContent + unknown.textContent,
                images: document.querySelectorAll('li.issue img').length,
                pwned: window.pwned === 1,
                advice: known.querySelector('dl').textContent,
            };
        }"""
    )
    assert '<img src=x onerror="window.pwned=1">' in shown["text"]
    assert shown["images"] == 0 and not shown["pwned"]
    assert "What paddler does" in shown["advice"] and "What you can do" in shown["advice"]
    page.reload()


def test_an_agent_is_stuck_when_it_shows_no_change_for_a_minute_while_it_works(
    page: Any,
) -> None:
    """The dashboard's rule, run in the page with made-up times: an agent that is not
    ready and works toward a desired state naming a model (loading, downloading, its
    engine restarting) is stuck once nothing it reports has changed for
    ``STUCK_AFTER_MS``; progress resets the clock; settled agents are never stuck."""
    seen = page.evaluate(
        """async () => {
            const { agentState, progressClock, STUCK_AFTER_MS } =
                await import('/static/dashboard.js');
            const { explainStuck } = await import('/static/issues.js');
            const agent = (id, fields) => ({ id, ready: false, issues: [],
                model_path: null, download_total: 0, download_current: 0,
                download_filename: null, ...fields });
            const loading = agent('a', { state_application_status: 'Fresh' });
            const download = (current) => agent('b', { state_application_status: 'Fresh',
                download_filename: 'm.gguf', download_total: 100, download_current: current });
            const restarting = agent('c', { state_application_status: 'Applied',
                model_path: '/m.gguf',
                issues: [{ EngineFailed: { error: 'x', restarting: true } }] });
            const ready = agent('d', { state_application_status: 'Applied', ready: true,
                model_path: '/m.gguf' });
            const refused = agent('e', { state_application_status: 'AttemptedAndNotAppliable',
                issues: [{ ModelFileDoesNotExist: { model_path: '/x' } }] });
            const clock = progressClock();
            const state = (a, now, desiredModel = true) =>
                agentState(a, { unchangedMs: clock.unchangedFor(a, now), desiredModel })[0];
            const t0 = 1_000_000;
            clock.note([loading, download(10), restarting, ready, refused], t0);
            const before = t0 + STUCK_AFTER_MS - 1;
            const after = t0 + STUCK_AFTER_MS;
            const out = {
                limit: STUCK_AFTER_MS,
                before: [loading, download(10), restarting].map((a) => state(a, before)),
                after: [loading, download(10), restarting, ready, refused]
                    .map((a) => state(a, after)),
                words: agentState(loading, { unchangedMs: STUCK_AFTER_MS })[1],
                noModelWanted: state(loading, after, false),
                unknownDesiredState: state(loading, after, null),
            };
            // the download moved at t0 + 50 s: its clock starts again then
            clock.note([loading, download(11), restarting, ready, refused], t0 + 50_000);
            out.moved = [state(download(11), after), state(download(11), t0 + 110_000)];
            out.stillStuck = state(loading, after);  // the same report: its clock runs on
            // an agent that left is forgotten: back, it starts from zero
            clock.note([], t0 + 200_000);
            clock.note([loading], t0 + 300_000);
            out.back = state(loading, t0 + 300_000 + STUCK_AFTER_MS - 1);
            out.explained = explainStuck(STUCK_AFTER_MS).textContent;
            return out;
        }"""
    )
    assert seen["limit"] == 60_000
    assert seen["before"] == ["loading", "downloading", "retrying"]
    assert seen["after"] == ["stuck", "stuck", "stuck", "ready", "attention"]
    assert seen["words"] == "stuck: no change for 60 s or more"
    assert seen["noModelWanted"] == "idle"  # nothing to apply: never stuck
    assert seen["unknownDesiredState"] == "stuck"
    assert seen["moved"] == ["downloading", "stuck"]
    assert seen["stillStuck"] == "stuck"
    assert seen["back"] == "loading"
    assert "no change for 60 s or more" in seen["explained"]
    assert "restart the agent" in seen["explained"]


def test_the_add_an_agent_command_for_another_host_writes_the_balancers_public_key(
    page: Any,
) -> None:
    """With the agents socket on a network address the command is for another host: the
    balancer's public key is written there from ``/config.json`` (public), the agent's
    key is to be copied into the balancer's folder, named; odd paths are quoted."""
    key = "rq:rM>}U?@Lns47E1%kR.o@n%FcmmsL/@{H8]yf7"
    commands = page.evaluate(
        """async (key) => {
            const { addAgentCommand } = await import('/static/dashboard.js');
            const config = { curve: true, agents_address: 'tcp://10.0.0.5:8070',
                curve_keys: { broker_public_key: key,
                    broker_public_key_file: '/etc/paddler/balancer.key',
                    authorized_agent_keys: "/etc/paddler/agent keys" } };
            const options = { name: 'gpu-1', slots: 8, keysDir: '~/keys' };
            return [addAgentCommand(config, options),
                addAgentCommand({ ...config, curve_keys: null }, options),
                addAgentCommand({ curve: false, agents_address: 'tcp://10.0.0.5:8070' },
                    options)];
        }""",
        key,
    )
    remote, unknown, plain = commands
    assert remote.splitlines() == [
        "# on the new agent's host: a keypair for it",
        "paddler keys generate --out ~/keys gpu-1",
        "# allow it: copy ~/keys/gpu-1.key into /etc/paddler/agent keys/ on the balancer's "
        "host (its --authorized-agent-keys folder)",
        "# the balancer's public key (/etc/paddler/balancer.key on its host), written here:",
        "cat > ~/keys/balancer.key <<'EOF'",
        "metadata",
        "curve",
        f'    public-key = "{key}"',
        "EOF",
        "paddler agent --broker-addr tcp://10.0.0.5:8070 --slots 8 --name gpu-1 \\",
        "  --broker-public-key ~/keys/balancer.key \\",
        "  --curve-secret-key ~/keys/gpu-1.key_secret",
    ]
    assert "# copy the balancer's public key here as ~/keys/balancer.key" in unknown
    assert "the balancer's --authorized-agent-keys folder, on its host" in unknown
    assert plain == "paddler agent --broker-addr tcp://10.0.0.5:8070 --slots 8 --name gpu-1"
    quoted = page.evaluate(
        """async () => {
            const { shellWord } = await import('/static/dashboard.js');
            return [shellWord('/tmp/a b/'), shellWord("it's"), shellWord('/plain/path.key')];
        }"""
    )
    assert quoted == ["'/tmp/a b/'", "'it'\\''s'", "/plain/path.key"]


def test_the_charts_show_data_points_after_some_requests(
    page: Any, panel_cluster: PanelCluster
) -> None:
    panel_cluster.generate(max_tokens=50)
    page.goto(f"{panel_cluster.panel}/#/charts")
    page.get_by_role("button", name="1 min").click()
    for chart in ("requests", "tokens", "ttft", "slots"):
        page.wait_for_function(
            f"""() => {{
                const chart = document.querySelector('[data-chart={chart}] svg');
                return chart && Number(chart.dataset.points) > 0 && Number(chart.dataset.max) > 0;
            }}"""
        )
    requests = page.locator("[data-chart=requests]")
    assert "done" in requests.locator(".legend").inner_text()
    assert requests.locator("polyline, circle").count() > 0


class HeldRequests:
    """``count`` streamed raw-prompt requests, each held open until the ``with`` block
    ends: then their clients leave, which cancels them (a buffered one leaves the
    buffer)."""

    def __init__(self, cluster: PanelCluster, count: int, max_tokens: int) -> None:
        self.cluster = cluster
        self.count = count
        self.max_tokens = max_tokens
        self.errors: list[BaseException] = []
        self._release = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._run()), daemon=True)

    async def _one(self, client: httpx.AsyncClient) -> None:
        async with client.stream(
            "POST",
            f"{self.cluster.inference}/api/v1/continue_from_raw_prompt",
            json={"raw_prompt": "Once upon a time", "max_tokens": self.max_tokens},
            headers={"Authorization": f"Bearer {INFERENCE_KEY}"},
        ) as answer:
            answer.raise_for_status()
            async for _ in answer.aiter_raw():
                pass

    async def _run(self) -> None:
        async with httpx.AsyncClient(verify=False, timeout=60) as client:
            tasks = [asyncio.create_task(self._one(client)) for _ in range(self.count)]
            await asyncio.to_thread(self._release.wait, 120)
            for task in tasks:
                task.cancel()
            for outcome in await asyncio.gather(*tasks, return_exceptions=True):
                if isinstance(outcome, BaseException) and not isinstance(
                    outcome, asyncio.CancelledError
                ):
                    self.errors.append(outcome)

    def __enter__(self) -> HeldRequests:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._release.set()
        self._thread.join(30)
        assert not self._thread.is_alive()


def test_the_queue_depth_chart_shows_requests_waiting_for_a_slot(
    page: Any, panel_cluster: PanelCluster
) -> None:
    """More requests than slots: some wait in the buffer, and a point of the queue
    depth chart (the balancer samples every 2 s) says how many."""
    page.goto(f"{panel_cluster.panel}/#/charts")
    page.get_by_role("button", name="1 min").click()
    queue = page.locator("[data-chart=queue]")
    with HeldRequests(panel_cluster, count=7, max_tokens=8000) as held:
        wait_until(lambda: panel_cluster.buffered() == 3, timeout_s=20, what="3 requests buffered")
        page.wait_for_function(
            """() => {
                const chart = document.querySelector('[data-chart=queue]');
                const latest = chart.querySelector('[data-test=latest]').textContent;
                const plot = chart.querySelector('svg');
                return latest === 'buffered 3' && Number(plot.dataset.max) >= 3;
            }""",
            timeout=15_000,
        )
        assert queue.locator("polyline, circle").count() > 0
        assert queue.locator(".legend").inner_text() == "buffered"
    assert not held.errors
    panel_cluster.wait_until_idle()


def _embeddings_option(page: Any) -> Any:
    return page.get_by_test_id("mode").locator("option[value=embeddings]")


def test_the_playground_has_no_embeddings_mode_while_the_desired_state_disables_them(
    page: Any, panel_cluster: PanelCluster
) -> None:
    """Embeddings are off in the cluster's desired state (the model page turns them on
    next; the playground test then uses them): the mode cannot be chosen."""
    assert panel_cluster.desired_state()["inference_parameters"]["enable_embeddings"] is False
    with page.expect_response(
        lambda answer: (
            answer.url.endswith("/api/v1/balancer_desired_state") and answer.request.method == "GET"
        )
    ) as asked:
        page.goto(f"{panel_cluster.panel}/#/playground")
    assert asked.value.ok
    asked.value.finished()
    page.get_by_test_id("prompt").wait_for()
    page.wait_for_timeout(300)  # the page reads the answer
    option = _embeddings_option(page)
    assert option.is_disabled()
    assert option.inner_text() == "Embeddings (off in the desired state)"
    assert page.get_by_test_id("mode").input_value() == "chat"


def test_the_model_page_changes_the_desired_state_and_shows_an_error_next_to_its_field(
    page: Any, panel_cluster: PanelCluster, console: Console
) -> None:
    page.goto(f"{panel_cluster.panel}/#/model")
    top_k = page.locator('[data-field="inference_parameters.top_k"]')
    top_k.wait_for()
    top_k.fill("-5")
    page.get_by_role("button", name="Save and apply").click()
    error = page.locator('[data-error-for="inference_parameters.top_k"]')
    error.wait_for()
    assert error.inner_text() == "must be from 0 to 16777216"
    assert top_k.get_attribute("aria-invalid") == "true"
    assert page.locator(".field-error:visible").count() == 1  # next to that field only
    assert panel_cluster.desired_state()["inference_parameters"]["top_k"] == 80  # unchanged
    shot(page, panel_cluster, "model")
    console.errors[:] = [e for e in console.errors if "status of 400" not in e]  # that PUT

    top_k.fill("40")
    page.locator('[data-field="inference_parameters.enable_embeddings"]').check()
    page.locator('[data-field="model.LocalToAgent"]').fill(str(panel_cluster.model_copy))
    page.get_by_role("button", name="Save and apply").click()
    page.get_by_test_id("saved").wait_for()
    assert not error.is_visible()
    state = panel_cluster.desired_state()
    assert state["model"] == {"LocalToAgent": str(panel_cluster.model_copy)}
    assert state["inference_parameters"]["top_k"] == 40
    assert state["inference_parameters"]["enable_embeddings"] is True

    # the agents' progress toward it shows on the dashboard
    page.goto(f"{panel_cluster.panel}/#/")
    page.wait_for_function(
        """(path) => {
            const cards = [...document.querySelectorAll('article.agent')];
            return cards.length === 2 && cards.every((card) =>
                card.querySelector('.model code').textContent === path &&
                card.querySelector('[data-test=agent-state]').textContent === 'ready');
        }""",
        arg=str(panel_cluster.model_copy),
    )


def test_a_model_source_error_is_shown_next_to_its_nested_field(
    page: Any, panel_cluster: PanelCluster, console: Console
) -> None:
    """A URL the balancer refuses (``model.Url.url``) and a Hugging Face file without
    its repository (``model.HuggingFace.repo_id``): the 400 names the nested field and
    its message shows next to that field only; nothing is saved."""
    before = panel_cluster.desired_state()
    page.goto(f"{panel_cluster.panel}/#/model")
    source = page.locator('[data-field="model"]')
    source.wait_for()
    save = page.get_by_role("button", name="Save and apply")
    cases = [
        (
            "Url",
            {"model.Url.url": "ftp://models.example/tiny.gguf"},
            "model.Url.url",
            "must start with http:// or https://",
        ),
        (
            "HuggingFace",
            {"model.HuggingFace.repo_id": "", "model.HuggingFace.filename": "tiny.gguf"},
            "model.HuggingFace.repo_id",
            "must be a non-empty string",
        ),
    ]
    for kind, values, path, message in cases:
        source.select_option(kind)
        for name, value in values.items():
            page.locator(f'[data-field="{name}"]').fill(value)
        with page.expect_response(
            lambda answer: (
                answer.request.method == "PUT"
                and answer.url.endswith("/api/v1/balancer_desired_state")
            )
        ) as put:
            save.click()
        assert put.value.status == 400
        assert put.value.json()["field"] == path
        error = page.locator(f'[data-error-for="{path}"]')
        error.wait_for()
        assert error.inner_text() == message
        # next to its field: in the same block as the input, the one marked invalid
        block = page.locator(".field", has=page.locator(f'[data-field="{path}"]'))
        assert block.locator(".field-error").inner_text() == message
        assert page.locator(f'[data-field="{path}"]').get_attribute("aria-invalid") == "true"
        assert page.locator(".field-error:visible").count() == 1
        assert page.locator("[aria-invalid]").count() == 1
        assert not page.get_by_test_id("form-error").is_visible()
    assert panel_cluster.desired_state() == before
    console.errors[:] = [e for e in console.errors if "status of 400" not in e]  # those PUTs
    page.reload()  # nothing of it kept


def _reply_count(page: Any) -> int:
    return int(page.get_by_test_id("reply").count())


def test_the_playground_streams_a_reply_and_stop_cancels_it_and_frees_the_slot(
    context: Any, page: Any, panel_cluster: PanelCluster, console: Console
) -> None:
    dashboard = context.new_page()  # a second tab on the dashboard, to watch the slots
    console.watch(dashboard)
    login(dashboard, panel_cluster)
    dashboard.locator("article.agent").nth(1).wait_for()
    page.bring_to_front()

    page.goto(f"{panel_cluster.panel}/#/playground")
    prompt = page.get_by_test_id("prompt")
    prompt.wait_for()
    page.get_by_label("max tokens").fill("12")
    prompt.fill("Hello!")
    page.get_by_test_id("send").click()
    meta = page.get_by_test_id("reply-meta").last
    page.wait_for_function(
        "() => /tokens\\/s$/.test([...document.querySelectorAll('[data-test=reply-meta]')]"
        ".pop().textContent)"
    )
    assert "served by agent-" in meta.inner_text() and "12 tokens" in meta.inner_text()
    assert "first token after" in meta.inner_text()
    assert page.get_by_test_id("reply-text").last.inner_text()
    prompt.fill("And then?")  # a second turn of the same conversation
    page.get_by_test_id("send").click()
    page.wait_for_function(
        "() => document.querySelectorAll('[data-test=reply]').length === 2 && "
        "/tokens\\/s$/.test([...document.querySelectorAll('[data-test=reply-meta]')]"
        ".pop().textContent)"
    )
    assert page.locator(".message.user").count() == 2
    shot(page, panel_cluster, "playground")

    # a long one: it streams (its text grows), stop cancels it, its slot frees
    page.get_by_label("max tokens").fill("8000")
    prompt.fill("Tell me everything.")
    page.get_by_test_id("send").click()
    reply = page.get_by_test_id("reply-text").last
    page.wait_for_function(
        "() => [...document.querySelectorAll('[data-test=reply-text]')].pop()"
        ".textContent.length > 20"
    )
    first = len(reply.inner_text())
    stop_at = page.get_by_test_id("stop").bounding_box()
    page.wait_for_function(
        "(n) => [...document.querySelectorAll('[data-test=reply-text]')].pop()"
        ".textContent.length > n + 200",
        arg=first,
    )
    assert page.get_by_test_id("stop").bounding_box() == stop_at  # streaming text moves no button
    dashboard.wait_for_function(
        """() => [...document.querySelectorAll('[data-test=slots-processing]')]
            .reduce((sum, e) => sum + Number(e.textContent), 0) === 1""",
        polling=100,  # a timer, not animation frames: the tab is in the background
    )
    page.get_by_test_id("stop").click()
    page.wait_for_function(
        "() => [...document.querySelectorAll('[data-test=reply-meta]')].pop()"
        ".textContent.endsWith('stopped')"
    )
    dashboard.wait_for_function(
        """() => [...document.querySelectorAll('[data-test=slots-processing]')]
            .every((e) => e.textContent === '0')""",
        polling=100,
    )
    assert all(agent["slots_processing"] == 0 for agent in panel_cluster.agents())
    tokens = re.search(r"(\d+) tokens", page.get_by_test_id("reply-meta").last.inner_text())
    assert tokens is not None and int(tokens.group(1)) < 8000  # stopped far from done
    assert reply.inner_text()
    dashboard.close()
    page.bring_to_front()

    # per-request parameters: the same seed gives the same raw completion
    page.get_by_test_id("mode").select_option("raw")
    page.get_by_label("max tokens").fill("16")
    page.get_by_label("temperature").fill("1.5")
    page.get_by_label("seed").fill("7")
    texts = []
    for _ in range(2):
        before = _reply_count(page)
        prompt.fill("Once upon a time")
        page.get_by_test_id("send").click()
        page.wait_for_function(
            "(n) => document.querySelectorAll('[data-test=reply]').length > n && "
            "/tokens\\/s$/.test([...document.querySelectorAll('[data-test=reply-meta]')]"
            ".pop().textContent)",
            arg=before,
        )
        texts.append(page.get_by_test_id("reply-text").last.inner_text())
    assert texts[0] == texts[1] and texts[0]

    # embeddings: the model page turned them on, so the mode can be chosen
    option = _embeddings_option(page)
    assert option.is_enabled() and option.inner_text() == "Embeddings"
    page.get_by_test_id("mode").select_option("embeddings")
    prompt.fill("first document\nsecond document")
    page.get_by_test_id("send").click()
    rows = page.locator("table.embeddings tbody tr")
    rows.nth(1).wait_for()
    assert sorted(rows.locator("td:first-child").all_inner_texts()) == ["1", "2"]
    assert rows.first.locator("td").nth(2).inner_text() == "64"  # the tiny model's width


THINKING_TEMPLATE = (
    "{% for m in messages %}{{ m.role }}: "
    "{% if '</think>' in m.content %}{{ m.content.split('</think>')[-1] }}"
    "{% else %}{{ m.content }}{% endif %}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant: {% if enable_thinking %}<think>\n{% endif %}"
    "{% endif %}"
)
"""A thinking-style chat template (as in ``tests/engine``): with ``enable_thinking``
the answer starts in a reasoning block, which the random model never closes, so all
it writes is reasoning; without, all is answer."""


def test_the_model_page_sets_a_chat_template_override_and_the_dashboard_shows_it_in_use(
    page: Any, panel_cluster: PanelCluster
) -> None:
    page.goto(f"{panel_cluster.panel}/#/model")
    area = page.locator('[data-field="chat_template_override"]')
    area.wait_for()
    own = page.get_by_role("radio", name="The model's own chat template")
    override = page.get_by_role("radio", name="This override:")
    assert own.is_checked() and not override.is_checked() and area.input_value() == ""
    override.check()
    area.fill(THINKING_TEMPLATE)
    page.get_by_role("button", name="Save and apply").click()
    page.get_by_test_id("saved").wait_for()
    state = panel_cluster.desired_state()
    assert state["chat_template_override"] == {"content": THINKING_TEMPLATE}
    assert state["use_chat_template_override"] is True
    assert state["model"] == {"LocalToAgent": str(panel_cluster.model_copy)}  # the rest kept
    assert state["inference_parameters"]["enable_embeddings"] is True
    panel_cluster.wait_for_agents(
        lambda a: a["uses_chat_template_override"], "both agents using the override"
    )
    page.reload()  # the form reads it back
    area.wait_for()
    assert override.is_checked() and area.input_value() == THINKING_TEMPLATE

    page.goto(f"{panel_cluster.panel}/#/")
    card = page.locator("article.agent").first
    card.wait_for()
    assert "chat template override" in card.locator(".muted.small").inner_text()
    card.get_by_role("button", name="Model details: GGUF metadata, chat template").click()
    details = card.get_by_test_id("agent-details")
    shown = details.get_by_test_id("override")
    shown.wait_for()
    assert shown.inner_text() == THINKING_TEMPLATE
    assert (
        details.get_by_role("heading", name="Chat template override (in use)", exact=True).count()
        == 1
    )
    assert "<|im_start|>" in details.inner_text()  # the model's own, shown apart


def test_the_playground_thinking_toggle_sends_enable_thinking_and_shows_reasoning_apart(
    page: Any, panel_cluster: PanelCluster
) -> None:
    """With the thinking template of the test before: the toggle on sends
    ``enable_thinking: true`` and the reply is reasoning, shown apart from the answer;
    off, ``false``, and all is answer. Then the model's own template again."""
    sent: list[dict[str, Any]] = []

    def frames(socket: Any) -> None:
        def frame(payload: str | bytes) -> None:
            message = json.loads(payload)
            if "Request" in message:
                sent.append(message["Request"]["request"])

        socket.on("framesent", frame)

    page.on("websocket", frames)
    try:
        page.goto(f"{panel_cluster.panel}/#/playground")
        prompt = page.get_by_test_id("prompt")
        prompt.wait_for()
        thinking = page.get_by_role("checkbox", name="thinking")
        assert not thinking.is_checked()
        page.get_by_label("max tokens").fill("10")
        replies = []
        for on in (True, False):
            thinking.set_checked(on)
            page.get_by_role("button", name="New conversation").click()
            prompt.fill("Why is the sky blue?")
            page.get_by_test_id("send").click()
            page.wait_for_function(
                "() => document.querySelectorAll('[data-test=reply]').length === 1 && "
                "/tokens\\/s$/.test(document.querySelector('[data-test=reply-meta]')"
                ".textContent)"
            )
            reply = page.get_by_test_id("reply")
            replies.append(
                {
                    "reasoning": reply.locator(".reasoning").inner_text(),
                    "reasoning shown": reply.locator(".reasoning").is_visible(),
                    "answer": reply.get_by_test_id("reply-text").inner_text(),
                    "meta": reply.get_by_test_id("reply-meta").inner_text(),
                }
            )
    finally:
        page.remove_listener("websocket", frames)
        state = panel_cluster.desired_state()
        panel_cluster.put_desired_state(
            {**state, "chat_template_override": None, "use_chat_template_override": False}
        )
    assert [list(request) for request in sent] == [["ContinueFromConversationHistory"]] * 2
    bodies = [request["ContinueFromConversationHistory"] for request in sent]
    assert [body["enable_thinking"] for body in bodies] == [True, False]
    assert all(body["max_tokens"] == 10 for body in bodies)
    thought, plain = replies
    assert thought["reasoning shown"] and thought["reasoning"].strip()
    assert thought["answer"] == ""
    assert "10 tokens" in thought["meta"]
    assert not plain["reasoning shown"] and plain["reasoning"] == ""
    assert plain["answer"].strip() and "10 tokens" in plain["meta"]
    panel_cluster.wait_for_agents(
        lambda a: not a["uses_chat_template_override"], "both agents on the model's template"
    )


def test_an_agent_downloading_its_model_shows_a_progress_bar(
    browser: Any, open_cluster: OpenCluster, console: Console, tmp_path: Path
) -> None:
    """A URL model (set on the model page) served slowly by a local server with its
    size: the dashboard shows the agent downloading, with a progress bar between 0 and
    the file's size that moves on; once the rest comes, the agent is ready and the bar
    gone. An open cluster of its own (its agent may download from 127.0.0.1)."""
    payload = write_tiny_llama(tmp_path / "served.gguf", seed=5).read_bytes()
    file = SlowFile(payload, chunk_bytes=4096, interval_s=0.1)  # ~40 kB/s: ~10 s
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    context.set_default_timeout(TIMEOUT_MS)
    try:
        with serve_slowly(file) as url:
            page = context.new_page()
            console.watch(page)
            page.goto(f"{open_cluster.panel}/#/model")
            source = page.locator('[data-field="model"]')
            source.wait_for()
            source.select_option("Url")
            page.locator('[data-field="model.Url.url"]').fill(url)
            page.get_by_role("button", name="Save and apply").click()
            page.get_by_test_id("saved").wait_for()

            page.goto(f"{open_cluster.panel}/#/")
            card = page.locator("article.agent")
            bar = card.locator(".download-bar")
            bar.wait_for()
            assert card.get_by_test_id("agent-state").inner_text() == "downloading the model"
            assert bar.get_attribute("role") == "progressbar"
            assert int(bar.get_attribute("aria-valuemax")) == len(payload)
            first = int(bar.get_attribute("aria-valuenow"))
            assert 0 <= first < len(payload)
            text = card.locator(".download").inner_text()
            assert re.fullmatch(r"Downloading slow\.gguf: [\d.]+ (B|KiB) of [\d.]+ KiB", text), text
            page.wait_for_function(
                """(first) => {
                    const bar = document.querySelector('.download-bar');
                    const now = bar && Number(bar.getAttribute('aria-valuenow'));
                    const width = bar && parseFloat(bar.querySelector('.bar-fill').style.width);
                    return now > first && now < Number(bar.getAttribute('aria-valuemax')) &&
                        width > 0 && width < 100;
                }""",
                arg=max(first, 1),
            )
            assert file.sent < len(payload)
            assert f"Desired model: {url}" in page.locator("main").inner_text()

            file.interval_s = 0  # the rest at once: the agent loads it
            page.wait_for_function(
                "() => document.querySelector('[data-test=agent-state]').textContent === 'ready'",
                timeout=30_000,
            )
            assert card.locator(".download").count() == 0
            model = card.locator(".model code").inner_text()
            assert model.startswith(str(open_cluster.cache)) and model.endswith(".gguf")
            (agent,) = open_cluster.agents()
            assert agent["download_current"] == agent["download_total"] == len(payload)
            page.close()
    finally:
        context.close()


def test_no_page_logs_a_javascript_error(
    page: Any, panel_cluster: PanelCluster, console: Console
) -> None:
    for path in ("#/", "#/model", "#/playground", "#/charts"):
        page.goto(f"{panel_cluster.panel}/{path}")
        page.locator("main section").first.wait_for()
        page.wait_for_timeout(300)
    # the charts after the whole module's requests: the README's picture
    page.get_by_role("button", name="1 min").click()
    page.wait_for_function("() => document.querySelectorAll('.chart-svg polyline').length > 4")
    shot(page, panel_cluster, "charts")
    assert console.errors == []
    # and the panel's own files answered with their policy
    answer = httpx.get(panel_cluster.panel, verify=False)
    assert "script-src 'self'" in answer.headers["content-security-policy"]
