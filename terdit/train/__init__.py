"""The QAT trainer (`python -m terdit.train`): its settings (train_config), data (data,
data_files), model set-up (setup), resumable state (state), torchrun plumbing (distributed), the
loop (loop), its logs and curves (plots) and the command line (train_cli). The public names load
on first use (terdit_common.lazy)."""
from terdit_common.lazy import lazy_exports

_EXPORTS = {"TrainConfig": ".train_config", "build_parser": ".train_cli", "main": ".train_cli",
            "plot_losses": ".plots", "read_log": ".plots", "train": ".loop"}
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)

__all__ = list(_EXPORTS)
