"""TernaryMatMul act_quant="int8" (W1.58A8 with int8 activations): the definition in
terdit.kernels.int8 against a case computed by hand, the registered ops and the layer against the
definition, the portable ONNX function (ONNX Runtime and onnx.reference) bit for bit against it,
the fold-proof decode, `python -m exporter --act-quant int8`, and the runtime's act_quant rules."""
import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper
from onnx.reference import ReferenceEvaluator

from exporter import ExportOptions, contract, export
from exporter.export_cli import build_parser
from runtime import SampleOptions, TerDiTPipeline, open_backend
from runtime.runtime_cli import main as runtime_main
from runtime.backends import BackendError
from terdit import PackedTernaryLinear, TerDiTConfig, set_act_quant_
from terdit.fused import FusedTerDiT
from terdit.kernels.int8 import (INT8_MAX, quantize_rows_int8_ref, ternary_linear_int8_ref,
                                 ternary_matmul_int8, ternary_matmul_int8_swiglu)
from terdit.formats import pack_k16, unpack_k16
from terdit.ternary import ternary_linear_ref
from terdit_common import op
from terdit_common.errors import UserError
from tests.helpers import pixel_checkpoint, random_model
from tests.test_w2a8_onnx import run_ort, tmm_model

QUIET = dict(log=lambda *_: None)
FAST = SampleOptions(steps=4, sampler="ddim", cfg_scale=3.0, seed=7, batch_size=4)


def _bits(a) -> np.ndarray:
    return np.ascontiguousarray(np.asarray(a, np.float32)).view(np.int32)


def _awkward_rows(k: int, seed: int = 0) -> torch.Tensor:
    """Rows with scale exactly 1 holding every tie j + 0.5 (round half to even), a zero row, a row
    below the 1e-12 amax floor, huge / tiny / subnormal magnitudes, values within a few ulps of a
    .5 boundary at arbitrary scales, and random rows over ~10 binades."""
    g = torch.Generator().manual_seed(seed)
    ties = torch.cat([torch.arange(-127, 127).float() + 0.5, torch.tensor([127.0])])
    ties = torch.nn.functional.pad(ties, (0, -ties.numel() % k)).reshape(-1, k)
    ties[:, -1] = 127.0                                      # amax 127: s = 1 exactly
    rows = [ties, torch.zeros(1, k), torch.full((1, k), 1e-14)]
    for mag in (1e30, 1e-30, 1e-40):
        rows.append(torch.randn(1, k, generator=g) * mag)
    for scale in (0.37, 3.3, 1e-5, 7e5):
        s = scale / INT8_MAX
        near = (torch.randint(-126, 126, (4, k), generator=g).float() + 0.5) * s
        ulps = torch.randint(-2, 3, (4, k), generator=g).float()
        near = near + ulps * torch.finfo(torch.float32).eps * near.abs()
        near[:, 0] = scale
        rows.append(near)
    rows.append(torch.randn(64, k, generator=g) * torch.exp(torch.randn(64, 1, generator=g) * 5))
    return torch.cat(rows).float()


# ---- the definition --------------------------------------------------------------------------

def test_definition_by_hand():
    # row 0: amax 127 -> s = 1, 2.5 -> 2 and -3.5 -> -4 (half to even)
    # row 1: amax 254 -> s = 2, 5 / 2 = 2.5 -> 2 and -1 / 2 = -0.5 -> -0
    x = torch.tensor([[127.0, 2.5, -3.5], [254.0, 5.0, -1.0]])
    xq, s = quantize_rows_int8_ref(x)
    assert xq.dtype == torch.int8 and s.dtype == torch.float32
    assert xq.tolist() == [[127, 2, -4], [127, 2, 0]] and s.tolist() == [1.0, 2.0]
    t = torch.tensor([[1, 0, -1], [-1, 1, 1]])
    scale, bias = torch.tensor([0.5, 2.0]), torch.tensor([1.0, -1.0])
    # acc = [[127 + 4, -127 + 2 - 4], [127, -127 + 2]] = [[131, -129], [127, -125]]
    # y = (acc * s) * scale + bias
    y = ternary_linear_int8_ref(xq, s, pack_k16(t), scale, bias)
    assert y.tolist() == [[66.5, -259.0], [128.0, -501.0]]
    assert ternary_linear_int8_ref(xq, s, pack_k16(t), scale).tolist() == [[65.5, -258.0],
                                                                           [127.0, -500.0]]


