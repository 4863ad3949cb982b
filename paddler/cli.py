"""The ``paddler`` command (typer): ``balancer`` and ``agent``.

Every option comes from a settings dataclass field (``paddler.broker.settings``,
``paddler.agent.settings``): ``--field-name`` with the environment variable
``PADDLER_FIELD_NAME`` and the field's help text.
"""

from __future__ import annotations

import inspect
import logging
import sys
from collections.abc import Callable
from dataclasses import MISSING, fields
from pathlib import Path
from typing import Annotated, Any, get_type_hints

import typer

from paddler.agent.settings import AgentSettings
from paddler.broker.settings import BrokerSettings
from paddler.cluster import ClusterSettings
from paddler.errors import ConfigurationError, PaddlerError
from paddler.http.settings import HttpSettings
from paddler.settings import check_settings, env_name, flag_name

app = typer.Typer(
    name="paddler",
    help="paddler: an LLM serving platform and load balancer for llama.cpp agents.",
    no_args_is_help=True,
    add_completion=False,
)


def configure_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


def _default(f: Any) -> Any:
    if f.default is not MISSING:
        return f.default
    if f.default_factory is not MISSING:
        return f.default_factory()
    return ...


def settings_command(
    name: str, settings_types: tuple[type[Any], ...], help: str
) -> Callable[[Callable[..., int]], Callable[..., int]]:
    """Register ``run(*settings)`` as a command whose options are the fields of the
    settings dataclasses (one instance of each is passed, in order)."""

    def register(run: Callable[..., int]) -> Callable[..., int]:
        parameters = []
        owners: list[tuple[type[Any], list[str]]] = []
        for settings_type in settings_types:
            hints = get_type_hints(settings_type)
            names = []
            for f in fields(settings_type):
                names.append(f.name)
                parameters.append(
                    inspect.Parameter(
                        f.name,
                        inspect.Parameter.KEYWORD_ONLY,
                        default=typer.Option(
                            _default(f),
                            f.metadata.get("flag") or flag_name(f.name),
                            envvar=env_name(f.name),
                            help=f.metadata["help"],
                            show_envvar=True,
                        ),
                        annotation=hints[f.name],
                    )
                )
            owners.append((settings_type, names))
        parameters.append(
            inspect.Parameter(
                "log_level",
                inspect.Parameter.KEYWORD_ONLY,
                default=typer.Option(
                    "info",
                    "--log-level",
                    envvar="PADDLER_LOG_LEVEL",
                    help="debug, info, warning or error.",
                ),
                annotation=str,
            )
        )

        def command(**values: Any) -> None:
            log_level = values.pop("log_level")
            configure_logging(log_level)
            try:
                instances = []
                for settings_type, names in owners:
                    settings = settings_type(**{n: values[n] for n in names})
                    check_settings(settings)
                    instances.append(settings)
                code = run(*instances, log_level=log_level)
            except ConfigurationError as exc:
                typer.echo(f"paddler {name}: {exc}", err=True)
                raise typer.Exit(2) from exc
            except PaddlerError as exc:
                typer.echo(f"paddler {name}: {exc}", err=True)
                raise typer.Exit(1) from exc
            raise typer.Exit(code)

        command.__signature__ = inspect.Signature(parameters)  # type: ignore[attr-defined]
        command.__name__ = name
        app.command(name, help=help)(command)
        return run

    return register


@settings_command(
    "balancer",
    (BrokerSettings, HttpSettings),
    "Run the balancer: the broker that owns cluster state and dispatches requests to "
    "agents, and the HTTP services (inference, management, OpenAI-compatible, web admin "
    "panel).",
)
def run_balancer(settings: BrokerSettings, http: HttpSettings, log_level: str = "info") -> int:
    import zmq

    from paddler.broker.server import BrokerServer
    from paddler.curve import WorkerKeys, load_keypair
    from paddler.http.server import HttpServer, http_config

    http_config(http, settings.clients_addr)  # check the addresses before binding anything
    worker_keys = None
    if settings.curve_secret_key:  # the HTTP workers get a keypair of their own
        broker_keys = load_keypair(settings.curve_secret_key, "--curve-secret-key")
        worker_keys = WorkerKeys(broker_keys.public)
    try:
        try:
            server = BrokerServer(
                settings, extra_client_keys=[worker_keys.public] if worker_keys else []
            )
        except zmq.ZMQError as exc:
            raise ConfigurationError("--agents-addr/--clients-addr", f"cannot bind: {exc}") from exc
        server.install_signal_handlers()
        web = HttpServer(
            http,
            settings.clients_addr,
            log_level,
            worker_keys.files if worker_keys else None,
            broker=settings,  # what the web admin panel shows about the balancer
        )
        try:
            server.run(watch=web.alive)
        finally:
            web.stop()
    finally:
        if worker_keys is not None:
            worker_keys.close()
    return 1 if server.failed else 0


@settings_command(
    "agent",
    (AgentSettings,),
    "Run an agent: serves the balancer's requests with a GGUF model through llama.cpp.",
)
def run_agent(settings: AgentSettings, log_level: str = "info") -> int:
    from paddler.agent.service import AgentService, agent_identity

    try:
        from paddler.agent.llama_engine import LlamaEngine
    except ImportError as exc:
        raise PaddlerError(f"the llama.cpp engine is not available: {exc}") from exc
    from paddler.agent.llama.loading import model_resolver
    from paddler.agent.source_rules import ModelSourceRules

    engine = LlamaEngine(
        settings.slots,
        n_threads=settings.threads or None,
        resolver=model_resolver(ModelSourceRules.from_settings(settings)),
    )
    service = AgentService(settings, engine, identity=agent_identity(settings.name))
    service.install_signal_handlers()
    return service.run()


@settings_command(
    "cluster",
    (ClusterSettings, BrokerSettings, HttpSettings),
    "Run a balancer and N agents on this machine (with a tiny demo model when no "
    "--model is given).",
)
def run_cluster_command(
    cluster: ClusterSettings, broker: BrokerSettings, http: HttpSettings, log_level: str = "info"
) -> int:
    from paddler.cluster import run_cluster

    return run_cluster(cluster, broker, http, log_level)


keys_app = typer.Typer(help="CurveZMQ keys for the balancer, agents and clients.")
app.add_typer(keys_app, name="keys")


@keys_app.command("generate")
def generate_keys(
    name: Annotated[str, typer.Argument(help="The keypair's name: NAME.key and NAME.key_secret.")],
    out: Annotated[Path, typer.Option("--out", help="The folder to write the key files into.")],
) -> None:
    """Write a keypair: NAME.key (public: give it to the other side) and NAME.key_secret
    (secret, mode 0600: keep it on this host)."""
    from paddler.curve import fingerprint, generate, load_public

    try:
        public, secret = generate(out, name)
    except (ConfigurationError, OSError) as exc:
        typer.echo(f"paddler keys generate: {exc}", err=True)
        raise typer.Exit(2) from exc
    key = fingerprint(load_public(public, "NAME"))
    typer.echo(f"public key: {public}\nsecret key: {secret}\nfingerprint: {key}")


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:  # pragma: no cover
        sys.exit(130)


if __name__ == "__main__":
    main()
