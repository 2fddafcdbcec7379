"""The concept sensitivity analysis: a synthetic model with a known answer, the rule, the cache,
the CLI (files and exit code 2), and the CLIP and tiny-world scorers.

The synthetic model is an exact denoiser for Gaussian data: x0 ~ N(m, I) with m = mu on channel
0 when the prompt is the concept *and* the step index is in [A, B), else m = 0. Its noise
prediction uses E[x0 | x_t] = m + sqrt(abar) (x_t - sqrt(abar) m). So the prompt reaches the
model only on steps [A, B), and the curve is known where it matters:
  * C(s) = 0 for s <= A: a switch before the window leaves every image identical to an end image;
  * C(s) = 1 for s >= B: likewise, after the window nothing the prompt does changes anything;
  * non-decreasing in between: DDIM with this denoiser is linear in the latent, so each concept
    step in the window adds a non-negative shift along channel 0, and the scorer (a sigmoid of
    the channel-0 mean) is increasing in that shift, so more concept steps never score less.
The recommended start must therefore fall in [A, B).
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import pytest
import torch

import kscu.cli
from kscu.analyze import cli as analyze_cli
from kscu.analyze.analysis import (
    AnalyzeSettings,
    analyze,
    auto_start_step,
    combine,
    measure,
    summarize,
)
from kscu.analyze.core import isotonic, start_from_curve
from kscu.families import FAMILIES, family_of

A, B = 15, 30  # the window of step indices where the synthetic model sees its prompt


class LatentScorer:
    """Presence = sigmoid of the channel-0 mean of the final latent (decode is the identity)."""

    def check(self, concept):
        pass

    def presence(self, z, concept):
        return torch.sigmoid(4 * (z[:, 0].mean((1, 2)) - 0.5))

    def describe(self):
        return {"name": "latent-mean"}


def window_eps(pipe, concept: str, mu: float = 1.0):
    alphas = pipe.scheduler.alphas_cumprod
    concept_emb = family_of(pipe).encode(pipe, [concept])["encoder_hidden_states"]
    from diffusers import DDIMScheduler

    sched = DDIMScheduler.from_config(pipe.scheduler.config)
    sched.set_timesteps(50)
    index = {int(t): s for s, t in enumerate(sched.timesteps)}

    def eps(x, t, emb):
        a = alphas[t].float()
        is_concept = (emb - concept_emb).abs().flatten(1).amax(1) < 1e-6
        on = is_concept & (A <= index[int(t)] < B)
        m = torch.zeros_like(x)
        m[:, 0] = mu * on.float().view(-1, 1, 1)
        x0 = m + a.sqrt() * (x - a.sqrt() * m)
        return (x - a.sqrt() * x0) / (1 - a).sqrt()

    return eps


def synthetic(pipe, seed=0, samples=4, stride=1, tmp=None):
    settings = AnalyzeSettings(samples=samples, seed=seed, stride=stride)
    return analyze(
        pipe,
        None,
        ["circle"],
        "class",
        settings,
        LatentScorer(),
        cache_dir=tmp,
        use_cache=tmp is not None,
        eps=window_eps(pipe, "circle"),
        decode=lambda z: z,
    )


def test_synthetic_curve_is_known_and_monotone(tiny_pipe):
    result = synthetic(tiny_pipe)
    curve = np.array(result["curve"])
    assert len(curve) == 50 and result["interpolated"] is False
    assert np.allclose(curve[: A + 1], 0, atol=1e-4)
    assert np.allclose(curve[B:], 1, atol=1e-4)
    assert np.all(np.diff(curve) >= -1e-6)
    assert curve[(A + B) // 2] > 0.2  # and it does rise inside the window
    start = result["recommended_start_step"]
    assert A <= start < B and result["reliable"]
    fit = np.append(isotonic(curve), 1.0)
    assert fit[start] <= 0.1 < fit[start + 1]  # the rule as stated
    assert "0.1" in result["rule"] and result["rule_parameters"]["max_start_step"] == 44


def test_recommended_start_is_stable_across_seeds(tiny_pipe):
    starts = [synthetic(tiny_pipe, seed=s)["recommended_start_step"] for s in (0, 1, 2, 3)]
    assert max(starts) - min(starts) <= 1, starts  # tolerance: 1 step


def test_stride_measures_fewer_steps_and_interpolates(tiny_pipe):
    full = synthetic(tiny_pipe)["curve"]
    coarse = synthetic(tiny_pipe, stride=5)
    assert coarse["interpolated"] and coarse["measured_steps"] == list(range(0, 50, 5))
    assert len(coarse["curve"]) == 50
    for s in coarse["measured_steps"]:
        assert coarse["curve"][s] == pytest.approx(full[s], abs=1e-4)


def test_rule_reads_the_monotone_fit_and_is_clamped():
    noisy = np.array([0.0] * 10 + [0.3, 0.0] + [0.05] * 8 + list(np.linspace(0.2, 1, 30)))
    assert start_from_curve(noisy, 0.1, 44) == 19  # the lone bump at 10 is pooled away
    assert start_from_curve(np.zeros(50), 0.1, 44) == 44  # decided only by the last step
    assert start_from_curve(np.ones(50), 0.1, 44) == 0
    assert np.all(np.diff(isotonic(np.array([3.0, 1, 2, 0, 5]))) >= 0)


def _per(curve, reliable=True):
    return {"curve": list(curve), "reliable": reliable}


def test_several_concepts_take_the_earliest_start_and_unseen_ones_fall_back():
    settings = AnalyzeSettings()
    early = np.clip(np.linspace(-0.5, 1.5, 50), 0, 1)
    late = np.clip(np.linspace(-2, 1, 50), 0, 1)
    both = combine({"a": _per(early), "b": _per(late)}, "class", settings)
    alone = [
        combine({k: _per(c)}, "class", settings)["recommended_start_step"]
        for k, c in (("a", early), ("b", late))
    ]
    assert both["recommended_start_step"] == min(alone) and alone[0] < alone[1]
    blind = combine({"a": _per(early, False)}, "style", settings)
    assert blind["recommended_start_step"] == 24 and blind["rule"].startswith("fallback")


def test_the_mode_default_is_clamped_to_a_short_walk():
    """Before: ``analyze --num-steps 4`` recorded and printed "class default 14", a step past
    the curve's end; the fallback already started at the clamp."""
    short = AnalyzeSettings(num_steps=4, stride=1)
    blind = combine({"a": _per(np.zeros(4), False)}, "class", short)
    assert blind["mode_default_start_step"] == blind["recommended_start_step"] == 3
    assert "default start step 14, clamped to 3 for 4 steps, is kept" in blind["rule"]
    seen = combine({"a": _per(np.linspace(0, 1, 4))}, "class", short)
    assert seen["mode_default_start_step"] == 3 and seen["task_defaults"]["class"] == 14


