"""`kscu generate` resumes only what was made the same way: generate.json is checked first."""

import hashlib
import json
from pathlib import Path

import pytest

from kscu.checkpoint import fingerprint, save_erased
from kscu.cli import main
from kscu.errors import KscuError
from kscu.generate import SETTINGS, generate_images, prompts_sha256
from kscu.promptfile import PromptRow, load_prompts


def generate(capsys, model, output, *extra, prompts=None):
    source = ["--prompts", prompts] if prompts else ["--prompt", "a church"]
    args = ["generate", "--model", model, *source, "--output", output, "--quiet", *extra]
    code = main([str(a) for a in args])
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture
def prompts(tmp_path):
    path = tmp_path / "p.csv"
    path.write_text("case_number,prompt\n0,a church\n1,a cat\n2,a tree\n")
    return path


@pytest.fixture
def folder(tiny_model_dir, tmp_path, prompts, capsys):
    """Three images made with --steps 2, and their mtimes."""
    out = tmp_path / "img"
    code, _, err = generate(capsys, tiny_model_dir, out, "--steps", "2", prompts=prompts)
    assert code == 0, err
    return out


def mtimes(folder):
    return {p.name: p.stat().st_mtime_ns for p in folder.glob("*.png")}


def test_settings_are_recorded(folder, tiny_model_dir):
    record = json.loads((folder / SETTINGS).read_text())
    assert record["model"] == str(tiny_model_dir.resolve())
    assert record["weights"] is None and record["weights_sha256"] is None
    assert (record["steps"], record["guidance"], record["seed"]) == (2, 7.5, 0)
    assert record["resolution"] == 16 and record["dtype"] == "float32"
    assert record["family"] == "sd"
    assert record["sampler"]["timesteps"] == [501, 1]  # the pinned DDIM at 2 steps
    scheduler = record["scheduler"]  # the scheduler as the walk uses it, not the model's own
    assert scheduler["class"] == "DDIMScheduler"
    pinned = ("clip_sample", "set_alpha_to_one", "steps_offset", "timestep_spacing")
    assert [scheduler["config"][k] for k in pinned] == [False, False, 1, "leading"]
    assert "kscu_version" in record


def test_another_scheduler_is_refused_and_an_older_record_resumes(
    folder, tiny_model_dir, prompts, capsys
):
    """A folder whose scheduler differs is refused; one recorded before kscu wrote the scheduler
    (the rest the same) resumes."""
    record = json.loads((folder / SETTINGS).read_text())
    (folder / SETTINGS).write_text(
        json.dumps(record | {"scheduler": record["scheduler"] | {"class": "EulerScheduler"}})
    )
    code, _, err = generate(capsys, tiny_model_dir, folder, "--steps", "2", prompts=prompts)
    assert code == 2 and "scheduler.class EulerScheduler vs DDIMScheduler" in err, err
    (folder / SETTINGS).write_text(
        json.dumps({k: v for k, v in record.items() if k != "scheduler"})
    )
    (folder / "1.png").unlink()
    code, out, err = generate(capsys, tiny_model_dir, folder, "--steps", "2", prompts=prompts)
    assert code == 0 and "wrote 1 new" in out, err


@pytest.mark.parametrize(
    "extra, words",
    [
        (["--steps", "3"], "steps 2 vs 3"),
        (["--steps", "2", "--guidance", "5", "--seed", "4"], "guidance 7.5 vs 5.0, seed 0 vs 4"),
        (["--steps", "2", "--resolution", "8"], "resolution 16 vs 8"),
    ],
)
def test_other_settings_are_refused_and_nothing_changes(
    folder, tiny_model_dir, prompts, capsys, extra, words
):
    before = mtimes(folder)
    (folder / "1.png").unlink()  # a missing image must not be made with the wrong settings
    code, _, err = generate(capsys, tiny_model_dir, folder, *extra, prompts=prompts)
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert words in err and "--overwrite" in err
    assert mtimes(folder) == {k: v for k, v in before.items() if k != "1.png"}


def test_other_weights_are_refused(folder, tiny_model_dir, tiny_pipe, prompts, capsys, tmp_path):
    name, param = next(iter(tiny_pipe.unet.named_parameters()))
    meta = {"base_model": "tiny", "base_fingerprint": fingerprint({name: param})}
    save_erased(tmp_path / "erased", {name: param.detach() + 0.1}, meta)
    code, _, err = generate(
        capsys,
        tiny_model_dir,
        folder,
        "--steps",
        "2",
        "--weights",
        tmp_path / "erased",
        prompts=prompts,
    )
    assert code == 2 and "weights_sha256 none vs " in err, err


