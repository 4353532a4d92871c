"""Dependencies the tests need fail under ``CI`` instead of skipping silently (``conftest.require_module``)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from .conftest import require_module

TESTS = Path(__file__).resolve().parent


def _outcome(name: str) -> tuple[type[BaseException], str] | None:
    """What ``require_module(name)`` raises (pytest's fail and skip are BaseExceptions: a skip must not escape)."""
    try:
        require_module(name)
    except BaseException as exc:
        return type(exc), str(exc)
    return None


def test_a_missing_module_fails_under_ci_and_skips_elsewhere(monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import onnxruntime now raises ImportError
    monkeypatch.setenv("CI", "true")
    kind, message = _outcome("onnxruntime")
    assert kind is pytest.fail.Exception and message.startswith("onnxruntime is not installed")
    monkeypatch.delenv("CI")
    kind, message = _outcome("onnxruntime")
    assert kind is pytest.skip.Exception and message.startswith("onnxruntime is not installed")


def test_an_installed_module_is_returned():
    assert require_module("safetensors.numpy").__name__ == "safetensors.numpy"


def test_no_test_skips_on_a_missing_module_silently():
    """``pytest.importorskip`` skips under CI too; ``require_module`` is the one way to need a module."""
    users = [
        p.name for p in sorted(TESTS.glob("test_*.py")) if "importorskip(" in p.read_text() and p != Path(__file__)
    ]
    assert users == []
