"""Object-erasure test: top-1 accuracy of an ImageNet classifier on the class each prompt names.

Protocol (ESD and followers): prompts "an image of a {class}" for the Imagenette classes, one or
more images each; a pretrained ImageNet ResNet-50 classifies every image; an image counts as
correct when the top-1 label is the class its row names. Reported per class (the erased class
should drop to ~0, the others should stay) and overall. The default model is the transformers
ImageNet ResNet-50 ``microsoft/resnet-50`` (any Hub id or folder of an image classifier with
its image processor works). The papers used torchvision's ResNet-50 weights, so absolute numbers
can differ by a point or two; the comparison between models with one classifier is what counts.

The prompt CSV needs a ``class`` column: a label name matched against the model's label list
(``church`` matches "church, church building"; case-insensitive, any comma-separated synonym),
or an integer ImageNet class index.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from kscu.errors import KscuError
from kscu.evaluate.cache import ImageCache, cached_map
from kscu.evaluate.common import (
    Workers,
    cache_counts,
    check_batch_size,
    list_images,
    load_rgb,
    match_rows,
    model_identity,
    read_csv_records,
    versions,
)
from kscu.models import load_or_explain
from kscu.promptfile import load_prompts, whole_number
from kscu.protocol import DEFAULT_CLASSIFIER


def load_classifier(model_id: str):
    """An image classifier and its processor (safetensors only, no remote code)."""
    from transformers import AutoImageProcessor, AutoModelForImageClassification

    (model, info), processor = load_or_explain(
        lambda: (
            AutoModelForImageClassification.from_pretrained(
                model_id, use_safetensors=True, trust_remote_code=False, output_loading_info=True
            ),
            AutoImageProcessor.from_pretrained(model_id, trust_remote_code=False),
        ),
        f"classifier {model_id!r}",
        "offline? give a local folder holding the model (model.safetensors, config.json) and "
        "its preprocessor_config.json",
    )
    body = model.base_model_prefix + "."
    head = [k for k in info["missing_keys"] if not k.startswith(body)]
    if head:  # transformers would score with a freshly initialised head
        raise KscuError(
            f"{model_id!r} is not an image classifier: its weights lack its classification "
            f"head ({len(head)} tensors, e.g. {sorted(head)[0]!r}); give an image-classification "
            "model such as "
            f"{DEFAULT_CLASSIFIER!r}"
        )
    return model.eval().requires_grad_(False), processor


def class_index(name: str, id2label: dict[int, str], source: str) -> int:
    """Resolve a class name (or an index) to the model's label index."""
    name = name.strip()
    idx = whole_number(name)
    if idx is not None:
        if idx not in id2label:
            raise KscuError(f"{source}: class index {idx} is not one of the model's labels")
        return idx

    def plain(text: str) -> str:
        return text.strip().lower().replace("_", " ")

    want = plain(name)
    hits = [i for i, label in id2label.items() if plain(str(label)) == want]  # the whole label
    hits = hits or [
        i for i, label in id2label.items() if want in [plain(s) for s in str(label).split(",")]
    ]
    if len(hits) == 1:
        return hits[0]
    if not hits:
        raise KscuError(
            f"{source}: class {name!r} is not a label of the classifier; use its label name "
            "(e.g. 'church', 'garbage truck') or its integer class index"
        )
    raise KscuError(
        f"{source}: class {name!r} names several labels ({hits}); use the integer class index"
    )


def evaluate_classify(
    images: str | Path,
    prompts: str | Path,
    model_id: str = DEFAULT_CLASSIFIER,
    batch_size: int = 32,
    use_cache: bool = True,
) -> dict:
    """Top-1 accuracy, overall and per class, of the classes the prompt file names."""
    check_batch_size(batch_size)
    files = list_images(images)
    records = read_csv_records(prompts, ["class"])
    rows = load_prompts(prompts)  # same file, same order: gives the case numbers
    class_of = {row.case_number: rec["class"] for row, rec in zip(rows, records, strict=True)}
    pairs = match_rows(files, class_of, str(prompts))
    model, processor = load_classifier(model_id)
    id2label = {int(k): v for k, v in model.config.id2label.items()}
    targets = {n: class_index(n, id2label, str(prompts)) for n in sorted(set(class_of.values()))}

    workers = Workers()
    lib = versions("transformers")
    protocol = {"model": model_identity(model_id), **lib}
    cache = ImageCache(
        images, "classify", protocol, valid=lambda i: type(i) is int and i in id2label
    )

    def predict(share: list[tuple[Path, str]]) -> list[int]:
        model.to(workers.device)
        out: list[int] = []
        for start in tqdm(
            range(0, len(share), batch_size), desc="classify", disable=not workers.is_main
        ):
            batch = [load_rgb(p) for p, _ in share[start : start + batch_size]]
            x = processor(images=batch, return_tensors="pt")["pixel_values"]
            with torch.no_grad():
                logits = model(pixel_values=x.to(workers.device, model.dtype)).logits
            out += logits.argmax(-1).tolist()
        return out

    labels, computed = cached_map(
        [(p, "") for p, _ in pairs], predict, cache if use_cache else None, workers
    )
    predicted = {p.name: label for (p, _), label in zip(pairs, labels, strict=True)}

    per_class: dict[str, dict] = {}
    correct_all = []
    for path, cls in pairs:
        ok = predicted[path.name] == targets[cls]
        correct_all.append(ok)
        entry = per_class.setdefault(cls, {"images": 0, "correct": 0})
        entry["images"] += 1
        entry["correct"] += int(ok)
    for entry in per_class.values():
        entry["top1"] = entry["correct"] / entry["images"]
    return {
        "metric": "classify",
        "top1": float(np.mean(correct_all)),
        "images": len(files),
        "per_class": {c: per_class[c]["top1"] for c in sorted(per_class)},
        "per_class_counts": {c: per_class[c] for c in sorted(per_class)},
        "class_index": targets,
        "model": model_id,
        "images_dir": str(Path(images).resolve()),
        "prompts": str(prompts),
        **cache_counts(computed, len(files)),
        "versions": lib,
        "per_image": {p.name: id2label[predicted[p.name]] for p, _ in pairs},
    }
