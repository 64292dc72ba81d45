"""The terdit CPU kernels (plugins/cpu) against the Python definitions, on every dispatch path this
CPU runs, through their three doors: the C ABI, the torch ops and the ONNX Runtime custom op."""
import ctypes
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from terdit.kernels.int8 import quantize_rows_int8_ref, ternary_linear_int8_ref
from terdit.formats import pack_k16
from terdit.ternary import ternary_linear_ref
from terdit.kernels.w2a8 import quantize_rows_e4m3_ref
from terdit_common import cpukernels

try:
    cpukernels.load()
except cpukernels.CpuKernelError as err:  # pragma: no cover - CI has g++
    pytest.skip(f"the CPU kernels cannot be built here: {err}", allow_module_level=True)

LIB = cpukernels.load()


def isa_params():
    out = []
    for isa in cpukernels.ISAS:
        with_lib = True
        try:
            with cpukernels.force_isa(isa):
                pass
        except cpukernels.CpuKernelError as err:
            with_lib = str(err)
        marks = () if with_lib is True else pytest.mark.skip(reason=f"{isa}: {with_lib}")
        out.append(pytest.param(isa, marks=marks))
    return out


ISAS = isa_params()
# M = 1, K not a multiple of 64 (nor of 16), N odd multiples of 16 and not a multiple of 16
SHAPES = [(1, 16, 16), (2, 40, 48), (7, 100, 80), (33, 200, 17), (130, 336, 208), (6, 64, 112)]


