"""Ring-A-Bell: the genetic search, the concept pairs, and a small attack end to end."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from attackkit import run_cli

from kscu.attack import ringabell
from kscu.attack.ringabell import RingABell, concept_pairs, genetic_search
from kscu.attack.settings import AttackSettings
from kscu.attack.targets import stream
from kscu.errors import KscuError
from kscu.models import load_pipeline


def test_genetic_search_finds_a_hidden_sequence():
    target = torch.tensor([3, 1, 4, 1, 5, 9])

    def mismatches(population):
        return (population != target).sum(1).float()

    settings = AttackSettings(length=6, population=60, generations=150)
    found, distance = genetic_search(mismatches, 10, settings, torch.Generator().manual_seed(0))
    assert found == target.tolist() and distance == 0


def test_concept_pairs_differ_by_the_concept_word_only():
    for concept in ("ring", "striped", "red"):
        pairs = concept_pairs(concept, bundled=True, count=12)
        assert len(pairs) == 12
        for with_it, without in pairs:
            words = with_it.lower().replace(",", " ").split()
            assert concept in words
            assert [w for w in words if w != concept] == without.replace(",", " ").split()


@pytest.mark.parametrize("concept", ["c++", "X (film)", "Mr. T."])
def test_a_concept_ending_in_punctuation_is_deleted_too(concept, monkeypatch):
    """Before: ``\\b`` never matched after "+", ")" or ".", so every pair was one prompt twice
    (a zero concept vector: exit 0, a search for nothing)."""
    for with_it, without in concept_pairs(concept, bundled=False):
        assert concept.lower() in with_it.lower() and concept.lower() not in without
    monkeypatch.setattr(ringabell, "GENERIC_TEMPLATES", ("a photo of {}", "a photo"))
    with pytest.raises(KscuError, match=r"could not be deleted from its prompts"):
        concept_pairs("c++", bundled=False)


def nearer_with_more_generations(pipe, concept, prompt, bundled, size, many) -> bool:
    """Ring-A-Bell's search on ``pipe``'s conditioning: does it get nearer its target?"""
    settings = AttackSettings(method="ringabell", generations=1, population=size, length=size // 5)
    attack = RingABell(pipe, concept, settings, bundled=bundled)
    own = attack.family.encode(pipe, [prompt])
    assert set(attack.vector) == set(own)  # every conditioning tensor moves along the concept
    goal = {k: own[k] + settings.eta * attack.vector[k] for k in own}

    def best(generations):
        s = dataclasses.replace(settings, generations=generations)
        return genetic_search(
            lambda p: attack.distance(p, goal), len(attack.vocab.words), s, stream(0, 0)
        )[1]

    return best(many) < best(1)


def test_more_generations_get_nearer_the_target():
    pipe = load_pipeline(None)
    assert nearer_with_more_generations(
        pipe, "heart", "a red heart on a plain background", True, 30, 40
    )


def test_ringabell_attack_end_to_end(tmp_path, capsys, noop_run):
    out = tmp_path / "rab"
    args = ["attack", "--method", "ringabell", "--weights", noop_run, "--concept", "heart"]
    args += ["--output", out, "--samples", "2", "--generations", "5", "--population", "16"]
    args += ["--length", "4", "--steps", "10", "--attack-all", "--quiet"]
    code, stdout, err = run_cli(args, capsys)
    assert code == 0, err
    result = json.loads((out / "attack.json").read_text())
    assert result["method"] == "ringabell" and result["attacked"] == 2
    assert 0 <= result["pre_asr"] <= 1 and 0 <= result["asr"] <= 1
    tok = load_pipeline(None).tokenizer
    for p in result["per_prompt"]:
        assert len(p["token_ids"]) == 4 and p["loss"] >= 0
        ids = tok(p["adversarial_prompt"]).input_ids
        assert ids == [tok.bos_token_id, *p["token_ids"], tok.eos_token_id]
    assert len(result["method_details"]["concept_pairs"]) == 32


@pytest.mark.parametrize("family", ["sdxl", "flux"])
def test_ringabell_searches_through_every_family_s_conditioning(family):
    """SDXL (two CLIP encoders, pooled) and FLUX (T5 + pooled CLIP): the concept vector and the
    search work on the family's own conditioning."""
    from tiny_families import build_tiny_flux_pipeline, build_tiny_sdxl_pipeline

    pipe = {"sdxl": build_tiny_sdxl_pipeline, "flux": build_tiny_flux_pipeline}[family]()
    pipe._kscu_family = family
    assert nearer_with_more_generations(pipe, "church", "a photo of a church", False, 20, 20)