def test_quantization_floor_clamp_and_dtype():
    # below the 1e-12 amax floor: s = 1e-12 / 127, 1e-15 / s = 0.127 and -6e-15 / s = -0.762
    xq, s = quantize_rows_int8_ref(torch.tensor([[0.0, 0.0], [1e-15, -6e-15]]))
    assert s.tolist() == [pytest.approx(1e-12 / 127, rel=1e-6)] * 2
    assert xq.tolist() == [[0, 0], [0, -1]]
    xq, _ = quantize_rows_int8_ref(torch.tensor([[-3.0, 3.0, 1.0]], dtype=torch.bfloat16))
    assert xq.tolist() == [[-127, 127, 42]]


@pytest.mark.parametrize("m", [1, 2, 7, 33])
@pytest.mark.parametrize("k,n", [(16, 16), (40, 48), (256, 80)])
def test_ops_equal_the_definition(m, k, n):
    g = torch.Generator().manual_seed(m * 1000 + k + n)
    x = torch.randn(m, k, generator=g) * 2
    w = pack_k16(torch.randint(-1, 2, (n, k), generator=g))
    scale, bias = torch.rand(n, generator=g) + 0.1, torch.randn(n, generator=g)
    xq, s = quantize_rows_int8_ref(x)
    ref = ternary_linear_int8_ref(xq, s, w, scale, bias)
    assert torch.equal(ternary_matmul_int8(x, w, scale, bias), ref)
    a = ternary_linear_int8_ref(xq, s, w, scale)
    h = n // 2
    assert torch.equal(ternary_matmul_int8_swiglu(x, w, scale),
                       torch.nn.functional.silu(a[:, :h]) * a[:, h:])
    # the mode costs accuracy against the weight-only product, but only quantization's share
    exact = ternary_linear_ref(x, w, scale, bias)
    err = float((ref - exact).abs().max() / exact.abs().max())
    assert 0 < err < 0.05
    xb = x.bfloat16()
    yb = ternary_matmul_int8(xb, w, scale, bias)
    assert yb.dtype == torch.bfloat16
    assert torch.equal(yb, ternary_linear_int8_ref(*quantize_rows_int8_ref(xb), w, scale, bias,
                                                   torch.bfloat16))


def test_ops_check_their_arguments_and_have_fake_kernels():
    w = pack_k16(torch.zeros(16, 32))
    with pytest.raises(ValueError, match="W must be int32"):
        ternary_matmul_int8(torch.randn(2, 48), w, torch.ones(16))
    with pytest.raises(TypeError, match="x has dtype torch.int32"):
        ternary_matmul_int8(torch.ones(2, 32, dtype=torch.int32), w, torch.ones(16))
    with pytest.raises(ValueError, match="N=16 must be even|must be even"):
        ternary_matmul_int8_swiglu(torch.randn(2, 32), pack_k16(torch.zeros(15, 32)),
                                   torch.ones(15))
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode():
        y = torch.ops.terdit.ternary_matmul_int8(torch.empty(3, 5, 32), torch.empty(16, 2, dtype=torch.int32),
                                                 torch.empty(16))
        z = torch.ops.terdit.ternary_matmul_int8_swiglu(
            torch.empty(3, 32, dtype=torch.float16), torch.empty(16, 2, dtype=torch.int32),
            torch.empty(16))
    assert tuple(y.shape) == (3, 5, 16) and tuple(z.shape) == (3, 8) and z.dtype == torch.float16


