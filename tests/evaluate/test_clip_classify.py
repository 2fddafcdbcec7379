"""CLIP score and classification with tiny random models, through the real loading code."""

import json

import pytest
from evalkit import kscu_main, make_images, write_csv

from kscu.errors import KscuError
from kscu.evaluate.classify import class_index, evaluate_classify
from kscu.evaluate.clip_score import evaluate_clip


def run_evaluate(metric, images, prompts, model, output) -> int:
    """``kscu evaluate METRIC --images --prompts --model --output`` through the real CLI."""
    argv = ["--images", images, "--prompts", prompts, "--model", model, "--output", output]
    return kscu_main(["evaluate", metric, *map(str, argv)])


def test_clip_score_runs_and_records_protocol(tmp_path, tiny_clip):
    make_images(tmp_path / "images", 3, size=(40, 40))
    csv = write_csv(
        tmp_path / "p.csv",
        ["case_number", "prompt", "evaluation_seed"],
        [
            [0, "a cat", 1],
            [1, "a church on a hill", 2],
            [2, "x" * 400, 3],
            [3, "never generated", 4],
        ],
    )
    out = tmp_path / "eval" / "clip.json"
    code = run_evaluate("clip", tmp_path / "images", csv, tiny_clip, out)
    assert code == 0
    result = json.loads(out.read_text())
    assert result["metric"] == "clip" and result["images"] == 3
    assert 0 <= result["clip_score"] <= 100
    assert result["model"] == str(tiny_clip)
    assert result["prompt_rows_without_image"] == 1
    assert set(result["per_image"]) == {"0.png", "1.png", "2.png"}
    assert "transformers" in result["versions"]


def test_clip_score_is_deterministic_and_pairs_by_case_number(tmp_path, tiny_clip):
    make_images(tmp_path / "images", 2, size=(32, 32), start=5)
    csv = write_csv(tmp_path / "p.csv", ["case_number", "prompt"], [[6, "b"], [5, "a"]])
    one = evaluate_clip(tmp_path / "images", csv, str(tiny_clip))
    two = evaluate_clip(tmp_path / "images", csv, str(tiny_clip), batch_size=1, use_cache=False)
    assert one["computed_images"] == two["computed_images"] == 2
    assert one["per_image"] == pytest.approx(two["per_image"], abs=1e-3)


def test_clip_image_without_prompt_row_is_an_error(tmp_path, tiny_clip, capsys):
    make_images(tmp_path / "images", 2, size=(32, 32))
    csv = write_csv(tmp_path / "p.csv", ["case_number", "prompt"], [[0, "a"]])
    code = run_evaluate("clip", tmp_path / "images", csv, tiny_clip, tmp_path / "c.json")
    assert code == 2
    assert "1.png has no row" in capsys.readouterr().err


def test_clip_csv_without_prompt_column(tmp_path, tiny_clip, capsys):
    make_images(tmp_path / "images", 1, size=(32, 32))
    csv = write_csv(tmp_path / "p.csv", ["case_number", "text"], [[0, "a"]])
    code = run_evaluate("clip", tmp_path / "images", csv, tiny_clip, tmp_path / "c.json")
    assert code == 2
    assert "'prompt' column" in capsys.readouterr().err


