"""Every embedding test starts with no remembered launch limit (embedding/budget.py keeps
one per loaded model, and the module-scoped models are shared by many tests)."""

from __future__ import annotations

import weakref

import pytest

from esm2_batch.embedding import budget


@pytest.fixture(autouse=True)
def fresh_budgets(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(budget, "_BUDGETS", weakref.WeakKeyDictionary())
