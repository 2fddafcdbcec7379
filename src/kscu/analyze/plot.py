"""``analyze.png``: the commitment curve, the recommended start and the task defaults."""

from __future__ import annotations

from pathlib import Path

from kscu.fileio import atomic_target

# A text chunk every plot carries: how ``kscu analyze --overwrite`` tells a plot it drew from
# anyone else's analyze.png (a PNG keeps text chunks through copies, unlike a file's dates).
MARKER_KEY, MARKER = "kscu", "analyze"


def plot_curve(
    path: str | Path,
    curve: list[float],
    start: int,
    defaults: dict[str, int],
    threshold: float,
    title: str,
    forward: list[float] | None = None,
    reverse_complement: list[float] | None = None,
) -> None:
    """Write the figure atomically; ``curve`` is one value per step index."""
    from matplotlib.figure import Figure  # no pyplot: no global state, no display needed

    fig = Figure(figsize=(7.2, 4.2), dpi=100, layout="constrained")
    ax = fig.subplots()
    steps = range(len(curve))
    if forward:
        ax.plot(steps, forward, color="#78aae6", lw=1, label="forward F")
    if reverse_complement:
        ax.plot(steps, reverse_complement, color="#e6aa78", lw=1, label="1 - reverse R")
    ax.plot(steps, curve, color="#1f5ab4", lw=2, label="commitment C")
    ax.axhline(threshold, color="gray", lw=1, ls=":", label=f"threshold {threshold:g}")
    by_step: dict[int, list[str]] = {}
    for mode, s in defaults.items():  # a family's defaults count its own steps: keep those shown
        if 0 <= s < len(curve):
            by_step.setdefault(s, []).append(mode)
    for i, (s, modes) in enumerate(sorted(by_step.items())):
        ax.axvline(s, color="#288c3c", lw=1, ls="--")
        ax.annotate(
            f"{', '.join(modes)} {s}",
            (s, 1),
            xycoords=("data", "axes fraction"),
            xytext=(3, -12 - 11 * (i % 3)),  # staggered: neighbouring defaults stay legible
            textcoords="offset points",
            color="#288c3c",
            fontsize=8,
        )
    ax.axvline(start, color="#c81e1e", lw=2, label=f"recommended start {start}")
    ax.set_xlim(0, max(len(curve) - 1, 1))
    ax.set_xlabel("step index s (0 = pure noise)")
    ax.set_ylabel("presence")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8, loc="center left")
    with atomic_target(path) as tmp:
        fig.savefig(tmp, format="png", metadata={MARKER_KEY: MARKER})


def is_plot(path: Path) -> bool:
    """Whether ``path`` is a PNG ``plot_curve`` drew: one carrying its marker. Any other file,
    a PNG drawn before kscu marked its plots included, is not (``--overwrite`` keeps it)."""
    from PIL import Image

    try:
        with Image.open(path) as im:  # reads the chunks before the pixels, not the pixels
            return im.format == "PNG" and im.info.get(MARKER_KEY) == MARKER
    except (OSError, ValueError, Image.DecompressionBombError):  # not an image kscu can open
        return False
