"""TerDiT reference (torch only): the model (config, model, fused), the ternary formats and layers
(formats, ternary), checkpoint I/O (checkpoint, loading, official), the diffusion process
(diffusion) and the sampling adapter (inference). Subpackages: terdit.train (the QAT trainer),
terdit.evaluate (FID, class accuracy), terdit.kernels (CUDA and CPU kernels, activation modes).
The public names below load on first use (terdit_common.lazy): `import terdit` imports no torch."""
from terdit_common.lazy import lazy_exports

__version__ = "0.1.0"

_EXPORTS = {
    **dict.fromkeys(("CheckpointError", "LoadedCheckpoint", "load_checkpoint", "save_checkpoint",
                     "save_official", "save_torch"), ".checkpoint"),
    **dict.fromkeys(("OFFICIAL_NAMES", "PRESETS", "TerDiTConfig"), ".config"),
    **dict.fromkeys(("hqq_to_k16", "k16_to_hqq", "pack_k16", "ternarize", "unpack_k16"),
                    ".formats"),
    "set_act_quant_": ".kernels.int8",
    **dict.fromkeys(("TerDiT", "guide"), ".model"),
    **dict.fromkeys(("PackedTernaryLinear", "TernaryLinear", "pack_model_", "ternary_linear_ref",
                     "ternary_matmul"), ".ternary"),
}
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)

__all__ = [*_EXPORTS, "__version__"]