def test_no_contrast_is_unreliable():
    m = {
        "measured_steps": [0],
        "forward_presence": [0.5],
        "reverse_presence": [0.52],
        "presence_concept": 0.52,
        "presence_neutral": 0.5,
    }
    s = summarize(m, AnalyzeSettings(stride=49))
    assert not s["reliable"] and len(s["curve"]) == 50 and all(np.isfinite(s["curve"]))


def test_measurements_are_cached(tiny_pipe, tmp_path, monkeypatch):
    first = synthetic(tiny_pipe, tmp=tmp_path)
    assert first["cached"] == [] and list(tmp_path.glob("circle-*.json"))

    def boom(*a, **k):
        raise AssertionError("measured again instead of reading the cache")

    monkeypatch.setattr("kscu.analyze.analysis.measure", boom)
    again = synthetic(tiny_pipe, tmp=tmp_path)
    assert again["cached"] == ["circle"] and again["curve"] == first["curve"]
    stricter = analyze(
        tiny_pipe,
        None,
        ["circle"],
        "class",
        AnalyzeSettings(samples=4, threshold=0.5),
        LatentScorer(),
        cache_dir=tmp_path,
        eps=window_eps(tiny_pipe, "circle"),
        decode=lambda z: z,
    )
    assert stricter["recommended_start_step"] > first["recommended_start_step"]  # rule only