def test_same_settings_make_only_the_missing_images(folder, tiny_model_dir, prompts, capsys):
    (folder / "1.png").unlink()
    before = mtimes(folder)
    code, out, err = generate(capsys, tiny_model_dir, folder, "--steps", "2", prompts=prompts)
    assert code == 0 and "wrote 1 new" in out, err
    after = mtimes(folder)
    assert set(after) == {"0.png", "1.png", "2.png"}
    assert all(after[k] == v for k, v in before.items())


def test_overwrite_starts_again(folder, tiny_model_dir, capsys):
    (folder / "notes.txt").write_text("mine")
    code, _, err = generate(capsys, tiny_model_dir, folder, "--steps", "3", "--overwrite")
    assert code == 0, err
    # the single prompt is case 0: the old 1.png and 2.png are gone, not left to be evaluated
    assert sorted(p.name for p in folder.iterdir()) == [
        "0.png",
        "generate.json",
        "manifest.csv",
        "notes.txt",
    ]
    assert json.loads((folder / SETTINGS).read_text())["steps"] == 3
    assert (folder / "manifest.csv").read_text().count("\n") == 2  # header + one row


def test_images_without_a_record_are_refused(folder, tiny_model_dir, prompts, capsys):
    (folder / SETTINGS).unlink()  # a folder from a kscu that did not write generate.json
    code, _, err = generate(capsys, tiny_model_dir, folder, "--steps", "2", prompts=prompts)
    assert code == 2 and f"no {SETTINGS}" in err and len(err.strip().splitlines()) == 1, err
    code, _, err = generate(
        capsys, tiny_model_dir, folder, "--steps", "2", "--overwrite", prompts=prompts
    )
    assert code == 0 and (folder / SETTINGS).is_file(), err


def test_numbered_images_kscu_did_not_make_are_never_deleted(tiny_model_dir, tmp_path, capsys):
    """Before: refused with advice to pass --overwrite, which then deleted the user's own
    1.png-3.png (no generate.json or manifest.csv: nothing says kscu made them)."""
    folder = tmp_path / "photos"
    folder.mkdir()
    for name in ("0.png", "1.png", "3.png", "holiday.png"):
        (folder / name).write_bytes(b"mine")
    for extra in ([], ["--overwrite"]):
        code, _, err = generate(capsys, tiny_model_dir, folder, "--steps", "2", *extra)
        assert code == 2 and "kscu never deletes them" in err, err
        assert len(err.strip().splitlines()) == 1
    assert sorted(p.name for p in folder.iterdir()) == ["0.png", "1.png", "3.png", "holiday.png"]
    assert all(p.read_bytes() == b"mine" for p in folder.iterdir())


def test_every_process_checks_and_only_the_main_one_records(tiny_pipe, tmp_path):
    rows = [PromptRow(case_number=c, prompt=f"p{c}") for c in range(4)]
    out = tmp_path / "img"
    at_barrier = []

    def wait_for_everyone():  # what the folder holds when this process reaches the barrier
        at_barrier.append(sorted(p.name for p in out.iterdir()))

    made = generate_images(
        tiny_pipe,
        rows,
        out,
        steps=2,
        progress=False,
        process_index=1,
        num_processes=2,
        wait_for_everyone=wait_for_everyone,
    )
    assert at_barrier == [[]]  # no image before the barrier, and no record from process 1
    assert [p.name for p in made] == ["1.png", "3.png"] and not (out / SETTINGS).exists()
    for path in made:
        path.unlink()
    generate_images(tiny_pipe, rows, out, steps=2, progress=False, process_index=0, num_processes=2)
    assert json.loads((out / SETTINGS).read_text())["steps"] == 2
    # a process that is not the main one refuses other settings before making anything
    with pytest.raises(KscuError, match="steps 2 vs 4"):
        generate_images(
            tiny_pipe, rows, out, steps=4, progress=False, process_index=1, num_processes=2
        )
    assert sorted(p.name for p in out.glob("*.png")) == ["0.png", "2.png"]


def test_a_damaged_record_is_a_clear_error(folder, tiny_model_dir, capsys):
    (folder / SETTINGS).write_text("{not json")
    code, _, err = generate(capsys, tiny_model_dir, folder, "--steps", "2")
    assert code == 2 and "cannot read" in err and "--overwrite" in err, err


