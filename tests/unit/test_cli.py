"""The ``paddler`` command: options from the settings dataclasses, env vars, clear errors."""

from __future__ import annotations

from dataclasses import fields

import pytest
from typer.testing import CliRunner

from paddler.agent.settings import AgentSettings
from paddler.broker.settings import BrokerSettings
from paddler.cli import app
from paddler.cluster import ClusterSettings
from paddler.http.settings import HttpSettings
from paddler.settings import env_name, flag_name

runner = CliRunner()


@pytest.mark.parametrize(
    ("command", "settings"),
    [
        ("balancer", (BrokerSettings, HttpSettings)),
        ("agent", (AgentSettings,)),
        ("cluster", (ClusterSettings, BrokerSettings, HttpSettings)),
    ],
)
def test_every_setting_is_an_option_and_an_environment_variable(command, settings) -> None:
    result = runner.invoke(app, [command, "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0
    for settings_type in settings:
        for f in fields(settings_type):
            assert flag_name(f.name) in result.output
            assert env_name(f.name) in result.output


def test_paddler_flag_names_are_kept() -> None:
    balancer = runner.invoke(app, ["balancer", "--help"], env={"COLUMNS": "200"}).output
    for flag in (
        "--max-buffered-requests",
        "--buffered-request-timeout",
        "--inference-item-timeout",
        "--state-database",
        "--inference-addr",
        "--management-addr",
        "--compat-openai-addr",
    ):
        assert flag in balancer
    agent = runner.invoke(app, ["agent", "--help"], env={"COLUMNS": "200"}).output
    assert "--slots" in agent and "--name" in agent


def test_an_out_of_range_value_is_refused_with_the_flag_named() -> None:
    result = runner.invoke(app, ["balancer", "--max-buffered-requests", "-1"])
    assert result.exit_code == 2
    assert "--max-buffered-requests: must be at least 0" in result.output


def test_environment_variables_are_read() -> None:
    result = runner.invoke(app, ["balancer"], env={"PADDLER_DISPATCH_POLICY": "random"})
    assert result.exit_code == 2
    assert "--dispatch-policy: must be one of slots, prefix, round-robin" in result.output


def test_a_bad_http_address_is_refused_before_anything_starts() -> None:
    result = runner.invoke(app, ["balancer", "--inference-addr", "nowhere"])
    assert result.exit_code == 2
    assert "--inference-addr: expected host:port" in result.output
    same = runner.invoke(
        app,
        ["balancer", "--inference-addr", "127.0.0.1:9999", "--management-addr", "127.0.0.1:9999"],
    )
    assert same.exit_code == 2 and "already used" in same.output


def test_a_cluster_with_a_missing_model_file_says_so(tmp_path) -> None:
    result = runner.invoke(app, ["cluster", "--model", str(tmp_path / "missing.gguf")])
    assert result.exit_code == 1
    assert "is not a file" in result.output
