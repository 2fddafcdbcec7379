"""The one configuration object of an erase run.

The CLI, the Python API and the metadata JSON all use ``EraseConfig``. Hyperparameters default to
``None``, meaning "not chosen by the user"; ``resolve`` fills them, in this order: the user's value,
the model's preset (``kscu_preset.json`` shipped in a model folder, e.g. the bundled tiny world),
the mode's row of ``MODE_DEFAULTS``, then ``DEFAULTS``. Those two tables are the only place
defaults live, so the README, the CLI help and kscu.json cannot disagree.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from typing import Any

from kscu.errors import KscuError

# KSCU_METHOD.md section 4: the authors' per-task defaults.
MODE_DEFAULTS: dict[str, dict[str, Any]] = {
    "nudity": {"iterations": 750, "start_step": 14, "scope": "noxattn"},
    "class": {"iterations": 750, "start_step": 14, "scope": "noxattn"},
    "style": {"iterations": 500, "start_step": 24, "scope": "xattn"},
    "instance": {"iterations": 200, "start_step": 40, "scope": "xattn"},
}
# "instance" with several concepts trains longer (the authors' multi-instance setting).
INSTANCE_MULTI_ITERATIONS = 750

# KSCU_METHOD.md sections 2, 3 and 5: shared by every mode.
DEFAULTS: dict[str, Any] = {
    "lr": 1e-5,
    "negative_guidance": 1.0,  # eta in target_erase = n - eta * (p - n)
    "lambda1_alpha": 2e-5,  # lambda1 = (T - t) * alpha, T = num_train_timesteps (1000)
    "lambda2": 1e-4,  # weight of the leakage term
    "trajectory_guidance": 3.0,  # CFG scale of the edited model's own trajectory
    "loops": 8,  # complete runs before the start step moves one later
    "num_steps": 50,  # DDIM inference steps
    "augment_fraction": 0.05,  # prompt augmentation in the last 5% of iterations
    "augment_variants": 10,
    "embedding_noise_std": 1e-5,
    "loss_space": "epsilon",  # "epsilon", or "model": the model's own output space (v for SD 2.x)
    # Not the method: a CPU erase's freed host memory (kscu.allocator), kept for reuse (SD's
    # iterations 1.4x faster) or returned (FLUX's default, in its family's table)
    "reuse_freed_memory": True,
}

METHODS = ("kscu", "esd")
DTYPES = ("float32", "bfloat16", "float16")


# Marks the fields that decide which code paths an erase runs (kernels, library code, the
# optimizer's and allocator's machinery): kscu.memory.pay_first_use warms them up with these.
ENGINE = {"engine": True}


@dataclass
class EraseConfig:
    """Everything that determines an erase run; ``None`` means "use the default"."""

    concepts: list[str]
    mode: str = "class"
    method: str = field(default="kscu", metadata=ENGINE)
    iterations: int | None = None
    start_step: int | str | None = None  # "auto": measured by kscu.analyze (runner)
    end_step: int | None = None  # exclusive; defaults to num_steps
    scope: str | None = None
    lr: float | None = None
    negative_guidance: float | None = None
    lambda1_alpha: float | None = None
    lambda2: float | None = None
    trajectory_guidance: float | None = None
    loops: int | None = None
    num_steps: int | None = None
    augment_fraction: float | None = None
    augment_variants: int | None = None
    embedding_noise_std: float | None = None
    loss_space: str | None = None
    max_sequence_length: int | None = None  # FLUX: T5 tokens of the prompt (512)
    resolution: int | None = None  # None: the model's native size
    seed: int = 0
    dtype: str = field(default="float32", metadata=ENGINE)
    device: str = "auto"
    reuse_trajectory: bool = True
    # step each tensor as its gradient completes (kscu.optim)
    optimizer_in_backward: bool = field(default=True, metadata=ENGINE)
    # diffusers' switch: less activation memory, more time
    gradient_checkpointing: bool = field(default=False, metadata=ENGINE)
    # Adam moments in bf16, stochastically rounded (opt-in, not exact)
    lean_adam: bool = field(default=False, metadata=ENGINE)
    # Adam moments in host memory, on the device per step (exact)
    offload_adam: bool = field(default=False, metadata=ENGINE)
    # float32 on the CPU: torch's native convolution, not oneDNN's
    fast_cpu_conv: bool = field(default=False, metadata=ENGINE)
    # CPU, glibc: freed blocks kept, else returned
    reuse_freed_memory: bool | None = field(default=None, metadata=ENGINE)
    # CPU float32: denoiser calls replayed from records (kscu.tracing)
    trace_denoiser: bool = field(default=True, metadata=ENGINE)
    augment: bool | None = None  # None: on for kscu, off for esd (the original ESD has none)
    family: str | None = None  # None: detected from the model (model_index.json)
    preset: dict[str, Any] = field(default_factory=dict)  # what a model preset applied

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def engine(self) -> dict[str, Any]:
        """The ``ENGINE`` fields' values: which code paths this erase runs."""
        fields = dataclasses.fields(self)
        return {f.name: getattr(self, f.name) for f in fields if f.metadata.get("engine")}

    @classmethod
    def check_keys(cls, data: dict[str, Any]) -> None:
        """Keys that are no erase setting fail in one line naming the known ones, not as a
        TypeError from the dataclass."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise KscuError(f"unknown configuration keys {unknown}; known: {sorted(names)}")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> EraseConfig:
        cls.check_keys(data)
        return cls(**data)


def settings_label(config: dict[str, Any]) -> str:
    """The settings a reader needs to judge a row (bench, report): what was really run.

    E.g. "esd: 750 it, lr 1e-05, scope noxattn, steps 0:50, augment off".
    """
    c = config
    parts = [
        f"{c.get('iterations')} it",
        f"lr {c.get('lr'):g}" if isinstance(c.get("lr"), int | float) else None,
        f"scope {c.get('scope')}",
        f"steps {c.get('start_step')}:{c.get('end_step')}",
        f"augment {'on' if c.get('augment') else 'off'}",
    ]
    return f"{c.get('method', 'kscu')}: " + ", ".join(p for p in parts if p)


def parse_concepts(text: str | list[str]) -> list[str]:
    """Split "A,B,C" into concepts; an empty or blank concept is an error, not a silent skip.

    A list (or tuple) from the Python API must hold strings: ``None`` or ``[1]`` failed as a
    TypeError or AttributeError here, without naming the setting.
    """
    listed = isinstance(text, list | tuple) and all(isinstance(c, str) for c in text)
    if not isinstance(text, str) and not listed:
        raise KscuError(
            f"concepts={text!r} is not a list of strings; give e.g. concepts=['church'] "
            "(or one comma-separated string)"
        )
    items = text.split(",") if isinstance(text, str) else list(text)
    concepts = [c.strip() for c in items]
    if not concepts or any(not c for c in concepts):
        raise KscuError(
            f'empty concept in {text!r}; give --concept "church" or a comma-separated list'
        )
    twice = sorted({c for c in concepts if concepts.count(c) > 1})
    if twice:  # it would be trained twice per pass: another schedule than the one asked for
        raise KscuError(
            f"concept {twice[0]!r} given twice in {','.join(concepts)!r}; give each concept once"
        )
    return concepts


def resolve(
    config: EraseConfig, preset: dict[str, Any] | None = None, family: Any = None
) -> EraseConfig:
    """Fill every ``None`` (user > model preset > mode default > global default) and validate.

    A model family's own table (e.g. FLUX's 28 steps and lr 1e-4) overrides the mode and global
    rows it names, so the defaults of every family are resolved the same way and recorded.
    """
    _check_types(config)  # the steps below compare and hash these values
    if family is None:
        from kscu.families import get_family

        family = get_family(config.family or "sd")
    if config.mode not in MODE_DEFAULTS:
        raise KscuError(f"unknown mode {config.mode!r}; choose one of {', '.join(MODE_DEFAULTS)}")
    if config.start_step == "auto":
        raise KscuError("--start-step auto needs the model: use kscu.runner.erase_to_folder")
    if config.method not in METHODS:
        raise KscuError(f"unknown method {config.method!r}; choose one of {', '.join(METHODS)}")
    concepts = parse_concepts(config.concepts)
    preset = _preset_for_mode(preset or {}, config.mode)
    mode_row = {**MODE_DEFAULTS[config.mode], **family.mode_defaults.get(config.mode, {})}
    if config.mode == "instance" and len(concepts) > 1:
        mode_row["iterations"] = INSTANCE_MULTI_ITERATIONS
    defaults = {**DEFAULTS, **family.defaults}
    values = config.to_dict()
    applied: dict[str, Any] = {}
    for name in [*mode_row, *defaults, "end_step"]:
        if values.get(name) is not None:
            continue
        if name in preset:
            values[name] = applied[name] = preset[name]
        elif name in mode_row:
            values[name] = mode_row[name]
        elif name in defaults:
            values[name] = defaults[name]
    if values["end_step"] is None:
        values["end_step"] = values["num_steps"]
    if config.method == "esd":
        # ESD: no key-step restriction and no leakage term (KSCU_METHOD.md section 3).
        values["start_step"] = 0 if config.start_step is None else config.start_step
        values["lambda2"] = 0.0 if config.lambda2 is None else config.lambda2
    if values["augment"] is None:
        values["augment"] = config.method == "kscu"
    values["family"] = family.name
    values["concepts"] = concepts
    values["preset"] = {**config.preset, **applied}  # resolving twice keeps the record
    out = EraseConfig(**values)
    if config.start_step is None and out.num_steps > 0 and not 0 <= out.start_step < out.num_steps:
        raise KscuError(  # the user changed --num-steps, not the start step the mode picked
            f"{config.mode} mode starts at key step {out.start_step}, outside --num-steps "
            f"{out.num_steps}; pass --start-step below {out.num_steps}"
        )
    _validate(out, family)
    return out


SEED_RANGE = (-(2**63), 2**64 - 1)  # what torch.Generator.manual_seed accepts


def non_negative(value: float) -> bool:
    """A finite number >= 0: what every guidance scale, loss weight and learning rate must be
    (NaN poisons a loss or samples black images; below 0 a guidance steers away from the
    prompt, a target turns toward the concept, a regulariser becomes a reward)."""
    return math.isfinite(value) and value >= 0


def check_seed(seed: int, where: str) -> None:
    """Refuse a prompt row's image seed torch cannot take before any image is made: it would
    fail only at that row's batch, after earlier images (and their folder) were written. The
    seed is the row's evaluation_seed or --seed plus its case number, so a huge case number is
    as much the cause as a huge seed."""
    if not SEED_RANGE[0] <= seed <= SEED_RANGE[1]:
        raise KscuError(
            f"{where} has image seed {seed} (its evaluation_seed, else --seed plus its "
            f"case_number), outside the seeds torch takes [{SEED_RANGE[0]}, {SEED_RANGE[1]}]; "
            "give an evaluation_seed, case_number or --seed that keeps it inside"
        )


def _preset_for_mode(preset: dict[str, Any], mode: str) -> dict[str, Any]:
    """A preset's flat keys apply to every mode; ``{"modes": {"class": {...}}}`` to one mode.

    Keys starting with ``_`` are comments (e.g. ``_why``: the measurements behind the values).
    """
    modes = preset.get("modes", {})
    if not isinstance(modes, dict) or not all(isinstance(v, dict) for v in modes.values()):
        raise KscuError(
            'model preset\'s "modes" must map mode names to objects; fix kscu_preset.json'
        )
    flat = {k: v for k, v in preset.items() if k != "modes" and not k.startswith("_")}
    flat.update(modes.get(mode, {}))
    allowed = set(MODE_DEFAULTS["class"]) | set(DEFAULTS)
    unknown = sorted(set(flat) - allowed)
    if unknown:
        raise KscuError(
            f"model preset has unknown keys {unknown}; fix kscu_preset.json (allowed: "
            f"{sorted(allowed)})"
        )
    for key, value in flat.items():  # the type of the default (None: a number or a string)
        kind = type(DEFAULTS.get(key, MODE_DEFAULTS["class"].get(key)))
        is_kind = _is_whole if kind is int else _is_real if kind is float else None
        ok = is_kind(value) if is_kind else isinstance(value, kind)
        if kind is not type(None) and not ok:
            raise KscuError(
                f"model preset sets {key}={value!r}, not a {kind.__name__}; fix kscu_preset.json"
            )
    return flat


def _is_whole(value: Any) -> bool:
    """A count or an index: an ``int``, not a ``bool`` (Python's True is 1, no user means it) and
    not a float, not even 10.0: ``kscu.schedule`` counts up to ``iterations`` and never reaches
    10.5 (the run looped until memory ran out), and ``range`` refuses floats."""
    return isinstance(value, int) and not isinstance(value, bool)


def _is_real(value: Any) -> bool:
    """A rate or a weight: an ``int`` or a ``float``, not a ``bool``; finiteness and ranges stay
    with each field's own rule in ``_validate``."""
    return isinstance(value, int | float) and not isinstance(value, bool)


# The type of every EraseConfig field. The CLI's argparse converts its flags, but the Python API,
# the metadata JSON and from_dict hand values over as they are. ``concepts`` is checked by
# parse_concepts (it also takes "A,B"), ``start_step`` may also be "auto" (see _check_types).
_FIELD_TYPES: tuple[tuple[tuple[str, ...], Any, str, str], ...] = (
    (
        (
            "iterations",
            "end_step",
            "loops",
            "num_steps",
            "augment_variants",
            "max_sequence_length",
            "resolution",
            "seed",
        ),
        _is_whole,
        "a whole number",
        "an int",
    ),
    (
        (
            "lr",
            "negative_guidance",
            "lambda1_alpha",
            "lambda2",
            "trajectory_guidance",
            "augment_fraction",
            "embedding_noise_std",
        ),
        _is_real,
        "a number",
        "an int or a float",
    ),
    (
        ("mode", "method", "scope", "loss_space", "dtype", "device", "family"),
        lambda v: isinstance(v, str),
        "a string",
        "a str",
    ),
    (
        (
            "reuse_trajectory",
            "optimizer_in_backward",
            "gradient_checkpointing",
            "lean_adam",
            "offload_adam",
            "fast_cpu_conv",
            "reuse_freed_memory",
            "trace_denoiser",
            "augment",
        ),
        lambda v: isinstance(v, bool),
        "True or False",
        "a bool",
    ),
    (("preset",), lambda v: isinstance(v, dict), "a dict", "a dict"),
)


def _check_types(c: EraseConfig) -> None:
    """Refuse a value of the wrong type in one line naming the field, before any comparison:
    ``iterations=10.5`` passed every range check and then looped forever, ``lr="1e-5"`` or
    ``seed=None`` failed as a TypeError deep in resolve or the trainer."""
    fields = {  # each field's default (preset's from its factory: {})
        f.name: f.default if f.default_factory is dataclasses.MISSING else f.default_factory()
        for f in dataclasses.fields(EraseConfig)
    }

    def refuse(name: str, value: Any, noun: str, fix: str) -> None:
        if isinstance(value, float) and value.is_integer() and noun.startswith("a whole"):
            fix = f"the int {int(value)}"
        default = fields[name]
        fix += " (or None for the default)" if default is None else f" (default {default!r})"
        raise KscuError(f"EraseConfig {name}={value!r} is not {noun}; give {fix}")

    parse_concepts(c.concepts)
    for names, is_kind, noun, fix in _FIELD_TYPES:
        for name in names:
            value = getattr(c, name)
            if not is_kind(value) and not (value is None and fields[name] is None):
                refuse(name, value, noun, fix)
    start = c.start_step
    if not (start is None or _is_whole(start) or (isinstance(start, str) and start == "auto")):
        refuse("start_step", start, "a whole number or 'auto'", "an int or 'auto'")


def _validate(c: EraseConfig, family: Any) -> None:
    def need(ok: bool, message: str) -> None:
        if not ok:
            raise KscuError(message)

    _check_types(c)  # again, resolved: a preset's or a family table's values are checked too

    scopes = ("full", *family.scope_rules)
    need(
        c.scope in scopes,
        f"unknown scope {c.scope!r} for {family.name}; choose one of {', '.join(scopes)}",
    )
    need(
        c.loss_space in ("epsilon", "model"),
        f"unknown loss space {c.loss_space!r}; choose epsilon or model",
    )
    need(c.dtype in DTYPES, f"unknown dtype {c.dtype!r}; choose one of {', '.join(DTYPES)}")
    need(
        not c.fast_cpu_conv or c.dtype == "float32",
        f"--fast-cpu-conv is for --dtype float32 (got {c.dtype}: the CPU's bf16/fp16 "
        "convolutions need oneDNN); drop the flag or use --dtype float32",
    )
    need(
        not c.fast_cpu_conv or c.device in ("auto", "cpu"),
        f"--fast-cpu-conv changes CPU convolutions only (got --device {c.device}); "
        "drop the flag or use --device cpu",
    )
    need(
        not c.offload_adam or c.optimizer_in_backward,
        "--offload-adam steps each tensor as its gradient completes; "
        "drop --no-optimizer-in-backward",
    )
    need(
        not c.offload_adam or c.dtype != "float16",
        "--offload-adam cannot run under --dtype float16 (its loss scaler holds every gradient "
        "before any step); use --dtype bfloat16",
    )
    need(
        not (c.offload_adam and c.lean_adam),
        "--offload-adam keeps the exact Adam state in host memory, --lean-adam a rounded one "
        "on the device: choose one",
    )
    need(c.iterations > 0, f"--iterations must be > 0 (got {c.iterations})")
    need(  # iteration i draws its noise with seed + i
        SEED_RANGE[0] <= c.seed and c.seed + c.iterations - 1 <= SEED_RANGE[1],
        f"--seed {c.seed}: the noise seeds seed..seed+iterations-1 must lie in torch's "
        f"[{SEED_RANGE[0]}, {SEED_RANGE[1]}]; give a smaller seed",
    )
    need(
        c.device == "auto" or re.fullmatch(r"cpu|cuda(:\d+)?", c.device) is not None,
        f"unknown device {c.device!r}; use auto, cpu, cuda or cuda:N",
    )
    need(c.num_steps > 0, f"--num-steps must be > 0 (got {c.num_steps})")
    need(
        0 <= c.start_step < c.num_steps,
        f"--start-step {c.start_step} must be in [0, {c.num_steps}) (the number of steps)",
    )
    need(
        c.start_step < c.end_step <= c.num_steps,
        f"--end-step {c.end_step} must be in ({c.start_step}, {c.num_steps}]",
    )
    need(c.loops > 0, f"--loops must be > 0 (got {c.loops})")
    for name in ("lr", "negative_guidance", "lambda1_alpha", "lambda2", "trajectory_guidance"):
        value = getattr(c, name)
        flag = "--" + name.replace("_", "-")
        need(non_negative(value), f"{flag} must be a finite number >= 0 (got {value})")
    limit = family.max_tokens
    need(
        c.max_sequence_length is None or limit is not None,
        f"--max-sequence-length sets FLUX's T5 prompt length; {family.name} has no such "
        "setting: drop it",
    )
    need(
        c.max_sequence_length is None or 0 < c.max_sequence_length <= (limit or 0),
        f"--max-sequence-length must be in [1, {limit}] (got {c.max_sequence_length})",
    )
    need(0 <= c.augment_fraction <= 1, "augment_fraction must be in [0, 1]")
    need(  # the trainer encodes this many prompt variants and picks one per augmented iteration
        c.augment_variants >= 1,
        f"augment_variants must be >= 1 (got {c.augment_variants}); give at least 1 variant",
    )
    need(  # the standard deviation of the noise on the text embedding: NaN poisons the loss
        non_negative(c.embedding_noise_std),
        f"embedding_noise_std must be a finite number >= 0 (got {c.embedding_noise_std}); "
        f"the default is {DEFAULTS['embedding_noise_std']}",
    )
    need(
        c.resolution is None or (c.resolution > 0 and c.resolution % 8 == 0),
        f"--resolution must be a positive multiple of 8 (got {c.resolution})",
    )
