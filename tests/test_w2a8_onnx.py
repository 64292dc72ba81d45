"""W1.58A8 through ONNX: TernaryMatMul act_quant="fp8", its portable function (QuantizeLinear /
DequantizeLinear to float8e4m3fn), the reference OpRun and `python -m exporter --w2a8`, all
against the PyTorch definition of the mode, terdit.kernels.w2a8.quantize_rows_e4m3_ref +
ternary_linear_e4m3_ref (what the plugin's kernels are tested against)."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from onnx.reference import ReferenceEvaluator

from terdit_common import op

from exporter import ExportError, ExportOptions, contract, export
from exporter.graph import build_graph, example_inputs, finalize, lower
from terdit import TerDiTConfig, load_checkpoint, save_checkpoint
from terdit.kernels.w2a8 import quantize_rows_e4m3_ref, ternary_linear_e4m3_ref
from terdit.formats import pack_k16
from terdit.ternary import ternary_linear_ref
from tests.helpers import random_model

ROOT = Path(__file__).resolve().parents[1]
QUIET = dict(log=lambda *_: None)
CPU = ["CPUExecutionProvider"]


def tmm_model(k, n, modes, dtype=TensorProto.FLOAT, body=None):
    """One TernaryMatMul node per entry of `modes` (chained: node i feeds node i + 1, so K == N
    when there are several), with the portable function of `body` (default: modes[0])."""
    contract.register_schema()
    nodes, x = [], "X"
    for i, mode in enumerate(modes):
        y = "Y" if i == len(modes) - 1 else f"h{i}"
        nodes.append(helper.make_node(op.OP_TYPE, [x, "W", "scale", "bias"], [y],
                                      domain=op.DOMAIN, name=f"tmm{i}",
                                      **op.node_attributes(k, n, mode)))
        x = y
    graph = helper.make_graph(nodes, "g", [
        helper.make_tensor_value_info("X", dtype, ["M", k]),
        helper.make_tensor_value_info("W", TensorProto.INT32, [n, (k + 15) // 16]),
        helper.make_tensor_value_info("scale", TensorProto.FLOAT, [n]),
        helper.make_tensor_value_info("bias", TensorProto.FLOAT, [n])],
        [helper.make_tensor_value_info("Y", dtype, ["M", n])])
    model = helper.make_model(graph, opset_imports=[
        helper.make_opsetid("", op.GRAPH_OPSET),
        helper.make_opsetid(op.DOMAIN, op.OP_VERSION)],
        functions=[contract.ternary_matmul_function(body or modes[0])])
    onnx.checker.check_model(model, full_check=True)
    return model


def run_ort(model, feeds):
    return ort.InferenceSession(model.SerializeToString(), providers=CPU).run(None, feeds)[0]


def _oracle(x, w, scale, bias, mode):
    if mode == "none":
        return ternary_linear_ref(x.float(), w, scale, bias)
    xq, s = quantize_rows_e4m3_ref(x)
    return ternary_linear_e4m3_ref(xq, s, w, scale, bias, torch.float32)


def _row_err(y, ref):
    """max over rows of max|y - ref| / max|ref| within the row."""
    y, ref = np.asarray(y, np.float32), np.asarray(ref, np.float32)
    return float((np.abs(y - ref).max(-1) / np.maximum(np.abs(ref).max(-1), 1e-30)).max())


def _e4m3_edge_rows(k):
    """Rows whose scale is exactly 1 or 2^-20 (amax 448 or 448 * 2^-20), holding every midpoint
    between neighbouring e4m3 values (round-to-nearest-even ties), plus a zero row, a row below
    the 1e-12 amax floor, subnormal-range values and a wide dynamic range."""
    values = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
    values = values[torch.isfinite(values)].unique()
    ties = torch.cat([(values[1:] + values[:-1]) / 2, torch.tensor([448.0])])
    ties = torch.nn.functional.pad(ties, (0, -ties.numel() % k)).reshape(-1, k)
    ties[:, -1] = 448.0
    g = torch.Generator().manual_seed(0)
    wide = torch.randn(6, k, generator=g) * torch.logspace(-30, 30, 6).reshape(-1, 1)
    return torch.cat([ties, -ties * 2.0 ** -20, torch.zeros(1, k), torch.full((1, k), 3e-13),
                      torch.randn(2, k, generator=g) * 1e-3, wide]).float()


def test_onnx_quantization_equals_the_torch_emulation_bit_for_bit():
    """Through an identity ternary weight the function's Y is its dequantized X: ONNX
    QuantizeLinear(saturate=1) / DequantizeLinear in ONNX Runtime and in onnx.reference, the
    OpRun and torch's float8_e4m3fn cast give the same values (ties to even, no overflow)."""
    k = 256
    x = _e4m3_edge_rows(k)
    w, scale, bias = pack_k16(torch.eye(k, dtype=torch.int8)), torch.ones(k), torch.zeros(k)
    feeds = {"X": x.numpy(), "W": w.numpy(), "scale": scale.numpy(), "bias": bias.numpy()}
    model = tmm_model(k, k, ["fp8"])
    expected = contract.dequantize_rows_e4m3(x).numpy()
    assert not np.array_equal(expected, x.numpy())                    # it did quantize
    assert np.array_equal(_oracle(x, w, scale, bias, "fp8").numpy(), expected)
    for name, y in (("onnxruntime", run_ort(model, feeds)),
                    ("onnx.reference", ReferenceEvaluator(model).run(None, feeds)[0]),
                    ("OpRun", ReferenceEvaluator(model, new_ops=contract.reference_ops())
                     .run(None, feeds)[0])):
        # equal values (the function adds the zero bias, so -0.0 comes back as +0.0)
        assert np.array_equal(y, expected), (name, np.abs(y - expected).max())


