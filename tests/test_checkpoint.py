import copy
import json
from dataclasses import replace

import pytest
import torch
from safetensors.torch import load_file, save_file

from kscu.checkpoint import WEIGHTS, check_output, load_erased, read_metadata, save_erased
from kscu.config import EraseConfig
from kscu.errors import KscuError
from kscu.runner import erase_to_folder


def unet_out(pipe):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 4, 8, 8, generator=g)
    emb = torch.randn(1, 16, 16, generator=g)
    with torch.no_grad():
        return pipe.unet(x, 500, emb).sample


@pytest.fixture
def erased(tiny_pipe, tmp_path):
    base = copy.deepcopy(tiny_pipe)
    cfg = EraseConfig(concepts=["church"], lr=1e-3, iterations=6, num_steps=8, start_step=2)
    erase_to_folder(cfg, "tiny", tmp_path / "run", progress=False, pipe=tiny_pipe)
    return base, tiny_pipe, tmp_path / "run"


def test_save_then_load_reproduces_outputs_bit_for_bit(erased):
    base, edited, run = erased
    assert not torch.equal(unet_out(base), unet_out(edited))
    meta = load_erased(base, run)
    assert torch.equal(unet_out(base), unet_out(edited))
    assert meta["config"]["concepts"] == ["church"]


def test_plain_diffusers_loads_the_weights_as_load_erased_does(erased):
    """The README's loading without kscu: the denoiser's own load_state_dict, nothing else."""
    base, edited, run = erased
    result = base.unet.load_state_dict(load_file(str(run / WEIGHTS)), strict=False)
    assert result.unexpected_keys == []  # every tensor found its place
    assert torch.equal(unet_out(base), unet_out(edited))


def test_checkpoint_holds_only_edited_tensors_under_unet_names(erased):
    _, edited, run = erased
    tensors = load_file(str(run / WEIGHTS))
    params = dict(edited.unet.named_parameters())
    assert set(tensors) < set(params)
    assert all(".attn2." not in k for k in tensors)  # class mode = noxattn
    meta = read_metadata(run)
    for key in (
        "config",
        "base_model",
        "torch_version",
        "diffusers_version",
        "schedule",
        "losses",
        "final_loss",
        "seconds",
    ):
        assert key in meta
    assert len(meta["losses"]) == 6 and meta["final_loss"] == meta["losses"][-1]
    assert meta["schedule"][:2] == [["church", 2], ["church", 3]]


def test_another_base_model_is_refused_unless_forced(erased):
    from tiny import build_tiny_pipeline

    _, _, run = erased
    other = build_tiny_pipeline(seed=1)
    with pytest.raises(KscuError, match="another base|differ from"):
        load_erased(other, run)
    load_erased(other, run, force=True)


def test_wrong_keys_or_shapes_are_refused_even_with_force(erased, tmp_path):
    base, _, run = erased
    tensors = load_file(str(run / WEIGHTS))
    name = next(iter(tensors))
    bad_key = dict(tensors, **{"down_blocks.9.nothing.weight": torch.zeros(1)})
    save_erased(tmp_path / "k", bad_key, read_metadata(run))
    with pytest.raises(KscuError, match="lacks"):
        load_erased(copy.deepcopy(base), tmp_path / "k", force=True)
    bad_shape = dict(tensors, **{name: torch.zeros(3, 3)})
    save_file(bad_shape, str(tmp_path / "k" / WEIGHTS))
    with pytest.raises(KscuError, match="shape"):
        load_erased(copy.deepcopy(base), tmp_path / "k", force=True)


def test_missing_files_are_clear(tmp_path, tiny_pipe):
    with pytest.raises(KscuError, match="missing"):
        load_erased(tiny_pipe, tmp_path)


@pytest.mark.parametrize(
    "damage, words",
    [
        (lambda run: (run / "kscu.json").write_text("[]"), "does not hold a JSON object"),
        (lambda run: (run / "kscu.json").write_bytes(b"\x89PNG\x00\xff"), "cannot read"),
        (lambda run: _drop_key(run, "base_fingerprint"), "names no base_fingerprint"),
        (lambda run: save_erased(run, {}, read_metadata(run)), "holds no tensors"),
    ],
)
def test_a_damaged_or_foreign_run_is_one_line(damage, words, erased):
    """Before: a list or binary kscu.json raised AttributeError / UnicodeDecodeError, and a
    kscu.json without a fingerprint (another tool's JSON) or weights without tensors loaded
    silently, the base model unchecked."""
    base, _, run = erased
    damage(run)
    with pytest.raises(KscuError, match=words) as e:
        load_erased(base, run)
    assert "\n" not in str(e.value)


def test_the_weights_file_instead_of_its_folder(erased):
    base, _, run = erased
    with pytest.raises(KscuError, match="is a file; give the folder"):
        load_erased(base, run / WEIGHTS)


def _drop_key(run, key):
    meta = read_metadata(run)
    del meta[key]
    (run / "kscu.json").write_text(json.dumps(meta))


