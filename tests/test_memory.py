"""kscu.memory: the plan counts what the erase holds; the run records plan and measured peak."""

import json

import pytest
import torch
import torch.utils.checkpoint

import kscu.memory
import kscu.preview
from kscu.cli import main
from kscu.config import EraseConfig, resolve
from kscu.families import FAMILIES
from kscu.memory import (
    FIRST_USE_PAID,
    START_AFTER_LOAD,
    START_BEFORE_LOAD,
    pay_first_use,
    peak_memory,
    plan,
    resident,
)
from kscu.preview import world_prompts


def test_plan_counts_the_components(tiny_model_dir, monkeypatch):
    import kscu.optim
    from kscu.scope import trainable_names

    sd = FAMILIES["sd"]
    cfg = resolve(EraseConfig(concepts=["church"], dtype="bfloat16"), family=sd)
    p = plan(str(tiny_model_dir), cfg, sd)
    n = p["trainable_elements"]
    assert p["bytes"]["adam"] == 8 * n and p["bytes"]["frozen"] == 2 * n
    assert p["bytes"]["masters"] == 0  # the float32 checkpoint's tensors are the masters
    assert p["bytes"]["activations"] > 0
    # optimizer-in-backward: the largest tensor's gradient at a time, plus the small tensors'
    # that are stepped together after the backward (kscu.optim.SMALL_TENSOR)
    unet = tiny_unet(tiny_model_dir)
    params = dict(unet.named_parameters())
    sizes = sorted(params[name].numel() for name in trainable_names(unet, cfg.scope, sd))
    for small in (0, sizes[len(sizes) // 2], sizes[-1]):
        monkeypatch.setattr(kscu.optim, "SMALL_TENSOR", small)
        expected = max([k for k in sizes if k > small], default=0)
        expected += sum(k for k in sizes if k <= small)
        assert plan(str(tiny_model_dir), cfg, sd)["bytes"]["gradients"] == 4 * expected
    held = resolve(EraseConfig(concepts=["church"], optimizer_in_backward=False), family=sd)
    assert plan(str(tiny_model_dir), held, sd)["bytes"]["gradients"] == 4 * n


def test_a_checkpoint_in_the_compute_dtype_is_its_own_frozen_copy(tiny_pipe, tmp_path):
    """bf16 weights with bf16 compute (FLUX.1's case): the loaded tensors are the frozen copy,
    counted in weights, and the masters are 4 new bytes each (kscu.trainer._frozen)."""
    tiny_pipe.unet.to(torch.bfloat16)
    tiny_pipe.save_pretrained(tmp_path / "bf16", safe_serialization=True)
    sd = FAMILIES["sd"]
    cfg = resolve(EraseConfig(concepts=["church"], dtype="bfloat16"), family=sd)
    p = plan(str(tmp_path / "bf16"), cfg, sd)
    n = p["trainable_elements"]
    assert p["bytes"]["masters"] == 4 * n and p["bytes"]["frozen"] == 0
    assert p["bytes"]["restore_copy"] == 0  # the loaded tensors restore the pipeline exactly


def test_cli_plan_prints_and_erases_nothing(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "run"
    args = ["erase", "--concept", "church", "--model", str(tiny_model_dir), "--output", str(out)]
    assert main([*args, "--plan"]) == 0
    text = capsys.readouterr().out
    assert "trainable elements" in text and "activations" in text and "expected peak" in text
    assert not out.exists()


def test_cli_plan_checks_the_output_it_is_given(tiny_model_dir, tmp_path, capsys):
    """Before: the plan ignored --output, then the erase it planned was refused for it."""
    out = tmp_path / "run"
    out.mkdir()
    (out / "kscu.json").write_text("{}")
    args = ["erase", "--concept", "church", "--model", str(tiny_model_dir), "--output", str(out)]
    assert main([*args, "--plan"]) == 2
    captured = capsys.readouterr()
    assert "--overwrite" in captured.err and captured.out == ""
    assert main([*args, "--plan", "--overwrite"]) == 0  # and nothing is replaced
    assert "expected peak" in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == ["kscu.json"]


def test_cli_plan_needs_no_output_folder(tiny_model_dir, capsys):
    """A plan writes nothing, so it needs no --output; an erase without one is refused."""
    args = ["erase", "--concept", "church", "--model", str(tiny_model_dir)]
    assert main([*args, "--plan"]) == 0
    assert "expected peak" in capsys.readouterr().out
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "--output" in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("replayed", [True, False])
def test_cli_plan_says_what_it_leaves_out(tiny_model_dir, tmp_path, capsys, replayed):
    """On a CPU in float32 the denoiser's calls are replayed from recorded graphs: the printed
    plan counts them, computed from its operations, and says so; without replay, neither."""
    args = ["erase", "--concept", "church", "--model", str(tiny_model_dir), "--plan"]
    args += ["--output", str(tmp_path / "run"), "--device", "cpu", "--dtype", "float32"]
    assert main(args if replayed else [*args, "--no-trace-denoiser"]) == 0
    text = capsys.readouterr().out
    assert "not counted:" in text and "library code" in text
    assert ("replay_records" in text) == replayed
    assert ("kB per operation" in text) == replayed


def test_plan_counts_the_replay_records_by_operations(tiny_model_dir):
    """The records grow with the network's operations, not its weights: the plan computes them
    from the operations its meta trace runs, only where calls are replayed (CPU, float32)."""
    from kscu.memory import RECORD_BYTES_PER_OPERATION

    sd = FAMILIES["sd"]

    def planned(**kw):
        cfg = resolve(EraseConfig(concepts=["church"], device="cpu", **kw), family=sd)
        return plan(str(tiny_model_dir), cfg, sd)["bytes"]

    records = planned(dtype="float32")["replay_records"]
    assert records > 0 and records % RECORD_BYTES_PER_OPERATION == 0
    one_row = planned(dtype="float32", lambda2=0.0)["replay_records"]  # ESD's edited call
    assert abs(one_row - records) < 0.02 * records  # the same network: nearly the same graph
    assert "replay_records" not in planned(dtype="float32", trace_denoiser=False)
    assert "replay_records" not in planned(dtype="bfloat16")  # not replayed: autocast
    assert "replay_records" not in planned(dtype="float32", gradient_checkpointing=True)


def test_cli_plan_that_fails_is_one_line(tiny_model_dir, tmp_path, capsys, monkeypatch):
    """A plan that cannot be made (an unreadable config) is an error, not a traceback."""

    def unreadable(*args, **kwargs):
        raise OSError("vae/config.json: unreadable")

    monkeypatch.setattr(kscu.memory, "plan", unreadable)
    args = ["erase", "--concept", "church", "--model", str(tiny_model_dir), "--plan"]
    assert main([*args, "--output", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert "no plan for" in err and "unreadable" in err and len(err.strip().splitlines()) == 1


def test_run_records_plan_and_measured_peak(tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    args = ["erase", "--concept", "church", "--model", str(tiny_model_dir), "--output", str(out)]
    assert (
        main([*args, "--iterations", "2", "--num-steps", "4", "--start-step", "1", "--quiet"]) == 0
    )
    meta = json.loads((out / "kscu.json").read_text())
    assert meta["memory_plan"]["trainable_elements"] == meta["trainable_elements"]
    assert meta["peak_memory_kind"] == "cpu_peak_rss_growth"
    assert isinstance(meta["peak_memory_bytes"], int) and meta["peak_memory_bytes"] >= 0
    assert meta["peak_memory_start_bytes"] > 0
    assert isinstance(meta["peak_memory_file_backed_bytes"], int)  # library code, in the peak
    # counted from before the load: the plan's whole total is the figure for that span
    assert meta["peak_memory_start"] == START_BEFORE_LOAD
    first_use = meta["peak_memory_first_use"]  # once per process: maybe by an earlier test
    assert first_use == FIRST_USE_PAID or first_use.startswith("not paid ("), first_use
    assert meta["peak_memory_planned_bytes"] == meta["memory_plan"]["total_bytes"]
    steps = meta["iteration_seconds"]  # the benchmarks' per-iteration speed comes from here
    assert len(steps) == 2 and all(v > 0 for v in steps)
    assert sum(steps) <= meta["seconds"]
    assert meta["convolution"] == "torch default"


def test_cpu_peak_growth_sees_an_allocation():
    with peak_memory(torch.device("cpu")) as peak:
        block = torch.ones(64 * 2**20 // 4)  # 64 MiB, touched
        del block
    assert peak["bytes"] >= 60 * 2**20, peak


def test_cpu_growth_from_before_the_load_counts_what_was_loaded():
    """``kscu erase`` reads the start before its model loads: the weights are in the growth, as
    the plan counts them. Before: the start was read after the load, so a checkpoint the load
    read into memory was missing from the measurement the plan is held against."""
    since = resident(START_BEFORE_LOAD)
    weights = torch.ones(64 * 2**20 // 4)  # "the load": 64 MiB, touched, alive through the span
    with peak_memory(torch.device("cpu"), since) as peak:
        pass
    assert peak["bytes"] >= 60 * 2**20 and peak["start"] == START_BEFORE_LOAD, peak
    with peak_memory(torch.device("cpu")) as after:  # a pipeline passed in loaded
        pass
    assert after["bytes"] < 16 * 2**20 and after["start"] == START_AFTER_LOAD, after
    assert weights.numel()


def test_the_first_use_payment_runs_once_and_changes_no_result(tiny_pipe, monkeypatch):
    """The 2-iteration world erase (and 2-step preview sample) that pays torch's first-use
    setup before a process's first CPU measurement runs on its own pipeline: an erase after it
    gives the same weights, bit for bit, as one before it; it runs once per process and says
    what it did."""
    import copy

    import kscu.trainer
    from kscu.trainer import erase

    cfg = EraseConfig(concepts=["church"], iterations=3, num_steps=6, start_step=2, device="cpu")
    before = erase(copy.deepcopy(tiny_pipe), cfg, progress=False).tensors
    calls = []
    real = kscu.trainer.erase
    monkeypatch.setattr(kscu.memory, "_FIRST_USE", {"state": None})
    monkeypatch.setattr("kscu.trainer.erase", lambda *a, **k: calls.append(a) or real(*a, **k))
    sampled, sample = [], kscu.preview.sample
    monkeypatch.setattr(
        kscu.preview, "sample", lambda *a, **k: sampled.append(a) or sample(*a, **k)
    )
    assert pay_first_use(cfg) == FIRST_USE_PAID
    assert pay_first_use(cfg) == FIRST_USE_PAID
    assert len(calls) == 1 and calls[0][0] is not tiny_pipe
    # the preview's batch shapes too (what kscu erase samples inside its measured span)
    assert [(a[0], a[1]) for a in sampled] == [(calls[0][0], world_prompts("circle"))]
    after = erase(tiny_pipe, cfg, progress=False).tensors
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_the_first_use_payment_never_costs_the_users_erase(monkeypatch):
    """Found by review: called inside a notebook's ``torch.inference_mode()`` it failed the
    user's erase (the world loaded as inference tensors); it turned diffusers' and transformers'
    progress bars off for the process. A failure (here: no bundled world) is skipped and named."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    from kscu.errors import KscuError

    monkeypatch.setattr(kscu.memory, "_FIRST_USE", {"state": None})
    diffusers_logging.enable_progress_bar()
    transformers_logging.enable_progress_bar()
    with torch.inference_mode():
        assert pay_first_use() == FIRST_USE_PAID
    assert diffusers_logging.is_progress_bar_enabled()
    assert transformers_logging.is_progress_bar_enabled()

    def no_world():
        raise KscuError("no bundled default model in this install")

    monkeypatch.setattr(kscu.memory, "_FIRST_USE", {"state": None})
    monkeypatch.setattr(kscu.preview, "sample", lambda *a, **k: no_world())
    assert pay_first_use() == (  # the erase's part was paid: said so
        f"{FIRST_USE_PAID}; its preview sample not "
        "(KscuError: no bundled default model in this install)"
    )

    monkeypatch.setattr(kscu.memory, "_FIRST_USE", {"state": None})
    monkeypatch.setattr("kscu.models.default_model", no_world)
    assert pay_first_use() == "not paid (KscuError: no bundled default model in this install)"


def test_cpu_peak_growth_counts_blocks_freed_before_the_start():
    """A preview's freed tensors stay in glibc's heap; an erase reusing them would not grow the
    resident set, so the measured peak would miss those bytes of its own."""
    pairs = [(torch.ones(2**14), torch.ones(1)) for _ in range(2048)]  # 64 KiB blocks, on the heap
    keepers = [small for _, small in pairs]  # live between the big blocks: freed, those stay apart
    del pairs
    with peak_memory(torch.device("cpu")) as peak:
        again = [torch.ones(2**14) for _ in range(2048)]  # 128 MiB in the freed blocks
        del again
    assert peak["bytes"] >= 100 * 2**20, peak
    assert len(keepers) == 2048


def test_plan_follows_gradient_checkpointing_and_counts_the_restore_copy(tiny_model_dir):
    """Checkpointed calls keep their inputs and recompute the inside: fewer saved bytes, but
    more than the inputs alone; a bf16 erase of a float32 checkpoint keeps an exact copy."""
    sd = FAMILIES["sd"]

    def planned(**kw):
        cfg = resolve(EraseConfig(concepts=["church"], device="cpu", **kw), family=sd)
        return plan(str(tiny_model_dir), cfg, sd)

    plain, ckpt = planned(dtype="bfloat16"), planned(dtype="bfloat16", gradient_checkpointing=True)
    assert 0 < ckpt["bytes"]["activations"] < plain["bytes"]["activations"]
    n = plain["trainable_elements"]
    # the trace has autocast's dtypes: backward keeps a bf16 copy of the float32 weights that a
    # gradient passes through (masters and the float32 checkpoint's other weights: nearly all
    # here) besides the activations
    every = sum(p.numel() for p in tiny_unet(tiny_model_dir).parameters())
    fp32 = planned(dtype="float32")["bytes"]["activations"]
    assert plain["bytes"]["activations"] > 2 * every
    assert plain["bytes"]["activations"] - 2 * every < fp32  # bf16 activations: narrower
    assert plain["bytes"]["restore_copy"] == 4 * n  # host RAM, here the CPU the erase runs on
    assert planned(dtype="float32")["bytes"]["restore_copy"] == 0  # masters are the originals


def tiny_unet(folder):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel.from_pretrained(folder, subfolder="unet")


@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "checkpointing"])
def test_plan_activations_are_the_peak_of_a_real_forward_and_backward(
    tiny_model_dir, checkpointing, monkeypatch
):
    """float32: the plan's activations are the peak of the bytes alive while a real edited
    forward and its backward run on the CPU with the erase's trainable tensors (torch's
    profiler sees every allocation and free there), with and without diffusers' checkpointed
    calls (recomputed inside backward), and fewer than when every parameter trains: frozen
    layers' inputs are not kept for their own weight gradients. Not in the plan: the CPU random
    state torch's checkpoint keeps per call until its recomputation (5 KB each, made outside
    the dispatcher; 57 calls for FLUX.1), added to the plan here."""
    from torch.profiler import ProfilerActivity, profile

    from kscu.families.base import cond_cat
    from kscu.models import load_pipeline
    from kscu.scope import trainable_names

    sd = FAMILIES["sd"]
    settings = dict(concepts=["church"], device="cpu", gradient_checkpointing=checkpointing)
    cfg = resolve(EraseConfig(**settings), family=sd)
    planned = plan(str(tiny_model_dir), cfg, sd)["bytes"]["activations"]
    full = resolve(EraseConfig(**settings, scope="full"), family=sd)
    assert plan(str(tiny_model_dir), full, sd)["bytes"]["activations"] > planned

    pipe = load_pipeline(str(tiny_model_dir))
    net = sd.denoiser(pipe).requires_grad_(False)
    calls, checkpoint = [], torch.utils.checkpoint.checkpoint
    if checkpointing:
        net.enable_gradient_checkpointing()  # diffusers' default: torch's, non-reentrant

        def counted(*args, **kwargs):
            calls.append(1)
            return checkpoint(*args, **kwargs)

        # diffusers looks torch's checkpoint up at each call
        monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", counted)
    params = dict(net.named_parameters())
    for name in trainable_names(net, cfg.scope, sd):
        params[name].requires_grad_(True)
        params[name].register_post_accumulate_grad_hook(lambda p: setattr(p, "grad", None))
    sampler = sd.sampler(pipe, cfg.num_steps, cfg.resolution, cfg.loss_space)
    noise = sampler.noise(0)
    x = noise.expand(2, *noise.shape[1:])  # the rows of e and u, as the plan traces them
    cond = cond_cat(sd.encode(pipe, ["church"]), sd.encode(pipe, [""]))
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = sampler.raw(net, x, cfg.start_step, cond)
        out.float().square().mean().backward()
        del out
    # (time, address, bytes: + allocated, - freed), a free before an allocation at the same time
    allocations = sorted(allocations_of(prof), key=lambda a: (a[0], a[2] > 0))
    sizes, live, peak = {}, 0, 0
    for _, address, size in allocations:
        if size > 0:
            sizes[address] = size
            live += size
            peak = max(peak, live)
        elif address in sizes:  # allocated inside (the weights, x and cond were there before)
            live -= sizes.pop(address)
    assert bool(calls) == checkpointing
    planned += len(calls) * torch.get_rng_state().nbytes
    # when written: 697,160 vs 716,504 bytes; checkpointing 328,456 vs 328,584 (the count of
    # every parameter as trainable, with the checkpoint's inside for its backward: 315,200)
    assert abs(planned - peak) <= (0.01 if checkpointing else 0.05) * peak, (planned, peak)


def test_live_bytes_counts_each_storage_once_while_it_lives():
    """The plan's instrument: a view adds nothing, a storage counts until its last view dies."""
    from kscu.memory import _LiveBytes

    a = torch.empty(1000, device="meta")  # made outside and skipped (views of it included)
    with _LiveBytes(skip={a.untyped_storage()._cdata}) as live:
        total = a[:10].sum()  # a's view: nothing; the sum: 4 bytes
        assert live.live == 4
        del total
        b = a * 2  # 4,000 bytes
        view = b[:10]  # b's storage: nothing new
        c = a * 3  # 8,000 alive: the peak
        del b, c  # the view keeps b's storage: 4,000
        d = a * 4  # 8,000 again
        assert live.live == 8000
        del view, d
    assert (live.peak, live.live) == (8000, 0)


def allocations_of(prof) -> list[tuple[int, int, int]]:
    """The profiler's allocation events: (time, address, bytes), freed blocks negative.

    torch has no public per-address allocation trace; this private one is torch 2.13's (pinned in
    .ci/run), so a torch upgrade may have to follow its change."""
    from torch._C._profiler import _EventType

    found, stack = [], list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        event = stack.pop()
        stack.extend(event.children)
        if event.typed[0] == _EventType.Allocation:
            found.append((event.start_time_ns, event.typed[1].ptr, event.typed[1].alloc_size))
    return found


def test_plan_moves_offloaded_adam_state_to_host_memory(tiny_model_dir):
    """--offload-adam on a GPU: the exact moments in host RAM, one tensor's on the device; on a
    CPU both are the erase's own memory, so the total grows by that one tensor's copies."""
    from kscu.scope import trainable_names

    sd = FAMILIES["sd"]

    def planned(device, **kw):
        cfg = resolve(EraseConfig(concepts=["church"], device=device, **kw), family=sd)
        return plan(str(tiny_model_dir), cfg, sd)

    unet = tiny_unet(tiny_model_dir)
    params = dict(unet.named_parameters())
    largest = max(params[n].numel() for n in trainable_names(unet, "noxattn", sd))
    gpu, gpu_off = planned("cuda"), planned("cuda", offload_adam=True)
    n = gpu["trainable_elements"]
    assert gpu["bytes"]["adam"] == 8 * n and "adam_state" not in gpu["host_bytes"]
    assert gpu_off["host_bytes"]["adam_state"] == 8 * n
    assert gpu_off["bytes"]["adam"] == 8 * largest < 8 * n
    # offloaded steps go one tensor at a time: the small tensors' gradients do not wait
    assert gpu_off["bytes"]["gradients"] == 4 * largest
    held = gpu["bytes"]["gradients"] - gpu_off["bytes"]["gradients"]
    assert gpu["total_bytes"] - gpu_off["total_bytes"] == 8 * (n - largest) + held
    cpu, cpu_off = planned("cpu"), planned("cpu", offload_adam=True)
    assert cpu_off["bytes"]["adam_state"] == 8 * n
    assert cpu_off["total_bytes"] - cpu["total_bytes"] == 8 * largest - held


def test_the_plan_never_runs_a_component_folders_own_code(tmp_path, monkeypatch):
    """Before: a text encoder whose config.json had an ``auto_map`` made transformers ask "run
    the custom code? [y/N]" while --plan built the component on the meta device."""
    marker = tmp_path / "ran"
    folder = tmp_path / "model" / "text_encoder"
    folder.mkdir(parents=True)
    (folder / "evil.py").write_text(
        f"import pathlib\npathlib.Path({str(marker)!r}).write_text('x')\n"
        "from transformers import PretrainedConfig\n"
        "class EvilConfig(PretrainedConfig):\n    model_type = 'kscu-evil'\n"
    )
    config = {"model_type": "kscu-evil", "auto_map": {"AutoConfig": "evil.EvilConfig"}}
    (folder / "config.json").write_text(json.dumps(config))
    monkeypatch.setattr("builtins.input", lambda *a: "y")  # a user who says yes
    with pytest.raises(ValueError, match="trust_remote_code"):
        kscu.memory._meta_component(
            str(tmp_path / "model"), "text_encoder", "CLIPTextModel", "transformers"
        )
    assert not marker.exists()
