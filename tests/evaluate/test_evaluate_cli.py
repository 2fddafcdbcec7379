"""kscu evaluate's handlers: the output is checked at the start and again before the write."""

import pytest
from evalkit import kscu_main, make_images, write_csv

import kscu.evaluate.clip_score


@pytest.mark.parametrize("overwrite", [False, True])
def test_a_file_made_at_the_output_during_the_evaluation_is_kept(
    tmp_path, tiny_clip, capsys, monkeypatch, overwrite
):
    """Before: checked only at the start, so the final write replaced a file that appeared
    meanwhile (someone's notes, another run's record), --overwrite or not."""
    make_images(tmp_path / "images", 1, size=(32, 32))
    csv = write_csv(tmp_path / "p.csv", ["case_number", "prompt"], [[0, "a cat"]])
    out = tmp_path / "clip.json"
    real = kscu.evaluate.clip_score.evaluate_clip

    def evaluate_while_someone_writes(*args, **kwargs):
        out.write_text("notes written while the evaluation ran\n")
        return real(*args, **kwargs)

    monkeypatch.setattr(kscu.evaluate.clip_score, "evaluate_clip", evaluate_while_someone_writes)
    argv = ["--images", tmp_path / "images", "--prompts", csv, "--model", tiny_clip]
    argv += ["--output", out] + (["--overwrite"] if overwrite else [])
    assert kscu_main(["evaluate", "clip", *map(str, argv)]) == 2
    last = capsys.readouterr().err.splitlines()[-1]  # after transformers' loading bar
    assert last == (
        f"error: --output {out} already exists and is not a kscu clip result; give another path "
        "(kscu does not replace a file it did not write, even with --overwrite)"
    )
    assert out.read_text() == "notes written while the evaluation ran\n"
