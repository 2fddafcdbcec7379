"""The settings of ``kscu analyze``: one dataclass whose defaults the CLI shows and uses.

Kept apart from ``kscu.analyze.analysis`` (torch, the pipelines) so that registering the CLI
command, which reads these defaults, stays cheap.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from kscu.config import SEED_RANGE, non_negative
from kscu.errors import KscuError
from kscu.protocol import KEY_STEP_CAP_FRACTION


@dataclass
class AnalyzeSettings:
    """Everything that determines a measurement (``threshold``/``min_contrast``: only the rule)."""

    samples: int = 8
    seed: int = 0
    neutral: str = ""
    # None: the family's sampling protocol (SD 50 steps / CFG 7.5, SDXL 50 / 5, FLUX 28 / 3.5)
    guidance: float | None = None  # of the generated images: what users sample with
    stride: int = 1  # measure every stride-th switch step, interpolate the rest
    threshold: float = 0.1
    min_contrast: float = 0.1
    num_steps: int | None = None
    resolution: int | None = None  # None: the model's own
    batch_size: int = 64  # UNet rows per call

    def for_family(self, family: Any) -> AnalyzeSettings:
        """These settings with the family's steps and guidance where none were given."""
        return dataclasses.replace(
            self,
            num_steps=family.eval_steps if self.num_steps is None else self.num_steps,
            guidance=family.eval_guidance if self.guidance is None else self.guidance,
        )

    def validate(self) -> None:
        def need(ok: bool, message: str) -> None:
            if not ok:
                raise KscuError(message)

        need(self.samples > 0, f"--samples must be > 0 (got {self.samples})")
        need(  # sample i's noise has seed + i
            SEED_RANGE[0] <= self.seed and self.seed + self.samples - 1 <= SEED_RANGE[1],
            f"--seed {self.seed}: the noise seeds seed..seed+samples-1 must lie in torch's "
            f"[{SEED_RANGE[0]}, {SEED_RANGE[1]}]; give a seed in "
            f"[{SEED_RANGE[0]}, {SEED_RANGE[1] - self.samples + 1}]",
        )
        need(self.stride > 0, f"--stride must be >= 1 (got {self.stride})")
        # Unset steps are the family's (``for_family``): the stride's upper bound is checked
        # against those once they are known, not against a guess (SD's 50 are not FLUX's 28).
        if self.num_steps is not None:
            steps = self.num_steps
            need(steps > 1, f"--num-steps must be > 1 (got {steps})")
            need(
                self.stride < steps,
                f"--stride must be in [1, {steps - 1}] for {steps} sampling steps "
                f"(got {self.stride})",
            )
        need(0 < self.threshold < 1, f"--threshold must be in (0, 1) (got {self.threshold})")
        need(
            0 <= self.min_contrast < 1, f"min_contrast must be in [0, 1) (got {self.min_contrast})"
        )
        need(
            self.guidance is None or non_negative(self.guidance),
            f"--guidance must be a finite number >= 0 (got {self.guidance})",
        )
        need(self.batch_size > 0, f"--batch-size must be > 0 (got {self.batch_size})")
        need(
            self.resolution is None or (self.resolution > 0 and self.resolution % 8 == 0),
            f"--resolution must be a positive multiple of 8 (got {self.resolution})",
        )

    def measured_steps(self) -> list[int]:
        return list(range(0, self.num_steps, self.stride))

    def measurement_key(self) -> dict[str, Any]:
        """The settings a measurement depends on (not the rule's parameters)."""
        d = dataclasses.asdict(self)
        for rule_only in ("threshold", "min_contrast", "batch_size"):
            d.pop(rule_only)
        return d


def cap_for(num_steps: int) -> int:
    """The latest start the Key Step Table reaches: ceil(0.9 N) - 1 (44 of 50)."""
    return math.ceil(KEY_STEP_CAP_FRACTION * num_steps) - 1