def test_clip_missing_model_offline(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    make_images(tmp_path / "images", 1, size=(32, 32))
    csv = write_csv(tmp_path / "p.csv", ["prompt"], [["a"]])
    code = run_evaluate("clip", tmp_path / "images", csv, tmp_path / "nope", tmp_path / "c.json")
    assert code == 2
    assert "cannot load CLIP model" in capsys.readouterr().err


def test_classify_top1_per_class(tmp_path, tiny_classifier):
    make_images(tmp_path / "images", 4, size=(48, 48))
    csv = write_csv(
        tmp_path / "p.csv",
        ["case_number", "prompt", "evaluation_seed", "class"],
        [
            [0, "an image of a church", 1, "church"],
            [1, "an image of a church", 2, "church"],
            [2, "an image of a tench", 3, "tench"],
            [3, "an image of a garbage truck", 4, "garbage truck"],
        ],
    )
    out = tmp_path / "classify.json"
    code = run_evaluate("classify", tmp_path / "images", csv, tiny_classifier, out)
    assert code == 0
    result = json.loads(out.read_text())
    assert result["metric"] == "classify" and result["images"] == 4
    assert set(result["per_class"]) == {"church", "tench", "garbage truck"}
    assert result["class_index"] == {"church": 2, "tench": 0, "garbage truck": 3}
    assert 0 <= result["top1"] <= 1
    # the overall accuracy is the image-weighted mean of the per-class ones
    counts = result["per_class_counts"]
    assert result["top1"] == pytest.approx(sum(c["correct"] for c in counts.values()) / 4)
    # every image's prediction is one of the model's labels
    assert len(result["per_image"]) == 4


def test_classify_needs_class_column(tmp_path, tiny_classifier, capsys):
    make_images(tmp_path / "images", 1, size=(32, 32))
    csv = write_csv(tmp_path / "p.csv", ["case_number", "prompt"], [[0, "a church"]])
    code = run_evaluate(
        "classify",
        tmp_path / "images",
        csv,
        tiny_classifier,
        tmp_path / "c.json",
    )
    assert code == 2
    err = capsys.readouterr().err
    assert "'class' column" in err and len(err.strip().splitlines()) == 1


def test_class_names_resolve_to_labels():
    labels = {0: "tench, Tinca tinca", 2: "church, church building", 4: "crane", 5: "crane"}
    assert class_index("Church", labels, "f") == 2
    assert class_index("tinca tinca", labels, "f") == 0
    assert class_index("4", labels, "f") == 4
    with pytest.raises(KscuError, match="several labels"):
        class_index("crane", labels, "f")
    with pytest.raises(KscuError, match="not a label"):
        class_index("parachute", labels, "f")


def test_classify_unknown_class_is_an_error(tmp_path, tiny_classifier):
    make_images(tmp_path / "images", 1, size=(32, 32))
    csv = write_csv(tmp_path / "p.csv", ["prompt", "class"], [["a", "parachute"]])
    with pytest.raises(KscuError, match="parachute"):
        evaluate_classify(tmp_path / "images", csv, str(tiny_classifier))


def test_an_unknown_class_is_one_line_with_no_loading_bar(tmp_path, tiny_classifier, capsys):
    """Before: transformers' "Loading weights: 100%|...|" bar on stderr above the error."""
    from transformers.utils import logging as transformers_logging

    make_images(tmp_path / "images", 1, size=(32, 32))
    csv = write_csv(tmp_path / "p.csv", ["prompt", "class"], [["a", "parachute"]])
    out = tmp_path / "c.json"
    was_on = transformers_logging.is_progress_bar_enabled()
    transformers_logging.enable_progress_bar()  # as in a fresh process: on (global state)
    try:
        assert run_evaluate("classify", tmp_path / "images", csv, tiny_classifier, out) == 2
        assert transformers_logging.is_progress_bar_enabled()  # off only during the load
    finally:
        if not was_on:
            transformers_logging.disable_progress_bar()
    err = capsys.readouterr().err
    assert "parachute" in err and len(err.strip().splitlines()) == 1, err
    assert "Loading" not in err and not out.exists()


@pytest.mark.parametrize("metric", ["clip", "classify"])
@pytest.mark.parametrize("size", ["0", "-2"])
def test_batch_size_must_be_positive(tmp_path, tiny_clip, tiny_classifier, capsys, metric, size):
    """Before: range() arg 3 must not be zero (a traceback), or a DataLoader's error."""
    make_images(tmp_path / "images", 2, size=(32, 32))
    csv = write_csv(
        tmp_path / "p.csv", ["case_number", "prompt", "class"], [[0, "a", 0], [1, "b", 2]]
    )
    model = tiny_clip if metric == "clip" else tiny_classifier
    out = tmp_path / "r.json"
    argv = ["evaluate", metric, "--images", str(tmp_path / "images"), "--prompts", str(csv)]
    assert (
        kscu_main([*argv, "--model", str(model), "--output", str(out), "--batch-size", size]) == 2
    )
    err = capsys.readouterr().err
    assert f"--batch-size must be a positive integer (got {size})" in err
    assert len(err.strip().splitlines()) == 1 and not out.exists()


def test_clip_result_is_replaced_only_with_overwrite(tmp_path, tiny_clip, capsys):
    make_images(tmp_path / "images", 1, size=(32, 32))
    csv = write_csv(tmp_path / "p.csv", ["case_number", "prompt"], [[0, "a cat"]])
    out = tmp_path / "clip.json"
    assert run_evaluate("clip", tmp_path / "images", csv, tiny_clip, out) == 0
    out.write_text(out.read_text().replace('"clip_score"', '"old_clip_score"'))
    assert run_evaluate("clip", tmp_path / "images", csv, tiny_clip, out) == 2
    assert "already holds a clip result" in capsys.readouterr().err
    assert "old_clip_score" in out.read_text()
    argv = ["--images", tmp_path / "images", "--prompts", csv, "--model", tiny_clip]
    assert (
        kscu_main(["evaluate", "clip", *map(str, argv), "--output", str(out), "--overwrite"]) == 0
    )
    assert "old_clip_score" not in out.read_text()


def test_classify_reads_a_csv_with_a_byte_order_mark(tmp_path, tiny_classifier):
    """Excel writes one; before: "no 'class' column (columns: \\ufeffclass, ...)"."""
    make_images(tmp_path / "images", 2, size=(32, 32))
    csv = tmp_path / "bom.csv"
    csv.write_text("class,prompt,case_number\nchurch,a church,0\ntench,a tench,1\n", "utf-8-sig")
    assert csv.read_bytes().startswith(b"\xef\xbb\xbf")
    out = tmp_path / "classify.json"
    assert run_evaluate("classify", tmp_path / "images", csv, tiny_classifier, out) == 0
    result = json.loads(out.read_text())
    assert result["class_index"] == {"church": 2, "tench": 0} and result["images"] == 2


def test_a_model_without_a_classification_head_is_refused(tmp_path):
    """Before: transformers added a randomly initialised head and a meaningless accuracy was
    written with exit 0."""
    from transformers import ConvNextImageProcessor, ResNetConfig, ResNetModel

    from kscu.evaluate.classify import load_classifier

    config = ResNetConfig(embedding_size=8, hidden_sizes=[8, 8], depths=[1, 1], num_labels=2)
    ResNetModel(config).save_pretrained(tmp_path, safe_serialization=True)
    ConvNextImageProcessor(size={"shortest_edge": 40}).save_pretrained(tmp_path)
    with pytest.raises(KscuError, match=r"is not an image classifier: its weights lack"):
        load_classifier(str(tmp_path))


def test_a_classifier_folder_with_its_own_code_never_runs_it(tmp_path, monkeypatch):
    """Before: transformers asked "run the custom code? [y/N]" and a yes ran the folder's
    Python file."""
    from kscu.evaluate.classify import load_classifier

    marker = tmp_path / "ran"
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "evil.py").write_text(
        f"import pathlib\npathlib.Path({str(marker)!r}).write_text('x')\n"
        "from transformers import PretrainedConfig\n"
        "class EvilConfig(PretrainedConfig):\n    model_type = 'kscu-evil'\n"
    )
    config = {"model_type": "kscu-evil", "auto_map": {"AutoConfig": "evil.EvilConfig"}}
    (tmp_path / "model" / "config.json").write_text(json.dumps(config))
    monkeypatch.setattr("builtins.input", lambda *a: "y")  # a user who says yes
    with pytest.raises(KscuError, match=r"cannot load classifier"):
        load_classifier(str(tmp_path / "model"))
    assert not marker.exists()


def test_a_whole_label_names_its_class():
    """Before: "church, church building" (the label as the model states it) was refused."""
    labels = {2: "church, church building", 4: "crane", 5: "crane"}
    assert class_index("Church, church building", labels, "p.csv") == 2
    assert class_index("church building", labels, "p.csv") == 2
    with pytest.raises(KscuError, match=r"names several labels \(\[4, 5\]\)"):
        class_index("crane", labels, "p.csv")