def test_dequantize_rows_e4m3():
    x = torch.tensor([[448.0, -2.0, 0.3, 3.0], [0.0, 0.0, 0.0, 0.0], [1e-20, 0.0, 0.0, 0.0]])
    xdq = contract.dequantize_rows_e4m3(x)                            # row 0: scale 1
    assert xdq.dtype == torch.float32 and xdq.shape == x.shape
    assert xdq[0, 0] == 448 and xdq[0, 1] == -2 and xdq[0, 3] == 3    # e4m3 values stay
    assert xdq[0, 2] != x[0, 2] and abs(xdq[0, 2] - x[0, 2]) <= 0.3 / 16
    assert torch.all(xdq[1] == 0) and xdq[2, 0] == 0                  # zero / below 1e-12 rows
    assert torch.equal(contract.dequantize_rows_e4m3(x.bfloat16()),
                       contract.dequantize_rows_e4m3(x.bfloat16().float()))


# max over rows of |ONNX - definition| / the row's largest output: the same quantized X, only
# the fp32 rounding order differs (the function scales X before the product, the definition
# after); ~1e-6 at worst here, 2e-6 is ~34 units of 2^-24 (README quotes this bound)
ROW_BOUND = 2e-6


@pytest.mark.parametrize("m", [1, 2, 7, 33, 1000])
@pytest.mark.parametrize("k, n", [(16, 16), (64, 48), (256, 128), (1536, 64), (48, 1536),
                                  (1536, 1536)])
def test_fp8_node_matches_the_torch_emulation(m, k, n):
    g = torch.Generator().manual_seed(m * 1000 + k + n)
    w = pack_k16(torch.randint(-1, 2, (n, k), generator=g, dtype=torch.int8))
    scale, bias = torch.rand(n, generator=g) + 0.5, torch.randn(n, generator=g)
    x = torch.randn(m, k, generator=g) * torch.exp(3 * torch.randn(m, 1, generator=g))
    feeds = {"X": x.numpy(), "W": w.numpy(), "scale": scale.numpy(), "bias": bias.numpy()}
    model = tmm_model(k, n, ["fp8"])
    ref = _oracle(x, w, scale, bias, "fp8").numpy()
    y = run_ort(model, feeds)
    oprun = ReferenceEvaluator(model, new_ops=contract.reference_ops()).run(None, feeds)[0]
    assert _row_err(y, ref) < ROW_BOUND
    assert _row_err(oprun, ref) < ROW_BOUND
    weight_only = _oracle(x, w, scale, bias, "none").numpy()
    assert _row_err(weight_only, ref) > 1e-3                          # the mode matters
    # float16 activations: quantized from the fp16 values, result rounded to fp16 once
    x16 = (8 * x / x.abs().amax(-1, keepdim=True)).half()            # no fp16 overflow in Y
    y16 = run_ort(tmm_model(k, n, ["fp8"], TensorProto.FLOAT16), {**feeds, "X": x16.numpy()})
    ref16 = _oracle(x16, w, scale, bias, "fp8").half().float().numpy()
    assert _row_err(y16.astype(np.float32), ref16) <= 2 * 2.0 ** -11


def test_mixed_modes_file_runs_every_node_in_the_body_mode():
    """What a file mixing act_quant values does (the exporter never writes one): the OpRun (and
    the plugin) follow each node's attribute; ONNX Runtime runs the file's one function body."""
    k = 64
    g = torch.Generator().manual_seed(3)
    w = pack_k16(torch.randint(-1, 2, (k, k), generator=g, dtype=torch.int8))
    scale, bias = torch.rand(k, generator=g) + 0.5, torch.randn(k, generator=g)
    x = torch.randn(5, k, generator=g)
    feeds = {"X": x.numpy(), "W": w.numpy(), "scale": scale.numpy(), "bias": bias.numpy()}
    model = tmm_model(k, k, ["fp8", "none"], body="fp8")
    per_node = _oracle(_oracle(x, w, scale, bias, "fp8"), w, scale, bias, "none").numpy()
    all_fp8 = _oracle(_oracle(x, w, scale, bias, "fp8"), w, scale, bias, "fp8").numpy()
    oprun = ReferenceEvaluator(model, new_ops=contract.reference_ops()).run(None, feeds)[0]
    assert _row_err(oprun, per_node) < 1e-5
    assert _row_err(run_ort(model, feeds), all_fp8) < 1e-5
    assert _row_err(per_node, all_fp8) > 1e-3


