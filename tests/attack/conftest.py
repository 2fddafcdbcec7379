"""Erase runs and attacks of the tiny world shared by the attack tests (made once per session).

Two weights folders: a no-op run (lr 0: the original model, where the concept is there to be
found) and a short, harsh erase (lr 3e-3: hearts mostly gone). Every run here uses one CPU
thread: the world's networks are too small to gain from a second one, and on a shared CPU two
spinning threads per process make each step many times slower.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from attackkit import SMALL, one_thread  # noqa: E402

from kscu.cli import main  # noqa: E402
from kscu.config import EraseConfig  # noqa: E402
from kscu.runner import erase_to_folder  # noqa: E402


@pytest.fixture(autouse=True)
def _one_thread():
    with one_thread():
        yield


def _erase(folder: Path, lr: float, iterations: int) -> Path:
    with one_thread():
        cfg = EraseConfig(concepts=["heart"], mode="class", lr=lr, iterations=iterations)
        erase_to_folder(cfg, None, folder, progress=False)
    return folder


@pytest.fixture(scope="session")
def noop_run(tmp_path_factory) -> Path:
    """Weights equal to the original model's (an erase with learning rate 0)."""
    return _erase(tmp_path_factory.mktemp("attack") / "noop", 0.0, 1)


@pytest.fixture(scope="session")
def harsh_run(tmp_path_factory) -> Path:
    """A short erase with a high learning rate: the tiny world stops drawing hearts."""
    return _erase(tmp_path_factory.mktemp("attack") / "harsh", 3e-3, 10)


def _attack(folder: Path, weights: Path, *extra: str) -> Path:
    with one_thread():
        code = main(
            ["attack", "--weights", str(weights), "--concept", "heart", "--output", str(folder)]
            + SMALL
            + list(extra)
        )
    assert code == 0
    return folder


@pytest.fixture(scope="session")
def original_attack(tmp_path_factory, noop_run) -> Path:
    """unlearndiff against the original model, every prompt attacked."""
    return _attack(tmp_path_factory.mktemp("attack") / "original", noop_run, "--attack-all")


@pytest.fixture(scope="session")
def harsh_attack(tmp_path_factory, harsh_run) -> Path:
    """unlearndiff against the harsh erase, with the defaults' rule (found prompts not attacked)."""
    return _attack(tmp_path_factory.mktemp("attack") / "harsh", harsh_run)
