"""TerDiT reference: model, ternary formats, checkpoint I/O and the QAT trainer (torch only)."""
from .config import OFFICIAL_NAMES, PRESETS, TerDiTConfig
from .model import TerDiT, guide
from .ternary import (PackedTernaryLinear, TernaryLinear, hqq_to_k16, k16_to_hqq, pack_k16, pack_model_, ternarize,
                      ternary_linear_ref, ternary_matmul, unpack_k16)
from .int8 import set_act_quant_
from .checkpoint import (CheckpointError, LoadedCheckpoint, load_checkpoint, save_checkpoint,
                         save_official, save_torch)

__version__ = "0.1.0"

__all__ = [
    "OFFICIAL_NAMES", "PRESETS", "TerDiTConfig", "TerDiT", "guide", "TernaryLinear", "PackedTernaryLinear",
    "hqq_to_k16", "k16_to_hqq", "pack_k16", "pack_model_", "ternarize", "ternary_linear_ref",
    "ternary_matmul", "unpack_k16", "set_act_quant_", "CheckpointError", "LoadedCheckpoint", "load_checkpoint",
    "save_checkpoint", "save_official", "save_torch", "__version__",
]
