"""A generation request's prompt as tokens: a raw prompt, or a conversation rendered
with the model's chat template."""

from __future__ import annotations

from typing import Any

from paddler.agent.chat_template import ChatTemplate, ChatTemplateError
from paddler.agent.llama.native import LlamaModel


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
    text = template.render(
        request["conversation_history"],
        add_generation_prompt=request["add_generation_prompt"],
        enable_thinking=request["enable_thinking"],
        tools=request.get("tools"),
    )
    # the template usually writes the BOS itself: never add a second one
    starts_with_bos = bool(model.bos_token) and text.startswith(model.bos_token)
    return model.tokenize(text, add_special=model.add_bos and not starts_with_bos)
