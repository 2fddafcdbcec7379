import pytest
from torch import nn

from kscu.errors import KscuError
from kscu.scope import trainable_names


def test_scopes_partition_as_described(tiny_pipe):
    unet = tiny_pipe.unet
    x = trainable_names(unet, "xattn")
    nox = trainable_names(unet, "noxattn")
    selfa = trainable_names(unet, "selfattn")
    full = trainable_names(unet, "full")
    assert x and all(".attn2." in n for n in x)
    assert all(".attn2." not in n for n in nox)
    assert selfa and all(".attn1." in n for n in selfa)
    assert set(x).isdisjoint(nox) and set(selfa) <= set(nox)
    assert len(full) == len(list(unet.parameters()))
    # noxattn: every Linear/Conv2d weight and bias, no norms
    norms = {n for n, m in unet.named_modules() if isinstance(m, (nn.GroupNorm, nn.LayerNorm))}
    assert norms and not any(name.rsplit(".", 1)[0] in norms for name in nox)
    assert "conv_in.weight" in nox and "time_embedding.linear_1.weight" in nox


def test_unknown_scope(tiny_pipe):
    with pytest.raises(KscuError, match="unknown scope"):
        trainable_names(tiny_pipe.unet, "mlp")