def test_weights_fingerprint_is_the_file_hash(tiny_pipe, tmp_path):
    name, param = next(iter(tiny_pipe.unet.named_parameters()))
    save_erased(tmp_path / "w", {name: param.detach()}, {"base_model": "tiny"})
    out = tmp_path / "img"
    rows = [PromptRow(case_number=0, prompt="p")]
    generate_images(tiny_pipe, rows, out, steps=2, progress=False, weights=tmp_path / "w")
    record = json.loads((out / SETTINGS).read_text())
    digest = hashlib.sha256((tmp_path / "w" / "weights.safetensors").read_bytes()).hexdigest()
    assert record["weights_sha256"] == digest and record["model"] is None


def test_batches_share_their_records(tiny_pipe, tmp_path, monkeypatch, replay_log):
    """Denoiser calls are replayed (kscu.tracing) with one record per batch shape for the whole
    run, not one per batch: recording costs two calls' time. The images are the ones a run
    through Python makes, bit for bit."""
    recorded, through_python = replay_log.recorded, replay_log.through_python
    rows = [PromptRow(case_number=c, prompt=f"a cat {c}") for c in range(3)]
    generate_images(tiny_pipe, rows, tmp_path / "replayed", steps=3, progress=False)
    assert len(recorded) == 1 and recorded[0] is not None  # three batches of one row
    # of the 9 calls only the record's first (recorded) and second (checked) ran through Python:
    # a replay that differed from Python would have been dropped, and the rest run through it
    assert len(through_python) == 2
    monkeypatch.setattr("kscu.families.base.traceable", lambda *_: False)
    generate_images(tiny_pipe, rows, tmp_path / "plain", steps=3, progress=False)
    assert len(recorded) == 1
    for c in range(3):
        replayed = (tmp_path / "replayed" / f"{c}.png").read_bytes()
        assert replayed == (tmp_path / "plain" / f"{c}.png").read_bytes()


@pytest.mark.parametrize(
    "csv",
    [
        "case_number,prompt\n0,a church\n1,a dog\n2,a tree\n",  # another prompt for 1.png
        "case_number,prompt,evaluation_seed\n0,a church,\n1,a cat,7\n2,a tree,\n",
        "case_number,prompt,evaluation_guidance\n0,a church,\n1,a cat,\n2,a tree,3\n",
        "case_number,prompt\n0,a church\n1,a cat\n",  # a row gone
        "case_number,prompt\n0,a cat\n1,a church\n2,a tree\n",  # the same prompts renumbered
    ],
)
def test_other_rows_are_refused_and_nothing_changes(folder, tiny_model_dir, tmp_path, capsys, csv):
    """An existing image (0.png) or a pending one (1.png) must not get another row's label."""
    (folder / "1.png").unlink()
    before = mtimes(folder)
    manifest = (folder / "manifest.csv").read_text()
    other = tmp_path / "other.csv"
    other.write_text(csv)
    code, _, err = generate(capsys, tiny_model_dir, folder, "--steps", "2", prompts=other)
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "prompts_sha256 " in err and "prompts, seeds or guidance" in err and "--overwrite" in err
    assert mtimes(folder) == before and (folder / "manifest.csv").read_text() == manifest


def test_another_prompt_is_refused(tiny_model_dir, tmp_path, capsys):
    """The audit's case: one --prompt, then another into the same folder."""
    out = tmp_path / "img"
    assert generate(capsys, tiny_model_dir, out, "--steps", "2")[0] == 0
    manifest = (out / "manifest.csv").read_text()
    args = ["generate", "--model", tiny_model_dir, "--prompt", "a blue square", "--steps", "2"]
    code = main([str(a) for a in [*args, "--output", out, "--quiet"]])
    assert code == 2 and "prompts_sha256" in capsys.readouterr().err
    assert (out / "manifest.csv").read_text() == manifest and "a church" in manifest


def test_the_same_rows_in_another_order_resume(folder, tiny_model_dir, tmp_path, capsys):
    (folder / "2.png").unlink()
    shuffled = tmp_path / "shuffled.csv"
    shuffled.write_text("case_number,prompt\n2,a tree\n0,a church\n1,a cat\n")
    code, out, err = generate(capsys, tiny_model_dir, folder, "--steps", "2", prompts=shuffled)
    assert code == 0 and "wrote 1 new" in out, err


