"""Paddler's ``AgentSnapshot`` JSON, built from the broker's record.

The broker says what it knows (``paddler.protocol.messages.AgentSnapshot``); the
shape Paddler's clients expect, and the two values Paddler derives, live here.
"""

from __future__ import annotations

from typing import Any

from paddler.protocol.messages import AgentSnapshot


def paddler_agent(agent: AgentSnapshot) -> dict[str, Any]:
    """Paddler's fields, in its order (``ready`` is ours and stays out), and with
    curve on, the fingerprint of the key the agent authenticated with."""
    body = {
        "id": agent.id,
        "name": agent.name,
        "slots_total": agent.slots_total,
        "slots_processing": agent.slots_processing,
        # an agent that never said how many slots it wants has what it wants
        "desired_slots_total": agent.desired_slots_total or agent.slots_total,
        "model_path": agent.model_path,
        "issues": agent.issues,
        "state_application_status": agent.state_application_status,
        "uses_chat_template_override": agent.uses_chat_template_override,
        "download_current": agent.download_current,
        "download_total": agent.download_total,
        "download_filename": agent.download_filename,
        # no size known (or nothing downloading): a progress bar cannot show a fraction
        "download_indeterminate": agent.download_total == 0,
    }
    if agent.key_fingerprint is not None:
        body["key_fingerprint"] = agent.key_fingerprint
    return body


def agents_body(agents: list[AgentSnapshot]) -> dict[str, Any]:
    """The body of ``/api/v1/agents`` and of every event of its stream."""
    return {"agents": [paddler_agent(agent) for agent in agents]}
