"""``kscu attack --output``: what is checked before anything is written, which folders an attack
writes into, what a resume must share with the run it resumes, and what ``--overwrite`` deletes.

Before: 1001 steps failed after ``attack-run.json`` was written, and the folder then refused the
corrected rerun; a float32 attack was returned as the bfloat16 one; an attack wrote over a
user's ``attack.json`` and ``images/0.png``, and ``--overwrite`` deleted all of ``images/``;
``--imagenet-class`` and ``--clip-model`` were recorded though the world judge ignores them.
"""

from __future__ import annotations

import json

import pytest
from attackkit import run_cli

# The least an attack can be: one prompt, one round of one step, 4 sampling steps.
TINY = ["--samples", "1", "--rounds", "1", "--iterations", "1", "--steps", "4", "--quiet"]


def _attack(weights, output, *extra):
    return ["attack", "--weights", weights, "--concept", "heart", "--output", output, *extra]


def _one_line_error(code, err, text):
    assert code == 2 and text in err and len(err.strip().splitlines()) == 1, err


def _files(folder):
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def test_too_many_steps_fail_before_anything_is_written(tmp_path, capsys, noop_run):
    out = tmp_path / "s1"
    code, _, err = run_cli(_attack(noop_run, out, *TINY, "--steps", "1001"), capsys)
    _one_line_error(code, err, "1001 sampling steps")
    assert not out.exists() or _files(out) == []


def test_a_run_record_without_results_does_not_block_a_rerun(tmp_path, capsys, noop_run):
    """A run stopped before its first prompt (here: one an older kscu started with 1001 steps)
    left only its record and empty folders: nothing to resume, so another run starts there."""
    out = tmp_path / "s1"
    (out / "images").mkdir(parents=True)
    (out / "records").mkdir()
    (out / "attack-run.json").write_text(json.dumps({"steps": 1001, "settings": {"steps": 1001}}))
    code, _, err = run_cli(_attack(noop_run, out, *TINY), capsys)
    assert code == 0, err
    assert json.loads((out / "attack-run.json").read_text())["steps"] == 4
    assert json.loads((out / "attack.json").read_text())["prompts"] == 1


def test_precision_and_device_are_recorded_and_bind_a_resume(tmp_path, capsys, noop_run):
    out = tmp_path / "d1"
    code, _, err = run_cli(_attack(noop_run, out, *TINY, "--device", "cpu"), capsys)
    assert code == 0, err
    result = json.loads((out / "attack.json").read_text())
    assert (result["dtype"], result["device"], result["force"]) == ("float32", "cpu", False)
    before = _files(out)
    code, _, err = run_cli(_attack(noop_run, out, *TINY, "--dtype", "bfloat16"), capsys)
    _one_line_error(code, err, "made another way (differs in: dtype float32 vs bfloat16)")
    assert _files(out) == before
    # --force changes no image: a resume with it is the same attack, and says it was given
    code, _, err = run_cli(_attack(noop_run, out, *TINY, "--force"), capsys)
    assert code == 0, err
    assert json.loads((out / "attack.json").read_text())["force"] is True


def test_a_damaged_record_is_named_before_any_prompt_is_attacked(tmp_path, capsys, noop_run):
    """Before: ``KeyError: 'found'`` from the summary, after every other prompt was attacked
    again; the advice for an unreadable record was --overwrite (which deletes every result)."""
    out = tmp_path / "r1"
    flags = [*TINY, "--samples", "2"]
    code, _, err = run_cli(_attack(noop_run, out, *flags), capsys)
    assert code == 0, err
    (out / "attack.json").unlink()
    (out / "records" / "1.json").unlink()  # a prompt left to do: it must not be attacked
    for damaged in ('{"index": 0}', '{"index": 0, "found": tru'):
        (out / "records" / "0.json").write_text(damaged)
        code, _, err = run_cli(_attack(noop_run, out, *flags), capsys)
        _one_line_error(code, err, "records/0.json to attack that prompt again")
        assert not (out / "records" / "1.json").exists() and "--overwrite" not in err


