"""Rendering conversations with a model's chat template (Jinja2, sandboxed).

The template comes from the GGUF metadata ``tokenizer.chat_template`` or from the
desired state's override. It gets what Hugging Face templates expect:
``messages``, ``add_generation_prompt``, ``enable_thinking``, ``bos_token``,
``eos_token``, ``tools``, ``raise_exception`` and ``strftime_now``.
"""

from __future__ import annotations

import datetime
import json
from typing import Any

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment

from paddler.errors import PaddlerError


class ChatTemplateError(PaddlerError):
    """The template does not compile or fails on this conversation."""


def _raise_exception(message: str) -> None:
    raise ChatTemplateError(f"the chat template refused the conversation: {message}")


def _strftime_now(fmt: str) -> str:
    return datetime.datetime.now().strftime(fmt)


def _tojson(
    value: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _text_of(content: Any) -> Any:
    """Multimodal parts reduce to their text for text-only models."""
    if isinstance(content, list):
        return "".join(part.get("text", "") for part in content if isinstance(part, dict))
    return content


class ChatTemplate:
    def __init__(self, source: str, bos_token: str, eos_token: str) -> None:
        self.source = source
        self.bos_token = bos_token
        self.eos_token = eos_token
        # the same environment Hugging Face's transformers renders templates in
        environment = ImmutableSandboxedEnvironment(
            trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
        )
        environment.globals["raise_exception"] = _raise_exception
        environment.globals["strftime_now"] = _strftime_now
        environment.filters["tojson"] = _tojson
        try:
            self._template = environment.from_string(source)
        except jinja2.TemplateError as exc:
            raise ChatTemplateError(f"the chat template does not compile: {exc}") from exc

    def render(
        self,
        messages: list[dict[str, Any]],
        *,
        add_generation_prompt: bool = True,
        enable_thinking: bool = False,
        tools: list[Any] | None = None,
    ) -> str:
        conversation = [{**m, "content": _text_of(m.get("content"))} for m in messages]
        try:
            return self._template.render(
                messages=conversation,
                add_generation_prompt=add_generation_prompt,
                enable_thinking=enable_thinking,
                bos_token=self.bos_token,
                eos_token=self.eos_token,
                tools=tools or None,
            )
        except ChatTemplateError:
            raise
        except Exception as exc:  # templates are user code: any failure is theirs
            raise ChatTemplateError(f"the chat template failed: {exc}") from exc
