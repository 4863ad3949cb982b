"""Run an agent on the fake engine: ``python -m paddler.testing.fake_agent``.

For tests and benchmarks of the broker and HTTP layers only.
"""

from __future__ import annotations

import argparse
import logging
import sys

from paddler.agent.service import AgentService, agent_identity
from paddler.agent.settings import AgentSettings
from paddler.testing.fake_engine import FakeEngine


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--broker-addr", required=True)
    parser.add_argument("--slots", type=int, default=4)
    parser.add_argument("--name", default=None)
    parser.add_argument("--step-ms", type=float, default=5.0)
    parser.add_argument("--tokens-per-step", type=int, default=1)
    parser.add_argument("--first-token-delay-ms", type=float, default=0.0)
    parser.add_argument("--shutdown-timeout", type=int, default=10_000)
    parser.add_argument("--identity", default=None)
    parser.add_argument(
        "--token-ids",
        choices=("on", "off"),
        default="on",
        help="off: send text without token ids (its streams cannot continue elsewhere)",
    )
    parser.add_argument("--broker-public-key", default=None)
    parser.add_argument("--curve-secret-key", default=None)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    settings = AgentSettings(
        broker_addr=args.broker_addr,
        slots=args.slots,
        name=args.name,
        shutdown_timeout=args.shutdown_timeout,
        broker_public_key=args.broker_public_key,
        curve_secret_key=args.curve_secret_key,
    )
    engine = FakeEngine(
        args.slots,
        step_ms=args.step_ms,
        tokens_per_step=args.tokens_per_step,
        first_token_delay_ms=args.first_token_delay_ms,
        token_ids=args.token_ids == "on",
    )
    identity = args.identity.encode() if args.identity else agent_identity(args.name)
    service = AgentService(settings, engine, identity=identity)
    service.install_signal_handlers()
    return service.run()


if __name__ == "__main__":
    sys.exit(main())
