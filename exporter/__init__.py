"""terdit exporter: lower ternary DiT checkpoints to ONNX with terdit::TernaryMatMul nodes."""
from .export import export
from .options import ExportError, ExportOptions

__all__ = ["ExportError", "ExportOptions", "export"]
