"""``analyze.png``: the commitment curve, the recommended start and the task defaults.

Drawn with Pillow alone, so the analysis needs no plotting library.
"""

from __future__ import annotations

from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from kscu.fileio import atomic_target

W, H = 720, 420
LEFT, RIGHT, TOP, BOTTOM = 56, 20, 60, 48
BLUE, GRAY, RED, GREEN, BLACK = (31, 90, 180), (150, 150, 150), (200, 30, 30), (40, 140, 60), 0


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
    n = len(curve)
    img = Image.new("RGB", (W, H), "white")
    d = ImageDraw.Draw(img)
    font = ImageFont.load_default()
    lo = min(0.0, *curve, *(forward or []), *(reverse_complement or []))
    hi = max(1.0, *curve, *(forward or []), *(reverse_complement or []))

    def px(s: float, v: float) -> tuple[float, float]:
        x = LEFT + (W - LEFT - RIGHT) * s / max(n - 1, 1)
        y = TOP + (H - TOP - BOTTOM) * (hi - v) / (hi - lo)
        return x, y

    d.rectangle([px(0, hi), px(n - 1, lo)], outline=BLACK)
    for v in (0.0, 0.25, 0.5, 0.75, 1.0):
        x, y = px(0, v)
        d.line([(x - 4, y), (x, y)], fill=BLACK)
        d.text((x - 34, y - 6), f"{v:.2f}", fill=BLACK, font=font)
    for s in range(0, n, 5):
        x, y = px(s, lo)
        d.line([(x, y), (x, y + 4)], fill=BLACK)
        d.text((x - 6, y + 6), str(s), fill=BLACK, font=font)
    d.text((W / 2 - 60, H - 18), "step index s (0 = pure noise)", fill=BLACK, font=font)
    d.text((LEFT, 8), title, fill=BLACK, font=font)
    d.line([px(0, threshold), px(n - 1, threshold)], fill=GRAY)
    d.text(
        (px(n - 1, threshold)[0] - 70, px(0, threshold)[1] - 12),
        f"threshold {threshold:g}",
        fill=GRAY,
        font=font,
    )
    by_step: dict[int, list[str]] = {}
    for mode, s in defaults.items():
        by_step.setdefault(s, []).append(mode)
    for i, (s, modes) in enumerate(sorted(by_step.items())):
        x0, y0 = px(s, hi)
        _dashed(d, (x0, y0), px(s, lo), GREEN)
        d.text((x0 + 3, y0 + 4 + 12 * (i % 2)), f"{', '.join(modes)} {s}", fill=GREEN, font=font)
    for series, color in ((forward, (120, 170, 230)), (reverse_complement, (230, 170, 120))):
        if series:
            d.line([px(s, v) for s, v in enumerate(series)], fill=color, width=1)
    d.line([px(s, v) for s, v in enumerate(curve)], fill=BLUE, width=2)
    x, _ = px(start, 0)
    d.line([px(start, hi), px(start, lo)], fill=RED, width=2)
    d.text((x + 4, px(0, lo)[1] - 28), f"recommended start {start}", fill=RED, font=font)
    legend = "dark blue: commitment C   light blue: forward F   orange: 1 - reverse R"
    d.text((LEFT, 26), legend, fill=BLACK, font=font)
    with atomic_target(path) as tmp:
        img.save(tmp, format="PNG")


def _dashed(
    d: ImageDraw.ImageDraw, a: tuple[float, float], b: tuple[float, float], color, dash: float = 6
) -> None:
    """A vertical dashed line from ``a`` down to ``b``."""
    y = a[1]
    while y < b[1]:
        d.line([(a[0], y), (a[0], min(y + dash, b[1]))], fill=color)
        y += 2 * dash
