"""Reasoning ("thinking") text told apart from the answer.

Thinking models write their reasoning between markers, ``<think>`` and ``</think>``
for most (Qwen 3, DeepSeek R1, QwQ...), ``[THINK]`` and ``[/THINK]`` for Mistral's.
Which pair a model uses is read from its chat template. A request whose prompt
ends with the opening marker (templates that open the block themselves when
thinking is on) starts inside it.

``ReasoningSplitter`` cuts a stream of text into reasoning and answer segments, the
markers left out, like ``TextAssembler`` does for stop strings: text that could be
the start of a marker is held back until it is known not to be one, so a marker
split across tokens is still found. Whitespace right after a marker is dropped.
"""

from __future__ import annotations

MARKERS = (("<think>", "</think>"), ("[THINK]", "[/THINK]"))


def thinking_markers(template_source: str | None) -> tuple[str, str] | None:
    """The markers a chat template's model writes its reasoning between, if any."""
    if not template_source:
        return None
    for opening, closing in MARKERS:
        if opening in template_source and closing in template_source:
            return opening, closing
    return None


class ReasoningSplitter:
    def __init__(self, opening: str, closing: str, inside: bool = False) -> None:
        self.opening = opening
        self.closing = closing
        self.inside = inside
        """Whether the text now is reasoning."""
        self._pending = ""
        self._trim = inside

    def _segment(self, out: list[tuple[bool, str]], text: str) -> None:
        if not text:
            return
        if self._trim:
            text = text.lstrip()
            if not text:
                return
            self._trim = False
        if out and out[-1][0] == self.inside:
            out[-1] = (self.inside, out[-1][1] + text)
        else:
            out.append((self.inside, text))

    def push(self, text: str) -> list[tuple[bool, str]]:
        """Add text; the segments ``(is_reasoning, text)`` that can be sent now."""
        out: list[tuple[bool, str]] = []
        text = self._pending + text
        while True:
            marker = self.closing if self.inside else self.opening
            index = text.find(marker)
            if index < 0:
                break
            self._segment(out, text[:index])
            text = text[index + len(marker) :]
            self.inside = not self.inside
            self._trim = True
        hold = 0
        for size in range(min(len(marker) - 1, len(text)), 0, -1):
            if text.endswith(marker[:size]):
                hold = size
                break
        self._pending = text[len(text) - hold :] if hold else ""
        self._segment(out, text[: len(text) - hold])
        return out

    def finish(self) -> list[tuple[bool, str]]:
        """What is still held back, at the end."""
        out: list[tuple[bool, str]] = []
        self._segment(out, self._pending)
        self._pending = ""
        return out
