"""Written files get the umask's permissions, reach the disk before the rename, never half exist."""

import os
import re
import stat
import sys

import pytest

from kscu.cli import main
from kscu.errors import KscuError
from kscu.evaluate.common import write_result
from kscu.fileio import (
    atomic_folder,
    atomic_target,
    check_replaceable,
    check_writable,
    write_json,
)


@pytest.fixture(params=[0o022, 0o007])
def umask(request):
    old = os.umask(request.param)
    yield request.param
    os.umask(old)


def mode(path):
    return stat.S_IMODE(path.stat().st_mode)


def test_files_and_folders_get_the_umask_permissions(umask, tmp_path):
    write_json(tmp_path / "a.json", {"x": 1})
    with atomic_target(tmp_path / "b.bin") as tmp:
        tmp.write_bytes(b"data")
    with atomic_folder(tmp_path / "run") as folder:
        write_json(folder / "c.json", {})
    for name in ("a.json", "b.bin", "run/c.json"):
        assert mode(tmp_path / name) == 0o666 & ~umask, name
    assert mode(tmp_path / "run") == 0o777 & ~umask


def test_every_file_kscu_writes_gets_the_umask_permissions(umask, tiny_model_dir, tmp_path, capsys):
    run, images = tmp_path / "run", tmp_path / "run" / "images"
    short = ["--iterations", "2", "--num-steps", "4", "--start-step", "1", "--quiet"]
    common = ["--model", tiny_model_dir, "--quiet"]
    steps = [
        ["erase", "--concept", "church", *common, "--output", run, *short, "--preview"],
        ["generate", *common, "--prompt", "a church", "--steps", "2", "--output", images],
    ]
    for args in steps:
        assert main([str(a) for a in args]) == 0, capsys.readouterr().err
    write_result({"fid": 1.0}, run / "eval" / "fid.json", markdown="| fid |\n")  # evaluate's path
    written = {
        "weights.safetensors",
        "kscu.json",
        "preview.png",
        "images/0.png",
        "images/manifest.csv",
        "images/generate.json",
        "eval/fid.json",
        "eval/fid.md",
    }
    found = {str(p.relative_to(run)) for p in run.rglob("*") if p.is_file()}
    assert found == written
    for name in written:
        assert mode(run / name) == 0o666 & ~umask, name
    for folder in (run, images, run / "eval"):
        assert mode(folder) == 0o777 & ~umask, folder


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/fd")
def test_file_is_flushed_before_the_rename_and_the_folder_after(tmp_path, monkeypatch):
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def replace(src, dst):
        events.append(("replace", str(dst)))
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    target = tmp_path / "out.json"
    with atomic_target(target) as tmp:
        tmp.write_text("{}")
    assert events == [("fsync", str(tmp)), ("replace", str(target)), ("fsync", str(tmp_path))]


def test_a_failed_block_leaves_nothing(tmp_path):
    (tmp_path / "keep.json").write_text("old")
    with pytest.raises(RuntimeError), atomic_target(tmp_path / "keep.json") as tmp:
        tmp.write_text("half")
        raise RuntimeError
    with pytest.raises(RuntimeError), atomic_folder(tmp_path / "run") as folder:
        (folder / "weights").write_text("half")
        raise RuntimeError
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.json"]
    assert (tmp_path / "keep.json").read_text() == "old"


