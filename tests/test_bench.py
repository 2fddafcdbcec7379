"""The tiny world end to end: default-model erase with preview, and `kscu bench`."""

import json

import pytest
import torch
from PIL import Image

from kscu.bench import bench_prompts, parse_step_ranges
from kscu.cli import main
from kscu.errors import KscuError


def run_cli(args, capsys):
    code = main([str(a) for a in args])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_default_model_erase_writes_preview_and_records_the_preset(tmp_path, capsys):
    out = tmp_path / "circle"
    code, stdout, err = run_cli(
        [
            "erase",
            "--concept",
            "circle",
            "--mode",
            "class",
            "--output",
            out,
            "--iterations",
            "12",
            "--quiet",
        ],
        capsys,
    )
    assert code == 0, err
    meta = json.loads((out / "kscu.json").read_text())
    assert meta["base_model"] == "kscu-tiny-world"
    assert meta["preset"], "the tiny world ships hyperparameters; they must be recorded"
    for key, value in meta["preset"].items():
        assert meta["config"][key] == value
    preview = Image.open(out / "preview.png")
    assert preview.width > 400 and preview.height > 200


def test_bench_scores_every_method_and_writes_its_files(tmp_path, capsys, monkeypatch):
    import kscu.analyze

    def fake_analysis(pipe, model, concepts, mode, **kwargs):  # the real one: test_analyze.py
        return {"curve": [0.0] * 50, "recommended_start_step": 20, "rule": "test"}

    monkeypatch.setattr(kscu.analyze, "auto_start_step", fake_analysis, raising=False)
    out = tmp_path / "bench"
    code, stdout, err = run_cli(
        [
            "bench",
            "--concept",
            "heart",
            "--mode",
            "class",
            "--methods",
            "kscu,esd",
            "--output",
            out,
            "--iterations",
            "150",
            "--lr",
            "5e-5",
            "--samples",
            "24",
            "--steps",
            "20",
            "--step-ranges",
            "14:50",
            "--start-step",
            "auto",
            "--quiet",
        ],
        capsys,
    )
    assert code == 0, err
    report = json.loads((out / "bench.json").read_text())
    rows = {r["label"]: r for r in report["rows"]}
    assert [r["method"] for r in report["rows"]] == ["original", "kscu", "esd", "kscu"]
    for row in report["rows"]:
        assert {"method", "UA", "IRA", "CRA", "FD", "seconds"} <= set(row)
        assert 0 <= row["UA"] <= 1 and 0 <= row["IRA"] <= 1 and 0 <= row["CRA"] <= 1
    original, kscu = rows["original"], rows["kscu(auto)"]
    assert original["FD"] == 0 and original["UA"] < 0.3  # the model draws hearts
    assert kscu["UA"] >= original["UA"] + 0.3  # a short erase already removes many hearts
    # stated tolerance: retention drops by at most 0.25 on this short, small-sample run
    assert kscu["IRA"] >= original["IRA"] - 0.25 and kscu["CRA"] >= original["CRA"] - 0.25
    assert rows["kscu[14:50]"]["start_step"] == 14 and kscu["start_step"] == 20
    auto_record = json.loads((out / "kscu_auto" / "kscu.json").read_text())
    assert auto_record["start_step_analysis"]["recommended_start_step"] == 20
    assert (out / "bench.md").read_text().count("|") > 20
    assert Image.open(out / "bench.png").width > 200
    assert (out / "esd" / "weights.safetensors").exists()


def test_bench_refuses_a_concept_outside_the_world(tmp_path, capsys):
    code, _, err = run_cli(["bench", "--concept", "church", "--output", tmp_path], capsys)
    assert code == 2 and "not a concept of the tiny world" in err
    assert len(err.strip().splitlines()) == 1


def test_a_bench_of_another_concept_is_not_mixed_in(tmp_path, capsys):
    """Before: the new bench.json said heart while the folder kept the earlier bench's erases."""
    out = tmp_path / "b"
    out.mkdir()
    (out / "bench.json").write_text(json.dumps({"concept": "circle", "mode": "class"}))
    code, _, err = run_cli(["bench", "--concept", "heart", "--output", out], capsys)
    assert code == 2 and "holds a bench of 'circle' (class mode), not 'heart'" in err
    assert len(err.strip().splitlines()) == 1 and sorted(p.name for p in out.iterdir()) == [
        "bench.json"
    ]


