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
