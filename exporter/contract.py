"""The terdit::TernaryMatMul op contract (version 1, docs/design.md section 4) on the ONNX side.

The written contract is plugins/ternaryMatMulPlugin/TernaryMatMul_PluginConfig.yaml; the
exporter's nodes and the TensorRT plugin creator are both tested against it. This module holds:
- the `onnx.defs.OpSchema` (registered so onnx.checker's full check accepts the nodes),
- the portable local function `terdit.TernaryMatMul` (standard-op decode) that lets ONNX Runtime,
  onnx.reference and polygraphy run an exported file with no custom library,
- an `onnx.reference` OpRun implementing the op directly (independent of the function).
"""
from __future__ import annotations

import numpy as np
import onnx
import torch
from onnx import FunctionProto, TensorProto, helper
from onnx.defs import OpSchema

from terdit.kernels.int8 import (INT8_MAX, INT8_MIN_AMAX, quantize_rows_int8_ref,
                                 ternary_linear_int8_ref)
from terdit.kernels.w2a8 import E4M3_MAX, E4M3_MIN_AMAX, quantize_rows_e4m3_ref
from terdit.formats import unpack_k16
from terdit_common.op import (ACT_QUANT, ACT_QUANT_DEFAULT, DOMAIN,
                              GRAPH_OPSET, OP_TYPE, OP_VERSION, OPTIONAL_ATTRIBUTES,
                              REQUIRED_ATTRIBUTES)

__all__ = ["node_act_quant", "dequantize_rows_e4m3", "register_schema", "ternary_matmul_function",
           "reference_ops", "decode_k16_numpy"]

ACTIVATION_TYPES = ("tensor(float)", "tensor(float16)", "tensor(bfloat16)")


def register_schema() -> None:
    """Register terdit::TernaryMatMul v1 with onnx (idempotent)."""
    try:
        onnx.defs.get_schema(OP_TYPE, OP_VERSION, DOMAIN)
        return
    except onnx.defs.SchemaError:
        pass
    P = OpSchema.FormalParameter
    schema = OpSchema(
        OP_TYPE, DOMAIN, OP_VERSION,
        doc="Y = X @ (scale * T)^T + bias with ternary T in the k16 layout: int32 "
            "[N, ceil(K/16)], weight (n, k) in word k/16 at bits 2*(k%16), code = w + 1.",
        inputs=[P("X", "T", "activations [..., K]"),
                P("W", "tensor(int32)", "k16 codes [N, ceil(K/16)]"),
                P("scale", "tensor(float)", "per-output-channel scale [N]"),
                P("bias", "tensor(float)", "bias [N]",
                  param_option=OpSchema.FormalParameterOption.Optional)],
        outputs=[P("Y", "T", "[..., N]")],
        type_constraints=[("T", list(ACTIVATION_TYPES), "activation types")],
        attributes=[OpSchema.Attribute("K", OpSchema.AttrType.INT, "input features"),
                    OpSchema.Attribute("N", OpSchema.AttrType.INT, "output features"),
                    OpSchema.Attribute("plugin_version", OpSchema.AttrType.STRING,
                                       "TensorRT plugin version, \"1\""),
                    OpSchema.Attribute("plugin_namespace", OpSchema.AttrType.STRING,
                                       "TensorRT plugin namespace, \"\""),
                    # optional without a schema default, so that onnxscript leaves it out of
                    # weight-only nodes as node_attributes() does (absent means "none")
                    OpSchema.Attribute("act_quant", OpSchema.AttrType.STRING,
                                       "activation quantization: \"none\" (when absent), "
                                       "\"int8\" (per-token int8, s = amax / 127, CPU "
                                       "kernels only) or \"fp8\" (per-token float8 e4m3, "
                                       "W1.58A8)",
                                       required=False)])
    onnx.defs.register_schema(schema)


def _ref_attr(name: str, ref: str, typ) -> onnx.AttributeProto:
    attr = onnx.AttributeProto()
    attr.name, attr.ref_attr_name, attr.type = name, ref, typ
    return attr


def _decode_lut() -> np.ndarray:
    """float32 [256, 4]: lut[b, i] = ((b >> 2i) & 3) - 1, the 4 ternary weights of a k16 byte."""
    b = np.arange(256, dtype=np.int32)[:, None]
    return (((b >> (2 * np.arange(4, dtype=np.int32))) & 3) - 1).astype(np.float32)


