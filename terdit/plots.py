"""Training logs (JSON lines) and loss curves."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from terdit_common.files import atomic_write


def read_log(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


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
