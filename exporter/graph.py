"""The graph an export lowers: model(x, t, y [, cfg_scale]) -> out with terdit::TernaryMatMul
nodes (torch.onnx dynamo export + a translation table for the registered ternary ops), then the
finishing touches (named batch dimension, the terdit domain, the portable local function)."""
from __future__ import annotations

import contextlib
import io
import logging
import sys
import warnings
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from torch import Tensor, nn

from terdit import TerDiT
from terdit.fused import FusedTerDiT
from terdit.kernels.int8 import set_act_quant_
from terdit.ternary import TERNARY_LAYERS, swiglu_ref, ternary_linear_ref
from terdit_common import op
from terdit_common.guidance import guide
from terdit_common.manifest import DATA_FILE
from terdit_common.op import node_attributes, size_violation

from . import contract
from .options import ExportError, ExportOptions


class DiffusionGraph(nn.Module):
    """What the ONNX file computes: model(x, t, y) -> out, float32 I/O whatever the compute dtype.

    With CFG folded in, x/t/y hold B images; the graph runs [x; x] with labels [y; null] and
    returns the guided eps (plus the conditional half's other channels) for the B images, exactly
    the first half of the official forward_with_cfg.
    """

    def __init__(self, model: nn.Module, cfg_mode: Optional[str], null_class: int,
                 in_channels: int) -> None:
        super().__init__()
        self.model = model
        self.cfg_mode = cfg_mode
        self.null_class = null_class
        self.in_channels = in_channels

    def forward(self, x: Tensor, t: Tensor, y: Tensor, cfg_scale: Optional[Tensor] = None
                ) -> Tensor:
        if self.cfg_mode is None:
            return self.model(x, t, y).float()
        out = self.model(torch.cat([x, x]), torch.cat([t, t]),
                         torch.cat([y, torch.full_like(y, self.null_class)]))
        return guide(out, cfg_scale, self.cfg_mode, self.in_channels).float()


