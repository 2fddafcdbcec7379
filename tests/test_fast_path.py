"""kscu.trainer (batched calls, no module copies) against the plain, independent reference loop.

benchmarks/plain_erase.py shares nothing with the package but the resolved config: its own key
step table, DDIM walk, loss and augmentation choice, written from KSCU_METHOD.md.
"""

import copy
import sys
from pathlib import Path

import pytest
import torch

from kscu.config import EraseConfig, resolve
from kscu.prompts import augmented_prompts
from kscu.trainer import erase

sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))

from plain_erase import plain_erase  # noqa: E402


@pytest.mark.parametrize(
    "scope,method,native_conv",
    [
        ("noxattn", "kscu", False),
        ("xattn", "kscu", False),
        ("noxattn", "esd", False),
        ("noxattn", "kscu", True),  # --fast-cpu-conv against the plain loop's oneDNN kernels
    ],
)
def test_fast_path_matches_the_plain_loop(tiny_pipe, scope, method, native_conv):
    cfg = resolve(
        EraseConfig(
            fast_cpu_conv=native_conv,
            concepts=["church", "cat"],
            method=method,
            scope=scope,
            lr=1e-3,
            iterations=40,  # the last 2 iterations are augmented (kscu)
            num_steps=10,
            start_step=4 if method == "kscu" else None,
            loops=2,
            seed=3,
        )
    )
    variants = {
        c: augmented_prompts(c, cfg.mode, cfg.augment_variants, cfg.seed) for c in cfg.concepts
    }
    plain_pipe = copy.deepcopy(tiny_pipe)
    base = {n: p.detach().clone() for n, p in tiny_pipe.unet.named_parameters()}

    plain_seen, fast_seen = [], []
    plain = plain_erase(
        plain_pipe, cfg, variants, callback=lambda i, e, x, loss: plain_seen.append((e, loss))
    )
    fast = erase(
        tiny_pipe, cfg, progress=False, callback=lambda i, e, x, loss: fast_seen.append((e, loss))
    )

    assert [e for e, _ in fast_seen] == [e for e, _ in plain_seen]  # same schedule
    a = torch.tensor([loss for _, loss in fast_seen])
    b = torch.tensor([loss for _, loss in plain_seen])
    assert torch.allclose(a, b, rtol=1e-3, atol=1e-8), (a - b).abs().max()
    assert set(fast.tensors) == set(plain)
    delta_fast = torch.cat([(fast.tensors[n] - base[n]).flatten() for n in plain])
    delta_plain = torch.cat([(plain[n] - base[n]).flatten() for n in plain])
    assert delta_plain.abs().max() > 1e-3  # the weights did move
    rel = (delta_fast - delta_plain).norm() / delta_plain.norm()
    assert rel < 1e-3, rel
