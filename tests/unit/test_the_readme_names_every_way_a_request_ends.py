"""The README's table of how a request ends names every outcome paddler documents
(``paddler.broker.metrics.REQUEST_OUTCOMES``), so none can be added unexplained."""

from __future__ import annotations

import re
from pathlib import Path

from paddler.broker.metrics import REQUEST_OUTCOMES

README = Path(__file__).resolve().parents[2] / "README.md"


def test_every_outcome_is_in_the_readme_table() -> None:
    text = README.read_text()
    section = text.split("### How a request ends", 1)[1].split("\n## ", 1)[0]
    named = set(re.findall(r"^\| `(\w+)` \|", section, flags=re.MULTILINE))
    missing = REQUEST_OUTCOMES - named - {"Cancelled"}  # the agent's name for `cancelled`
    assert not missing, f"README's 'How a request ends' lacks {sorted(missing)}"
    assert "`Cancelled`" in section
    assert not named - REQUEST_OUTCOMES, f"not outcomes: {sorted(named - REQUEST_OUTCOMES)}"
