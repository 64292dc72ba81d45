"""Small ONNX files with TernaryMatMul nodes for the build-engine tests (the stand-in parser reads
real ONNX files)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from terdit_common import op

from exporter import contract

K = 64


def ternary_onnx(path: Path, *, batch="batch", nodes: int = 3, dtype: int = TensorProto.FLOAT,
                 cfg: bool = True, namespace=True, function: bool = True,
                 act_quant: str = "none", extra_op: str | None = None) -> Path:
    """x [batch, 16, K] -> `nodes` chained TernaryMatMul nodes -> out, plus the DiT's other
    inputs t [batch], y [batch] (and a 0-d cfg_scale). `namespace`: True (every node has
    plugin_namespace), False (none has it) or the number of leading nodes that have it.
    `extra_op`: a node of that op_type in domain 'custom' (no function, no plugin)."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.integers(0, 2**31, (K, K // 16), dtype=np.int64)
                                     .astype(np.int32), "W"),
             numpy_helper.from_array(np.ones(K, np.float32), "scale"),
             numpy_helper.from_array(np.zeros(K, np.float32), "bias")]
    graph_nodes, x = [], "x"
    for i in range(nodes):
        attrs = op.node_attributes(K, K, act_quant)
        has_namespace = namespace if isinstance(namespace, bool) else i < namespace
        if not has_namespace:
            del attrs["plugin_namespace"]
        graph_nodes.append(helper.make_node(op.OP_TYPE, [x, "W", "scale", "bias"],
                                            [f"h{i}"], domain=op.DOMAIN, name=f"tmm{i}",
                                            **attrs))
        x = f"h{i}"
    if extra_op:
        graph_nodes.append(helper.make_node(extra_op, [x], ["h_extra"], domain="custom",
                                            name="extra"))
        x = "h_extra"
    graph_nodes.append(helper.make_node("Identity", [x], ["out"], name="out"))
    inputs = [helper.make_tensor_value_info("x", dtype, [batch, 16, K]),
              helper.make_tensor_value_info("t", TensorProto.FLOAT, [batch]),
              helper.make_tensor_value_info("y", TensorProto.INT64, [batch])]
    if cfg:
        inputs.append(helper.make_tensor_value_info("cfg_scale", TensorProto.FLOAT, []))
    value_info = [helper.make_tensor_value_info(f"h{i}", dtype, [batch, 16, K])
                  for i in range(nodes)]
    graph = helper.make_graph(graph_nodes, "g", inputs,
                              [helper.make_tensor_value_info("out", dtype, [batch, 16, K])],
                              inits, value_info=value_info)
    opsets = [helper.make_opsetid("", op.GRAPH_OPSET),
              helper.make_opsetid(op.DOMAIN, op.OP_VERSION)]
    if extra_op:
        opsets.append(helper.make_opsetid("custom", 1))
    model = helper.make_model(graph, opset_imports=opsets, functions=[
        contract.ternary_matmul_function(act_quant)] if function else [])
    onnx.save(model, str(path))
    return path
