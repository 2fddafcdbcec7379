"""kscu.families.base: what every family shares."""

from types import SimpleNamespace

import pytest
import torch

from kscu.families import FAMILIES
from kscu.families.base import offload_modules


@pytest.mark.parametrize(
    "family, names",
    [
        ("sd", {"text_encoder", "vae"}),
        ("sdxl", {"text_encoder", "text_encoder_2", "vae"}),
        ("flux", {"text_encoder", "text_encoder_2", "vae"}),
    ],
)
def test_every_family_moves_encoders_and_vae_off_the_accelerator(family, names):
    """The plan leaves them out of the accelerator's peak (kscu.memory): they must really go."""
    moved_to = []
    modules = {
        n: SimpleNamespace(device=torch.device("meta"), to=moved_to.append)
        for n in ("text_encoder", "text_encoder_2", "vae")
    }
    assert set(FAMILIES[family].encoder_modules) == names
    pipe = SimpleNamespace(**modules)
    moved = offload_modules(
        pipe, SimpleNamespace(device=torch.device("meta")), FAMILIES[family].encoder_modules
    )
    assert set(moved) == names and moved_to == ["cpu"] * len(names)
    on_cpu = SimpleNamespace(device=torch.device("cpu"))
    assert offload_modules(pipe, on_cpu, FAMILIES[family].encoder_modules) == {}


@pytest.mark.parametrize("variant", ["sd", "sdxl", "flux"])
def test_a_resolution_far_past_the_native_size_is_refused_before_any_tensor(
    variant, tiny_pipe, sdxl_pipe, flux_pipe
):
    """Before: ``--resolution 1000000`` asked torch for 4 TB (a traceback from its allocator)
    and left generate's record behind; 4096 on the 32 px world ran for minutes."""
    from kscu.errors import KscuError
    from kscu.families import family_of

    pipe = {"sd": tiny_pipe, "sdxl": sdxl_pipe, "flux": flux_pipe}[variant]
    family = family_of(pipe)
    native = family.native_resolution(pipe)
    assert family.sampler(pipe, 4, 4 * native, "epsilon").resolution == 4 * native
    with pytest.raises(KscuError, match=rf"--resolution 1000000 is over 4x .* {native} px"):
        family.sampler(pipe, 4, 1_000_000, "epsilon")


def test_a_sample_size_given_as_height_and_width_has_a_native_resolution():
    """diffusers allows [h, w]: the resolution limit read it with int() (a TypeError)."""
    from kscu.families.sd import SDFamily

    pipe = SimpleNamespace(unet=SimpleNamespace(config=SimpleNamespace(sample_size=[8, 16])))
    pipe.vae_scale_factor = 8
    assert SDFamily().native_resolution(pipe) == 128