def test_layer_mode_and_set_act_quant():
    torch.manual_seed(0)
    cfg = TerDiTConfig(input_size=8, patch_size=2, in_channels=1, dim=32, n_layers=1, n_heads=2,
                       multiple_of=32, num_classes=3)
    model = random_model(cfg, seed=0)
    from terdit import pack_model_
    fused = FusedTerDiT(pack_model_(model))
    layers = [m for m in fused.modules() if isinstance(m, PackedTernaryLinear)]
    assert layers and all(m.act_quant == "none" for m in layers)
    x = torch.randn(2, 1, 8, 8)
    t, y = torch.tensor([10.0, 500.0]), torch.tensor([0, 2])
    with torch.no_grad():
        plain = fused(x, t, y)
        set_act_quant_(fused, "int8")
        assert all(m.act_quant == "int8" for m in layers)
        quant = fused(x, t, y)
    assert not torch.equal(plain, quant)
    assert float((quant - plain).abs().max() / plain.abs().max()) < 0.05
    lin = layers[0]
    xin = torch.randn(3, lin.in_features)
    assert torch.equal(lin(xin), ternary_matmul_int8(xin, lin.codes, lin.scale, lin.bias))
    assert "act_quant" not in "".join(fused.state_dict())
    for bad, match in (("fp8", "terdit.kernels.accel"), ("int4", "act_quant='int4' is not one of none, int8")):
        with pytest.raises(ValueError, match=match):
            set_act_quant_(fused, bad)
    set_act_quant_(fused, "none")
    with torch.no_grad():
        assert torch.equal(fused(x, t, y), plain)


# ---- the ONNX function -----------------------------------------------------------------------