def _translation_table(act_quant: str) -> dict:
    """terdit's registered ops -> TernaryMatMul nodes. The weight-only ops get `act_quant` (an
    fp8 export lowers the weight-only model); the int8 ops, which a model runs after
    terdit.kernels.int8.set_act_quant_(model, "int8"), always get act_quant="int8"."""
    import onnxscript
    from onnxscript import ir
    from onnxscript import opset20 as onnx_op

    import terdit.kernels.int8  # noqa: F401  (registers terdit::ternary_matmul_int8*)

    contract.register_schema()
    terdit_ops = onnxscript.values.Opset(op.DOMAIN, op.OP_VERSION)

    def node(mode):
        def ternary_matmul(x, w, scale, bias=None):
            k, n = int(x.shape[-1]), int(w.shape[0])
            if bias is None:
                # Every node carries a bias (zeros here): the portable function adds it.
                bias = onnx_op.Constant(value=ir.tensor(np.zeros(n, np.float32)))
            return terdit_ops.TernaryMatMul(x, w, scale, bias, **node_attributes(k, n, mode))

        def ternary_matmul_swiglu(x, w, scale):
            n = int(w.shape[0])
            a = ternary_matmul(x, w, scale)
            h1 = onnx_op.Slice(a, [0], [n // 2], [-1])
            h3 = onnx_op.Slice(a, [n // 2], [n], [-1])
            return onnx_op.Mul(onnx_op.Mul(h1, onnx_op.Sigmoid(h1)), h3)

        return ternary_matmul, ternary_matmul_swiglu

    plain, plain_swiglu = node(act_quant)
    int8, int8_swiglu = node("int8")
    ops = torch.ops.terdit
    return {ops.ternary_matmul.default: plain, ops.ternary_matmul_swiglu.default: plain_swiglu,
            ops.ternary_matmul_int8.default: int8,
            ops.ternary_matmul_int8_swiglu.default: int8_swiglu}


def build_graph(model: TerDiT, options: ExportOptions) -> DiffusionGraph:
    cfg = model.cfg
    if not model.packed:
        raise ExportError("the model must be packed (ternary); load it with packed=True")
    for name, m in model.named_modules():
        why = size_violation(m.in_features, m.out_features) \
            if isinstance(m, TERNARY_LAYERS) else None
        if why:
            raise ExportError(f"layer {name!r}: {why}")
    net: nn.Module = FusedTerDiT(model) if options.fuse else model
    # int8: PyTorch runs the mode itself (the validation reference) and lowers its int8 ops
    set_act_quant_(net, "int8" if options.act_quant == "int8" else "none")
    mode = None if options.cfg == "none" else options.cfg
    return DiffusionGraph(net, mode, cfg.null_class, cfg.in_channels).eval()


def example_inputs(cfg, batch: int, cfg_mode: Optional[str], seed: int = 0) -> dict[str, Tensor]:
    g = torch.Generator().manual_seed(seed)
    inputs = {"x": torch.randn(batch, cfg.in_channels, cfg.input_size, cfg.input_size, generator=g),
              "t": torch.randint(0, 1000, (batch,), generator=g).float(),
              "y": torch.randint(0, cfg.num_classes, (batch,), generator=g)}
    if cfg_mode is not None:
        inputs["cfg_scale"] = torch.tensor(4.0)
    return inputs


def lower(graph: DiffusionGraph, cfg, act_quant: str = op.ACT_QUANT_DEFAULT) -> Any:
    """torch.onnx.export (dynamo) -> onnx_ir Model; every TernaryMatMul node gets `act_quant`."""
    contract.register_schema()
    inputs = example_inputs(cfg, 2, graph.cfg_mode)
    batch = torch.export.Dim("batch", min=1, max=4096)
    dynamic = {"x": {0: batch}, "t": {0: batch}, "y": {0: batch}}
    names = ["x", "t", "y"]
    if graph.cfg_mode is not None:
        dynamic["cfg_scale"] = None
        names.append("cfg_scale")
    with torch.no_grad(), quiet_export():
        program = torch.onnx.export(
            graph, tuple(inputs.values()), dynamo=True, opset_version=op.GRAPH_OPSET,
            input_names=names, output_names=["out"], dynamic_shapes=dynamic,
            custom_translation_table=_translation_table(act_quant), optimize=True, verify=False,
            verbose=False)
    return program.model


class ActQuantEmulation(torch.overrides.TorchFunctionMode):
    """PyTorch runs the model as an act_quant="fp8" file computes: the input of every terdit
    ternary op quantized per token (terdit.kernels.w2a8.quantize_rows_e4m3_ref), the product in fp32
    (ternary_linear_ref / swiglu_ref) and cast back to the input's dtype, as the ONNX function
    does. The reference of a --w2a8 export's validation."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.ops.terdit.ternary_matmul.default:
            x, w, scale, *bias = args
            xq = contract.dequantize_rows_e4m3(x)
            return ternary_linear_ref(xq, w, scale, *bias, **kwargs).to(x.dtype)
        if func is torch.ops.terdit.ternary_matmul_swiglu.default:
            x, w, scale = args
            return swiglu_ref(contract.dequantize_rows_e4m3(x), w, scale).to(x.dtype)
        return func(*args, **kwargs)


def act_quant_emulation(act_quant: str):
    """A context in which PyTorch computes the model as an `act_quant` file does: fp8 is
    emulated; "none" and "int8" (which the graph runs itself, see build_graph) are unchanged."""
    return ActQuantEmulation() if act_quant == "fp8" else contextlib.nullcontext()


@contextlib.contextmanager
def quiet_export():
    """torch.onnx prints progress lines and library warnings; keep them unless export fails."""
    buf = io.StringIO()
    loggers = [logging.getLogger(n) for n in ("torch.onnx", "torch.export", "torch._dynamo")]
    levels = [lg.level for lg in loggers]
    try:
        for lg in loggers:
            lg.setLevel(logging.ERROR)
        with warnings.catch_warnings(), contextlib.redirect_stdout(buf):
            warnings.simplefilter("ignore")
            yield
    except Exception:
        sys.stderr.write(buf.getvalue())
        raise
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def finalize(model_ir, with_function: bool, metadata: dict,
             act_quant: str = op.ACT_QUANT_DEFAULT) -> None:
    """Name the batch dim, import the terdit domain, append the portable function (the body of
    `act_quant`, which every TernaryMatMul node must carry: contract.ternary_matmul_function)."""
    from onnxscript import ir

    for node in model_ir.graph:
        if node.op_type == op.OP_TYPE and node.domain == op.DOMAIN:
            attr = node.attributes.get("act_quant")
            mode = attr.value if attr is not None else op.ACT_QUANT_DEFAULT
            if mode != act_quant:
                raise ExportError(f"internal error: node {node.name!r} has act_quant={mode!r} "
                                  f"in an act_quant={act_quant!r} export; please report this")
    model_ir.opset_imports[op.DOMAIN] = op.OP_VERSION
    for value in list(model_ir.graph.inputs) + list(model_ir.graph.outputs):
        if value.name == "cfg_scale":
            continue
        if value.shape is None or len(value.shape) == 0 or isinstance(value.shape[0], int):
            raise ExportError(f"internal error: the batch dimension of graph value {value.name!r} "
                              f"was specialised to {value.shape}; please report this")
        dims = list(value.shape)
        dims[0] = ir.SymbolicDim("batch")
        value.shape = ir.Shape(dims)
    if with_function:
        fn = ir.serde.deserialize_function(contract.ternary_matmul_function(act_quant))
        model_ir.functions[fn.identifier()] = fn
    for key, val in metadata.items():
        model_ir.metadata_props[key] = val


def save_model(model_ir, path: Path, external: bool) -> None:
    from onnxscript import ir
    if external:
        ir.save(model_ir, path, external_data=DATA_FILE)
    else:
        ir.save(model_ir, path)


def _weight_bytes(model: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))
