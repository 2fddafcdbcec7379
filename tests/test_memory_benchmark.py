"""benchmarks/memory.py's FLUX-width extrapolation: per-block bytes from shapes with added blocks.

The extrapolation turns three small measurements into a 19 + 38 block figure; a wrong divisor or
a swapped block kind would move the README's FLUX row by tens of GiB without any run failing.
"""

import argparse
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))

import memory as bench  # noqa: E402


def linear_bytes(joint: int, single: int) -> int:
    """A model whose bytes grow exactly linearly in its blocks (what the extrapolation assumes)."""
    return 5_000 + 700 * joint + 300 * single


@pytest.mark.parametrize("added", [(1, 1), (3, 6), (2, 5)])
def test_extrapolation_from_added_blocks_is_exact_for_linear_bytes(added):
    shapes = bench.flux_shapes(added)
    assert list(shapes) == ["1+1", f"{1 + added[0]}+1", f"1+{1 + added[1]}"]
    small = {name: linear_bytes(*blocks) for name, blocks in shapes.items()}
    assert bench.extrapolate(small) == linear_bytes(*bench.FLUX_DEV_BLOCKS)


@pytest.mark.parametrize("added,weight", [((1, 1), -54), ((3, 6), 1 - 18 / 3 - 37 / 6)])
def test_the_base_shapes_noise_is_weighted_as_the_docstring_says(added, weight):
    """A GiB of noise on the 1+1 run moves the 19 + 38 figure by ``weight`` GiB."""
    small = {name: linear_bytes(*blocks) for name, blocks in bench.flux_shapes(added).items()}
    exact = bench.extrapolate(small)
    small["1+1"] += 2**30
    assert bench.extrapolate(small) - exact == pytest.approx(weight * 2**30, abs=1)


def test_added_blocks_and_repeats_refuse_what_cannot_be_measured():
    assert bench.block_pair("3,6") == (3, 6)
    assert bench.at_least_one("3") == 3
    for text in ("0,2", "3", "1,2,3", "a,b", ""):
        with pytest.raises(argparse.ArgumentTypeError):
            bench.block_pair(text)
    for text in ("0", "-1", "1.5", "two"):
        with pytest.raises(argparse.ArgumentTypeError):
            bench.at_least_one(text)


def test_repeated_runs_keep_their_median_and_every_figure():
    runs = [{"measured_bytes": b, "seconds": s} for b, s in ((30, 1.0), (10, 2.0), (20, 3.0))]
    merged = bench.median_run(runs)
    assert merged["measured_bytes"] == 20
    assert merged["runs"] == [30, 10, 20]
    assert merged["seconds"] == 1.0  # the first run's record


def test_report_names_the_cpu_the_measurements_ran_on(capsys):
    """A replan prints the JSON's CPU (the measurements'), not the machine it replans on."""
    args = argparse.Namespace(model="sd14", resolution=64, iterations=3, dtype="float32")
    row = {"measured_bytes": 2**30, "plan_bytes": 2**30, "gpu_host_bytes": 0, "seconds": None}
    bench.report(args, {"default": row}, cpu="AMD EPYC")
    assert capsys.readouterr().out.splitlines()[0].endswith("CPU (AMD EPYC)")
    bench.report(args, {"default": row})
    assert f"CPU ({bench.cpu_model()})" in capsys.readouterr().out


@pytest.mark.parametrize(
    "variant, returned",
    [
        ("default (optimizer-in-backward)", True),
        ("kept freed blocks (--reuse-freed-memory)", False),
    ],
)
def test_a_fixed_threshold_returns_freed_memory_except_in_the_kept_variant(
    monkeypatch, tmp_path, variant, returned
):
    """Under ``--malloc-mmap-threshold`` the kscu runs return freed memory (so the threshold
    applies), but the kept variant must still run kept: the last of two opposite flags wins."""
    seen = []

    def run(command, **kwargs):
        seen.append(command)
        raise StopIteration

    monkeypatch.setattr(bench.subprocess, "run", run)
    args = argparse.Namespace(
        resolution=64, iterations=1, dtype="float32", malloc_mmap_threshold=2**20
    )
    with pytest.raises(StopIteration):
        bench.kscu_run(tmp_path, tmp_path / "out", args, bench.VARIANTS[variant])
    flags = [f for f in seen[0] if f.endswith("reuse-freed-memory")]
    assert flags == (["--no-reuse-freed-memory"] if returned else ["--reuse-freed-memory"])
