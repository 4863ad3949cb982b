"""The dashboard explains every issue a paddler agent can report, and only those: the
issue kinds are read from ``paddler/agent``'s source (the tagged values it reports,
``{"Kind": {...}}``) and compared with the ``ISSUES`` table of ``issues.js``."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
AGENT = ROOT / "paddler" / "agent"
ISSUES_JS = ROOT / "paddler" / "http" / "admin" / "static" / "issues.js"

TAG = re.compile(r"[A-Z][A-Za-z0-9]+")
NOT_ISSUES = {"embedding"}
"""Calls whose tagged values are results, not issues (an embedding, or why one failed)."""


def _tag(node: ast.AST) -> str | None:
    """The tag of ``{"Kind": {...}}`` (a dict of one CamelCase key whose value is a dict)."""
    if not isinstance(node, ast.Dict) or len(node.keys) != 1:
        return None
    key, value = node.keys[0], node.values[0]
    if isinstance(key, ast.Constant) and isinstance(key.value, str) and TAG.fullmatch(key.value):
        return key.value if isinstance(value, ast.Dict) else None
    return None


def _called(call: ast.Call) -> str:
    return call.func.attr if isinstance(call.func, ast.Attribute) else getattr(call.func, "id", "")


def _kind_parameters(tree: ast.Module) -> dict[str, int]:
    """Functions that build an issue whose kind is one of their parameters (``def
    _hub_issue(kind, ...)``: ``{kind: {...}}``): name -> that parameter's position."""
    found: dict[str, int] = {}
    for function in ast.walk(tree):
        if not isinstance(function, ast.FunctionDef):
            continue
        names = [argument.arg for argument in function.args.args]
        for node in ast.walk(function):
            if isinstance(node, ast.Dict) and len(node.keys) == 1:
                key = node.keys[0]
                if isinstance(key, ast.Name) and key.id in names:
                    found[function.name] = names.index(key.id)
    return found


def agent_issue_kinds() -> dict[str, list[str]]:
    """Every issue kind ``paddler/agent`` can report -> where (file:line)."""
    trees = {path: ast.parse(path.read_text()) for path in sorted(AGENT.rglob("*.py"))}
    wrappers: dict[str, int] = {}
    for tree in trees.values():
        wrappers.update(_kind_parameters(tree))
    kinds: dict[str, list[str]] = {}
    for path, tree in trees.items():
        results: set[int] = set()  # ids of the nodes inside a call that sends a result
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and _called(node) in NOT_ISSUES:
                results.update(id(inner) for inner in ast.walk(node))
        for node in ast.walk(tree):
            kind = None
            if id(node) in results:
                continue
            if isinstance(node, ast.Call) and _called(node) in wrappers:
                index = wrappers[_called(node)]
                if index < len(node.args):
                    argument = node.args[index]
                    if isinstance(argument, ast.Constant) and isinstance(argument.value, str):
                        kind = argument.value
            else:
                kind = _tag(node)
            if kind is not None:
                where = f"{path.relative_to(ROOT)}:{getattr(node, 'lineno', 0)}"
                kinds.setdefault(kind, []).append(where)
    return kinds


def explained_kinds() -> set[str]:
    """The keys of ``export const ISSUES = {...}`` in issues.js."""
    text = ISSUES_JS.read_text()
    start = text.index("export const ISSUES = {")
    end = text.index("\n};\n", start)
    return set(re.findall(r"^  ([A-Za-z0-9]+): \{$", text[start:end], re.MULTILINE))


def test_the_source_reading_finds_the_issues_agents_are_known_to_report() -> None:
    kinds = agent_issue_kinds()
    # one of each way an issue is made: a ModelSourceError, a helper taking the kind,
    # a status's issues list, the worker's own
    for kind in ("ModelFileDoesNotExist", "HuggingFacePermissions", "ModelCannotBeLoaded"):
        assert kind in kinds
    assert "EngineFailed" in kinds and "UnableToFindChatTemplate" in kinds
    assert not {"Embedding", "DocumentExceedsBatchSize"} & set(kinds)  # results, not issues


def test_every_issue_an_agent_reports_is_explained_and_nothing_else_is() -> None:
    emitted = agent_issue_kinds()
    explained = explained_kinds()
    missing = {kind: emitted[kind] for kind in sorted(set(emitted) - explained)}
    assert not missing, f"issues.js has no explanation of {missing}"
    never = sorted(explained - set(emitted))
    assert not never, f"issues.js explains issues no paddler agent reports: {never}"


def test_no_explanation_promises_a_retry_paddler_does_not_make() -> None:
    """An agent never tries a failed model again by itself (``apply_state`` skips a
    desired state it already applied): the texts must not say otherwise."""
    text = re.sub(r'"\s*\+\s*\n\s*"', "", ISSUES_JS.read_text())  # "a " +\n "b": "a b"
    for claim in ("tries again later", "retries later", "will retry", "try again later"):
        assert claim not in text, claim
    assert "does not try again by itself" in text
