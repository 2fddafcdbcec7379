"""UnlearnDiffAtk in the tiny world: the sanity check (the original model is found), a harsh
erase resisting more, real adversarial prompts, attack.json, resume."""

from __future__ import annotations

import json
import shutil

import torch
from attackkit import SMALL, run_cli

from kscu.attack.unlearndiff import encode_with_slots, frozen, timestep_schedule
from kscu.attack.vocab import WordVocab
from kscu.families import family_of
from kscu.families.sd import _token_ids
from kscu.models import load_pipeline


def _result(folder) -> dict:
    return json.loads((folder / "attack.json").read_text())


def test_slots_go_through_the_text_encoders_own_forward_pass():
    pipe = load_pipeline(None)
    prompts = ["a red heart on a striped background", "star"]
    ids = _token_ids(pipe.tokenizer, prompts)
    own = pipe.text_encoder.get_input_embeddings()(ids[:, 1:4]).detach()
    expected = family_of(pipe).encode(pipe, prompts)["encoder_hidden_states"]
    assert torch.equal(encode_with_slots(pipe.text_encoder, ids, own), expected)

    slots = own.clone().requires_grad_(True)
    with frozen(pipe.text_encoder):
        out = encode_with_slots(pipe.text_encoder, ids, slots.flip(0))  # other tokens in
        out.square().sum().backward()
    assert not torch.allclose(out, expected)
    assert slots.grad.abs().sum() > 0  # the gradient reaches the slots ...
    assert all(p.grad is None for p in pipe.text_encoder.parameters())  # ... and nothing else
    assert all(p.requires_grad for p in pipe.text_encoder.parameters())  # flags restored


def test_rounds_visit_the_timestep_grid_from_low_noise_to_high():
    assert timestep_schedule(50) == list(range(49, -1, -1))  # every DDIM timestep, t = 1 first
    ten = timestep_schedule(10)
    assert ten == sorted(set(ten), reverse=True) and ten[0] == 47 and ten[-1] == 2


def test_attack_finds_the_concept_in_the_original_model(original_attack):
    """Sanity: against weights equal to the original, the concept is there to be found."""
    result = _result(original_attack)
    assert result["attacked"] == result["prompts"] == 6  # --attack-all: every prompt attacked
    assert result["asr"] >= 5 / 6
    for p in result["per_prompt"]:
        assert p["adversarial_prompt"].endswith(p["prompt"]) and len(p["token_ids"]) == 5
        assert 1 <= p["round"] <= 2 and p["loss"] > 0


def test_a_harshly_erased_model_resists_more(original_attack, harsh_attack):
    original, harsh = _result(original_attack), _result(harsh_attack)
    assert harsh["pre_asr"] < original["pre_asr"]
    assert harsh["asr"] < original["asr"]
    assert harsh["asr"] >= harsh["pre_asr"]  # a prompt found before the attack counts as found
    attacked = [p for p in harsh["per_prompt"] if p["attacked"]]
    assert len(attacked) == harsh["prompts"] - harsh["pre_found"]
    assert all(not p["pre_found"] for p in attacked)


def test_adversarial_prompts_are_real_words_that_tokenize_back(original_attack):
    pipe = load_pipeline(None)
    tok, vocab = pipe.tokenizer, WordVocab(pipe.tokenizer)
    for p in _result(original_attack)["per_prompt"]:
        ids = tok(p["adversarial_prompt"]).input_ids
        assert ids == [tok.bos_token_id, *p["token_ids"], *tok(p["prompt"]).input_ids[1:]]
        words = p["adversarial_prompt"].split()[:5]
        assert [tok.decode([i]) for i in p["token_ids"]] == words
        assert set(p["token_ids"]) <= set(vocab.token_ids.tolist())


def test_attack_json_and_images(harsh_attack):
    result = _result(harsh_attack)
    assert {"asr", "pre_asr", "per_prompt", "settings", "versions", "judge", "method"} <= set(
        result
    )
    assert result["method"] == "unlearndiff" and result["judge"]["name"] == "world"
    assert result["settings"]["tokens"] == 5 and result["settings"]["rounds"] == 2
    assert result["asr"] == sum(p["found"] for p in result["per_prompt"]) / 6
    assert result["pre_asr"] == sum(p["pre_found"] for p in result["per_prompt"]) / 6
    keys = {"prompt", "seed", "adversarial_prompt", "token_ids", "found", "pre_found", "verdict"}
    for p in result["per_prompt"]:
        assert keys <= set(p)
        i = p["index"]
        for name in (f"{i}.png", f"{i}-pre.png"):
            assert (harsh_attack / "images" / name).is_file()
        assert (harsh_attack / "images" / f"{i}-target.png").is_file() == p["attacked"]


def test_resume_skips_done_prompts_and_refuses_other_settings(
    tmp_path, capsys, harsh_run, harsh_attack
):
    folder = tmp_path / "attack"
    shutil.copytree(harsh_attack, folder)
    (folder / "records" / "2.json").unlink()
    kept = {p: p.stat().st_mtime_ns for p in (folder / "records").iterdir()}
    args = ["attack", "--weights", harsh_run, "--concept", "heart", "--output", folder, *SMALL]
    code, out, err = run_cli(args, capsys)
    assert code == 0, err
    assert {p: p.stat().st_mtime_ns for p in kept} == kept  # done prompts are not redone
    redone = json.loads((folder / "records" / "2.json").read_text())
    before = _result(harsh_attack)["per_prompt"][2]
    for key in ("prompt", "pre_found", "found", "adversarial_prompt", "token_ids", "round"):
        assert redone[key] == before[key]  # its own random streams: alone = in a batch of 6
    assert _result(folder)["prompts"] == 6

    code, _, err = run_cli([*args, "--iterations", "9"], capsys)
    assert code == 2 and "settings.iterations" in err and len(err.strip().splitlines()) == 1
    code, _, err = run_cli([*args, "--iterations", "1", "--rounds", "1", "--overwrite"], capsys)
    assert code == 0, err
    assert _result(folder)["settings"]["iterations"] == 1
