"""Reason codes are one closed set (shared/reasons.py): raise sites and comparisons use its members,
never raw strings, and a transient failure is not a bad-input error."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from edge.control.activation import ActivationError, ActivationInterruptedError
from edge.delivery.downloader import DownloadError, DownloadInterruptedError
from shared.errors import ContractError, ReasonedError, TransientError
from shared.reasons import Reason

ROOT = Path(__file__).resolve().parents[1]
APPS = ("edge", "shared", "fleet", "trainer")


def _app_sources() -> list[tuple[Path, ast.AST]]:
    return [
        (path, ast.parse(path.read_text())) for app in APPS for path in sorted((ROOT / app).rglob("*.py"))
    ]


def _reasoned_error_names() -> set[str]:
    """Every class in the apps that derives, directly or not, from ReasonedError."""
    bases: dict[str, set[str]] = {}
    for _, tree in _app_sources():
        for node in ast.walk(tree):
            if isinstance(node, ast.ClassDef):
                bases[node.name] = {ast.unparse(base).split(".")[-1] for base in node.bases}
    known = {"ReasonedError"}
    while True:
        grown = known | {name for name, parents in bases.items() if parents & known}
        if grown == known:
            return known
        known = grown


def test_every_code_is_kebab_case_and_unique() -> None:
    assert len({member.value for member in Reason}) == len(Reason)
    for member in Reason:
        assert re.fullmatch(r"[a-z][a-z0-9]*(-[a-z0-9]+)*", member.value), member
        assert member.name == member.value.upper().replace("-", "_")


def test_raise_sites_name_a_member_never_a_string() -> None:
    reasoned = _reasoned_error_names()
    assert {"ContractError", "TransientError", "TrainerError", "ActivationError"} <= reasoned
    literal = []
    for path, tree in _app_sources():
        for node in ast.walk(tree):
            if not isinstance(node, ast.Call) or not node.args:
                continue
            name = ast.unparse(node.func).split(".")[-1]
            first = node.args[0]
            if name in reasoned and isinstance(first, ast.Constant | ast.JoinedStr):
                literal.append(f"{path.relative_to(ROOT)}:{node.lineno} {name}({ast.unparse(first)}, ...)")
    assert literal == []


def test_control_flow_never_compares_a_reason_with_a_string() -> None:
    found = []
    for path, tree in _app_sources():
        for node in ast.walk(tree):
            if not isinstance(node, ast.Compare):
                continue
            sides = [node.left, *node.comparators]
            names_reason = any(ast.unparse(side).split(".")[-1] == "reason" for side in sides)
            has_string = any(isinstance(side, ast.Constant) and isinstance(side.value, str) for side in sides)
            if names_reason and has_string:
                found.append(f"{path.relative_to(ROOT)}:{node.lineno} {ast.unparse(node)}")
    assert found == []


def test_an_unknown_code_is_a_programming_error() -> None:
    with pytest.raises(ValueError, match="not-a-code"):
        ContractError("not-a-code", "message")  # type: ignore[arg-type]
    assert ContractError(Reason.SCHEMA, "message").reason is Reason.SCHEMA
    assert ContractError("schema", "message").reason is Reason.SCHEMA  # type: ignore[arg-type]


def test_a_member_is_its_code_wherever_a_string_is_expected() -> None:
    err = ContractError(Reason.HASH_MISMATCH, "sha256 differs")
    assert err.reason == "hash-mismatch"
    assert f"{err.reason}: {err}" == "hash-mismatch: sha256 differs"


def test_transient_failures_are_not_bad_input() -> None:
    assert not issubclass(TransientError, ContractError)
    for transient in (DownloadInterruptedError, ActivationInterruptedError):
        assert issubclass(transient, TransientError)
        assert issubclass(transient, ReasonedError)
        assert not issubclass(transient, ContractError)
    assert issubclass(DownloadError, ContractError)
    assert issubclass(ActivationError, ContractError)