@pytest.mark.parametrize(
    "damage",
    [
        lambda doc: [],  # a list instead of the record: AttributeError before
        lambda doc: {**doc, "measurement": None},
        lambda doc: {**doc, "measurement": {**doc["measurement"], "forward_presence": None}},
        lambda doc: {**doc, "measurement": {**doc["measurement"], "presence_concept": "x"}},
        lambda doc: {**doc, "measurement": {**doc["measurement"], "measured_steps": [0]}},
    ],
)
def test_a_damaged_cache_entry_is_measured_again(tiny_pipe, tmp_path, damage):
    """Before: a traceback (AttributeError, TypeError, KeyError) from an edited cache file."""
    first = synthetic(tiny_pipe, tmp=tmp_path)
    (path,) = tmp_path.glob("circle-*.json")
    path.write_text(json.dumps(damage(json.loads(path.read_text()))))
    again = synthetic(tiny_pipe, tmp=tmp_path)
    assert again["cached"] == [] and again["curve"] == first["curve"]


def test_auto_start_step_for_erase(tiny_pipe, tiny_clip, tmp_path, monkeypatch):
    """The path ``erase --start-step auto`` takes: real UNet and VAE, CLIP from $KSCU_CLIP_MODEL."""
    monkeypatch.setenv("KSCU_CLIP_MODEL", str(tiny_clip))
    out = auto_start_step(
        tiny_pipe,
        "some/model",
        ["cat"],
        "instance",
        seed=3,
        cache_dir=tmp_path,
        settings=AnalyzeSettings(samples=1, stride=10, batch_size=16),
    )
    assert isinstance(out["recommended_start_step"], int)
    assert 0 <= out["recommended_start_step"] <= 44 and len(out["curve"]) == 50
    assert out["settings"]["seed"] == 3 and out["mode_default_start_step"] == 40
    assert out["scorer"]["model"] == str(tiny_clip)
    json.dumps(out)  # recordable in kscu.json as is


def run(argv, capsys, monkeypatch):
    """``kscu.cli.main`` with ``analyze`` registered (whether or not cli.py wires it yet)."""
    build = kscu.cli.build_parser

    def build_with_analyze():
        parser = build()
        sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        if "analyze" not in sub.choices:
            analyze_cli.register(sub)
        return parser

    monkeypatch.setattr(kscu.cli, "build_parser", build_with_analyze)
    try:
        code = kscu.cli.main([str(a) for a in argv])
    except SystemExit as e:  # argparse usage errors
        code = e.code
    out = capsys.readouterr()
    return code, out.out, out.err


