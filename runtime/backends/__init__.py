"""Model backends over one protocol (runtime/backends/protocol.py), so guidance and schedulers
are shared:

| backend | runs                                         | module                      |
|---------|----------------------------------------------|-----------------------------|
| ort     | an export directory in ONNX Runtime          | backends/ort_backend.py     |
| trt     | a TensorRT plan built from an export         | runtime/tensorrt/backend.py |
| torch   | an export directory or a checkpoint, PyTorch | backends/torch_backend.py   |

runtime/backends/opener.py picks and opens one (open_backend). Every backend checks what it opens:
an export directory's manifest and the sha256 of every file it lists
(terdit_common.manifest.open_export; a changed byte is refused before any sampling).
"""
from .protocol import BACKEND_OPTIONS, Backend, BackendError

__all__ = ["BACKEND_OPTIONS", "Backend", "BackendError"]
