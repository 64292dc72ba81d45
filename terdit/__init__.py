"""TerDiT reference (torch only): the model (config, model, fused), the ternary formats and layers
(formats, ternary), checkpoint I/O (checkpoint, loading, official), the diffusion process
(diffusion) and the sampling adapter (inference). Subpackages: terdit.train (the QAT trainer),
terdit.evaluate (FID, class accuracy), terdit.kernels (CUDA and CPU kernels, activation modes)."""
from .checkpoint import (CheckpointError, LoadedCheckpoint, load_checkpoint, save_checkpoint,
                         save_official, save_torch)
from .config import OFFICIAL_NAMES, PRESETS, TerDiTConfig
from .formats import hqq_to_k16, k16_to_hqq, pack_k16, ternarize, unpack_k16
from .kernels.int8 import set_act_quant_
from .model import TerDiT, guide
from .ternary import (PackedTernaryLinear, TernaryLinear, pack_model_, ternary_linear_ref,
                      ternary_matmul)

__version__ = "0.1.0"

__all__ = [
    "OFFICIAL_NAMES", "PRESETS", "TerDiTConfig", "TerDiT", "guide", "TernaryLinear",
    "PackedTernaryLinear", "hqq_to_k16", "k16_to_hqq", "pack_k16", "pack_model_", "ternarize",
    "ternary_linear_ref", "ternary_matmul", "unpack_k16", "set_act_quant_", "CheckpointError",
    "LoadedCheckpoint", "load_checkpoint", "save_checkpoint", "save_official", "save_torch",
    "__version__",
]
