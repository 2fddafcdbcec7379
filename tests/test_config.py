import pytest

from kscu.config import DEFAULTS, MODE_DEFAULTS, EraseConfig, parse_concepts, resolve
from kscu.errors import KscuError


@pytest.mark.parametrize("mode", list(MODE_DEFAULTS))
def test_mode_defaults_fill_unset_fields(mode):
    cfg = resolve(EraseConfig(concepts=["x"], mode=mode))
    for key, value in MODE_DEFAULTS[mode].items():
        assert getattr(cfg, key) == value
    assert cfg.lr == DEFAULTS["lr"] == 1e-5
    assert cfg.end_step == cfg.num_steps == 50
    assert cfg.loops == 8 and cfg.trajectory_guidance == 3.0 and cfg.lambda2 == 1e-4


def test_table_of_the_method():
    assert MODE_DEFAULTS["nudity"] == {"iterations": 750, "start_step": 14, "scope": "noxattn"}
    assert MODE_DEFAULTS["style"] == {"iterations": 500, "start_step": 24, "scope": "xattn"}
    assert resolve(EraseConfig(concepts=["a"], mode="instance")).iterations == 200
    assert resolve(EraseConfig(concepts=["a", "b"], mode="instance")).iterations == 750


def test_user_beats_preset_beats_mode():
    preset = {"lr": 1e-3, "iterations": 99, "modes": {"style": {"iterations": 7}}}
    cfg = resolve(EraseConfig(concepts=["x"], mode="class", lr=5e-4), preset)
    assert cfg.lr == 5e-4 and cfg.iterations == 99
    assert cfg.preset == {"iterations": 99}  # recorded: only what the preset decided
    style = resolve(EraseConfig(concepts=["x"], mode="style"), preset)
    assert style.iterations == 7 and style.lr == 1e-3
    assert resolve(style) == style  # idempotent, keeps the preset record


def test_esd_removes_key_steps_and_leak_term():
    cfg = resolve(EraseConfig(concepts=["x"], mode="class", method="esd"))
    assert cfg.start_step == 0 and cfg.end_step == 50 and cfg.lambda2 == 0.0
    assert cfg.iterations == 750 and cfg.scope == "noxattn"


@pytest.mark.parametrize(
    "kwargs, words",
    [
        ({"mode": "painting"}, "unknown mode"),
        ({"method": "uce"}, "unknown method"),
        ({"scope": "attn3"}, "unknown scope"),
        ({"start_step": 50}, "--start-step"),
        ({"start_step": 10, "end_step": 10}, "--end-step"),
        ({"iterations": 0}, "--iterations"),
        ({"lr": -1.0}, "--lr"),
        ({"dtype": "int8"}, "unknown dtype"),
        ({"resolution": 30}, "--resolution"),
        ({"offload_adam": True, "optimizer_in_backward": False}, "--offload-adam"),
        ({"offload_adam": True, "dtype": "float16"}, "--offload-adam"),
        ({"offload_adam": True, "lean_adam": True}, "choose one"),
        ({"negative_guidance": float("nan")}, "--negative-guidance must be a finite number"),
        ({"trajectory_guidance": float("inf")}, "--trajectory-guidance must be a finite number"),
        ({"lambda1_alpha": float("nan")}, "--lambda1-alpha must be a finite number"),
        ({"max_sequence_length": 0}, "sets FLUX's T5 prompt length; sd has no such setting"),
        ({"num_steps": 10}, "class mode starts at key step 14, outside --num-steps 10"),
        # found by review (stop 35): tracebacks or wrong advice before
        ({"num_steps": 0}, r"--num-steps must be > 0 \(got 0\)"),
        ({"seed": 10**23}, "noise seeds seed..seed\\+iterations-1 must lie in torch's"),
        ({"seed": 2**64 - 2, "iterations": 5}, "give a smaller seed"),
        ({"device": "foo"}, "unknown device 'foo'; use auto, cpu, cuda or cuda:N"),
        ({"device": "mps"}, "unknown device 'mps'"),
        ({"device": "meta"}, "unknown device 'meta'"),
    ],
)
def test_bad_values_are_refused_with_the_flag_named(kwargs, words):
    with pytest.raises(KscuError, match=words):
        resolve(EraseConfig(concepts=["x"], **kwargs))


@pytest.mark.parametrize("text", ["", " ", "a,,b", "a, "])
def test_empty_concepts_are_refused(text):
    with pytest.raises(KscuError, match="empty concept"):
        parse_concepts(text)


def test_a_concept_given_twice_is_refused():
    """Before: accepted, and trained twice per pass (another schedule than asked for)."""
    with pytest.raises(KscuError, match="concept 'circle' given twice in 'circle,circle'"):
        parse_concepts("circle, circle")


def test_concepts_are_split_and_stripped():
    assert parse_concepts("Van Gogh, church") == ["Van Gogh", "church"]


def test_unknown_preset_key_is_refused():
    with pytest.raises(KscuError, match="preset"):
        resolve(EraseConfig(concepts=["x"]), {"learning_rate": 1})


@pytest.mark.parametrize(
    "preset, words",
    [
        ({"lr": "fast"}, "sets lr='fast', not a float"),
        ({"iterations": True}, "sets iterations=True, not a int"),
        ({"modes": [1]}, '"modes" must map mode names to objects'),
        ({"modes": {"class": 3}}, '"modes" must map mode names to objects'),
    ],
)
def test_a_malformed_preset_is_one_line(preset, words):
    """Before: TypeError / AttributeError from inside resolve()."""
    with pytest.raises(KscuError, match=words):
        resolve(EraseConfig(concepts=["x"]), preset)


def test_a_well_typed_preset_is_taken():
    cfg = resolve(EraseConfig(concepts=["x"]), {"lr": 1, "iterations": 9, "scope": "xattn"})
    assert (cfg.lr, cfg.iterations, cfg.scope) == (1, 9, "xattn")


def test_round_trip_through_dict():
    cfg = resolve(EraseConfig(concepts=["x"], mode="style"))
    assert EraseConfig.from_dict(cfg.to_dict()) == cfg


def test_esd_runs_without_augmentation_unless_asked():
    assert resolve(EraseConfig(concepts=["c"], method="esd")).augment is False
    assert resolve(EraseConfig(concepts=["c"], method="esd", augment=True)).augment is True
    assert resolve(EraseConfig(concepts=["c"])).augment is True


def test_loss_space_defaults_to_epsilon_and_is_checked():
    assert resolve(EraseConfig(concepts=["c"])).loss_space == "epsilon"
    with pytest.raises(KscuError, match="loss space"):
        resolve(EraseConfig(concepts=["c"], loss_space="v"))
