import dataclasses

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
        # found by review (stop 41): below 0 the regulariser turns into a reward, silently
        ({"lambda1_alpha": -1.0}, r"--lambda1-alpha must be a finite number >= 0 \(got -1.0\)"),
        ({"negative_guidance": -1.0}, "--negative-guidance must be a finite number >= 0"),
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


# Found by review: values from the Python API were not type-checked. iterations=10.5 passed and
# then looped forever in kscu.schedule; the others failed as raw TypeError / AttributeError /
# IndexError, some only in the trainer.
@pytest.mark.parametrize(
    "kwargs, words",
    [
        ({"iterations": 10.5}, r"EraseConfig iterations=10.5 is not a whole number; give an int"),
        ({"iterations": 10.0}, r"iterations=10.0 is not a whole number; give the int 10"),
        ({"iterations": "10"}, r"iterations='10' is not a whole number"),
        ({"iterations": True}, r"iterations=True is not a whole number"),
        ({"concepts": None}, r"concepts=None is not a list of strings; give e\.g\. concepts="),
        ({"concepts": [1]}, r"concepts=\[1\] is not a list of strings"),
        ({"concepts": ["a", None]}, r"concepts=\['a', None\] is not a list of strings"),
        ({"lr": "1e-5"}, r"lr='1e-5' is not a number; give an int or a float"),
        ({"lr": True}, r"lr=True is not a number"),
        ({"seed": None}, r"seed=None is not a whole number; give an int \(default 0\)"),
        ({"seed": 1.0}, r"seed=1.0 is not a whole number; give the int 1"),
        ({"start_step": 2.0}, r"start_step=2.0 is not a whole number or 'auto'; give the int 2"),
        ({"start_step": "14"}, r"start_step='14' is not a whole number or 'auto'"),
        ({"end_step": 40.0}, r"end_step=40.0 is not a whole number"),
        ({"resolution": 16.0}, r"resolution=16.0 is not a whole number; give the int 16"),
        ({"num_steps": "50"}, r"num_steps='50' is not a whole number"),
        ({"loops": 8.5}, r"loops=8.5 is not a whole number"),
        ({"augment_variants": 2.0}, r"augment_variants=2.0 is not a whole number"),
        ({"mode": ["class"]}, r"mode=\['class'\] is not a string; give a str \(default 'class'\)"),
        ({"family": ["sd"]}, r"family=\['sd'\] is not a string"),
        ({"device": 0}, r"device=0 is not a string"),
        ({"lean_adam": 1}, r"lean_adam=1 is not True or False; give a bool \(default False\)"),
        ({"augment": "yes"}, r"augment='yes' is not True or False"),
        ({"preset": None}, r"preset=None is not a dict; give a dict \(default \{\}\)"),
        ({"augment_variants": 0}, r"augment_variants must be >= 1 \(got 0\)"),
        ({"augment_variants": -3}, r"augment_variants must be >= 1 \(got -3\)"),
        ({"embedding_noise_std": float("nan")}, r"embedding_noise_std must be a finite number"),
        ({"embedding_noise_std": -1e-5}, r"embedding_noise_std must be a finite number >= 0"),
    ],
)
def test_python_api_values_of_the_wrong_type_are_one_line(kwargs, words):
    with pytest.raises(KscuError, match=words) as caught:
        resolve(EraseConfig(**{"concepts": ["circle"], **kwargs}))
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize("name", [f.name for f in dataclasses.fields(EraseConfig)])
def test_every_field_is_type_checked(name):
    """No field's type may go unchecked, including fields added later: an ``object()`` is the
    wrong type for every one of them."""
    with pytest.raises(KscuError, match=rf"\b{name}=<object object at"):
        resolve(EraseConfig(**{"concepts": ["x"], name: object()}))


def test_values_of_the_right_type_are_still_taken():
    cfg = resolve(
        EraseConfig(
            concepts=("a", "b"),  # parse_concepts takes a tuple or "a,b" as well as a list
            lr=1,  # an int is a real number
            negative_guidance=2,
            iterations=12,
            seed=-5,
            resolution=64,
            augment_variants=1,
            embedding_noise_std=0,
            reuse_freed_memory=False,
            augment=False,
            family="sd",
            preset={},
        )
    )
    assert (cfg.concepts, cfg.lr, cfg.iterations, cfg.augment_variants) == (["a", "b"], 1, 12, 1)
    assert resolve(EraseConfig(concepts="a, b")).concepts == ["a", "b"]
    with pytest.raises(KscuError, match="--start-step auto needs the model"):
        resolve(EraseConfig(concepts=["x"], start_step="auto"))  # "auto" is no type error


def test_a_preset_float_for_a_whole_number_is_refused():
    """Before: accepted (only int-or-float was asked of it), then looped like iterations=10.5."""
    with pytest.raises(KscuError, match=r"sets iterations=9.5, not a int; fix kscu_preset.json"):
        resolve(EraseConfig(concepts=["x"]), {"iterations": 9.5})
