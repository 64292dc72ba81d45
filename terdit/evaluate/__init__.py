"""Sample quality (`python -m terdit.evaluate`): FID with the standard Inception network (fid),
class accuracy under a small Fashion-MNIST classifier (classifier), and the command line
(evaluate_cli). The public names load on first use (terdit_common.lazy)."""
from terdit_common.lazy import lazy_exports

_EXPORTS = dict.fromkeys(("build_parser", "evaluate_images", "main"), ".evaluate_cli")
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)

__all__ = list(_EXPORTS)
