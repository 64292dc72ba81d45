"""terdit exporter: lower ternary DiT checkpoints to ONNX with terdit::TernaryMatMul nodes."""
from .export import ExportError, ExportOptions, export

__all__ = ["ExportError", "ExportOptions", "export"]