def test_bf16_erase_of_a_float32_checkpoint_is_exact_and_recorded(tiny_model_dir, tmp_path):
    """kscu erase --dtype bfloat16 on a float32 checkpoint: the saved tensors are base + update
    with no bf16 rounding of the base; kscu.json states family, timesteps and loss space; the
    fingerprint check is exact (a base one float32 ulp away is refused)."""
    from safetensors.torch import load_file

    from kscu.checkpoint import load_erased
    from kscu.models import load_pipeline

    out = tmp_path / "bf16"
    cfg = EraseConfig(
        concepts=["church"], dtype="bfloat16", iterations=3, num_steps=10, start_step=3, lr=1e-5
    )
    erase_to_folder(cfg, str(tiny_model_dir), out, progress=False)
    meta = json.loads((out / "kscu.json").read_text())
    assert meta["family"] == "sd" and meta["loss_space"] == "epsilon"
    assert meta["timesteps"] == [901 - 100 * s for s in range(10)]
    saved = load_file(str(out / "weights.safetensors"))
    base = load_pipeline(str(tiny_model_dir))
    params = dict(base.unet.named_parameters())
    rounded_base = sum(
        (t == params[n].detach().bfloat16().float()).sum().item() for n, t in saved.items()
    )
    sub_ulp = sum(
        ((t != params[n]) & (t.bfloat16().float() == params[n].detach().bfloat16().float()))
        .sum()
        .item()
        for n, t in saved.items()
    )
    assert sub_ulp > 0  # changes a bf16 base could not hold
    assert rounded_base < 0.01 * sum(t.numel() for t in saved.values())
    load_erased(base, out)  # the exact base: accepted
    load_erased(load_pipeline(str(tiny_model_dir), dtype="bfloat16"), out)  # same base, bf16
    other = load_pipeline(str(tiny_model_dir))
    name = next(iter(meta["base_fingerprint"]))
    with torch.no_grad():
        p = dict(other.unet.named_parameters())[name].view(-1)
        p[0] = torch.nextafter(p[0], torch.tensor(1.0))
    with pytest.raises(KscuError, match="differ"):
        load_erased(other, out)


def test_check_output_keeps_erase_messages_and_takes_another_commands_markers(tmp_path):
    """Erase's words stay as they were; analyze and world train name their own result."""
    folder = tmp_path / "out"
    analysis = dict(markers=("analyze.json",), what="analysis", how="--overwrite")
    assert check_output(folder) is False and check_output(folder, **analysis) is False
    folder.mkdir()
    assert check_output(folder, True) is False  # empty: nothing to replace
    (folder / "analyze.json").write_text("{}")
    with pytest.raises(KscuError) as e:
        check_output(folder, True)
    assert str(e.value) == (
        f"--output {folder} is not empty and holds no kscu run; give a new or empty folder"
    )
    with pytest.raises(KscuError) as e:
        check_output(folder, **analysis)
    assert str(e.value) == (
        f"--output {folder} already holds an analysis; give a new folder, or pass --overwrite "
        "to replace it (the old analysis stays until the new one is complete)"
    )
    assert check_output(folder, True, **analysis) is True
    (folder / WEIGHTS).write_text("x")
    with pytest.raises(KscuError) as e:
        check_output(folder)
    assert str(e.value) == (
        f"--output {folder} already holds a run; give a new folder, or pass --overwrite / "
        "overwrite=True to replace it (the old run stays until the new one is complete)"
    )
    assert check_output(folder, True) is True


@pytest.mark.parametrize("output", [".", ".."])
def test_check_output_refuses_the_current_folder(tmp_path, monkeypatch, output):
    """Before, an erase into an empty current folder trained and then failed with a ValueError
    traceback when moving its run into place ("PosixPath('.') has an empty name")."""
    (tmp_path / "here").mkdir()
    monkeypatch.chdir(tmp_path / "here")
    with pytest.raises(KscuError, match="is the current folder or holds it"):
        check_output(output)
    check_output("runs/x")  # below it: fine


def test_load_erased_into_a_compiled_denoiser(erased):
    """Before: refused, "tensors this unet lacks (e.g. _orig_mod. ...)": torch.compile's names."""
    base, edited, run = erased
    base.unet = torch.compile(base.unet, backend="eager")
    load_erased(base, run)
    assert torch.equal(unet_out(base), unet_out(edited))


def test_load_erased_refuses_a_denoiser_holding_lora_adapters(erased):
    """Before: the same refusal as another architecture's, or (fused) a silent partial load."""
    base, _, run = erased
    base.unet.peft_config = {"style": "LoraConfig(r=4)"}  # as diffusers' peft integration sets
    with pytest.raises(KscuError, match=r"the unet holds LoRA adapters \(style\); fuse them"):
        load_erased(base, run)


def test_a_run_from_a_base_held_in_bf16_loads_into_the_same_base_in_float32(tiny_pipe, tmp_path):
    """Before: refused as another base model (its fingerprint held bf16 values, compared to
    the float32 ones to the bit); the README promises any pipeline of the same base model."""
    base32 = copy.deepcopy(tiny_pipe)
    tiny_pipe.unet.to(torch.bfloat16)
    cfg = EraseConfig(concepts=["church"], lr=1e-3, iterations=4, num_steps=8, start_step=2)
    erase_to_folder(replace(cfg, dtype="bfloat16"), "tiny", tmp_path / "run", False, tiny_pipe)
    load_erased(base32, tmp_path / "run")
    assert base32.unet.conv_in.weight.dtype == torch.float32
    other = copy.deepcopy(base32)  # already edited: still refused, and the message says why
    with pytest.raises(KscuError, match="as held now .another model, or one already edited"):
        load_erased(other, tmp_path / "run")


def test_load_erased_into_a_model_offloaded_denoiser(erased):
    """Model offload keeps the weights where they sit between calls: copying values in works
    (an erase, which makes its state there, is refused: tests/test_trainer.py)."""
    from accelerate.hooks import CpuOffload, add_hook_to_module

    base, edited, run = erased
    add_hook_to_module(base.unet, CpuOffload(execution_device="cuda:0"))  # a GPU machine's
    load_erased(base, run)
    mine, theirs = dict(base.unet.named_parameters()), dict(edited.unet.named_parameters())
    assert all(torch.equal(mine[n], theirs[n]) for n in theirs)  # no forward: no GPU here