def test_a_bench_is_not_replaced_without_reuse_or_overwrite(tmp_path, capsys):
    """Before: a second bench into the same --output erased again over the first one's runs."""
    out = tmp_path / "b"
    (out / "kscu").mkdir(parents=True)
    (out / "kscu" / "kscu.json").write_text("{}")
    code, _, err = run_cli(["bench", "--concept", "circle", "--output", out], capsys)
    assert code == 2 and "holds no bench.json" in err and "--reuse" in err
    (out / "bench.json").write_text(json.dumps({"concept": "circle", "mode": "class"}))
    code, _, err = run_cli(["bench", "--concept", "circle", "--output", out], capsys)
    assert code == 2 and "already holds a bench of 'circle'" in err and "--overwrite" in err
    assert len(err.strip().splitlines()) == 1
    assert sorted(p.name for p in out.rglob("*")) == ["bench.json", "kscu", "kscu.json"]


@pytest.mark.parametrize("flag", ["--overwrite", "--reuse"])
def test_a_folder_no_bench_made_is_not_written_into(tmp_path, capsys, flag):
    """Before: ``--overwrite`` (or ``--reuse``) into any non-empty folder without a bench.json
    erased and wrote bench.json, bench.md and the run folders beside the user's own files."""
    out = tmp_path / "b"
    (out / "kscu").mkdir(parents=True)  # an interrupted bench's run: that alone is accepted
    (out / "notes.txt").write_text("mine")
    code, _, err = run_cli(["bench", "--concept", "circle", "--output", out, flag], capsys)
    assert code == 2 and "holds 'notes.txt', which no bench made" in err, err
    assert len(err.strip().splitlines()) == 1
    assert sorted(p.name for p in out.iterdir()) == ["kscu", "notes.txt"]


@pytest.mark.parametrize(
    "flags, words",
    [
        (["--samples", "1"], "--samples must be >= 2"),  # before: LinAlgError after the erases
        (["--methods", "esd", "--start-step", "auto"], "--start-step is kscu's"),  # ignored
        (["--seed=-1"], "--seed/--seeds -1: give seeds in [0, "),  # before: numpy's ValueError
        (["--seeds", "0,-3"], "--seed/--seeds -3: give seeds in [0, "),
        (["--reuse", "--overwrite"], "--reuse keeps finished erases, --overwrite erases again"),
        (["--guidance=-5"], "--guidance must be a finite number >= 0 (got -5.0)"),  # as analyze
    ],
)
def test_bench_flags_that_cannot_work_are_refused(flags, words, tmp_path, capsys):
    args = ["bench", "--concept", "circle", "--output", tmp_path / "b", *flags]
    code, _, err = run_cli(args, capsys)
    assert code == 2 and words in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "b").exists()


def test_bench_names_its_own_attack_samples_flag(tmp_path, capsys):
    args = ["bench", "--concept", "heart", "--attack", "unlearndiff", "--attack-samples", "0"]
    code, _, err = run_cli([*args, "--output", tmp_path / "b"], capsys)
    assert code == 2 and "--attack-samples must be > 0" in err  # before: "--samples must be"


def test_bench_refuses_a_guidance_that_is_not_a_number(tmp_path, capsys):
    """Before: numpy's LinAlgError from the FD score, after every erase."""
    args = ["bench", "--concept", "heart", "--guidance", "nan", "--output", tmp_path / "b"]
    code, _, err = run_cli(args, capsys)
    assert code == 2 and "--guidance must be a finite number" in err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "b").exists()


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"start_step": 10}, r"start_step -> start_step="),
        ({"end_step": 30, "lr": 1e-5}, r"end_step -> step_ranges="),
        ({"learning_rate": 1e-5}, r"unknown configuration keys \['learning_rate'\]"),
    ],
)
def test_bench_refuses_overrides_it_cannot_apply(tmp_path, overrides, message):
    """Before: a TypeError from inside the bench ("multiple values for keyword argument")."""
    from kscu.bench import run_bench

    with pytest.raises(KscuError, match=message):
        run_bench("heart", "class", ["kscu"], tmp_path, step_ranges=[(14, 50)], overrides=overrides)
    assert not any(tmp_path.iterdir())


def test_bench_prompts_split_target_and_retain():
    p = bench_prompts("striped", 12, seed=0)
    assert p["kind"] == "texture"
    assert all(lab["texture"] == "striped" for lab in p["target_labels"])
    assert all(lab["texture"] != "striped" for lab in p["retain_labels"])
    assert all("striped" in prompt for prompt in p["target_prompts"])


def test_step_ranges():
    assert parse_step_ranges("0:50,14:50,0:15") == [(0, 50), (14, 50), (0, 15)]
    with pytest.raises(KscuError, match="S:E"):
        parse_step_ranges("14-50")