def case(m, k, n, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    t = torch.randint(-1, 2, (n, k), generator=g)
    w = pack_k16(t)
    scale = torch.rand(n, generator=g) + 0.25
    b = torch.randn(n, generator=g) if bias else None
    x = torch.randn(m, k, generator=g) * torch.logspace(-2, 1, m).unsqueeze(1)
    return x, w, scale, b


def c_matmul(x, w, scale, bias, mode, threads):
    m, k = x.shape
    y = torch.empty(m, w.shape[0])
    rc = LIB.terditCpuTernaryMatmul(x.data_ptr(), w.data_ptr(), scale.data_ptr(),
                                    None if bias is None else bias.data_ptr(), y.data_ptr(), m,
                                    w.shape[0], k, cpukernels.ACT_QUANT_CODES[mode], threads,
                                    None, None)
    assert rc == 0, cpukernels.status_text(rc)
    return y


def rel_err(a, b):
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("m,k,n", SHAPES)
def test_exact_mode_matches_the_reference(isa, threads, m, k, n):
    for bias in (True, False):
        x, w, scale, b = case(m, k, n, bias)
        with cpukernels.force_isa(isa):
            y = c_matmul(x, w, scale, b, "none", threads)
        ref64 = ternary_linear_ref(x.double(), w, scale.double(), None if b is None else b.double())
        assert rel_err(y.double(), ref64) <= 2 * k * torch.finfo(torch.float32).eps


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("m,k,n", SHAPES)
def test_int8_mode_is_the_definition_bit_for_bit(isa, threads, m, k, n):
    for bias in (True, False):
        x, w, scale, b = case(m, k, n, bias, seed=1)
        with cpukernels.force_isa(isa):
            y = c_matmul(x, w, scale, b, "int8", threads)
        xq, s = quantize_rows_int8_ref(x)
        assert torch.equal(y, ternary_linear_int8_ref(xq, s, w, scale, b))


@pytest.mark.parametrize("isa", ISAS)
def test_int8_quantized_rows_are_the_definitions_bytes(isa):
    g = torch.Generator().manual_seed(2)
    x = torch.randn(9, 75, generator=g) * torch.logspace(-30, 3, 9).unsqueeze(1)
    x[0] = 0.0                                        # amax floor
    x[1, :4] = torch.tensor([1.27, -0.635, 0.005, 0.015])  # ties at .5 after / (amax / 127)
    x[1, 4:] = 0.0
    xq = torch.empty(9, 75, dtype=torch.int8)
    s = torch.empty(9)
    with cpukernels.force_isa(isa):
        assert LIB.terditCpuQuantizeRowsInt8(x.data_ptr(), 9, 75, xq.data_ptr(), s.data_ptr()) == 0
    rq, rs = quantize_rows_int8_ref(x)
    assert torch.equal(s, rs)
    assert torch.equal(xq, rq)
    assert xq[1, :4].tolist() == [127, -64, 0, 2]    # hand-computed: half-even ties (63.5, 1.5)


def test_int8_hand_computed():
    # x = [[2, -1, 0.5]]: s = 2/127, xq = [127, -63.5 -> -64, 31.75 -> 32]; t = [[1, 0, -1], [-1, 1, 1]]
    x = torch.tensor([[2.0, -1.0, 0.5]])
    w = pack_k16(torch.tensor([[1, 0, -1], [-1, 1, 1]]))
    scale = torch.tensor([1.0, 0.5])
    bias = torch.tensor([0.0, 1.0])
    y = c_matmul(x, w, scale, bias, "int8", 1)
    s = torch.tensor(2.0) / 127
    expected = torch.stack([(torch.tensor(127.0 - 32) * s) * 1.0 + 0.0,
                            (torch.tensor(-127.0 - 64 + 32) * s) * 0.5 + 1.0])
    assert torch.equal(y[0], expected)


@pytest.mark.parametrize("isa", ISAS)
def test_fp8_mode_is_the_e4m3_emulation(isa):
    x, w, scale, b = case(33, 96, 48, seed=3)
    with cpukernels.force_isa(isa):
        y = c_matmul(x, w, scale, b, "fp8", 2)
    xq, s = quantize_rows_e4m3_ref(x)
    ref = ternary_linear_ref(xq.double() * s.double().unsqueeze(-1), w, scale.double(), b.double())
    assert rel_err(y.double(), ref) <= 2 * 96 * torch.finfo(torch.float32).eps


def test_nan_row_gives_nan_row_only():
    x, w, scale, b = case(3, 32, 16, seed=4)
    x[1, 5] = float("nan")
    for mode in ("none", "int8", "fp8"):
        y = c_matmul(x, w, scale, b, mode, 2)
        assert torch.isnan(y[1]).all() and torch.isfinite(y[[0, 2]]).all(), mode


def test_unsupported_isa_and_act_quant_are_refused():
    with pytest.raises(ValueError, match="not one of"):
        with cpukernels.force_isa("sse9"):
            pass
    x, w, scale, b = case(2, 16, 16)
    y = torch.empty(2, 16)
    rc = LIB.terditCpuTernaryMatmul(x.data_ptr(), w.data_ptr(), scale.data_ptr(), None,
                                    y.data_ptr(), 2, 16, 16, 7, 1, None, None)
    assert "unsupported act_quant" in cpukernels.status_text(rc)


# ---- the torch ops ------------------------------------------------------------------------------

def test_torch_ops_run_the_kernels_on_cpu():
    from terdit.kernels import cpu_ops as cpu_kernels
    assert cpu_kernels.load().startswith("terdit CPU kernels")
    x, w, scale, b = case(2 * 16, 64, 96, seed=5)
    x = x.reshape(2, 16, 64)
    y = torch.ops.terdit.ternary_matmul(x, w, scale, b)
    assert rel_err(y.double(), ternary_linear_ref(x.double(), w, scale.double(), b.double())) < 1e-5
    yi = torch.ops.terdit.ternary_matmul_int8(x, w, scale, b)
    xq, s = quantize_rows_int8_ref(x)
    assert torch.equal(yi, ternary_linear_int8_ref(xq, s, w, scale, b))
    ys = torch.ops.terdit.ternary_matmul_int8_swiglu(x, w, scale)
    a = ternary_linear_int8_ref(xq, s, w, scale)
    assert torch.equal(ys, torch.nn.functional.silu(a[..., :48]) * a[..., 48:])
    xb = x.to(torch.bfloat16)
    assert torch.ops.terdit.ternary_matmul(xb, w, scale, b).dtype == torch.bfloat16
    # K = 0: every output row is the bias, as in the reference
    w0 = torch.empty(96, 0, dtype=torch.int32)
    y0 = torch.ops.terdit.ternary_matmul(torch.empty(3, 0), w0, scale, b)
    assert torch.equal(y0, b.expand(3, 96))


def test_torch_compile_keeps_the_op():
    from terdit.kernels import cpu_ops as cpu_kernels
    cpu_kernels.load()
    x, w, scale, b = case(8, 32, 32, seed=6)

    def f(x):
        return torch.ops.terdit.ternary_matmul_int8(torch.nn.functional.silu(x), w, scale, b)

    compiled = torch.compile(f, fullgraph=True, backend="eager")
    assert torch.equal(compiled(x), f(x))


def test_a_library_that_does_not_load_is_one_clear_line(tmp_path):
    bad = tmp_path / "libterdit_cpu.so"
    bad.write_bytes(b"not a library")
    code = ("from terdit_common import cpukernels\n"
            "try:\n    cpukernels.load()\nexcept cpukernels.CpuKernelError as e:\n"
            "    print('ERR', e)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={"TERDIT_CPU_LIB": str(bad), "PATH": "/usr/bin:/bin"})
    assert proc.stdout.startswith("ERR cannot load " + str(bad)), proc.stdout + proc.stderr
    assert proc.stdout.count("\n") == 1


# ---- the ONNX Runtime custom op ------------------------------------------------------------------

needs_ort_headers = pytest.mark.skipif(
    cpukernels.ort_include_dir() is None or not hasattr(LIB, "RegisterCustomOps"),
    reason="ONNX Runtime's C API headers are absent (set TERDIT_ORT_INCLUDE or provide "
           "../shared/onnxruntime-headers): the custom op is not built")


def one_node_model(path, k, n, act_quant, bias, dtype="float"):
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from exporter import contract
    from terdit_common.op import node_attributes
    contract.register_schema()
    g = torch.Generator().manual_seed(7)
    w = pack_k16(torch.randint(-1, 2, (n, k), generator=g)).numpy()
    scale = (torch.rand(n, generator=g) + 0.5).numpy()
    inits = [numpy_helper.from_array(w, "W"), numpy_helper.from_array(scale, "scale")]
    inputs = ["x", "W", "scale"]
    if bias:
        inits.append(numpy_helper.from_array(torch.randn(n, generator=g).numpy(), "bias"))
        inputs.append("bias")
    elem = {"float": TensorProto.FLOAT, "float16": TensorProto.FLOAT16}[dtype]
    node = helper.make_node("TernaryMatMul", inputs, ["y"], domain="terdit",
                            **node_attributes(k, n, act_quant))
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", elem, ["b", "t", k])],
                              [helper.make_tensor_value_info("y", elem, ["b", "t", n])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20),
                                                    helper.make_opsetid("terdit", 1)],
                              functions=[contract.ternary_matmul_function(act_quant)])
    onnx.save(model, path)
    return path


