"""Cost of a KSCU erase on a model with exactly SD v1.4's architecture (random weights).

The cost of an erase does not depend on the weights' values, so this builds SD v1.4's UNet
(320/640/1280/1280, 2 layers per block, cross-attention 768, 8 heads), a CLIP ViT-L/14 text
encoder, SD's VAE and DDIM config from code, runs ``kscu.erase`` on it and prints:

- ms per iteration (median and p90 after warm-up), seconds per full erase (extrapolated from the
  median, and measured when --iterations is the mode's full count);
- peak memory (GPU: max allocated; CPU: max RSS);
- the share of trainable elements that changed (bf16 storage would lose most lr=1e-5 steps);
- with --compare-fp32: a float32-compute run from the same seed: median relative loss difference
  over the first 100 iterations and cosine similarity of the two runs' total weight change;
- FLOPs of one steady-state iteration (torch.utils.flop_counter) and the implied utilization
  of the GPU's dense bf16 peak.

Writes everything to --output (JSON). Example (GPU):
    python benchmarks/sd14_erase.py --mode class --iterations 200 --dtype bfloat16 --compare-fp32
On a CPU, use a small --resolution (e.g. 64) and a few iterations: it checks the script runs.
"""

from __future__ import annotations

import argparse
import functools
import json
import resource
import statistics
import tempfile
import time
from pathlib import Path

import torch
from machine import cpu_model

from kscu.config import EraseConfig, resolve
from kscu.scope import trainable_names
from kscu.trainer import erase

# Dense bf16 tensor-core peaks from the vendor datasheets (FLOP/s), for the utilization figure.
BF16_PEAK = {"H100": 989.4e12, "H200": 989.4e12, "A100": 312e12}


