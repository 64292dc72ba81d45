"""The IDDPM noise schedule and the official timestep respacing (float64, as the official numpy
code computes them; terdit.diffusion and the numpy samplers both use these)."""
from __future__ import annotations

from typing import Sequence, Union

import numpy as np

NUM_TRAIN_STEPS = 1000
# rescaled to T steps the last beta is 0.02 * 1000 / T: above 1 (no valid process) below this
MIN_TIMESTEPS = 20


def linear_betas(num_steps: int = NUM_TRAIN_STEPS) -> np.ndarray:
    """Ho et al.'s linear schedule 1e-4 .. 0.02, rescaled to `num_steps` (float64)."""
    if num_steps < MIN_TIMESTEPS:
        raise ValueError(f"num_timesteps={num_steps} must be at least {MIN_TIMESTEPS}")
    scale = 1000 / num_steps
    return np.linspace(scale * 0.0001, scale * 0.02, num_steps, dtype=np.float64)


def space_timesteps(num_timesteps: int, section_counts: Union[str, Sequence[int]]) -> set[int]:
    """The timesteps kept by respacing (IDDPM): "N" or "a,b,c" strides each of equally sized
    sections of the original process to that many steps (fractional stride, rounded); "ddimN"
    uses the DDIM paper's fixed integer stride and must give exactly N steps."""
    if isinstance(section_counts, str):
        if section_counts.startswith("ddim"):
            desired = _count(section_counts[len("ddim"):], section_counts, num_timesteps)
            for stride in range(1, num_timesteps):
                if len(range(0, num_timesteps, stride)) == desired:
                    return set(range(0, num_timesteps, stride))
            near = sorted({len(range(0, num_timesteps, s)) for s in range(1, num_timesteps)},
                          key=lambda c: abs(c - desired))[:2]
            raise ValueError(f"{desired} DDIM steps: no integer stride takes exactly {desired} "
                             f"of the {num_timesteps} training timesteps; use "
                             f"{' or '.join(map(str, sorted(near)))}")
        section_counts = [_count(x, section_counts, num_timesteps)
                          for x in section_counts.split(",")]
    sections = list(section_counts)
    if not sections or any(c <= 0 for c in sections):
        raise ValueError(f"respacing {section_counts!r}: section counts must be positive")
    size_per, extra = divmod(num_timesteps, len(sections))
    start = 0
    steps: list[int] = []
    for i, count in enumerate(sections):
        size = size_per + (1 if i < extra else 0)
        if size < count:
            raise ValueError(f"respacing {section_counts!r}: cannot divide a section of {size} "
                             f"steps into {count}")
        stride = 1 if count <= 1 else (size - 1) / (count - 1)
        cur = 0.0
        for _ in range(count):
            steps.append(start + round(cur))
            cur += stride
        start += size
    return set(steps)


def _count(text: str, spec: str, num_timesteps: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise ValueError(f"respacing {spec!r}: expected 'N', 'a,b,c' or 'ddimN'") from None
    if not 1 <= value <= num_timesteps:
        raise ValueError(f"{value} sampling steps: must be between 1 and the {num_timesteps} "
                         f"training timesteps")
    return value
