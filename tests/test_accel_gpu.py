"""The fast CUDA backend (terdit.kernels.accel) against the reference model, on every preset's shapes.

Error measure: max |out - ref_fp32| / max |ref_fp32|. Bound: twice the error of the plain
PyTorch bf16 model (reference op, eager, unfused) on the same inputs, plus 1e-3, the kernel
tests' rule applied to the whole network."""
import pytest
import torch

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

from terdit import TerDiT, TerDiTConfig  # noqa: E402
from terdit.formats import codes_to_k16  # noqa: E402

PRESETS = ["TerDiT-600M", "TerDiT-4.2B", "TerDiT-7B"]


def _packed(name, input_size=8, seed=0):
    cfg = TerDiTConfig.from_name(name, input_size=input_size)
    torch.manual_seed(seed)
    with torch.device("cuda"):
        model = TerDiT(cfg, packed=True)
        for m in model.ternary_layers():
            m.codes.copy_(codes_to_k16(torch.randint(0, 3, (m.out_features, m.in_features),
                                                     dtype=torch.uint8)))
            m.scale.fill_(1.0 / m.in_features ** 0.5)
            if m.bias is not None:
                torch.nn.init.normal_(m.bias, std=0.05)
        for pname, p in model.named_parameters():
            if p.dim() >= 2 and not pname.startswith("y_embedder"):
                torch.nn.init.normal_(p, std=0.02)
    return model.eval()


def _inputs(cfg, n, seed=1):
    g = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(n, cfg.in_channels, cfg.input_size, cfg.input_size, device="cuda", generator=g)
    t = torch.rand(n, device="cuda", generator=g) * 999
    y = torch.randint(0, cfg.num_classes, (n,), device="cuda", generator=g)
    return x, t, y


def _rel(a, b):
    return float((a.float() - b.float()).abs().max() / b.float().abs().max())


@pytest.fixture(scope="module", autouse=True)
def kernels():
    from terdit.kernels import cuda as k
    k.load()


@pytest.mark.parametrize("name", PRESETS)
@pytest.mark.parametrize("graphs", [False, True], ids=["eager", "cuda-graph"])
def test_fast_backend_matches_reference(name, graphs, monkeypatch):
    from terdit import ternary
    from terdit.kernels.accel import AcceleratedTerDiT
    from terdit.fused import FusedTerDiT
    model = _packed(name)
    x, t, y = _inputs(model.cfg, 4)
    with torch.no_grad(), monkeypatch.context() as m:
        # oracle: the unfused model with the reference op (unpack + fp32 matmul) on the GPU
        m.setattr(ternary, "ternary_matmul", ternary.ternary_linear_ref)
        ref = model(x, t, y)
        torch_bf16 = model.to(torch.bfloat16)(x, t, y)
        model.float()
    # compiled blocks are exercised with the graph; the eager variant keeps the run short
    fast = AcceleratedTerDiT(FusedTerDiT(model).to(torch.bfloat16), compile=graphs, cuda_graphs=graphs)
    out = fast(x, t, y)
    out2 = fast(x, t, y)
    assert torch.equal(out, out2), "replays must be deterministic"
    bound = 2 * _rel(torch_bf16, ref) + 1e-3
    assert torch.isfinite(out).all()
    assert _rel(out, ref) <= bound, (_rel(out, ref), bound)


def test_cuda_graph_replays_track_new_inputs():
    from terdit.kernels.accel import AcceleratedTerDiT
    from terdit.fused import FusedTerDiT
    model = _packed("TerDiT-600M")
    fast = AcceleratedTerDiT(FusedTerDiT(model).to(torch.bfloat16), compile=False, cuda_graphs=True)
    eager = AcceleratedTerDiT(FusedTerDiT(model).to(torch.bfloat16), compile=False, cuda_graphs=False)
    for seed in (1, 2, 3):
        x, t, y = _inputs(model.cfg, 2, seed)
        assert _rel(fast(x, t, y), eager(x, t, y)) < 1e-2


@pytest.mark.parametrize("gemm", ["ternary", "cublaslt"])
def test_w2a8_mode_error_is_small(gemm):
    from terdit.kernels.accel import AcceleratedTerDiT
    from terdit.fused import FusedTerDiT
    if torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("FP8 tensor cores need sm_89+")
    model = _packed("TerDiT-600M", input_size=16)
    x, t, y = _inputs(model.cfg, 4)
    wo = AcceleratedTerDiT(FusedTerDiT(_packed("TerDiT-600M", 16)).to(torch.bfloat16))(x, t, y)
    fast = AcceleratedTerDiT(FusedTerDiT(model).to(torch.bfloat16), w2a8=True, w2a8_gemm=gemm)
    out = fast(x, t, y)
    err = _rel(out, wo)
    mean = float((out.float() - wo.float()).abs().mean() / wo.float().abs().max())
    print(f"W1.58A8 ({gemm}) vs weight-only output: max rel err {err:.3e}, mean {mean:.3e}")
    assert torch.isfinite(out).all()
    assert err < 0.1
    if gemm == "ternary":
        # The weights stay 2-bit codes on the GPU: no e4m3 (or any float) copy of them.
        assert not any(b.dtype == torch.float8_e4m3fn for b in fast.model.buffers())