def test_a_record_without_the_rows_fingerprint_resumes(folder, tiny_model_dir, tmp_path, capsys):
    """A folder recorded before kscu fingerprinted the rows resumes as it did then."""
    record = json.loads((folder / SETTINGS).read_text())
    assert len(record.pop("prompts_sha256")) == 64
    (folder / SETTINGS).write_text(json.dumps(record))
    (folder / "1.png").unlink()
    other = tmp_path / "other.csv"
    other.write_text("case_number,prompt\n0,a church\n1,a dog\n2,a tree\n")
    code, out, err = generate(capsys, tiny_model_dir, folder, "--steps", "2", prompts=other)
    assert code == 0 and "wrote 1 new" in out, err


def test_every_process_refuses_other_rows(tiny_pipe, tmp_path):
    rows = [PromptRow(case_number=c, prompt=f"p{c}") for c in range(4)]
    out = tmp_path / "img"
    generate_images(tiny_pipe, rows[:1], out, steps=2, progress=False)
    record = json.loads((out / SETTINGS).read_text())
    assert record["prompts_sha256"] == prompts_sha256(rows[:1], 0, 7.5)
    # process 1 would make 1.png and 3.png only, but 0.png is not what these rows say
    with pytest.raises(KscuError, match="prompts_sha256"):
        generate_images(
            tiny_pipe, rows, out, steps=2, progress=False, process_index=1, num_processes=2
        )
    assert sorted(p.name for p in out.glob("*.png")) == ["0.png"]


def test_the_rows_fingerprint_covers_what_decides_each_image():
    rows = [PromptRow(case_number=0, prompt="a"), PromptRow(case_number=1, prompt="b")]
    same = prompts_sha256(rows, 0, 7.5)
    assert same == prompts_sha256(rows[::-1], 0, 7.5)
    # a row's own seed/guidance equal to the resolved default makes the same image
    assert same == prompts_sha256([rows[0], PromptRow(1, "b", seed=1, guidance=7.5)], 0, 7.5)
    others = [
        prompts_sha256(rows, 1, 7.5),
        prompts_sha256(rows, 0, 5.0),
        prompts_sha256([rows[0], PromptRow(1, "c")], 0, 7.5),
        prompts_sha256([rows[0], PromptRow(2, "b")], 0, 7.5),
        prompts_sha256([rows[0], PromptRow(1, "b", seed=9)], 0, 7.5),
        prompts_sha256([rows[0], PromptRow(1, "b", guidance=2.0)], 0, 7.5),
        prompts_sha256(rows[:1], 0, 7.5),
    ]
    assert len({same, *others}) == 1 + len(others)


@pytest.mark.parametrize(
    "extra, words",
    [
        (["--guidance", "nan"], "--guidance must be a finite number >= 0 (got nan)"),
        (["--guidance", "inf"], "--guidance must be a finite number >= 0 (got inf)"),
        # before: accepted (analyze, attack and bench refused it): steers away from the prompt
        (["--guidance", "-4"], "--guidance must be a finite number >= 0 (got -4.0)"),
        (["--resolution", "0"], "--resolution must be a positive multiple of 8 (got 0)"),
        (["--resolution", "30"], "--resolution must be a positive multiple of 8 (got 30)"),
        (["--resolution", "-8"], "--resolution must be a positive multiple of 8 (got -8)"),
        # before: torch's allocator traceback, and generate.json left behind (stop 41's review)
        (["--resolution", "1000000"], "--resolution 1000000 is over 4x this model's native"),
    ],
)
def test_bad_settings_are_refused_before_anything_is_written(
    tiny_model_dir, tmp_path, capsys, extra, words
):
    out = tmp_path / "img"
    code, _, err = generate(capsys, tiny_model_dir, out, "--steps", "2", *extra)
    assert code == 2 and len(err.strip().splitlines()) == 1 and words in err, err
    assert not out.exists()


@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_a_row_with_non_finite_guidance_is_refused(tiny_model_dir, tmp_path, capsys, value):
    csv = tmp_path / "p.csv"
    csv.write_text(f"case_number,prompt,evaluation_guidance\n0,a church,\n1,a cat,{value}\n")
    out = tmp_path / "img"
    code, _, err = generate(capsys, tiny_model_dir, out, "--steps", "2", prompts=csv)
    assert code == 2 and "row 3" in err and "not a finite number" in err, err
    assert not out.exists()