def ternary_matmul_function(act_quant: str = ACT_QUANT_DEFAULT) -> FunctionProto:
    """terdit.TernaryMatMul as a local function of standard opset-20 ops.

    Decode (every mode): the first op on W adds a zero computed from X (Cast(Size(X) - Size(X))),
    so no runtime can constant-fold the decode at load time (folded, it would hold every weight
    as fp32 at once, plus its int32 intermediates). The 4 bytes of each int32 word come from
    exact INT32 ops valid for words with bit 31 set: with D = 256^j, byte_j = ((W - W mod D) / D)
    mod 256 (Mod fmod=0 takes the divisor's sign; D divides 2^32). A Gather from the constant
    float LUT [256, 4] (lut[b, i] = ((b >> 2i) & 3) - 1) turns bytes into ternary weights
    T [N, KW*16]; X is zero-padded to KW*16 columns. Then Y = (X @ T^T) * scale[n] + bias[n] in
    fp32 (Gemm on the unscaled T), cast back to X's type. Every node the exporter writes carries
    a bias (zeros when the layer has none): the function needs it.

    act_quant="int8" quantizes the fp32 rows of X first (terdit.kernels.int8): per row ReduceMax |X| ->
    s = max(amax, 1e-12) / 127 -> QuantizeLinear to int8 (per-axis on the rows, round half to
    even, |X / s| <= 127 by construction) -> Cast to float; then Y = ((xq @ T^T) * s[m]) *
    scale[n] + bias[n], each a separate fp32 op, as terdit.kernels.int8.ternary_linear_int8_ref.

    act_quant="fp8" (W1.58A8) quantizes the fp32 rows of X as the plugin does: per row
    ReduceMax |X| -> s = max(amax, 1e-12) / 448 -> QuantizeLinear to float8e4m3fn (per-axis on
    the rows, saturate=1; float8 Q/DQ need opset 19+) -> DequantizeLinear, then the same Gemm.
    A function has one body and the body cannot read a STRING attribute without string
    tensors (which TensorRT's function fallback cannot parse), so the body is chosen per file:
    every node of one export has the same act_quant (graph.finalize checks it) and the file
    carries this mode's body. A file mixing modes would run all its nodes in the body's mode
    under ONNX Runtime; the plugin and reference_ops() follow each node's attribute.
    """
    if act_quant not in ACT_QUANT:
        raise ValueError(f"act_quant={act_quant!r} is not one of {ACT_QUANT}")
    f32 = lambda name, val: helper.make_node(  # noqa: E731
        "Constant", [], [name], value=helper.make_tensor(name, TensorProto.FLOAT, [], [val]))
    i32 = lambda name, vals: helper.make_node(  # noqa: E731
        "Constant", [], [name], value=helper.make_tensor(name, TensorProto.INT32,
                                                         [len(vals)], vals))
    i64 = lambda name, vals: helper.make_node(  # noqa: E731
        "Constant", [], [name], value=helper.make_tensor(name, TensorProto.INT64,
                                                         [len(vals)], vals))
    k_scalar = helper.make_node("Constant", [], ["k_scalar"])
    k_scalar.attribute.append(_ref_attr("value_int", "K", onnx.AttributeProto.INT))
    n_scalar = helper.make_node("Constant", [], ["n_scalar"])
    n_scalar.attribute.append(_ref_attr("value_int", "N", onnx.AttributeProto.INT))
    lut = _decode_lut()
    x_rows = "x2"
    quantize = []
    if act_quant in ("int8", "fp8"):
        qmax, min_amax = (INT8_MAX, INT8_MIN_AMAX) if act_quant == "int8" else (E4M3_MAX,
                                                                                E4M3_MIN_AMAX)
        quantize = [
            # s = max(amax_k |X[m, k]|, 1e-12) / qmax per row m, as a [M] per-axis scale
            helper.make_node("Abs", ["x2"], ["x2_abs"]),
            helper.make_node("ReduceMax", ["x2_abs", "axis1"], ["amax"], keepdims=0),
            f32("min_amax", min_amax), f32("q_max", qmax),
            helper.make_node("Max", ["amax", "min_amax"], ["amax_c"]),
            helper.make_node("Div", ["amax_c", "q_max"], ["s_row"]),
            helper.make_node("Shape", ["s_row"], ["m1"]),
        ]
    if act_quant == "int8":
        x_rows = "xq_f"
        quantize += [
            # an int8 zero point of shape [M] selects int8 as QuantizeLinear's output
            helper.make_node("ConstantOfShape", ["m1"], ["zp_i8"],
                             value=helper.make_tensor("zp_i8", TensorProto.INT8, [1], [0])),
            helper.make_node("QuantizeLinear", ["x2", "s_row", "zp_i8"], ["x2_q"], axis=0),
            helper.make_node("Cast", ["x2_q"], ["xq_f"], to=TensorProto.FLOAT),
        ]
    elif act_quant == "fp8":
        x_rows = "x2_dq"
        quantize += [
            # a float8 zero point of shape [M] selects float8e4m3fn as QuantizeLinear's output
            # (ONNX Runtime's ConstantOfShape has no float8 output, hence the Cast)
            helper.make_node("ConstantOfShape", ["m1"], ["zp32"],
                             value=helper.make_tensor("zp32", TensorProto.FLOAT, [1], [0.0])),
            helper.make_node("Cast", ["zp32"], ["zp8"], to=TensorProto.FLOAT8E4M3FN),
            helper.make_node("QuantizeLinear", ["x2", "s_row", "zp8"], ["x2_q"], axis=0,
                             saturate=1),
            helper.make_node("DequantizeLinear", ["x2_q", "s_row", "zp8"], ["x2_dq"], axis=0),
        ]
    acc_scaled = [helper.make_node("Mul", ["acc", "scale"], ["y_scaled"])]
    if act_quant == "int8":
        acc_scaled = [
            helper.make_node("Unsqueeze", ["s_row", "axis1"], ["s_col"]),
            helper.make_node("Mul", ["acc", "s_col"], ["acc_s"]),
            helper.make_node("Mul", ["acc_s", "scale"], ["y_scaled"]),
        ]
    nodes = [
        k_scalar, n_scalar,
        i64("axis0", [0]), i64("axis1", [1]), i64("axis2", [2]), i64("minus1", [-1]),
        i64("zeros3", [0, 0, 0]), i64("sixteen", [16]),
        helper.make_node("Unsqueeze", ["k_scalar", "axis0"], ["k1"]),
        helper.make_node("Unsqueeze", ["n_scalar", "axis0"], ["n1"]),
        # X -> fp32 [M, K]
        helper.make_node("Cast", ["X"], ["x32"], to=TensorProto.FLOAT),
        helper.make_node("Concat", ["minus1", "k1"], ["x2_shape"], axis=0),
        helper.make_node("Reshape", ["x32", "x2_shape"], ["x2"]),
        *quantize,
        # a zero that depends on X: nothing below can be constant-folded at load time
        helper.make_node("Size", ["X"], ["x_size"]),
        helper.make_node("Sub", ["x_size", "x_size"], ["zero64"]),
        helper.make_node("Cast", ["zero64"], ["dyn_zero"], to=TensorProto.INT32),
        helper.make_node("Add", ["W", "dyn_zero"], ["w_dyn"]),
        # W [N, KW] -> bytes [N, KW, 4]: byte_j = ((W - W mod 256^j) / 256^j) mod 256
        helper.make_node("Unsqueeze", ["w_dyn", "axis2"], ["w3"]),
        i32("pow256", [1, 1 << 8, 1 << 16, 1 << 24]), i32("c256", [256]),
        helper.make_node("Mod", ["w3", "pow256"], ["low"], fmod=0),
        helper.make_node("Sub", ["w3", "low"], ["high"]),
        helper.make_node("Div", ["high", "pow256"], ["shifted"]),
        helper.make_node("Mod", ["shifted", "c256"], ["bytes"], fmod=0),
        # bytes -> ternary weights [N, KW, 4, 4] -> T [N, KW*16] (columns past K are zeros)
        helper.make_node("Constant", [], ["lut"], value=helper.make_tensor(
            "lut", TensorProto.FLOAT, list(lut.shape), lut.ravel().tolist())),
        helper.make_node("Gather", ["lut", "bytes"], ["tern4"], axis=0),
        helper.make_node("Concat", ["n1", "minus1"], ["t_shape"], axis=0),
        helper.make_node("Reshape", ["tern4", "t_shape"], ["tern"]),
        # X's rows zero-padded from K to KW*16 columns
        helper.make_node("Shape", ["W"], ["kw1"], start=1, end=2),
        helper.make_node("Mul", ["kw1", "sixteen"], ["kp1"]),
        helper.make_node("Sub", ["kp1", "k1"], ["k_pad"]),
        helper.make_node("Concat", ["zeros3", "k_pad"], ["pads"], axis=0),
        helper.make_node("Pad", [x_rows, "pads"], ["x_pad"]),
        helper.make_node("Gemm", ["x_pad", "tern"], ["acc"], transB=1),
        *acc_scaled,
        helper.make_node("Add", ["y_scaled", "bias"], ["y2"]),
        helper.make_node("Shape", ["X"], ["lead"], end=-1),
        helper.make_node("Concat", ["lead", "n1"], ["y_shape"], axis=0),
        helper.make_node("Reshape", ["y2", "y_shape"], ["y32"]),
        helper.make_node("CastLike", ["y32", "X"], ["Y"]),
    ]
    return helper.make_function(
        DOMAIN, OP_TYPE, ["X", "W", "scale", "bias"], ["Y"], nodes,
        opset_imports=[helper.make_opsetid("", GRAPH_OPSET)],
        attributes=list(REQUIRED_ATTRIBUTES),
        # declared with its default, so nodes without it (weight-only) still bind every attribute
        attribute_protos=[helper.make_attribute(a, ACT_QUANT_DEFAULT) for a in OPTIONAL_ATTRIBUTES],
        doc_string=f"Portable decode of terdit::TernaryMatMul v1 (k16 ternary weights), "
                   f"act_quant={act_quant} for every node of this file.")


