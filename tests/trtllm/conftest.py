"""Fixtures for the reference-executor tests: one CPU thread, the in-memory reference connector."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest
import torch


@pytest.fixture(autouse=True)
def _one_torch_thread():
    # Tiny tensors: thread hand-off costs more than the work on a 2-core machine.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def refconn(monkeypatch):
    """The module holding ``RefScheduler`` / ``RefWorker``, importable by spawned TP ranks."""
    monkeypatch.syspath_prepend(str(Path(__file__).parent))
    return importlib.import_module("executor_refconn")