def _quantize_graph():
    """Just the function's quantization (the same ops), returning QuantizeLinear's output."""
    body = contract.ternary_matmul_function("int8")
    wanted = {"axis1", "x2_abs", "amax", "min_amax", "q_max", "amax_c", "s_row", "m1", "zp_i8",
              "x2_q"}
    nodes = [n for n in body.node if n.output[0] in wanted]
    assert [n.op_type for n in nodes][-1] == "QuantizeLinear" and len(nodes) == len(wanted)
    graph = helper.make_graph(nodes, "q", [helper.make_tensor_value_info("x2", TensorProto.FLOAT,
                                                                         ["M", "K"])],
                              [helper.make_tensor_value_info("x2_q", TensorProto.INT8, ["M", "K"]),
                               helper.make_tensor_value_info("s_row", TensorProto.FLOAT, ["M"])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", op.GRAPH_OPSET)])
    onnx.checker.check_model(model, full_check=True)
    return model


@pytest.mark.parametrize("k", [16, 64, 1024])
def test_function_quantization_is_bit_exact(k):
    x = _awkward_rows(k)
    xq_ref, s_ref = quantize_rows_int8_ref(x)
    model = _quantize_graph()
    # ORT's QuantizeLinear divides (a reciprocal multiply would differ on these rows)
    recip = torch.round(x * (1 / s_ref[:, None])).clamp(-127, 127)
    assert bool((recip != xq_ref.float()).any())
    for xq, s in (ort.InferenceSession(model.SerializeToString(),
                                       providers=["CPUExecutionProvider"]).run(None, {"x2": x.numpy()}),
                  ReferenceEvaluator(model).run(None, {"x2": x.numpy()})):
        assert np.array_equal(_bits(s), _bits(s_ref))
        assert xq.dtype == np.int8 and np.array_equal(xq, xq_ref.numpy())


@pytest.mark.parametrize("m,k,n", [(1, 16, 16), (7, 40, 32), (80, 256, 48)])
def test_function_and_oprun_equal_the_definition_bit_for_bit(m, k, n):
    g = torch.Generator().manual_seed(m + k + n)
    x = _awkward_rows(k)[:m] if m > 1 else torch.randn(1, k, generator=g)
    w = pack_k16(torch.randint(-1, 2, (n, k), generator=g))
    scale, bias = torch.rand(n, generator=g) + 0.1, torch.randn(n, generator=g) * 10
    ref = ternary_linear_int8_ref(*quantize_rows_int8_ref(x), w, scale, bias).numpy()
    model = tmm_model(k, n, ["int8"])
    feeds = {"X": x.numpy(), "W": w.numpy(), "scale": scale.numpy(), "bias": bias.numpy()}
    assert np.array_equal(_bits(run_ort(model, feeds)), _bits(ref))
    assert np.array_equal(_bits(ReferenceEvaluator(model).run(None, feeds)[0]), _bits(ref))
    oprun = ReferenceEvaluator(model, new_ops=contract.reference_ops()).run(None, feeds)[0]
    assert np.array_equal(_bits(oprun), _bits(ref))


def test_decode_handles_every_byte_and_negative_words():
    """All 81 valid bytes in every position of words with bit 31 set and clear, K not a multiple
    of 16 (zero-padded X), in all three modes' bodies."""
    codes = np.array([b for b in range(256) if all((b >> (2 * i)) & 3 != 3 for i in range(4))])
    k = 4 * len(codes) - 5
    t = torch.from_numpy(np.stack([np.roll(((codes[:, None] >> (2 * np.arange(4))) & 3).ravel(), r)
                                   for r in range(0, 64, 4)]) - 1)[:, :k]
    w = pack_k16(t)
    assert bool((w < 0).any()) and bool((w > 0).any())
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, k, generator=g)
    feeds = {"X": x.numpy(), "W": w.numpy(), "scale": np.ones(16, np.float32),
             "bias": np.zeros(16, np.float32)}
    assert torch.equal(unpack_k16(w, k), t.to(torch.int8))
    for mode in ("none", "int8", "fp8"):
        y = run_ort(tmm_model(k, 16, [mode]), feeds)
        ref = (ternary_linear_ref(x, w, torch.ones(16)) if mode == "none" else
               ternary_linear_int8_ref(*quantize_rows_int8_ref(x), w, torch.ones(16))
               if mode == "int8" else None)
        if ref is not None:
            assert np.abs(y - ref.numpy()).max() <= 1e-5 * np.abs(ref.numpy()).max()


def test_decode_is_not_constant_folded(tmp_path):
    """ONNX Runtime's load-time optimizer (constant folding included) keeps the decode in the
    graph: no fp32 weight-sized initializer appears in the optimized model."""
    k, n = 512, 256
    g = torch.Generator().manual_seed(0)
    w = pack_k16(torch.randint(-1, 2, (n, k), generator=g))
    model = tmm_model(k, n, ["none"])
    graph = model.graph
    for name, arr in (("W", w.numpy()), ("scale", np.ones(n, np.float32)),
                      ("bias", np.zeros(n, np.float32))):
        graph.initializer.append(onnx.numpy_helper.from_array(arr, name))
        inp = next(i for i in graph.input if i.name == name)
        graph.input.remove(inp)
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    so.optimized_model_filepath = str(tmp_path / "opt.onnx")
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    x = torch.randn(2, k, generator=g)
    y = sess.run(None, {"X": x.numpy()})[0]
    assert np.abs(y - ternary_linear_ref(x, w, torch.ones(n), torch.zeros(n)).numpy()).max() < 1e-4
    opt = onnx.load(str(tmp_path / "opt.onnx"))
    biggest = max(int(np.prod(i.dims)) for i in opt.graph.initializer)
    assert biggest < n * k // 4, f"an initializer of {biggest} elements: the decode was folded"


# ---- export and runtime ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def int8_export(tmp_path_factory):
    root = tmp_path_factory.mktemp("int8")
    pixel_checkpoint(root / "ck", seed=3, num_classes=5)
    manifest = export(root / "ck", root / "onnx",
                      ExportOptions(act_quant="int8", validate_batches=(1, 3)), **QUIET)
    return root, manifest


def test_int8_export_validates_and_records_the_mode(int8_export):
    root, manifest = int8_export
    assert manifest["options"]["act_quant"] == "int8" and manifest["graph"]["act_quant"] == "int8"
    v = manifest["validation"]
    assert v["passed"] and "ternary_matmul_int8" in v["reference"]
    assert all(c["rel_err"] <= c["bound"] for c in v["checks"])
    m = onnx.load(str(root / "onnx" / "model.onnx"))
    nodes = [n for n in m.graph.node if n.op_type == op.OP_TYPE]
    assert nodes and all(contract.node_act_quant(n) == "int8" for n in nodes)
    (fn,) = m.functions
    ops = [n.op_type for n in fn.node]
    assert "QuantizeLinear" in ops and "DequantizeLinear" not in ops


def test_export_cli_act_quant_flags(capsys):
    assert build_parser().parse_args(["c", "-o", "o", "--act-quant", "int8"]).act_quant == "int8"
    assert build_parser().parse_args(["c", "-o", "o", "--w2a8"]).act_quant == "fp8"
    assert build_parser().parse_args(["c", "-o", "o"]).act_quant == "none"
    with pytest.raises(SystemExit):
        build_parser().parse_args(["c", "-o", "o", "--act-quant", "int8", "--w2a8"])
    assert "not allowed with argument" in capsys.readouterr().err


def test_torch_int8_samples_like_the_ort_int8_export(int8_export):
    root, _ = int8_export
    onnx_int8 = TerDiTPipeline(open_backend(root / "onnx", "ort")).sample([0, 1, 2], [1, 2, 4], FAST)
    same = TerDiTPipeline(open_backend(root / "onnx", "ort", act_quant="int8")).sample([0, 1, 2],
                                                                                 [1, 2, 4], FAST)
    assert np.array_equal(onnx_int8, same)
    pipe = TerDiTPipeline.from_pretrained(root / "onnx", backend="torch", act_quant="int8")
    assert pipe.backend.act_quant == "int8"
    torch_int8 = pipe.sample([0, 1, 2], [1, 2, 4], FAST)
    torch_none = TerDiTPipeline(open_backend(root / "onnx", "torch")).sample([0, 1, 2], [1, 2, 4], FAST)
    scale = np.abs(torch_int8).max()
    close = np.abs(torch_int8 - onnx_int8).max() / scale
    apart = np.abs(torch_none - onnx_int8).max() / scale
    assert close < 1e-4 and apart > 10 * close


def test_ort_refuses_another_mode(int8_export, capsys, tmp_path):
    root, _ = int8_export
    with pytest.raises(BackendError, match="exported with act_quant=int8"):
        open_backend(root / "onnx", "ort", act_quant="none")
    from runtime import TerDiTPipeline
    with pytest.raises(BackendError, match=r"--act-quant fp8 \(--w2a8\): --backend ort"):
        TerDiTPipeline.from_pretrained(root / "onnx", backend="ort", act_quant="fp8")
    with pytest.raises(BackendError, match="--w2a8 selects act_quant=fp8"):
        open_backend(root / "onnx", "torch", w2a8=True, act_quant="int8")
    rc = runtime_main(["sample", "--model", str(root / "onnx"), "--act-quant", "none",
                       "--out", str(tmp_path / "s"), "--num", "1", "--steps", "2",
                       "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "act_quant=int8" in err[0]
    assert not (tmp_path / "s" / "samples.json").exists()


def test_cli_torch_int8_records_the_mode(int8_export, tmp_path):
    root, _ = int8_export
    assert runtime_main(["sample", "--model", str(root / "ck"), "--act-quant", "int8",
                         "--out", str(tmp_path / "s"), "--num", "2", "--steps", "2",
                         "--no-progress"]) == 0
    rec = json.loads((tmp_path / "s" / "samples.json").read_text())
    assert rec["settings"]["act_quant"] == "int8"


def test_trt_build_refuses_int8_before_tensorrt(tmp_path):
    from runtime.tensorrt.engine_build import build_engine
    from tests.trt_standin.files import ternary_onnx
    onnx_path = ternary_onnx(tmp_path / "m.onnx", act_quant="int8")
    plugin = tmp_path / "libplugin.so"
    plugin.write_bytes(b"")
    with pytest.raises(UserError, match="act_quant=\"int8\" runs on the CPU kernels"):
        build_engine(onnx_path, plugin, tmp_path / "m.plan")