def build_sd14(device: torch.device, dtype: torch.dtype):
    """A StableDiffusionPipeline with SD v1.4's exact architecture and random weights."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from kscu.models import assemble_pipeline, sd_ddim_scheduler
    from kscu.world.tokenizer import save_tokenizer_files

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=64,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        block_out_channels=(320, 640, 1280, 1280),
        layers_per_block=2,
        cross_attention_dim=768,
        attention_head_dim=8,
    )
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=49408,
            hidden_size=768,
            intermediate_size=3072,
            num_hidden_layers=12,
            num_attention_heads=12,
            max_position_embeddings=77,
            hidden_act="quick_gelu",
        )
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(128, 256, 512, 512),
        layers_per_block=2,
        latent_channels=4,
        sample_size=512,
    )
    with tempfile.TemporaryDirectory() as folder:
        save_tokenizer_files(Path(folder))
        tokenizer = CLIPTokenizer.from_pretrained(folder, model_max_length=77)
    pipe = assemble_pipeline(unet, vae, text_encoder, tokenizer, sd_ddim_scheduler())
    return pipe.to(device=device, dtype=dtype)


def peak_memory_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def timed_erase(pipe, cfg: EraseConfig, device: torch.device, loop=None):
    """Run an erase, returning the result and a host timestamp after every iteration."""
    loop = loop or functools.partial(erase, progress=False)
    stamps: list[float] = []

    def tick(*_):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        stamps.append(time.perf_counter())

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    result = loop(pipe, cfg, callback=tick)
    return result, [start, *stamps], time.perf_counter() - start


def median_p90(stamps: list[float], warmup: int) -> tuple[float, float]:
    """Median and p90 of the per-iteration times (ms), leaving out the warm-up iterations."""
    per_iter = [1e3 * (b - a) for a, b in zip(stamps[:-1], stamps[1:], strict=True)]
    steady = per_iter[warmup:] or per_iter
    p90 = statistics.quantiles(steady, n=10)[-1] if len(steady) >= 10 else max(steady)
    return statistics.median(steady), p90


def steady_state_flops(pipe, cfg: EraseConfig) -> int:
    """FLOPs of one iteration that advances the trajectory by one step (the common case)."""
    from torch.utils.flop_counter import FlopCounterMode

    def count(iterations: int) -> int:
        one = resolve(EraseConfig(**{**cfg.to_dict(), "iterations": iterations, "start_step": 0}))
        snapshot = {n: p.detach().clone() for n, p in pipe.unet.named_parameters()}
        with FlopCounterMode(display=False) as counter:
            erase(pipe, one, progress=False)
        with torch.no_grad():
            for n, p in pipe.unet.named_parameters():
                p.copy_(snapshot[n])
        return counter.get_total_flops()

    return count(2) - count(1)


def changed_share(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> float:
    changed = sum(int((after[n] != before[n]).sum()) for n in before)
    return changed / sum(t.numel() for t in before.values())


def cosine(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], base) -> float:
    dot = sum(float(((a[n] - base[n]) * (b[n] - base[n])).double().sum()) for n in base)
    na = sum(float(((a[n] - base[n]).double() ** 2).sum()) for n in base) ** 0.5
    nb = sum(float(((b[n] - base[n]).double() ** 2).sum()) for n in base) ** 0.5
    return dot / (na * nb) if na and nb else float("nan")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--mode", default="class")
    ap.add_argument("--iterations", type=int, default=100)
    ap.add_argument("--warmup", type=int, default=10, help="iterations left out of the timings")
    ap.add_argument("--dtype", default="bfloat16", help="compute dtype of the measured run")
    ap.add_argument("--compare-fp32", action="store_true")
    ap.add_argument("--compare-plain", action="store_true", help="also time plain_erase.py")
    ap.add_argument("--resolution", type=int, default=512)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--no-flops", action="store_true")
    ap.add_argument("--output", type=Path, default=Path("benchmarks/results/sd14_erase.json"))
    args = ap.parse_args()

    from kscu.models import TORCH_DTYPES, resolve_device

    device = resolve_device(args.device)
    cfg = resolve(
        EraseConfig(
            concepts=["church"],
            mode=args.mode,
            iterations=args.iterations,
            dtype=args.dtype,
            resolution=args.resolution,
        )
    )
    pipe = build_sd14(device, TORCH_DTYPES[args.dtype])
    names = trainable_names(pipe.unet, cfg.scope)
    params = dict(pipe.unet.named_parameters())
    base = {n: params[n].detach().float().cpu() for n in names}

    result, stamps, total = timed_erase(pipe, cfg, device)
    median, p90 = median_p90(stamps, args.warmup)
    full = resolve(EraseConfig(concepts=["church"], mode=args.mode)).iterations
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_model()
    report = {
        "device": name or device.type,
        "mode": args.mode,
        "scope": cfg.scope,
        "dtype": args.dtype,
        "resolution": args.resolution,
        "iterations": args.iterations,
        "trainable_elements": sum(t.numel() for t in base.values()),
        "ms_per_iteration_median": round(median, 2),
        "ms_per_iteration_p90": round(p90, 2),
        "seconds_per_erase_extrapolated": round(median * full / 1e3, 1),
        "seconds_measured": round(total, 1),
        "full_erase_iterations": full,
        "peak_memory_gib": round(peak_memory_gib(device), 2),
        "changed_element_share": changed_share(base, result.tensors),
        "torch_version": torch.__version__,
    }
    if args.compare_fp32:
        pipe = build_sd14(device, torch.float32)
        ref_cfg = resolve(EraseConfig(**{**cfg.to_dict(), "dtype": "float32"}))
        ref, _, _ = timed_erase(pipe, ref_cfg, device)
        k = min(100, len(ref.losses))
        rel = [abs(a - b) / abs(b) for a, b in zip(result.losses[:k], ref.losses[:k], strict=True)]
        report["fp32_loss_median_rel_diff_first_100"] = statistics.median(rel)
        report["fp32_weight_change_cosine"] = cosine(result.tensors, ref.tensors, base)
        report["fp32_changed_element_share"] = changed_share(base, ref.tensors)
    if args.compare_plain:  # the straightforward loop, float32, same seed and schedule
        from plain_erase import plain_erase

        pipe = build_sd14(device, torch.float32)
        plain_cfg = resolve(EraseConfig(**{**cfg.to_dict(), "dtype": "float32"}))
        _, plain_stamps, _ = timed_erase(pipe, plain_cfg, device, loop=plain_erase)
        plain_median, _ = median_p90(plain_stamps, args.warmup)
        report["plain_fp32_ms_per_iteration_median"] = round(plain_median, 2)
        report["plain_fp32_peak_memory_gib"] = round(peak_memory_gib(device), 2)
        report["speedup_vs_plain_fp32"] = round(plain_median / median, 2)
    if not args.no_flops:
        flops = steady_state_flops(pipe, cfg)
        report["flops_per_iteration"] = flops
        report["achieved_tflops"] = round(flops / (median / 1e3) / 1e12, 2)
        peak = next((v for k, v in BF16_PEAK.items() if k in report["device"]), None)
        if peak:
            report["bf16_peak_utilization"] = round(flops / (median / 1e3) / peak, 4)

    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2) + "\n")
    width = max(len(k) for k in report)
    for key, value in report.items():
        print(f"{key:<{width}}  {value}")
    print(f"-> {args.output}")


if __name__ == "__main__":
    main()
