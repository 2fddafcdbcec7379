"""Fixtures of the evaluation tests: tiny random CLIP, classifier and SD pipeline folders."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))


@pytest.fixture(autouse=True)
def _own_caches(monkeypatch):
    """Per-image caches beside each test's images, never in a developer's $KSCU_CACHE."""
    monkeypatch.delenv("KSCU_CACHE", raising=False)


@pytest.fixture(scope="session")
def tiny_classifier(tmp_path_factory) -> Path:
    """A random ResNet image classifier with ImageNet-style labels (stands in for resnet-50)."""
    import torch
    from transformers import ConvNextImageProcessor, ResNetConfig, ResNetForImageClassification

    folder = tmp_path_factory.mktemp("tiny_resnet")
    torch.manual_seed(0)
    labels = {
        0: "tench, Tinca tinca",
        1: "English springer, English springer spaniel",
        2: "church, church building",
        3: "garbage truck, dustcart",
        4: "crane",
        5: "crane",
    }
    config = ResNetConfig(
        embedding_size=8,
        hidden_sizes=[8, 8, 16, 16],
        depths=[1, 1, 1, 1],
        num_labels=len(labels),
        id2label=labels,
        label2id={v: k for k, v in labels.items()},
    )
    ResNetForImageClassification(config).save_pretrained(folder, safe_serialization=True)
    ConvNextImageProcessor(size={"shortest_edge": 40}, crop_pct=0.875).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_sd(tmp_path_factory) -> Path:
    """A random StableDiffusionPipeline folder (32 px images), saved with safetensors."""
    from tiny import build_tiny_pipeline

    folder = tmp_path_factory.mktemp("tiny_sd")
    build_tiny_pipeline(sample_size=16).save_pretrained(folder, safe_serialization=True)
    return folder
