"""terdit::TernaryMatMul (docs/design.md sections 4 and 7): the op's identity and size rule,
shared by the PyTorch reference, the exporter, the TensorRT plugin's Python side and the runtime
(the written contract is plugins/ternaryMatMulPlugin/TernaryMatMul_PluginConfig.yaml)."""
from __future__ import annotations

DOMAIN = "terdit"
OP_TYPE = "TernaryMatMul"
OP_VERSION = 1
CONTRACT_VERSION = 1
GRAPH_OPSET = 20
# The TensorRT plugin the ONNX parser maps the node to (creator name = op_type).
PLUGIN_NAME = OP_TYPE
PLUGIN_VERSION = "1"
PLUGIN_NAMESPACE = ""
REQUIRED_ATTRIBUTES = ("K", "N", "plugin_version", "plugin_namespace")
OPTIONAL_ATTRIBUTES = ("act_quant",)                  # absent means ACT_QUANT_DEFAULT
ATTRIBUTES = REQUIRED_ATTRIBUTES + OPTIONAL_ATTRIBUTES
# Activation quantization of the product:
# - "none": weight-only (W1.58A16).
# - "int8" (W1.58A8 with int8 activations, BitNet b1.58's A8; CPU kernels, ONNX Runtime and
#   PyTorch only, the TensorRT plugin refuses it): each row m of X quantized with the fp32 scale
#   s[m] = max(amax_k |X[m, k]|, 1e-12) / 127 to xq = clamp(round_half_even(X / s[m]), -127,
#   127) (true fp32 division), acc = xq @ T^T exact (integer sums), then Y = (acc * s[m]) *
#   scale[n] + bias[n] as separate fp32 ops in that order; defined by terdit.kernels.int8's
#   quantize_rows_int8_ref and ternary_linear_int8_ref.
# - "fp8" (W1.58A8: each row m of X quantized to float8 e4m3 with s[m] = max(amax_k |X[m, k]|,
#   1e-12) / 448, fp32 accumulation, Y = acc * s[m] * scale[n] + bias[n]; defined by
#   terdit.kernels.w2a8's quantize_rows_e4m3_ref and ternary_linear_e4m3_ref).
ACT_QUANT = ("none", "int8", "fp8")
ACT_QUANT_DEFAULT = "none"
# The activation dtypes (X and Y) by the names every command line uses: --dtype of the exporter
# and the torch backend, build-engine's precisions. Index order = the ONNX / kernel type codes'
# order: float32, float16, bfloat16.
DTYPES = ("fp32", "fp16", "bf16")
# Kernels tile K and N by 16 (k16 words hold 16 weights).
SIZE_MULTIPLE = 16
WEIGHT_LAYOUT = "k16"


def k16_words(k: int) -> int:
    """int32 words per weight row of the k16 layout."""
    return (k + 15) // 16


def size_violation(in_features: int, out_features: int) -> str | None:
    """Why a layer cannot be a TernaryMatMul node, or None when it can."""
    if in_features % SIZE_MULTIPLE or out_features % SIZE_MULTIPLE:
        return (f"in_features={in_features}, out_features={out_features}: TernaryMatMul needs "
                f"both to be multiples of {SIZE_MULTIPLE}; choose dims that are (pad the layer) "
                f"or run the model with --backend torch")
    return None


def node_attributes(k: int, n: int, act_quant: str = "none") -> dict:
    """The attributes of one node. `plugin_namespace` must be present: TensorRT 10.15+ / 11
    prefer the registered plugin over the local function only when it is."""
    if act_quant not in ACT_QUANT:
        raise ValueError(f"act_quant={act_quant!r} is not one of {ACT_QUANT}")
    attrs = {"K": int(k), "N": int(n), "plugin_version": PLUGIN_VERSION,
             "plugin_namespace": PLUGIN_NAMESPACE}
    if act_quant != ACT_QUANT_DEFAULT:
        attrs["act_quant"] = act_quant
    return attrs
