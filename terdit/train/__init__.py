"""The QAT trainer (`python -m terdit.train`): its settings (config), data (data, data_files),
model set-up (setup), resumable state (state), torchrun plumbing (distributed), the loop (loop)
and its logs and curves (plots)."""
from .train_cli import build_parser, main
from .train_config import TrainConfig
from .loop import train
from .plots import plot_losses, read_log

__all__ = ["TrainConfig", "build_parser", "main", "plot_losses", "read_log", "train"]
