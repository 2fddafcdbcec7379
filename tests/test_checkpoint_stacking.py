"""load_erased onto a pipeline that already holds another run (kscu.checkpoint.loaded_runs).

Before: a run of another scope passed the base check (its fingerprint covers only its own
tensors, which the first run left alone) and was stacked silently on the first.
"""

import copy
import re

import pytest
import torch

from kscu import checkpoint
from kscu.checkpoint import load_erased
from kscu.config import EraseConfig
from kscu.errors import KscuError
from kscu.runner import erase_to_folder

SMALL = dict(lr=1e-3, iterations=2, num_steps=4, start_step=1)


@pytest.fixture(scope="module")
def runs(_tiny_template, tmp_path_factory):
    """Two erases of the same base: "class" edits all but cross-attention, "style" only it."""
    folder = tmp_path_factory.mktemp("stacking")
    made = {}
    for mode, concept, scope in (("class", "church", "noxattn"), ("style", "van gogh", "xattn")):
        cfg = EraseConfig(concepts=[concept], mode=mode, scope=scope, **SMALL)
        _, pipe = erase_to_folder(cfg, "tiny", folder / mode, False, copy.deepcopy(_tiny_template))
        made[mode] = (folder / mode, _weights(pipe))
    return made


def _weights(pipe) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in pipe.unet.named_parameters()}


def _same(pipe, weights: dict[str, torch.Tensor]) -> bool:
    return all(torch.equal(p, weights[n]) for n, p in pipe.unet.named_parameters())


def _held(pipe) -> list[str]:
    return [r["run"] for r in checkpoint.loaded_runs(pipe.unet)]


def _stacking(held: str, run) -> str:
    return (
        f"this unet already holds {held}, and {run} replaces only its own "
        "tensors, so both edits would apply; load the base model fresh before loading another "
        "run, or pass --force / force=True to stack them"
    )


def test_a_run_of_another_scope_is_refused_in_one_line_and_nothing_is_written(runs, tiny_pipe):
    (run_a, after_a), (run_b, _) = runs["class"], runs["style"]
    load_erased(tiny_pipe, run_a)
    assert _same(tiny_pipe, after_a)
    with pytest.raises(KscuError) as e:
        load_erased(tiny_pipe, run_b)
    assert str(e.value) == _stacking(run_a, run_b)
    assert _same(tiny_pipe, after_a)  # refused before any copy
    assert _held(tiny_pipe) == [str(run_a)]


def test_either_order_and_a_copy_of_the_pipeline_are_refused(runs, tiny_pipe):
    (run_a, _), (run_b, _) = runs["class"], runs["style"]
    load_erased(tiny_pipe, run_b)
    clone = copy.deepcopy(tiny_pipe)  # the record goes with the weights
    for pipe in (tiny_pipe, clone):
        with pytest.raises(KscuError, match="already holds .* both edits would apply"):
            load_erased(pipe, run_a)


def test_force_stacks_both_edits_and_records_both(runs, tiny_pipe):
    (run_a, after_a), (run_b, after_b) = runs["class"], runs["style"]
    load_erased(tiny_pipe, run_a)
    load_erased(tiny_pipe, run_b, force=True)
    params = dict(tiny_pipe.unet.named_parameters())
    stacked = [n for n in params if not torch.equal(after_a[n], after_b[n])]
    assert stacked  # each run's own tensors, from both
    assert all(
        torch.equal(params[n], after_a[n]) or torch.equal(params[n], after_b[n]) for n in stacked
    )
    assert not _same(tiny_pipe, after_a) and not _same(tiny_pipe, after_b)
    assert _held(tiny_pipe) == [str(run_a), str(run_b)]
    load_erased(tiny_pipe, run_b, force=True)  # the same run again: recorded once
    assert _held(tiny_pipe) == [str(run_a), str(run_b)]


def test_the_same_run_again_is_refused_naming_what_the_pipeline_holds(runs, tiny_pipe):
    run_a, _ = runs["class"]
    load_erased(tiny_pipe, run_a)
    with pytest.raises(KscuError, match=re.escape(f"or an earlier load_erased: it holds {run_a})")):
        load_erased(tiny_pipe, run_a)


def test_a_pipeline_converted_to_bf16_after_loading_still_holds_the_run(runs, tiny_pipe):
    (run_a, _), (run_b, _) = runs["class"], runs["style"]
    load_erased(tiny_pipe, run_a)
    tiny_pipe.unet.to(torch.bfloat16)
    with pytest.raises(KscuError, match="already holds"):
        load_erased(tiny_pipe, run_b)


def test_restoring_the_base_weights_lets_another_run_load(runs, tiny_pipe):
    """The bench's way: load_state_dict of the original between runs, on one pipeline (worked
    before too: what is refused is what the weights hold, not what was once loaded)."""
    (run_a, _), (run_b, after_b) = runs["class"], runs["style"]
    original = copy.deepcopy(tiny_pipe.unet.state_dict())
    load_erased(tiny_pipe, run_a)
    tiny_pipe.unet.load_state_dict(original)  # the record of run_a stays, its values do not
    load_erased(tiny_pipe, run_b)
    assert _same(tiny_pipe, after_b)


def test_a_run_loaded_onto_an_erase_made_in_place_is_refused(runs, tiny_pipe):
    """``erase(pipe)`` edits the pipeline in place; a run of another scope loaded onto the
    result stacked silently (the base check sees only that run's tensors, which the erase left
    alone). The erase now records what it made, as load_erased does."""
    from kscu.trainer import erase

    run_b, _ = runs["style"]
    erase(tiny_pipe, EraseConfig(concepts=["church"], scope="noxattn", **SMALL), progress=False)
    with pytest.raises(KscuError) as e:
        load_erased(tiny_pipe, run_b)
    assert str(e.value) == _stacking("an erase of 'church' made in place", run_b)
    load_erased(tiny_pipe, run_b, force=True)  # on purpose: allowed
