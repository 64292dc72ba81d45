"""Training logs (JSON lines) and loss curves."""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np

from terdit_common.errors import UserError
from terdit_common.files import atomic_write
from terdit_common.inputs import read_bytes
from terdit_common.limits import MAX_TEXT_BYTES


def read_log(path: Path, flag: str = "", missing_ok: bool = True) -> list[dict]:
    """The rows of a training log (JSON lines, as terdit.train writes): a regular file of at
    most MAX_TEXT_BYTES, UTF-8, every line a JSON object with numbers for "step" and "loss"
    where it has a loss. A last line torn by a kill mid-append is dropped; anything else is a
    UserError naming the file and the line. A missing log is no rows when `missing_ok`."""
    path = Path(path)
    if missing_ok and not os.path.lexists(path):
        return []
    fix = "pass the log.jsonl of a terdit.train run"
    data = read_bytes(path, flag, fix, MAX_TEXT_BYTES, "MAX_TEXT_BYTES")
    try:
        lines = data.decode("utf-8").splitlines()
    except UnicodeDecodeError as err:
        raise UserError(f"{path}: not UTF-8 text (byte {err.start}); {fix}") from None
    rows = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except (ValueError, RecursionError) as err:
            if n == len(lines) and not data.endswith(b"\n"):
                break                               # torn by a kill mid-append
            raise UserError(f"{path}:{n}: not valid JSON ({str(err)[:80]}); each line of a "
                            f"training log is one JSON object: fix or remove the line") from None
        if not isinstance(row, dict):
            raise UserError(f"{path}:{n}: a JSON {type(row).__name__}, expected an object")
        if "loss" in row and not all(_number(row.get(k)) for k in ("step", "loss")):
            raise UserError(f"{path}:{n}: a row with a loss needs numbers for 'step' and "
                            f"'loss', found step={str(row.get('step'))[:20]}, "
                            f"loss={str(row.get('loss'))[:20]}")
        rows.append(row)
    return rows


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def plot_losses(runs: dict[str, Path], out: Path, smooth: int = 20,
                title: str = "training loss (mse + vb)") -> Path:
    """One loss curve per run (label -> log.jsonl), moving-average smoothed, to a PNG."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    for label, log in runs.items():
        rows = [r for r in read_log(Path(log)) if "loss" in r]
        if not rows:
            continue
        steps = np.array([r["step"] for r in rows])
        loss = np.array([r["loss"] for r in rows])
        ax.plot(steps, loss, alpha=0.25, lw=0.8)
        k = max(1, min(smooth, len(loss)))
        ax.plot(steps[k - 1:], np.convolve(loss, np.ones(k) / k, mode="valid"),
                color=ax.lines[-1].get_color(), label=label, lw=1.6)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_yscale("log")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if ax.lines:
        ax.legend()
    fig.tight_layout()
    atomic_write(out, lambda p: fig.savefig(p, format="png"))
    plt.close(fig)
    return out