def test_feature_distance_against_closed_form():
    """Two Gaussians with diagonal covariances: FD = |mu1-mu2|^2 + sum (sqrt(a) - sqrt(b))^2."""
    import numpy as np

    from kscu.bench import feature_distance

    rng = np.random.default_rng(0)
    z = rng.standard_normal((200_000, 2))
    a = z * np.sqrt([1.0, 4.0])
    b = (z - z.mean(0)) / z.std(0) * np.sqrt([9.0, 1.0]) + [1.0, -2.0]
    a = (a - a.mean(0)) / a.std(0) * np.sqrt([1.0, 4.0])
    expected = 1.0 + 4.0 + (1 - 3) ** 2 + (2 - 1) ** 2
    assert abs(feature_distance(a, b) - expected) < 0.05
    assert abs(feature_distance(a, a)) < 1e-9


def _weights_sum(pipe) -> float:
    return float(sum(p.detach().double().sum() for p in pipe.unet.parameters()))


def test_each_seed_scores_the_original_model_first_and_reuse_skips_finished_erases(
    tmp_path, monkeypatch
):
    """With --seeds, the original row of every seed is scored on the original weights (not on
    the previous seed's last erase); --reuse loads finished erases instead of erasing again."""
    import kscu.bench as bench
    import kscu.runner as runner

    seen = []

    def score(self, pipe):
        seen.append((self.seed, _weights_sum(pipe)))
        return {"UA": 0.0, "IRA": 1.0, "CRA": 1.0, "FD": 0.0}

    monkeypatch.setattr(bench.Judge, "score", score)
    args = dict(iterations=2, samples=2, steps=2, seeds=[0, 1], progress=False)
    first = bench.run_bench("heart", "class", ["kscu", "esd"], tmp_path, **args)
    original = seen[0][1]
    starts = [total for i, (seed, total) in enumerate(seen) if i % 3 == 0]
    assert [s for s, _ in seen] == [0, 0, 0, 1, 1, 1]
    assert starts == [original, original]  # each seed's first row: the original weights
    assert len({total for _, total in seen}) == 5  # 4 different erases and the original

    erased, scored = [], list(seen)
    real = runner.erase_to_folder
    monkeypatch.setattr(
        runner, "erase_to_folder", lambda *a, **k: erased.append(1) or real(*a, **k)
    )
    seen.clear()
    again = bench.run_bench("heart", "class", ["kscu", "esd"], tmp_path, reuse=True, **args)
    assert not erased and seen == scored  # the same weights, loaded instead of erased
    kscu_json = json.loads((tmp_path / "seed0" / "kscu" / "kscu.json").read_text())
    assert again["rows"][1]["seconds_per_seed"][0] == round(kscu_json["seconds"], 2)
    assert first["rows"][1]["UA"] == again["rows"][1]["UA"]
    changed = bench.run_bench(
        "heart", "class", ["esd"], tmp_path, reuse=True, **{**args, "iterations": 3}
    )
    assert len(erased) == 2 and changed["rows"][1]["iterations"] == 3  # other settings: erased


def test_fast_cpu_conv_is_each_erases_own(tmp_path, capsys, monkeypatch):
    """kscu bench --fast-cpu-conv: every erase runs and records it, scoring keeps oneDNN (its
    batched generation is faster with it), and the report says so."""
    import kscu.bench as bench

    seen = []

    def score(self, pipe):
        seen.append(torch.backends.mkldnn.enabled)
        return {"UA": 0.0, "IRA": 1.0, "CRA": 1.0, "FD": 0.0}

    monkeypatch.setattr(bench.Judge, "score", score)
    args = ["--concept", "heart", "--iterations", "2", "--samples", "2", "--steps", "2"]
    code = main(["bench", *args, "--output", str(tmp_path), "--quiet", "--fast-cpu-conv"])
    assert code == 0 and seen == [True, True, True] and torch.backends.mkldnn.enabled
    report = json.loads((tmp_path / "bench.json").read_text())
    assert report["fast_cpu_conv"] is True
    assert "--fast-cpu-conv" in (tmp_path / "bench.md").read_text()
    for run in ("kscu", "esd"):
        meta = json.loads((tmp_path / run / "kscu.json").read_text())
        assert meta["config"]["fast_cpu_conv"] is True
        assert meta["convolution"] == "torch native (--fast-cpu-conv)"


