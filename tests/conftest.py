"""Shared fixtures: tiny random pipelines (fresh per test: an erase edits in place)."""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import pytest

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