def dequantize_rows_e4m3(x: torch.Tensor) -> torch.Tensor:
    """What an act_quant="fp8" function's DequantizeLinear yields for X (fp32 [..., K]): the
    per-token e4m3 values of terdit.kernels.w2a8.quantize_rows_e4m3_ref times their row scale."""
    xq, s = quantize_rows_e4m3_ref(x)
    return xq.float() * s.unsqueeze(-1)


def node_act_quant(node) -> str:
    """The act_quant of a TernaryMatMul NodeProto (ACT_QUANT_DEFAULT when absent)."""
    for attr in node.attribute:
        if attr.name == "act_quant":
            return onnx.helper.get_attribute_value(attr).decode()
    return ACT_QUANT_DEFAULT


def decode_k16_numpy(w: np.ndarray, k: int) -> np.ndarray:
    """k16 int32 [N, KW] -> ternary float32 [N, k] (terdit's decode, for the reference OpRun)."""
    w = np.array(w, np.int32, order="C")  # a writable copy: ORT hands over read-only arrays
    return unpack_k16(torch.from_numpy(w), k, torch.float32).numpy()


def reference_ops():
    """[OpRun] implementing terdit::TernaryMatMul for onnx.reference.ReferenceEvaluator."""
    from onnx.reference.op_run import OpRun

    class TernaryMatMul(OpRun):
        op_domain = DOMAIN

        def _run(self, X, W, scale, bias=None, K=None, N=None, plugin_version=None,
                 plugin_namespace=None, act_quant=None):
            if W.shape[0] != N or X.shape[-1] != K:
                raise ValueError(f"TernaryMatMul: K={K}, N={N} disagree with X {X.shape} / "
                                 f"W {W.shape}")
            mode = ACT_QUANT_DEFAULT if act_quant is None else (
                act_quant.decode() if isinstance(act_quant, bytes) else act_quant)
            if mode not in ACT_QUANT:
                raise ValueError(f"TernaryMatMul: act_quant={mode!r} is not one of {ACT_QUANT}")
            x = X.astype(np.float32).reshape(-1, int(K))
            if mode == "int8":
                xq, s = quantize_rows_int8_ref(torch.from_numpy(x))
                w = torch.from_numpy(np.array(W, np.int32, order="C"))
                y = ternary_linear_int8_ref(xq, s, w, torch.from_numpy(np.asarray(scale)),
                                            None if bias is None else
                                            torch.from_numpy(np.asarray(bias))).numpy()
                return (y.reshape(*X.shape[:-1], int(N)).astype(X.dtype),)
            if mode == "fp8":
                x = dequantize_rows_e4m3(torch.from_numpy(x)).numpy()
            y = np.empty((x.shape[0], int(N)), np.float32)
            rows = max(1, (1 << 24) // max(int(K), 1))  # decode ~16M weights at a time
            for n0 in range(0, int(N), rows):
                t = decode_k16_numpy(W[n0:n0 + rows], int(K))
                y[:, n0:n0 + rows] = x @ (t * scale[n0:n0 + rows, None]).T
            if bias is not None:
                y += bias
            return (y.reshape(*X.shape[:-1], int(N)).astype(X.dtype),)

    return [TernaryMatMul]