def test_jobs_erase_in_parallel_exactly_as_kscu_erase_with_that_many_threads(tmp_path, monkeypatch):
    """kscu bench --jobs 2: the erases run in two worker processes with half the threads each;
    each run folder then holds exactly what `kscu erase` writes with that many threads, the
    bench loads it instead of erasing again, and the records say how it ran."""
    from safetensors.torch import load_file

    import kscu.bench as bench
    import kscu.runner as runner
    from kscu.config import EraseConfig

    monkeypatch.setattr(
        bench.Judge, "score", lambda self, pipe: {"UA": 0.0, "IRA": 1.0, "CRA": 1.0, "FD": 0.0}
    )
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        erased_here = []
        real = runner.erase_to_folder
        monkeypatch.setattr(
            runner, "erase_to_folder", lambda *a, **k: erased_here.append(1) or real(*a, **k)
        )
        args = dict(iterations=3, samples=2, steps=2, progress=False)
        report = bench.run_bench("heart", "class", ["kscu", "esd"], tmp_path, jobs=2, **args)
        assert not erased_here  # both erases ran in the workers
        assert report["jobs"] == 2
        assert (
            "2 at a time (--jobs) with 1 CPU thread(s) each" in (tmp_path / "bench.md").read_text()
        )
        torch.set_num_threads(1)
        for row in report["rows"][1:]:
            meta = json.loads((tmp_path / row["label"] / "kscu.json").read_text())
            assert meta["torch_threads"] == row["torch_threads"] == 1
            assert row["seconds"] == round(meta["seconds"], 2)
            cfg = EraseConfig(concepts=["heart"], mode="class", method=row["method"], iterations=3)
            real(cfg, None, tmp_path / "ref", False, overwrite=True)  # as `kscu erase` runs it
            ours = load_file(tmp_path / row["label"] / "weights.safetensors")
            reference = load_file(tmp_path / "ref" / "weights.safetensors")
            assert ours.keys() == reference.keys()
            assert all(torch.equal(ours[k], reference[k]) for k in ours), row["label"]
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--jobs", "0"], "--jobs 0"),
        (["--jobs", str(torch.get_num_threads() + 1)], "the CPU threads torch uses here"),
        (["--methods", "kscu,esd,kscu"], "kscu asked for twice"),
        (["--step-ranges", "14:50,14:50"], "kscu[14:50] asked for twice"),
        (["--step-ranges", "14:100"], "--step-ranges 14:100: the erase has 50 steps"),
    ],
)
def test_bench_refuses_bad_jobs_and_repeated_rows_in_one_line(tmp_path, capsys, flags, message):
    args = ["bench", "--concept", "heart", "--output", str(tmp_path / "b"), "--quiet"]
    code, _, err = run_cli([*args, *flags], capsys)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1
    assert "--end-step" not in err  # erase's flag, which the bench does not have
    assert not (tmp_path / "b").exists()


def test_a_failed_parallel_erase_is_one_line_and_stops_the_bench(tmp_path, capsys):
    """An erase that fails in its worker (here: its run folder holds a stranger's file) ends
    the bench with that erase's own one-line error, exit 2, and no report."""
    (tmp_path / "esd").mkdir()
    (tmp_path / "esd" / "notes.txt").write_text("not a run")
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        args = ["--concept", "heart", "--iterations", "3", "--samples", "2", "--steps", "2"]
        code, _, err = run_cli(
            ["bench", *args, "--output", tmp_path, "--jobs", "2", "--quiet", "--overwrite"], capsys
        )
    finally:
        torch.set_num_threads(threads)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "holds no kscu run" in err, err
    assert (tmp_path / "esd" / "notes.txt").exists() and not (tmp_path / "bench.json").exists()


def test_reuse_loads_an_automatic_start_steps_run(tmp_path, monkeypatch):
    """A finished `--start-step auto` erase is found again by the step it measured (the path
    --jobs takes to load what its workers erased); other settings still erase again."""
    import kscu.analyze
    import kscu.bench as bench
    import kscu.runner as runner

    def fake_analysis(pipe, model, concepts, mode, **kwargs):
        return {"curve": [0.0] * 50, "recommended_start_step": 20, "rule": "test"}

    monkeypatch.setattr(kscu.analyze, "auto_start_step", fake_analysis, raising=False)
    monkeypatch.setattr(
        bench.Judge, "score", lambda self, pipe: {"UA": 0.0, "IRA": 1.0, "CRA": 1.0, "FD": 0.0}
    )
    args = dict(iterations=2, samples=2, steps=2, start_step="auto", progress=False)
    first = bench.run_bench("heart", "class", ["kscu"], tmp_path, **args)
    assert first["rows"][1]["start_step"] == 20
    erased = []
    real = runner.erase_to_folder
    monkeypatch.setattr(
        runner, "erase_to_folder", lambda *a, **k: erased.append(1) or real(*a, **k)
    )
    again = bench.run_bench("heart", "class", ["kscu"], tmp_path, reuse=True, **args)
    assert not erased and again["rows"][1]["start_step"] == 20
    bench.run_bench("heart", "class", ["kscu"], tmp_path, reuse=True, **{**args, "iterations": 3})
    assert len(erased) == 1