def sessions(path, function=True):
    """(a session with the custom op, a plain one running the function or None)."""
    import onnxruntime as ort
    so = ort.SessionOptions()
    cpukernels.register_ort(so)
    return (ort.InferenceSession(str(path), so),
            ort.InferenceSession(str(path)) if function else None)


@needs_ort_headers
@pytest.mark.parametrize("act_quant", ["none", "int8", "fp8"])
def test_ort_custom_op_equals_the_function(tmp_path, act_quant):
    path = one_node_model(tmp_path / "m.onnx", 200, 48, act_quant, bias=True)
    native, function = sessions(path)
    x = (torch.randn(3, 5, 200) * 3).numpy()
    a = native.run(None, {"x": x})[0]
    b = function.run(None, {"x": x})[0]
    bound = 2 * 200 * np.finfo(np.float32).eps
    assert np.abs(a - b).max() / np.abs(b).max() <= bound
    if act_quant == "int8":  # integer sums: the same value both ways up to the last roundings
        assert np.abs(a - b).max() / np.abs(b).max() <= 4 * np.finfo(np.float32).eps


@needs_ort_headers
def test_ort_custom_op_without_bias_and_in_float16(tmp_path):
    # the portable function needs the bias input (the exporter always writes one); the custom op
    # follows the contract, where it is optional: compare with the definition
    path = one_node_model(tmp_path / "m.onnx", 64, 32, "none", bias=False)
    native, _ = sessions(path, function=False)
    import onnx
    inits = {i.name: torch.from_numpy(onnx.numpy_helper.to_array(i).copy())
             for i in onnx.load(path).graph.initializer}
    x = torch.randn(2, 3, 64)
    ref = ternary_linear_ref(x.double(), inits["W"], inits["scale"].double())
    assert rel_err(torch.from_numpy(native.run(None, {"x": x.numpy()})[0]).double(), ref) < 1e-6
    native, function = sessions(one_node_model(tmp_path / "h.onnx", 64, 32, "none", bias=True,
                                               dtype="float16"))
    xh = torch.randn(2, 3, 64).half().numpy()
    a, b = native.run(None, {"x": xh})[0], function.run(None, {"x": xh})[0]
    assert a.dtype == np.float16 and np.allclose(a, b, rtol=2e-3, atol=2e-3)


