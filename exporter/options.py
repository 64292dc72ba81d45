"""What an export can be asked for (every default lives here) and the export's error type."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

from terdit_common.errors import UserError
from terdit_common.guidance import CFG_MODES
from terdit_common.limits import MAX_SEED, MAX_VALIDATE_BATCH, MAX_VALIDATE_BATCHES, check_count
from terdit_common.op import ACT_QUANT, ACT_QUANT_DEFAULT, DTYPES

CFG_CHOICES = ("none",) + CFG_MODES             # --cfg: folded guidance, by the guidance modes


class ExportError(UserError):
    """An export that cannot proceed or did not validate; the message says why and what to do."""


@dataclass(frozen=True)
class ExportOptions:
    dtype: str = "fp32"
    cfg: str = "none"
    fuse: bool = True
    function: bool = True
    validate: bool = True
    validate_batches: tuple[int, ...] = (1, 2)
    tolerance: Optional[float] = None
    vae: Optional[str] = None
    overwrite: bool = False
    ema: Optional[bool] = None
    ternary: Optional[bool] = None
    external_data: Optional[bool] = None
    seed: int = 0
    # TernaryMatMul activation mode of every node (--act-quant; --w2a8 is "fp8"): one of
    # terdit_common.op.ACT_QUANT, "none" (weight-only), "int8" or "fp8"
    act_quant: str = ACT_QUANT_DEFAULT

    def __post_init__(self) -> None:
        if self.act_quant not in ACT_QUANT:
            raise ExportError(f"act_quant={self.act_quant!r} is not one of {', '.join(ACT_QUANT)}")
        if self.dtype not in DTYPES:
            raise ExportError(f"--dtype {self.dtype!r} is not one of {', '.join(DTYPES)}")
        if self.cfg not in CFG_CHOICES:
            raise ExportError(f"--cfg {self.cfg!r} is not one of {', '.join(CFG_CHOICES)}")
        batches = self.validate_batches
        if not batches or len(batches) > MAX_VALIDATE_BATCHES or any(
                not 1 <= b <= MAX_VALIDATE_BATCH for b in batches):
            raise ExportError(f"--validate-batches {' '.join(map(str, batches))}: give 1 to "
                             f"{MAX_VALIDATE_BATCHES} batch sizes from 1 to {MAX_VALIDATE_BATCH}")
        if self.tolerance is not None and not (math.isfinite(self.tolerance)
                                               and self.tolerance > 0):
            raise ExportError(f"--tolerance {self.tolerance}: must be a finite positive number")
        check_count("--seed", self.seed, 0, MAX_SEED)
