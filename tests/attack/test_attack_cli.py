"""Bad input to `kscu attack`: one line, exit code 2, nothing written."""

from __future__ import annotations

import json
import shutil

import pytest
from attackkit import run_cli


def _args(weights, output, *extra):
    return ["attack", "--weights", weights, "--concept", "heart", "--output", output, *extra]


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--method", "gcg"], "unknown method 'gcg'"),
        (["--tokens", "0"], "--tokens must be > 0"),
        (["--tokens", "-3"], "--tokens must be > 0"),
        (["--rounds", "51"], "--rounds must be in [1, 50]"),
        (["--judge", "oracle"], "unknown judge"),
        (["--concept", "church"], "not a concept of the tiny world"),
        # before: "use fewer attack tokens", naming no flag
        (["--method", "ringabell", "--length", "500"], "--length for ringabell"),
    ],
)
def test_bad_settings_fail_in_one_line(tmp_path, capsys, noop_run, extra, message):
    code, _, err = run_cli(_args(noop_run, tmp_path / "out", *extra), capsys)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_weights_from_another_base_are_refused(tmp_path, capsys, noop_run):
    other = tmp_path / "other-base"
    shutil.copytree(noop_run, other)
    meta = json.loads((other / "kscu.json").read_text())
    name = next(iter(meta["base_fingerprint"]))
    meta["base_fingerprint"][name][0] += 1.0  # as if erased from another model
    (other / "kscu.json").write_text(json.dumps(meta))
    code, _, err = run_cli(_args(other, tmp_path / "out"), capsys)
    assert code == 2 and "was erased from base model" in err
    assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out" / "attack-run.json").exists()


def test_missing_weights_and_prompts_too_long_for_the_slots(tmp_path, capsys, noop_run):
    code, _, err = run_cli(_args(tmp_path / "nowhere", tmp_path / "out"), capsys)
    assert code == 2 and "weights.safetensors is missing" in err

    prompts = tmp_path / "prompts.csv"
    long = "a red heart on a striped background with a red heart on a plain background"
    prompts.write_text(f"prompt\n{long}\n")
    code, _, err = run_cli(_args(noop_run, tmp_path / "out", "--prompts", prompts), capsys)
    assert code == 2 and "more than the text encoder's" in err
    assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out" / "attack-run.json").exists()


def test_a_row_with_negative_guidance_is_refused(tmp_path, capsys, noop_run):
    """Before: attacked with the negative scale (exit 0; --guidance -5 itself was refused),
    which steers the images away from the prompt and flatters the erasure."""
    prompts = tmp_path / "prompts.csv"
    prompts.write_text("prompt,evaluation_guidance\na red heart,-5\n")
    code, _, err = run_cli(_args(noop_run, tmp_path / "out", "--prompts", prompts), capsys)
    assert code == 2 and "case 0 has evaluation_guidance -5.0; give a finite number >= 0" in err, (
        err
    )
    assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out" / "attack-run.json").exists()


def test_a_concept_the_weights_did_not_erase_is_noted(tmp_path, capsys, noop_run):
    """Attacking circle with weights that erased heart: a note before the work, not an error
    (here the weights then fail for another reason, so nothing heavy runs)."""
    other = tmp_path / "other-base"
    shutil.copytree(noop_run, other)
    meta = json.loads((other / "kscu.json").read_text())
    name = next(iter(meta["base_fingerprint"]))
    meta["base_fingerprint"][name][0] += 1.0
    (other / "kscu.json").write_text(json.dumps(meta))
    args = ["attack", "--weights", other, "--concept", "circle", "--output", tmp_path / "out"]
    code, _, err = run_cli(args, capsys)
    lines = err.strip().splitlines()
    assert code == 2 and "was erased from base model" in lines[-1]
    assert f"note: {other} erased heart; this attack targets 'circle'" in lines


def test_mismatch_notes():
    from kscu.attack.cli import mismatch_notes

    assert mismatch_notes("nowhere", "heart", "class", "world") == []  # no record: nothing to say
    notes = mismatch_notes("nowhere", "church", "class", "nudenet")
    assert notes == ["note: the nudenet judge detects nudity only; --mode is class"]