def test_function_and_options_refuse_unknown_modes():
    with pytest.raises(ValueError, match="act_quant='int4' is not one of"):
        contract.ternary_matmul_function("int4")
    with pytest.raises(ValueError, match="act_quant='int4' is not one of none, int8, fp8"):
        ExportOptions(act_quant="int4")
    with pytest.raises(ValueError, match="act_quant='fp4'"):
        op.node_attributes(16, 16, "fp4")


# ---- the exporter ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    model = random_model(TerDiTConfig.from_name("TerDiT-tiny", qk_norm=True), seed=0)
    return save_checkpoint(model, tmp_path_factory.mktemp("ck") / "tiny")


def _node_outputs(path, feeds):
    """Runs the file in ONNX Runtime with every TernaryMatMul's X and Y exposed as outputs."""
    model = onnx.load(str(path))
    nodes = [n for n in model.graph.node if n.op_type == op.OP_TYPE]
    typed = {v.name: v for v in list(model.graph.value_info) + list(model.graph.input)}
    names = list(dict.fromkeys(name for n in nodes for name in (n.input[0], n.output[0])))
    del model.graph.output[:]
    model.graph.output.extend(typed[name] for name in names)
    session = ort.InferenceSession(model.SerializeToString(), providers=CPU)
    values = dict(zip(names, session.run(names, feeds)))
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    return nodes, values, inits


def test_w2a8_export(tiny_ckpt, tmp_path):
    manifest = export(tiny_ckpt, tmp_path / "o", ExportOptions(act_quant="fp8", cfg="official"),
                      **QUIET)
    path = tmp_path / "o" / "model.onnx"
    assert manifest["graph"]["act_quant"] == manifest["options"]["act_quant"] == "fp8"
    validation = manifest["validation"]
    assert validation["passed"] and "act_quant=fp8 emulated" in validation["reference"]
    assert validation["tolerance"] == pytest.approx(5e-2)
    contract.register_schema()
    onnx.checker.check_model(str(path), full_check=True)
    model = onnx.load(str(path))
    assert [f.name for f in model.functions] == [op.OP_TYPE]
    assert "act_quant=fp8" in model.functions[0].doc_string
    assert any(n.op_type == "QuantizeLinear" for n in model.functions[0].node)

    # each node computes the oracle on its own input: tight, whatever happened upstream
    cfg = load_checkpoint(tiny_ckpt).model.cfg
    feeds = {k: v.numpy() for k, v in example_inputs(cfg, 3, "official", seed=5).items()}
    nodes, values, inits = _node_outputs(path, feeds)
    assert len(nodes) == manifest["graph"]["ternary_matmul_nodes"]
    for node in nodes:
        assert contract.node_act_quant(node) == "fp8"
        attr = next(a for a in node.attribute if a.name == "act_quant")
        assert attr.type == onnx.AttributeProto.STRING
        w, scale = (torch.tensor(inits[name]) for name in node.input[1:3])
        bias = torch.tensor(inits[node.input[3]]) if node.input[3] in inits else None
        x, y = torch.from_numpy(values[node.input[0]]), values[node.output[0]]
        ref = _oracle(x.reshape(-1, x.shape[-1]), w, scale, bias, "fp8").numpy()
        assert _row_err(y.reshape(ref.shape), ref) < 1e-5, node.name

    # validation compared with the emulation: much closer than the weight-only model is
    model_pt = load_checkpoint(tiny_ckpt, packed=True).model
    graph = build_graph(model_pt, ExportOptions(cfg="official")).float()
    inputs = example_inputs(cfg, 1, "official", seed=1)
    with torch.no_grad():
        weight_only = graph(**inputs).numpy()
    onnx_out = ort.InferenceSession(str(path), providers=CPU).run(
        None, {k: v.numpy() for k, v in inputs.items()})[0]
    gap = np.abs(onnx_out - weight_only).max() / np.abs(weight_only).max()
    assert validation["checks"][0]["rel_err"] * 100 < gap


def test_finalize_refuses_a_node_of_another_mode(tiny_ckpt):
    model = load_checkpoint(tiny_ckpt, packed=True).model
    model_ir = lower(build_graph(model, ExportOptions()), model.cfg, "none")
    with pytest.raises(ExportError, match="act_quant='none' in an act_quant='fp8' export"):
        finalize(model_ir, True, {}, "fp8")


def test_cli_w2a8_end_to_end(tiny_ckpt, tmp_path):
    out = tmp_path / "o"
    proc = subprocess.run([sys.executable, "-m", "exporter", str(tiny_ckpt), "-o", str(out),
                           "--w2a8", "--dtype", "fp16", "--validate-batches", "2"],
                          capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "act_quant fp8" in proc.stdout and "validate batch 2" in proc.stdout
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["graph"]["act_quant"] == "fp8" and manifest["validation"]["passed"]
    nodes = [n for n in onnx.load(str(out / "model.onnx")).graph.node
             if n.op_type == op.OP_TYPE]
    assert nodes and {contract.node_act_quant(n) for n in nodes} == {"fp8"}
