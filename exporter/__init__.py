"""terdit exporter: lower ternary DiT checkpoints to ONNX with terdit::TernaryMatMul nodes
(`python -m exporter`, exporter/export_cli.py). The public names load on first use
(terdit_common.lazy)."""
from terdit_common.lazy import lazy_exports

_EXPORTS = {"export": ".export", "ExportError": ".options", "ExportOptions": ".options"}
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)

__all__ = list(_EXPORTS)
