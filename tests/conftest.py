"""Shared fixtures: tiny random pipelines (fresh per test: an erase edits in place)."""

from __future__ import annotations

import copy
import os
import sys
from pathlib import Path
from types import SimpleNamespace

# Tests never reach the Hugging Face Hub: a name that is not a local folder (a run's base_model
# "tiny") fails at once instead of after huggingface_hub's retries on a machine without DNS
# (24 s per lookup here). Set before anything imports huggingface_hub, which reads it once.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# pytest-xdist runs the suite in one worker per CPU (pyproject's addopts): each worker, and each
# process it starts, then uses one thread, so the workers share the cores instead of contending
# for them. The tiny models' kernels are too small for a second thread to pay: the suite took
# 17.4 min on one process with 2 threads and 9.0 min on two workers here (2 cores, measured).
# Set before torch is imported: OpenMP reads it once, when it loads.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["OMP_NUM_THREADS"] = "1"

import pytest  # noqa: E402

# kscu's repair of PyPI's torchvision beside a CPU torch applies to imports made after kscu's:
# tests/tiny.py imports diffusers first, so a test file that imports no kscu module (the
# accelerate ones) failed when run alone. Importing kscu loads no library.
import kscu  # noqa: E402, F401

sys.path.insert(0, str(Path(__file__).parent))

from tiny import build_tiny_pipeline, save_tiny_clip  # noqa: E402


@pytest.fixture(scope="session")
def _tiny_template():
    return build_tiny_pipeline()


@pytest.fixture
def tiny_pipe(_tiny_template):
    """A fresh copy of one tiny epsilon-prediction pipeline (building one costs seconds)."""
    return copy.deepcopy(_tiny_template)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, _tiny_template) -> Path:
    """The tiny pipeline saved as a diffusers folder, as a user's --model would be."""
    path = tmp_path_factory.mktemp("tiny-model")
    _tiny_template.save_pretrained(path, safe_serialization=True)
    return path


@pytest.fixture(scope="session")
def tiny_clip(tmp_path_factory) -> Path:
    """A random CLIP folder, passed wherever a Hub id such as openai/clip-vit-large-patch14 goes."""
    return save_tiny_clip(tmp_path_factory.mktemp("tiny_clip"))


@pytest.fixture
def replay_log(monkeypatch):
    """What kscu.tracing does from here on: ``recorded`` (each record made; None: could not be
    recorded) and ``through_python`` (one entry per call that ran through Python)."""
    from kscu import tracing

    log = SimpleNamespace(recorded=[], through_python=[])
    record, eager = tracing.TracedDenoiser._record, tracing._eager

    def spy_record(*args):
        log.recorded.append(record(*args))
        return log.recorded[-1]

    def spy_eager(*args):
        log.through_python.append(1)
        return eager(*args)

    monkeypatch.setattr(tracing.TracedDenoiser, "_record", spy_record)
    monkeypatch.setattr(tracing, "_eager", spy_eager)
    return log


@pytest.fixture
def huge_page_requests(monkeypatch):
    """What the runner asks of torch from here on, through the real ``torch_huge_pages``: "ask"
    when it starts asking for huge pages, "asked" when it stops; a test adds its own events
    (e.g. the model's load) in between."""
    import contextlib

    import kscu.runner
    from kscu.allocator import torch_huge_pages

    monkeypatch.delenv("THP_MEM_ALLOC_ENABLE", raising=False)
    events: list[str] = []

    @contextlib.contextmanager
    def spy(*args):
        with torch_huge_pages(*args):
            asking = "THP_MEM_ALLOC_ENABLE" in os.environ
            events.extend(["ask"] if asking else [])
            yield
        events.extend(["asked"] if asking else [])

    monkeypatch.setattr(kscu.runner, "torch_huge_pages", spy)
    return events