@needs_ort_headers
def test_ort_refuses_an_unsupported_act_quant_and_code_3(tmp_path):
    import onnx
    import onnxruntime as ort
    path = one_node_model(tmp_path / "m.onnx", 32, 16, "none", bias=True)
    model = onnx.load(path)
    model.graph.node[0].attribute.append(onnx.helper.make_attribute("act_quant", "int4"))
    onnx.save(model, tmp_path / "bad.onnx")
    so = ort.SessionOptions()
    cpukernels.register_ort(so)
    with pytest.raises(Exception, match='act_quant="int4" is not supported by the terdit CPU'):
        ort.InferenceSession(str(tmp_path / "bad.onnx"), so)
    model = onnx.load(path)
    w = onnx.numpy_helper.to_array(model.graph.initializer[0]).copy()
    w[3, 1] |= 3 << 6                                    # code 3 in row 3
    model.graph.initializer[0].CopyFrom(onnx.numpy_helper.from_array(w, "W"))
    onnx.save(model, tmp_path / "three.onnx")
    with pytest.raises(Exception, match="W row 3 word 1 holds code 3"):
        ort.InferenceSession(str(tmp_path / "three.onnx"), so)


@pytest.fixture(scope="module")
def tiny_export(tmp_path_factory):
    from exporter import ExportOptions, export
    from tests.helpers import pixel_checkpoint
    root = tmp_path_factory.mktemp("cpu_export")
    export(pixel_checkpoint(root / "ckpt"), root / "onnx", ExportOptions())
    return root / "onnx"


@needs_ort_headers
def test_export_samples_the_same_images_with_and_without_the_library(tiny_export):
    from runtime.backends.ort_backend import OrtBackend
    from terdit_common.sampling import SampleOptions, sample_latents
    native = OrtBackend(tiny_export, kernels="native")
    function = OrtBackend(tiny_export, kernels="function")
    assert native.kernels.startswith("terdit CPU kernels") and "function" in function.kernels
    options = SampleOptions(steps=10, sampler="ddim", cfg_scale=2.0, seed=0, batch_size=4)
    a = sample_latents(native.forward, native.info, [0, 1, 2, 3], [0, 1, 2, 0], options)
    b = sample_latents(function.forward, function.info, [0, 1, 2, 3], [0, 1, 2, 0], options)
    assert np.abs(a - b).max() <= 1e-4 * max(1.0, float(np.abs(b).max()))


def test_cli_with_a_broken_library_is_one_error_line(tiny_export, tmp_path):
    """--kernels native with a library that does not load: exit 2, one line naming the file; the
    default (auto) says which path it took and samples with the portable function."""
    bad = tmp_path / "libterdit_cpu.so"
    bad.write_bytes(b"\x7fELF broken")
    env = {"TERDIT_CPU_LIB": str(bad), "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    args = [sys.executable, "-m", "runtime", "sample", "--model", str(tiny_export), "--classes",
            "0", "--num", "1", "--steps", "2", "--out", str(tmp_path / "out")]
    proc = subprocess.run(args + ["--kernels", "native"], capture_output=True, text=True, env=env)
    assert proc.returncode == 2, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: --kernels native: cannot load "), lines
    assert "Traceback" not in proc.stderr
    proc = subprocess.run(args + ["--out", str(tmp_path / "auto")], capture_output=True,
                          text=True, env=env)
    assert proc.returncode == 0, proc.stderr
    assert "TernaryMatMul: portable ONNX function (cannot load" in proc.stderr


def test_ctypes_abi_version():
    LIB.terditCpuAbiVersion.restype = ctypes.c_int
    assert LIB.terditCpuAbiVersion() == cpukernels.ABI_VERSION


@pytest.mark.parametrize("preset, want", [(None, "PASSIVE"), ("ACTIVE", "ACTIVE")])
def test_torch_backend_on_the_cpu_makes_openmp_threads_sleep(tiny_export, preset, want):
    """The runtime imports no torch before it opens the torch backend, which then loads torch with
    OMP_WAIT_POLICY=PASSIVE (spinning torch threads slow the kernels' pool: cpukernels says how
    much), keeping a value the user set."""
    code = ("import os, sys\n"
            "import runtime.runtime_cli\n"
            "assert 'torch' not in sys.modules, 'the runtime imported torch before the backend'\n"
            "from runtime.backends.torch_backend import TorchBackend\n"
            f"be = TorchBackend({str(tiny_export)!r}, device='cpu')\n"
            "print(os.environ.get('OMP_WAIT_POLICY'), be.kernels)\n")
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    if preset:
        env["OMP_WAIT_POLICY"] = preset
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                          cwd=str(cpukernels.REPO_ROOT))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == [want, "cpu"], proc.stdout + proc.stderr
