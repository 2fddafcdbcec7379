"""Quality and speed of the bundled tiny world model.

Prints the classifier-judged accuracy of the prompted shape/color/texture on images generated
from held-out caption templates (fixed seeds, 50 DDIM steps, guidance 7.5), and the time to
generate 64 images in one batch; writes both as JSON.

    python benchmarks/world_quality.py --output world_quality.json [--n-images 240]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch
from machine import machine


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="pipeline folder (default: bundled world)")
    parser.add_argument("--n-images", type=int, default=240)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--guidance", type=float, default=7.5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--output", default="world_quality.json")
    args = parser.parse_args(argv)

    from diffusers import StableDiffusionPipeline

    from kscu.world import default_model_path
    from kscu.world.quality import score_pipeline, time_generation

    torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    model = args.model or str(default_model_path())
    pipe = StableDiffusionPipeline.from_pretrained(model, use_safetensors=True)
    pipe.set_progress_bar_config(disable=True)

    seconds_64 = time_generation(pipe, 64, args.steps, args.guidance)
    print(f"64 images x {args.steps} steps (CFG {args.guidance}): {seconds_64:.1f} s", flush=True)
    start = time.perf_counter()
    quality = score_pipeline(pipe, args.n_images, args.seed, args.steps, args.guidance)
    print(
        f"held-out prompts, {args.n_images} images: shape {quality['shape']:.3f} "
        f"color {quality['color']:.3f} texture {quality['texture']:.3f} "
        f"({time.perf_counter() - start:.0f} s)"
    )
    print("per shape: " + " ".join(f"{k} {v:.2f}" for k, v in quality["per_shape"].items()))
    result = {
        "model": model,
        "quality": quality,
        "seconds_64_images": round(seconds_64, 2),
        "steps": args.steps,
        "guidance": args.guidance,
        "threads": args.threads,
        "torch": torch.__version__,
        **machine(),
        "python": sys.version.split()[0],
    }
    with open(args.output, "w") as f:
        json.dump(result, f, indent=2)
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