def test_the_python_api_refuses_bad_guidance_and_resolution(tiny_pipe, tmp_path):
    out = tmp_path / "img"
    good = [PromptRow(case_number=0, prompt="p")]
    with pytest.raises(KscuError, match=r"case 1 has evaluation_guidance nan"):
        generate_images(tiny_pipe, [*good, PromptRow(1, "q", guidance=float("nan"))], out, steps=2)
    with pytest.raises(KscuError, match=r"--guidance must be a finite number >= 0 \(got inf\)"):
        generate_images(tiny_pipe, good, out, steps=2, guidance=float("inf"))
    for size in (0, 12):
        with pytest.raises(KscuError, match="positive multiple of 8"):
            generate_images(tiny_pipe, good, out, steps=2, resolution=size)
    assert not out.exists()
    generate_images(tiny_pipe, good, out, steps=2, resolution=8, progress=False)
    assert json.loads((out / SETTINGS).read_text())["resolution"] == 8


def test_a_fractional_case_number_is_refused(tiny_model_dir, tmp_path, capsys):
    csv = tmp_path / "p.csv"
    csv.write_text("case_number,prompt\n1.5,a church\n")
    out = tmp_path / "img"
    code, _, err = generate(capsys, tiny_model_dir, out, "--steps", "2", prompts=csv)
    assert code == 2 and "case_number='1.5'" in err and "not a whole number" in err, err
    assert not out.exists()


@pytest.mark.parametrize(
    "extra, csv, words",
    [
        (["--steps", "1001"], None, "1001 sampling steps: this model's scheduler has 1000"),
        ([], "prompt,evaluation_seed\na church,99999999999999999999999\n", "outside the seeds"),
        (["--seed", str(2**64)], None, "outside the seeds torch takes"),
        ([], f"case_number,prompt\n{2**64},a church\n", "evaluation_seed, case_number or"),
    ],
)
def test_bad_steps_or_seeds_are_one_line_before_the_folder(
    tiny_model_dir, tmp_path, capsys, extra, csv, words
):
    """Before: diffusers' ValueError (steps) or torch's overflow (seed) as a traceback, after the
    output folder (and, for the seed, its generate.json) was made."""
    prompts = None
    if csv is not None:
        prompts = tmp_path / "p.csv"
        prompts.write_text(csv)
    out = tmp_path / "img"
    code, _, err = generate(capsys, tiny_model_dir, out, *extra, prompts=prompts)
    assert code == 2 and words in err and len(err.strip().splitlines()) == 1, err
    assert not out.exists()


def test_force_without_weights_is_refused(tiny_model_dir, tmp_path, capsys):
    """Before: accepted and ignored (there is nothing to load onto another base model)."""
    code, _, err = generate(capsys, tiny_model_dir, tmp_path / "img", "--force")
    assert code == 2 and "give --weights" in err and not (tmp_path / "img").exists()


def test_the_weights_are_recorded_by_their_absolute_path(
    tiny_model_dir, tiny_pipe, tmp_path, monkeypatch, capsys
):
    """Before: only ``weights`` as typed ("w"), which names nothing once the user is elsewhere.
    The absolute path is recorded beside it, and not compared: a moved folder still resumes."""
    name, param = next(iter(tiny_pipe.unet.named_parameters()))
    meta = {"base_model": "tiny", "base_fingerprint": fingerprint({name: param})}
    save_erased(tmp_path / "w", {name: param.detach() + 0.1}, meta)
    monkeypatch.chdir(tmp_path)
    code, _, err = generate(capsys, tiny_model_dir, "img", "--steps", "2", "--weights", "w")
    assert code == 0, err
    record = json.loads((tmp_path / "img" / SETTINGS).read_text())
    assert record["weights"] == "w"  # as given, as before
    assert record["weights_resolved"] == str((tmp_path / "w").resolve())
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    (tmp_path / "img" / "0.png").unlink()
    args = ["--steps", "2", "--weights", tmp_path / "w"]
    code, out, err = generate(capsys, tiny_model_dir, tmp_path / "img", *args)
    assert code == 0 and "wrote 1 new" in out, err


