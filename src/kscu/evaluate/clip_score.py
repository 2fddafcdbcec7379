"""CLIP score: how well each image matches the prompt it was generated from.

Protocol (the torchmetrics/Hessel et al. definition the papers use): for each image and its own
prompt, ``100 * max(cos(image_embedding, text_embedding), 0)`` with a transformers CLIP model
(default ``openai/clip-vit-large-patch14``; any Hub id or local folder of a ``CLIPModel`` with
its processor), prompts truncated to the model's context (77 tokens); the score is the mean over
images. Images pair with prompt rows through their file name ``{case_number}.png``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from kscu.evaluate.cache import ImageCache, cached_map
from kscu.evaluate.common import (
    Workers,
    cache_counts,
    check_batch_size,
    list_images,
    load_rgb,
    match_rows,
    model_identity,
    versions,
)
from kscu.fileio import is_number
from kscu.models import load_or_explain
from kscu.promptfile import load_prompts
from kscu.protocol import DEFAULT_CLIP

DEFINITION = "mean over images of 100 * max(cos(image, own prompt), 0)"


def load_clip(model_id: str):
    """A CLIPModel and its processor from a Hub id or folder (safetensors only, no remote code)."""
    from transformers import CLIPModel, CLIPProcessor

    model, processor = load_or_explain(
        lambda: (
            CLIPModel.from_pretrained(model_id, use_safetensors=True, trust_remote_code=False),
            CLIPProcessor.from_pretrained(model_id, trust_remote_code=False),
        ),
        f"CLIP model {model_id!r}",
        "offline? give a local folder holding a CLIPModel (model.safetensors, config.json) "
        "and its processor files",
    )
    return model.eval().requires_grad_(False), processor


@torch.no_grad()
def clip_scores(model, processor, images, prompts: list[str], device) -> np.ndarray:
    """Per-pair CLIP scores for PIL images and their prompts."""
    max_len = model.config.text_config.max_position_embeddings
    text = processor.tokenizer(
        prompts, padding="max_length", truncation=True, max_length=max_len, return_tensors="pt"
    )
    pixels = processor.image_processor(images=images, return_tensors="pt")["pixel_values"]
    img = model.get_image_features(pixel_values=pixels.to(device, model.dtype))
    txt = model.get_text_features(
        input_ids=text["input_ids"].to(device), attention_mask=text["attention_mask"].to(device)
    )
    img = _tensor(img)
    txt = _tensor(txt)
    cos = torch.nn.functional.cosine_similarity(img.float(), txt.float(), dim=-1)
    return (100 * cos.clamp(min=0)).cpu().numpy()


def _tensor(out):
    # transformers 5 may return a model output object instead of a bare tensor
    if isinstance(out, torch.Tensor):
        return out
    return out.pooler_output if getattr(out, "pooler_output", None) is not None else out[0]


def evaluate_clip(
    images: str | Path,
    prompts: str | Path,
    model_id: str = DEFAULT_CLIP,
    batch_size: int = 16,
    use_cache: bool = True,
) -> dict:
    """Mean CLIP score of a folder of images against the prompts they were made from."""
    check_batch_size(batch_size)
    files = list_images(images)
    rows = load_prompts(prompts)
    pairs = match_rows(files, {r.case_number: r for r in rows}, str(prompts))
    workers = Workers()
    lib = versions("transformers")
    protocol = {"model": model_identity(model_id), "definition": DEFINITION, **lib}
    cache = ImageCache(images, "clip", protocol, valid=is_number)

    def score(share: list[tuple[Path, str]]) -> list[float]:
        if not share:
            return []
        model, processor = load_clip(model_id)
        model = model.to(workers.device)
        out: list[float] = []
        for start in tqdm(
            range(0, len(share), batch_size), desc="clip", disable=not workers.is_main
        ):
            batch = share[start : start + batch_size]
            images_ = [load_rgb(p) for p, _ in batch]
            texts = [text for _, text in batch]
            out += [float(s) for s in clip_scores(model, processor, images_, texts, workers.device)]
        return out

    items = [(p, r.prompt) for p, r in pairs]
    scores, computed = cached_map(items, score, cache if use_cache else None, workers)
    values = np.array(scores)
    return {
        "metric": "clip",
        "clip_score": float(values.mean()),
        "clip_score_std": float(values.std()),
        "images": len(files),
        "prompt_rows_without_image": len(rows) - len(files),
        "model": model_id,
        "definition": DEFINITION,
        "images_dir": str(Path(images).resolve()),
        "prompts": str(prompts),
        **cache_counts(computed, len(files)),
        "versions": lib,
        "per_image": {p.name: round(v, 4) for p, v in zip(files, scores, strict=True)},
    }
