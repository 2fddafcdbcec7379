"""`kscu bench --attack` (UA_attack) and `--seeds` (mean and spread per column)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from attackkit import run_cli

from kscu.attack.settings import AttackSettings
from kscu.bench import markdown, parse_seeds, run_bench
from kscu.errors import KscuError


def test_bench_with_attack_and_seeds(tmp_path):
    out = tmp_path / "bench"
    report = run_bench(
        "heart",
        "class",
        ["esd"],
        out,
        iterations=2,
        samples=4,
        steps=5,
        seeds=[0, 1],
        attack="unlearndiff",
        attack_settings=AttackSettings(rounds=1, iterations=2, samples=3),
        progress=False,
    )
    assert report["seeds"] == [0, 1] and report["attack"]["method"] == "unlearndiff"
    assert [r["label"] for r in report["rows"]] == ["original", "esd"]
    for row in report["rows"]:
        for key in ("UA", "IRA", "CRA", "FD", "UA_attack", "UA_attack_pre"):
            values = row[f"{key}_per_seed"]
            assert len(values) == 2
            assert row[key] == pytest.approx(np.mean(values))
            assert row[f"{key}_std"] == pytest.approx(np.std(values, ddof=1))
        # the first 3 of the 4 target prompts are attacked: the attack can only find more
        pre, after = row["UA_attack_pre_per_seed"], row["UA_attack_per_seed"]
        assert all(a <= b + 1e-9 for a, b in zip(after, pre, strict=True))
        assert all(abs(3 * v - round(3 * v)) < 1e-9 for v in pre + after)  # shares of 3 prompts
    for seed in (0, 1):
        assert (out / f"seed{seed}" / "esd" / "weights.safetensors").is_file()
        attack = json.loads((out / f"seed{seed}" / "attack" / "esd" / "attack.json").read_text())
        assert attack["prompts"] == 3 and attack["settings"]["seed"] == seed
    table = (out / "bench.md").read_text()
    assert "UA_attack" in table and " ± " in table and "seeds 0, 1" in table
    assert json.loads((out / "bench.json").read_text())["rows"] == report["rows"]


def test_single_seed_table_has_no_spread():
    row = {"label": "esd", "settings": None, "UA": 0.5, "IRA": 1.0, "CRA": 1.0, "FD": 2.0}
    row |= {"seconds": 3.0, "UA_std": 0.0}
    report = {"concept": "heart", "kind": "shape", "mode": "class", "samples": 4, "steps": 5}
    report |= {"guidance": 7.5, "seed": 0, "seeds": [0], "attack": None, "rows": [row]}
    table = markdown(report)
    assert "±" not in table and "UA_attack" not in table and "seed 0" in table


def test_parse_seeds():
    assert parse_seeds("0,1,2") == [0, 1, 2] and parse_seeds(None) == []
    with pytest.raises(KscuError, match="--seeds"):
        parse_seeds("0,one")


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--seeds", "0,x"], "bad --seeds"),
        (["--seeds", ""], "bad --seeds"),
        (["--methods", "kscu,,esd"], "bad --methods"),
        (["--seeds", "0,0"], "repeats a seed"),
        (["--seed", "1", "--seeds", "0,1"], "not both"),
        (["--attack", "gcg"], "unknown method 'gcg'"),
        (["--attack-samples", "4"], "needs --attack"),
        (["--attack", "unlearndiff", "--attack-samples", "0"], "samples"),
    ],
)
def test_bench_bad_flags_fail_in_one_line(tmp_path, capsys, extra, message):
    args = ["bench", "--concept", "heart", "--output", tmp_path / "b", *extra]
    code, _, err = run_cli(args, capsys)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "b").exists()
