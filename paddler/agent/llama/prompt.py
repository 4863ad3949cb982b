"""A generation request's prompt as tokens: a raw prompt, or a conversation rendered
with the model's chat template."""

from __future__ import annotations

from typing import Any

from paddler.agent.chat_template import ChatTemplate, ChatTemplateError
from paddler.agent.llama.native import LlamaModel
from paddler.agent.tool_calls import template_messages
from paddler.protocol.tool_calls import forced_tool, uses_tools


def prompt_tokens(
    model: LlamaModel, template: ChatTemplate | None, request: dict[str, Any]
) -> list[int]:
    """The tokens of a request's prompt; ``ChatTemplateError`` when a conversation
    cannot be rendered."""
    if "raw_prompt" in request:
        return model.tokenize(request["raw_prompt"], add_special=True)
    if template is None:
        raise ChatTemplateError(
            "this model has no chat template; set chat_template_override in the desired state"
        )
    tools = uses_tools(request)
    text = template.render(
        template_messages(template.source, request["conversation_history"]),
        add_generation_prompt=request["add_generation_prompt"],
        enable_thinking=request["enable_thinking"] and not forces_tool_call(request),
        tools=request["tools"] if tools else None,
    )
    # the template usually writes the BOS itself: never add a second one
    starts_with_bos = bool(model.bos_token) and text.startswith(model.bos_token)
    return model.tokenize(text, add_special=model.add_bos and not starts_with_bos)


def forces_tool_call(request: dict[str, Any]) -> bool:
    """Whether the request's ``tool_choice`` makes the answer a tool call (required,
    or a named tool): its grammar starts the call at once, with no reasoning first."""
    choice = request.get("tool_choice", "auto")
    return bool(request.get("tools")) and (choice == "required" or forced_tool(choice) is not None)
