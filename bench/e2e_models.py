"""The models bench/e2e.py times: random packed TerDiTs in the official layout, the official
unpack-then-F.linear deployment, dense bf16 peers, and torch.compile'd blocks under a CUDA graph."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from terdit import TerDiT, TerDiTConfig
from terdit.ternary import TernaryLinear
from terdit.formats import codes_to_k16, k16_to_hqq

# --dry-run: the whole script on the CPU with tiny models (no kernels, compile or graphs), to
# check it end to end where no GPU is at hand; its numbers mean nothing.
DRY = {"on": False}


def device() -> str:
    return "cpu" if DRY["on"] else "cuda"


def sync() -> None:
    if not DRY["on"]:
        torch.cuda.synchronize()


def random_packed(cfg: TerDiTConfig, seed: int = 0, on: str | None = None) -> TerDiT:
    """A packed TerDiT on the GPU (or `on`) with random codes 0..2, alpha ~ 1/sqrt(K) and
    N(0, 0.02) dense weights."""
    torch.manual_seed(seed)
    with torch.device(on or device()):
        model = TerDiT(cfg, packed=True)
        for m in model.ternary_layers():
            codes = torch.randint(0, 3, (m.out_features, m.in_features), dtype=torch.uint8)
            m.codes.copy_(codes_to_k16(codes))
            m.scale.fill_(1.0 / m.in_features ** 0.5)
            if m.bias is not None:
                torch.nn.init.normal_(m.bias, std=0.02)
        for name, p in model.named_parameters():
            if "adaLN_modulation.2" in name or name.endswith("norm.weight"):
                continue
            if p.dim() >= 2 and not name.startswith("y_embedder"):
                torch.nn.init.normal_(p, std=0.02)
    return model.eval()


class OfficialUnpackLinear(torch.nn.Module):
    """The official inference layer: 2-bit HQQ uint8 (N/4, K) + one alpha, unpacked to float on
    every forward (hqq's unpack_2bit_u8, written with torch ops), then F.linear."""

    def __init__(self, layer: TernaryLinear) -> None:
        super().__init__()
        self.register_buffer("weight", k16_to_hqq(layer.codes, layer.in_features))
        self.register_buffer("alphas", layer.scale[:1].clone())
        self.register_buffer("bias", None if layer.bias is None else layer.bias.detach().clone())

    def forward(self, x):
        w = self.weight
        codes = torch.cat([(w & 0xC0) >> 6, (w & 0x30) >> 4, (w & 0x0C) >> 2, w & 0x03], 0)
        w = (self.alphas * (codes.to(torch.float) - 1.0)).to(x.dtype)
        return F.linear(x, w, None if self.bias is None else self.bias.to(x.dtype))


def official_model(packed: TerDiT) -> TerDiT:
    import copy
    model = copy.deepcopy(packed)
    def swap(mod):
        for name, child in list(mod.named_children()):
            if isinstance(child, TernaryLinear):
                setattr(mod, name, OfficialUnpackLinear(child))
            else:
                swap(child)
    swap(model)
    return model.to(torch.bfloat16).eval()


def dense_model(cfg: TerDiTConfig) -> TerDiT:
    torch.manual_seed(1)
    with torch.device(device()):
        model = TerDiT(cfg.replace(ternary=False))
        for name, p in model.named_parameters():
            if p.dim() >= 2 and not name.startswith("y_embedder"):
                torch.nn.init.normal_(p, std=0.02)
    return model.to(torch.bfloat16).eval()


class CompiledGraphed:
    """torch.compile'd blocks + one CUDA graph per batch size, for the dense bf16 peer."""

    def __init__(self, model: TerDiT) -> None:
        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
        self.model = model
        self.block = torch.compile(lambda blk, h, c, cos, sin: blk(h, c, cos, sin),
                                   fullgraph=True, dynamic=False,
                                   backend="aot_eager" if DRY["on"] else "inductor")
        self.graphs = {}

    def eager(self, x, t, y):
        m = self.model
        h, c = m.embed(x, t, y)
        for blk in m.layers:
            h = self.block(blk, h, c, m.rope_cos, m.rope_sin)
        return m.unpatchify(m.final_layer(h, c))

    @torch.no_grad()
    def __call__(self, x, t, y):
        if DRY["on"]:
            return self.eager(x, t, y)
        n = x.shape[0]
        if n not in self.graphs:
            static = (x.clone(), t.clone(), y.clone())
            s = torch.cuda.Stream()
            s.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(s):
                for _ in range(3):
                    self.eager(*static)
            torch.cuda.current_stream().wait_stream(s)
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                out = self.eager(*static)
            self.graphs[n] = (g, static, out)
        g, static, out = self.graphs[n]
        for dst, src in zip(static, (x, t, y)):
            dst.copy_(src)
        g.replay()
        return out


def module_bytes(*mods) -> int:
    seen, total = set(), 0
    for mod in mods:
        for t in list(mod.parameters()) + list(mod.buffers()):
            if t is not None and t.data_ptr() not in seen:
                seen.add(t.data_ptr())
                total += t.numel() * t.element_size()
    return total