def test_cli_writes_json_and_png(tiny_model_dir, tiny_clip, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("KSCU_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "an"
    code, stdout, err = run(
        [
            "analyze",
            "--concept",
            "church",
            "--model",
            tiny_model_dir,
            "--clip-model",
            tiny_clip,
            "--samples",
            "2",
            "--stride",
            "10",
            "--output",
            out,
            "--device",
            "cpu",
            "--quiet",
        ],
        capsys,
        monkeypatch,
    )
    assert code == 0, err
    data = json.loads((out / "analyze.json").read_text())
    assert len(data["curve"]) == 50 and isinstance(data["recommended_start_step"], int)
    assert data["rule"] and data["scorer"]["name"] == "clip"
    assert data["per_concept"]["church"]["measured_steps"] == [0, 10, 20, 30, 40]
    assert (out / "analyze.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # random tiny CLIP: its curve may or may not be informative; the line must say which
    assert ("recommended start step" in stdout) == data["reliable"]
    assert list((tmp_path / "cache" / "analyze").glob("church-*.json"))


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--concept", " "], "empty concept"),
        (["--concept", "a,,b"], "empty concept"),
        (["--concept", "church", "--samples", "0"], "--samples must be > 0"),
        (["--concept", "church", "--samples", "-3"], "--samples must be > 0"),
        (["--concept", "church", "--stride", "0"], "--stride"),
        (["--concept", "church", "--threshold", "1.5"], "--threshold"),
        (["--concept", "church", "--mode", "bogus"], "unknown mode"),
        # before: the default CLIP scorer failed to load first, naming CLIP instead of the folder
        (["--concept", "church", "--model", "no/such/folder"], "model folder no/such/folder"),
    ],
)
def test_cli_bad_input_is_one_line_and_exit_2(flags, message, tmp_path, capsys, monkeypatch):
    code, _, err = run(["analyze", *flags, "--output", tmp_path / "x"], capsys, monkeypatch)
    assert code == 2
    assert err.startswith("error:") and message in err and err.count("\n") == 1
    assert not (tmp_path / "x").exists()


def test_world_scorer_reads_the_classifier():
    world = pytest.importorskip("kscu.world.classifier")
    try:
        world.load_classifier()
    except Exception as e:  # noqa: BLE001 - the world is optional in this checkout
        pytest.skip(f"no world classifier: {e}")
    from kscu.analyze.scorers import WorldScorer
    from kscu.errors import KscuError
    from kscu.world.data import render

    rng = np.random.default_rng(0)
    circles = torch.from_numpy(
        np.stack([render("circle", "red", "striped", rng) for _ in range(8)])
    )
    squares = torch.from_numpy(np.stack([render("square", "blue", "plain", rng) for _ in range(8)]))
    scorer = WorldScorer()
    assert scorer.presence(circles, "circle").mean() > scorer.presence(squares, "circle").mean()
    assert scorer.presence(circles, "striped").mean() > scorer.presence(squares, "striped").mean()
    with pytest.raises(KscuError):
        scorer.check("church")


def test_cli_defaults_are_the_settings_defaults():
    """One list of defaults: the flags' defaults are AnalyzeSettings' (and the protocol's)."""
    from kscu.analyze.settings import AnalyzeSettings, cap_for
    from kscu.protocol import EVAL_GUIDANCE, EVAL_STEPS

    parser = argparse.ArgumentParser()
    analyze_cli.register(parser.add_subparsers())
    args = parser.parse_args(["analyze", "--concept", "church", "--output", "x"])
    assert analyze_cli.settings_from_args(args) == AnalyzeSettings()
    sd = AnalyzeSettings().for_family(FAMILIES["sd"])  # unset: the family's protocol
    assert (sd.num_steps, sd.guidance) == (EVAL_STEPS, EVAL_GUIDANCE)
    flux = AnalyzeSettings().for_family(FAMILIES["flux"])
    assert (flux.num_steps, flux.guidance) == (28, 3.5)
    assert cap_for(50) == 44 and cap_for(10) == 8


def test_plot_is_a_matplotlib_png(tmp_path):
    from PIL import Image

    from kscu.analyze.plot import plot_curve

    curve = [min(1.0, s / 30) for s in range(50)]
    plot_curve(tmp_path / "analyze.png", curve, 3, {"class": 14}, 0.1, "t", curve, curve)
    with Image.open(tmp_path / "analyze.png") as im:
        assert im.format == "PNG" and im.size == (720, 420)
        assert len(im.convert("RGB").getcolors(2**24)) > 20  # lines and text drawn
        assert im.info["kscu"] == "analyze"  # what --overwrite looks for (is_plot)
    assert [p.name for p in tmp_path.iterdir()] == ["analyze.png"]  # no temporary left


def test_only_a_marked_png_is_a_plot_analyze_drew(tmp_path):
    """Only the marker counts: the same picture saved again without it (as PIL saves it, or as
    kscu drew it before the marker), other images, text and folders are not analyze's plots."""
    from PIL import Image

    from kscu.analyze.plot import is_plot, plot_curve

    plot_curve(tmp_path / "a.png", [0.0, 0.5, 1.0], 1, {"class": 1}, 0.1, "t")
    with Image.open(tmp_path / "a.png") as im:
        im.save(tmp_path / "resaved.png")
        im.convert("RGB").save(tmp_path / "a.jpg")
    (tmp_path / "text.png").write_text("not an image")
    (tmp_path / "folder.png").mkdir()
    assert is_plot(tmp_path / "a.png")
    for name in ("resaved.png", "a.jpg", "text.png", "folder.png", "missing.png"):
        assert not is_plot(tmp_path / name), name


def test_plot_leaves_out_defaults_beyond_the_measured_steps(tmp_path):
    """A walk shorter than the family's default (--num-steps 4 where a default start is 20)
    draws only the defaults it contains; one outside the axes collapsed matplotlib's layout."""
    import warnings

    from kscu.analyze.plot import plot_curve

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        plot_curve(tmp_path / "a.png", [0.0, 0.2, 0.6, 1.0], 2, {"class": 1, "style": 20}, 0.1, "t")
    assert (tmp_path / "a.png").stat().st_size > 0


def test_measurement_walks_in_inference_mode(tiny_pipe):
    """The switch walks skip autograd's bookkeeping (no gradient is ever taken there)."""
    modes, eps = [], window_eps(tiny_pipe, "circle")

    def recording(x, t, emb):
        modes.append(torch.is_inference_mode_enabled())
        return eps(x, t, emb)

    settings = AnalyzeSettings(samples=2, stride=10).for_family(family_of(tiny_pipe))
    measure(tiny_pipe, "circle", settings, LatentScorer(), eps=recording, decode=lambda z: z)
    assert modes and all(modes)


def test_measurement_replays_the_denoiser_with_the_same_values(tiny_pipe, monkeypatch, replay_log):
    """With the pipeline's own UNet (a CPU, float32) the switch walks are replayed from records
    (kscu.tracing): the same curve as calls through Python."""
    settings = AnalyzeSettings(samples=2, stride=10).for_family(family_of(tiny_pipe))

    def run() -> dict:
        return measure(tiny_pipe, "circle", settings, LatentScorer(), decode=lambda z: z)

    recorded, through_python = replay_log.recorded, replay_log.through_python
    replayed = run()
    made = len(recorded)
    assert made and None not in recorded
    assert len(through_python) == 2 * made  # each record's first call and its check; none dropped
    monkeypatch.setattr("kscu.families.base.traceable", lambda *_: False)
    plain = run()
    assert len(recorded) == made  # the plain run called through Python
    assert {k: v for k, v in replayed.items() if k != "seconds"} == {
        k: v for k, v in plain.items() if k != "seconds"
    }


def test_bad_steps_and_an_unwritable_cache_fail_before_the_measurement(
    tiny_pipe, tmp_path, monkeypatch
):
    """``analyze`` (also ``kscu erase --start-step auto``) checks the scheduler's steps and the
    cache folder before it measures. Before: both failed only once the measurement was done."""
    from kscu.errors import KscuError

    def boom(*a, **k):
        raise AssertionError("measured before the checks")

    monkeypatch.setattr("kscu.analyze.analysis.measure", boom)
    with pytest.raises(KscuError, match="100000 sampling steps"):
        analyze(
            tiny_pipe,
            None,
            ["circle"],
            "class",
            AnalyzeSettings(num_steps=100000),
            LatentScorer(),
            use_cache=False,
            eps=window_eps(tiny_pipe, "circle"),
        )
    (tmp_path / "file").write_text("")
    monkeypatch.setenv("KSCU_CACHE", str(tmp_path / "file"))
    with pytest.raises(KscuError, match=r"goes through the file .*\$KSCU_CACHE"):
        analyze(
            tiny_pipe,
            None,
            ["circle"],
            "class",
            AnalyzeSettings(samples=1),
            LatentScorer(),
            eps=window_eps(tiny_pipe, "circle"),
        )


def test_a_clip_model_with_the_world_scorer_is_refused():
    """Before: ignored without a word (attack refuses the same combination)."""
    from kscu.analyze.scorers import make_scorer
    from kscu.errors import KscuError

    with pytest.raises(KscuError, match="--clip-model is the clip scorer's"):
        make_scorer("world", None, "class", "a photo", "openai/clip-vit-base-patch32", "cpu")