def test_the_prompt_source_is_recorded(tiny_pipe, tmp_path, monkeypatch):
    """Before: only the rows' fingerprint; which file (or Hub dataset) they came from was lost.
    A CSV is recorded by its absolute path and the sha256 of its bytes."""
    monkeypatch.chdir(tmp_path)
    Path("p.csv").write_text("case_number,prompt\n0,a church\n")
    rows = load_prompts("p.csv")
    generate_images(tiny_pipe, rows, "img", steps=2, progress=False, prompts="p.csv")
    record = json.loads((tmp_path / "img" / SETTINGS).read_text())
    assert record["prompts"] == str((tmp_path / "p.csv").resolve())
    digest = hashlib.sha256(b"case_number,prompt\n0,a church\n").hexdigest()
    assert record["prompts_file_sha256"] == digest
    # the same rows from a moved or renamed file resume: the file is recorded, not compared
    Path("p.csv").rename("moved.csv")
    Path("img/0.png").unlink()
    made = generate_images(tiny_pipe, rows, "img", steps=2, progress=False, prompts="moved.csv")
    assert [p.name for p in made] == ["0.png"]


@pytest.mark.parametrize(
    "source, recorded",
    [("AIML-TUDA/i2p", ("AIML-TUDA/i2p", None)), (None, (None, None))],
)
def test_a_hub_dataset_or_direct_rows_are_recorded_as_such(tiny_pipe, tmp_path, source, recorded):
    rows = [PromptRow(case_number=0, prompt="p")]
    out = tmp_path / "img"
    generate_images(tiny_pipe, rows, out, steps=2, progress=False, prompts=source)
    record = json.loads((out / SETTINGS).read_text())
    assert (record["prompts"], record["prompts_file_sha256"]) == recorded


def test_kscu_generate_records_its_prompt_file(tiny_model_dir, prompts, tmp_path, capsys):
    """The CLI passes --prompts on (before: generate.json said "prompts": null for every CLI
    run); --prompt's single row names no file."""
    code, _, err = generate(capsys, tiny_model_dir, tmp_path / "a", "--steps", "2", prompts=prompts)
    assert code == 0, err
    record = json.loads((tmp_path / "a" / SETTINGS).read_text())
    assert record["prompts"] == str(prompts.resolve())
    assert record["prompts_file_sha256"] == hashlib.sha256(prompts.read_bytes()).hexdigest()
    code, _, err = generate(capsys, tiny_model_dir, tmp_path / "b", "--steps", "2")
    assert code == 0, err
    assert json.loads((tmp_path / "b" / SETTINGS).read_text())["prompts"] is None


@pytest.mark.parametrize("inside", ["", "unet"])
def test_a_model_folder_is_no_image_folder(tiny_model_dir, capsys, inside):
    """Before: images, generate.json and the manifest were written into the model folder (or its
    unet/), with or without --overwrite."""
    out = tiny_model_dir / inside if inside else tiny_model_dir
    before = sorted(p.name for p in out.iterdir())
    for extra in ([], ["--overwrite"]):
        code, _, err = generate(capsys, tiny_model_dir, out, "--steps", "2", *extra)
        assert code == 2 and "holds a model or an erase run" in err, err
    assert sorted(p.name for p in out.iterdir()) == before


def test_prompts_longer_than_the_text_encoder_reads_are_noted(tiny_model_dir, tmp_path, capsys):
    """Before: cut to the tokenizer's limit without a word (many I2P prompts are longer)."""
    from transformers import AutoTokenizer

    limit = AutoTokenizer.from_pretrained(tiny_model_dir / "tokenizer").model_max_length
    csv = tmp_path / "p.csv"
    csv.write_text(f"case_number,prompt\n3,a church\n7,{' '.join(['cat'] * (limit + 5))}\n")
    code, _, err = generate(capsys, tiny_model_dir, tmp_path / "img", "--steps", "1", prompts=csv)
    assert code == 0, err
    assert f"note: 1 of 2 prompts are longer than the {limit} tokens" in err and "case 7" in err
    code, _, err = generate(capsys, tiny_model_dir, tmp_path / "img2", "--steps", "1")
    assert code == 0 and "note:" not in err, err


def test_a_row_with_negative_guidance_is_refused(tiny_model_dir, tmp_path, capsys):
    """Before: made with the negative scale (only --guidance -4 itself was refused)."""
    csv = tmp_path / "p.csv"
    csv.write_text("case_number,prompt,evaluation_guidance\n0,a church,\n1,a cat,-5\n")
    out = tmp_path / "img"
    code, _, err = generate(capsys, tiny_model_dir, out, "--steps", "2", prompts=csv)
    assert code == 2 and "case 1 has evaluation_guidance -5.0; give a finite number >= 0" in err
    assert not out.exists()
