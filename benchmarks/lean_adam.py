"""The effect of ``--lean-adam`` (bf16 Adam moments, stochastic rounding) against exact Adam.

Erases the same concept from the bundled tiny world twice from the same weights and seed, and
prints: the share of trainable elements changed, the loss agreement over the iterations, and the
cosine of the total weight change against the exact run. JSON out.

    python benchmarks/lean_adam.py --iterations 100 --json lean_adam.json
"""

from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path

import torch

from kscu.config import EraseConfig
from kscu.models import load_pipeline
from kscu.trainer import erase


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--concept", default="circle")
    p.add_argument("--iterations", type=int, default=100)
    p.add_argument("--lr", type=float, default=2e-5)
    p.add_argument("--json", type=Path, default=Path("lean_adam.json"))
    args = p.parse_args()
    pipe = load_pipeline(None, exact_denoiser=True)
    base = {n: t.detach().clone() for n, t in pipe.unet.named_parameters()}
    runs = {}
    for lean in (False, True):
        run_pipe = copy.deepcopy(pipe)
        cfg = EraseConfig(
            concepts=[args.concept], iterations=args.iterations, lr=args.lr, lean_adam=lean
        )
        runs[lean] = erase(run_pipe, cfg, progress=False)
    exact, lean = runs[False], runs[True]
    d_exact = torch.cat([(t - base[n]).double().flatten() for n, t in exact.tensors.items()])
    d_lean = torch.cat([(lean.tensors[n] - base[n]).double().flatten() for n in exact.tensors])
    le, ll = torch.tensor(exact.losses), torch.tensor(lean.losses)
    out = {
        "iterations": args.iterations,
        "lr": args.lr,
        "changed_share_exact": (d_exact != 0).float().mean().item(),
        "changed_share_lean": (d_lean != 0).float().mean().item(),
        "loss_max_relative_difference": ((le - ll).abs() / le.abs()).max().item(),
        "loss_median_relative_difference": ((le - ll).abs() / le.abs()).median().item(),
        "weight_change_cosine": torch.nn.functional.cosine_similarity(d_exact, d_lean, 0).item(),
        "weight_change_norm_ratio": (d_lean.norm() / d_exact.norm()).item(),
    }
    for k, v in out.items():
        print(f"{k:<34} {v}")
    args.json.write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