def test_folder_replace_swaps_whole_folders(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "stale.png").write_text("old")
    with pytest.raises(KscuError, match="nothing was replaced"), atomic_folder(run) as folder:
        (folder / "new.json").write_text("new")  # without replace, a filled folder stays
    assert sorted(p.name for p in run.iterdir()) == ["stale.png"]
    with atomic_folder(run, replace=True) as folder:
        (folder / "new.json").write_text("new")
    assert sorted(p.name for p in run.iterdir()) == ["new.json"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


@pytest.mark.parametrize("signum", ["SIGINT", "SIGTERM"])
def test_a_signal_between_the_renames_waits_for_the_swap(tmp_path, monkeypatch, signum):
    """Ctrl-C (or a bench worker's SIGTERM) right after the earlier run is moved aside: the new
    run is moved in and the old one removed first, then the signal takes effect as it would have;
    the folder never holds its earlier version only under a hidden name."""
    import signal

    import kscu.fileio

    run = tmp_path / "run"
    run.mkdir()
    (run / "old.json").write_text("old")
    rename, calls = os.rename, []

    def interrupted(src, dst):
        rename(src, dst)
        calls.append(dst)
        if len(calls) == 1:  # the earlier version is now aside
            signal.raise_signal(getattr(signal, signum))

    def stop(signum, frame):
        raise SystemExit(f"signal {signum}")

    monkeypatch.setattr(kscu.fileio.os, "rename", interrupted)
    # Python's Ctrl-C handler (pytest may start with SIGINT ignored), a bench worker's SIGTERM one
    handlers = {signal.SIGINT: signal.default_int_handler, signal.SIGTERM: stop}
    previous = {s: signal.signal(s, h) for s, h in handlers.items()}
    try:
        with pytest.raises((KeyboardInterrupt, SystemExit)), atomic_folder(run, True) as folder:
            (folder / "new.json").write_text("new")
        assert {s: signal.getsignal(s) for s in handlers} == handlers  # put back
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
    assert len(calls) == 2
    assert sorted(p.name for p in run.iterdir()) == ["new.json"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_check_writable_accepts_a_new_path_and_leaves_nothing(tmp_path):
    check_writable(tmp_path / "runs" / "new")  # folders made later, by the command itself
    check_writable(tmp_path / "eval" / "result.json", folder=False)
    assert list(tmp_path.iterdir()) == []  # the probe file is gone again


@pytest.mark.parametrize(
    "target, folder, words",
    [
        ("afile", True, "--output {p}/afile is a file; give a folder"),
        ("adir", False, "--output {p}/adir is a folder; give a file name"),
        ("afile/sub", True, "goes through the file {p}/afile"),
        ("afile/res.json", False, "goes through the file {p}/afile"),
    ],
)
def test_check_writable_names_the_path_in_the_way(tmp_path, target, folder, words):
    (tmp_path / "afile").write_text("x")
    (tmp_path / "adir").mkdir()
    with pytest.raises(KscuError, match=re.escape(words.format(p=tmp_path))):
        check_writable(tmp_path / target, folder=folder)


def test_check_writable_tries_a_file_where_permissions_cannot_tell(tmp_path, monkeypatch):
    """Root ignores permission bits and /proc takes no files: only a real write tells."""
    import kscu.fileio

    def refused(path):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(kscu.fileio, "_new_file", refused)
    with pytest.raises(KscuError, match="cannot write in .* \\(Permission denied\\)"):
        check_writable(tmp_path / "out")


def test_an_unwritable_output_fails_before_the_erase(tmp_path, capsys):
    """Before: the erase trained, then failed with a traceback at its first write."""
    (tmp_path / "afile").write_text("x")
    args = ["erase", "--concept", "circle", "--no-preview", "--quiet"]
    assert main([*args, "--output", str(tmp_path / "afile" / "run")]) == 2
    err = capsys.readouterr().err
    assert "goes through the file" in err and len(err.strip().splitlines()) == 1


def test_an_os_error_no_check_foresaw_is_one_line(tiny_model_dir, tmp_path, capsys, monkeypatch):
    import kscu.runner

    def full(*args, **kwargs):
        raise OSError(28, "No space left on device", str(tmp_path / "run"))

    monkeypatch.setattr(kscu.runner, "erase_to_folder", full)
    args = ["erase", "--concept", "church", "--model", str(tiny_model_dir), "--quiet"]
    assert main([*args, "--output", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert "No space left on device" in err and len(err.strip().splitlines()) == 1


def test_check_replaceable_refuses_a_file_it_did_not_write_even_with_overwrite(tmp_path):
    """One rule for every command that writes a single file: a missing path is free, an earlier
    file of its own needs ``overwrite``, anyone else's file is never replaced; the advice (the
    default as evaluate and report give it, or the caller's) and a note on unrecognised files
    are the caller's."""
    ours = tmp_path / "ours.json"
    ours.write_text("kscu")
    mine = tmp_path / "mine.json"
    mine.write_text("notes")
    (tmp_path / "link.json").symlink_to(tmp_path / "gone")  # a dangling link is still there

    def is_ours(path):
        return path.read_text() == "kscu"

    check_replaceable(tmp_path / "new.json", "--output new.json", "result", is_ours, False)
    check_replaceable(ours, "--output ours.json", "result", is_ours, True)
    with pytest.raises(KscuError) as e:
        check_replaceable(ours, "--output ours.json", "result", is_ours, False)
    assert str(e.value) == (
        "--output ours.json already holds a result; give another path, or pass --overwrite to "
        "replace it"
    )
    for path in (mine, tmp_path / "link.json"):
        with pytest.raises(KscuError) as e:
            check_replaceable(
                path, "X", "plot", lambda p: False, True, fix="move it", unrecognised=" (old)"
            )
        assert str(e.value) == (
            "X already exists and is not a kscu plot (old); move it (kscu does not replace a "
            "file it did not write, even with --overwrite)"
        )
    assert mine.read_text() == "notes"


def test_check_replaceable_is_still_importable_from_the_evaluators():
    """report and fid import it from kscu.evaluate.common, where it was written first."""
    import kscu.evaluate.common

    assert kscu.evaluate.common.check_replaceable is check_replaceable
