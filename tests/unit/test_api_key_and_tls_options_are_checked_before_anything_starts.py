"""``--inference-api-key``, ``--management-api-key``, ``--tls-cert`` and ``--tls-key``:
read and checked before anything binds, refused with the flag named (never the key),
and keys never on a command line nor in gunicorn's environment."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import trustme
from typer.testing import CliRunner

from paddler.cli import app
from paddler.cluster import _flags, _secret_env
from paddler.errors import ConfigurationError
from paddler.http.api_keys import ApiKeys, read_api_keys
from paddler.http.app import CONFIG_ENV, HttpConfig
from paddler.http.server import check_tls, gunicorn_command, gunicorn_env, http_config
from paddler.http.settings import HttpSettings

runner = CliRunner()
SECRET = "s3cret-key_0123456789"


def test_keys_come_from_values_and_from_files_of_one_key_per_line(tmp_path: Path) -> None:
    keys_file = tmp_path / "keys.txt"
    keys_file.write_text("# inference keys\nfile-key-1\n\n  file-key-2  \n")
    keys = read_api_keys(["inline-key", f"@{keys_file}"], "--inference-api-key")
    assert keys == ["inline-key", "file-key-1", "file-key-2"]


def test_a_bad_key_is_refused_without_being_shown(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError) as bad:
        read_api_keys(["good-key", "has space!"], "--inference-api-key")
    assert bad.value.field == "--inference-api-key"
    assert "value 2" in str(bad.value) and "has space" not in str(bad.value)
    keys_file = tmp_path / "keys.txt"
    keys_file.write_text("ok\nno;good\n")
    with pytest.raises(ConfigurationError, match="line 2 of") as in_file:
        read_api_keys([f"@{keys_file}"], "--management-api-key")
    assert "no;good" not in str(in_file.value)


def test_an_empty_or_unreadable_key_file_is_refused(tmp_path: Path) -> None:
    empty = tmp_path / "empty.txt"
    empty.write_text("# nothing yet\n\n")
    with pytest.raises(ConfigurationError, match="holds no key"):
        read_api_keys([f"@{empty}"], "--inference-api-key")
    with pytest.raises(ConfigurationError, match="cannot read the key file"):
        read_api_keys([f"@{tmp_path / 'missing.txt'}"], "--inference-api-key")


def test_the_workers_config_holds_digests_only(tmp_path: Path, monkeypatch) -> None:
    keys_file = tmp_path / "management.txt"
    keys_file.write_text("management-key\n")
    settings = HttpSettings(
        compat_openai_addr="127.0.0.1:8062",
        inference_api_key=[SECRET],
        management_api_key=[f"@{keys_file}"],
    )
    config = http_config(settings, "tcp://127.0.0.1:8071")
    text = config.to_env()
    assert SECRET not in text and "management-key" not in text
    restored = HttpConfig.from_env(text)
    assert ApiKeys.from_hex(restored.api_keys["inference"]).accepts(SECRET)
    assert ApiKeys.from_hex(restored.api_keys["openai"]).accepts(SECRET)
    assert ApiKeys.from_hex(restored.api_keys["management"]).accepts("management-key")
    assert not ApiKeys.from_hex(restored.api_keys["management"]).accepts(SECRET)
    assert SECRET not in " ".join(gunicorn_command(settings, "info"))
    monkeypatch.setenv("PADDLER_INFERENCE_API_KEY", SECRET)
    monkeypatch.setenv("PADDLER_MANAGEMENT_API_KEY", f"@{keys_file}")
    env = gunicorn_env(config)
    assert "PADDLER_INFERENCE_API_KEY" not in env and "PADDLER_MANAGEMENT_API_KEY" not in env
    assert SECRET not in json.dumps(env) and json.loads(env[CONFIG_ENV])["api_keys"]


def test_without_keys_every_service_is_open() -> None:
    config = http_config(HttpSettings(), "tcp://127.0.0.1:8071")
    assert not any(config.api_keys.values())


def test_paddler_cluster_passes_keys_to_its_balancer_in_the_environment(
    tmp_path: Path, monkeypatch
) -> None:
    monkeypatch.delenv("PADDLER_MANAGEMENT_API_KEY", raising=False)
    keys_file = tmp_path / "keys.txt"
    keys_file.write_text("file-key\n")
    settings = HttpSettings(inference_api_key=[SECRET, f"@{keys_file}"], tls_cert="c", tls_key="k")
    argv = _flags(settings)
    assert SECRET not in argv and "--inference-api-key" not in argv
    assert argv[argv.index("--tls-cert") + 1] == "c"
    env = _secret_env(settings)
    assert env["PADDLER_INFERENCE_API_KEY"] == f"{SECRET} file-key"
    assert "PADDLER_MANAGEMENT_API_KEY" not in env


def test_the_key_options_are_repeatable_and_read_from_the_environment() -> None:
    repeated = runner.invoke(
        app,
        ["balancer", "--inference-api-key", "fine-key", "--inference-api-key", "not fine"],
    )
    assert repeated.exit_code == 2
    assert "--inference-api-key: value 2 is not a valid key" in repeated.output
    assert "not fine" not in repeated.output
    from_env = runner.invoke(
        app, ["balancer"], env={"PADDLER_MANAGEMENT_API_KEY": "fine-key bad;key"}
    )
    assert from_env.exit_code == 2
    assert "--management-api-key: value 2 is not a valid key" in from_env.output


@pytest.fixture(scope="module")
def pem(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("tls")
    ca = trustme.CA()
    server = ca.issue_cert("127.0.0.1", "localhost")
    other = trustme.CA().issue_cert("localhost")
    files = {"cert": folder / "cert.pem", "key": folder / "key.pem", "other": folder / "other.pem"}
    server.cert_chain_pems[0].write_to_path(str(files["cert"]))
    server.private_key_pem.write_to_path(str(files["key"]))
    other.private_key_pem.write_to_path(str(files["other"]))
    return files


def test_tls_needs_both_files(pem) -> None:
    only_cert = runner.invoke(app, ["balancer", "--tls-cert", str(pem["cert"])])
    assert only_cert.exit_code == 2
    assert "--tls-key: --tls-cert needs --tls-key too" in only_cert.output
    only_key = runner.invoke(app, ["balancer", "--tls-key", str(pem["key"])])
    assert only_key.exit_code == 2
    assert "--tls-cert: --tls-key needs --tls-cert too" in only_key.output


def test_tls_files_must_be_readable_and_a_pair(pem, tmp_path: Path) -> None:
    missing = runner.invoke(
        app,
        ["balancer", "--tls-cert", str(tmp_path / "nope.pem"), "--tls-key", str(pem["key"])],
    )
    assert missing.exit_code == 2
    assert "--tls-cert: cannot read" in missing.output
    with pytest.raises(ConfigurationError, match="not a PEM certificate and its private key"):
        check_tls(HttpSettings(tls_cert=str(pem["cert"]), tls_key=str(pem["other"])))
    with pytest.raises(ConfigurationError, match="not a PEM certificate"):
        check_tls(HttpSettings(tls_cert=str(pem["key"]), tls_key=str(pem["key"])))


def test_a_certificate_and_its_key_go_to_gunicorn(pem) -> None:
    settings = HttpSettings(tls_cert=str(pem["cert"]), tls_key=str(pem["key"]))
    check_tls(settings)
    command = gunicorn_command(settings, "info")
    assert command[command.index("--certfile") + 1] == str(pem["cert"])
    assert command[command.index("--keyfile") + 1] == str(pem["key"])
    assert "--certfile" not in gunicorn_command(HttpSettings(), "info")