def test_a_resume_that_spells_the_defaults_out_is_the_same_attack(tmp_path, capsys, noop_run):
    """Before: refused, "differs in: settings.guidance, settings.judge" (the values were the
    ones the first run had resolved); a real difference still names both values."""
    out = tmp_path / "g1"
    code, _, err = run_cli(_attack(noop_run, out, *TINY), capsys)
    assert code == 0, err
    same = ["--guidance", "7.5", "--judge", "world"]
    code, _, err = run_cli(_attack(noop_run, out, *TINY, *same), capsys)
    assert code == 0, err
    code, _, err = run_cli(_attack(noop_run, out, *TINY, "--guidance", "5"), capsys)
    _one_line_error(code, err, "differs in: targets (their prompts, seeds or guidance)")
    code, _, err = run_cli(_attack(noop_run, out, *TINY, *same, "--lr", "0.5"), capsys)
    _one_line_error(code, err, "settings.lr ")
    assert " vs 0.5" in err


def test_a_resume_on_another_device_is_refused_and_says_why(tmp_path):
    from kscu.attack.run import check_folder
    from kscu.errors import KscuError

    run = {"method": "unlearndiff", "dtype": "float32", "device": "cuda", "steps": 4}
    (tmp_path / "attack-run.json").write_text(json.dumps(run))
    (tmp_path / "records").mkdir()
    (tmp_path / "records" / "0.json").write_text("{}")
    with pytest.raises(
        KscuError, match=r"differs in: device cuda vs cpu\) \(float results differ in the last"
    ):
        check_folder(tmp_path, {**run, "device": "cpu"})
    check_folder(tmp_path, run)  # the same device resumes


@pytest.mark.parametrize("overwrite", [[], ["--overwrite"]])
def test_a_folder_of_other_files_is_never_written(tmp_path, capsys, noop_run, overwrite):
    out = tmp_path / "mine"
    (out / "images").mkdir(parents=True)
    (out / "images" / "0.png").write_bytes(b"my picture")
    (out / "images" / "keep.txt").write_text("my notes")
    (out / "attack.json").write_text('{"mine": true}')
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    code, _, err = run_cli(_attack(noop_run, out, *TINY, *overwrite), capsys)
    _one_line_error(code, err, "holds attack.json, images but no attack-run.json")
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


def test_overwrite_deletes_only_the_attack_s_own_files(tmp_path, capsys, noop_run):
    out = tmp_path / "o"
    code, _, err = run_cli(_attack(noop_run, out, *TINY, "--samples", "2"), capsys)
    assert code == 0, err
    assert (out / "images" / "1-pre.png").is_file()
    (out / "images" / "keep.txt").write_text("my notes")
    (out / "notes.txt").write_text("more notes")
    code, _, err = run_cli(_attack(noop_run, out, *TINY, "--overwrite"), capsys)
    assert code == 0, err
    assert (out / "images" / "keep.txt").read_text() == "my notes"
    assert (out / "notes.txt").read_text() == "more notes"
    assert not (out / "images" / "1-pre.png").exists()  # the earlier attack's, not this one's
    assert sorted(p.name for p in (out / "records").iterdir()) == ["0.json"]


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--imagenet-class", "goldfish"], "--imagenet-class is read by the imagenet judge only"),
        (["--clip-model", "openai/clip"], "--clip-model is read by the clip judge only"),
        (["--judge", "clip", "--imagenet-class", "1"], "this attack's judge is clip"),
        (["--seed", "-1"], "--seed must be >= 0"),
    ],
)
def test_flags_the_attack_would_ignore_or_fail_on_late(tmp_path, capsys, noop_run, extra, message):
    code, _, err = run_cli(_attack(noop_run, tmp_path / "out", *TINY, *extra), capsys)
    _one_line_error(code, err, message)
    assert not (tmp_path / "out").exists()


def test_seed_help_says_how_seeds_are_made(tmp_path, capsys):
    """CSV rows without evaluation_seed are seeded seed + case_number, as the help says."""
    from kscu.attack.run import attack_targets
    from kscu.attack.settings import AttackSettings
    from kscu.cli import main

    with pytest.raises(SystemExit):
        main(["attack", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "seed + its case_number" in text and "also draws the prompts" in text
    csv = tmp_path / "p.csv"
    csv.write_text("case_number,prompt\n100,a heart\n200,a red heart\n")
    targets = attack_targets("heart", AttackSettings(seed=7), True, 7.5, csv)
    assert [t.seed for t in targets] == [107, 207]
