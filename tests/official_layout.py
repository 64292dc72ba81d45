"""Test helpers written independently of terdit's own code paths: write a checkpoint in the
official release layout, and run the official DiT_Llama forward from its state dict (complex
RoPE, HQQ unpack with the CUDA kernel's masks, apex-style RMSNorm) as an oracle."""
from __future__ import annotations

import argparse
import math
from pathlib import Path

import torch
import torch.nn.functional as F

OFFICIAL_DIMS = {  # name: (dim, n_layers, n_heads)
    "DiT_Llama_600M_patch2": (1536, 16, 32),
    "DiT_Llama_3B_patch2": (3072, 32, 32),
    "DiT_Llama_7B_patch2": (4096, 32, 32),
}
TERNARY = ("attention.wq", "attention.wk", "attention.wv", "attention.wo",
           "feed_forward.w1", "feed_forward.w2", "feed_forward.w3", "adaLN_modulation.1")


def shrink_600m(monkeypatch, dim: int = 64, n_layers: int = 2, n_heads: int = 4) -> None:
    """DiT_Llama_600M_patch2 shrunk (our preset and this oracle's table, for the test): the
    official code only builds its named sizes, so tests that need the official layout but not
    its size use this."""
    import terdit.config
    monkeypatch.setitem(terdit.config.PRESETS, "TerDiT-600M", terdit.config.PRESETS[
        "TerDiT-600M"].replace(dim=dim, n_layers=n_layers, n_heads=n_heads))
    monkeypatch.setitem(OFFICIAL_DIMS, "DiT_Llama_600M_patch2", (dim, n_layers, n_heads))


def hidden_of(dim: int) -> int:
    h = int(2 * (4 * dim) / 3)
    return 256 * ((h + 255) // 256)


def hqq_pack(codes: torch.Tensor) -> torch.Tensor:
    """codes uint8 [N, K] in 0..2 -> official uint8 [N/4, K]."""
    h = codes.shape[0] // 4
    c = codes.to(torch.uint8)
    return (c[:h] << 6) | (c[h:2 * h] << 4) | (c[2 * h:3 * h] << 2) | c[3 * h:]


def hqq_unpack(w: torch.Tensor) -> torch.Tensor:
    return torch.cat([(w & 0xC0) >> 6, (w & 0x30) >> 4, (w & 0x0C) >> 2, w & 0x03], 0)


def layer_shapes(dim: int, qk_norm: bool):
    """(suffix, out, in, bias) of each ternary layer + fp shapes of a block."""
    hid, cond = hidden_of(dim), min(dim, 1024)
    ternary = {"attention.wq": (dim, dim, False), "attention.wk": (dim, dim, False),
               "attention.wv": (dim, dim, False), "attention.wo": (dim, dim, False),
               "feed_forward.w1": (hid, dim, False), "feed_forward.w2": (dim, hid, False),
               "feed_forward.w3": (hid, dim, False), "adaLN_modulation.1": (6 * dim, cond, True)}
    fp = {"attention_norm.weight": (dim,), "ffn_norm.weight": (dim,),
          "adaLN_modulation.2.weight": (6 * dim,)}
    if qk_norm:
        fp.update({"attention.q_norm.weight": (dim,), "attention.q_norm.bias": (dim,),
                   "attention.k_norm.weight": (dim,), "attention.k_norm.bias": (dim,)})
    return ternary, fp


def random_official_state(model: str, image_size: int, num_classes: int = 1000,
                          qk_norm: bool = False, packed: bool = True, dtype=torch.float32,
                          seed: int = 0, std: float = 0.05) -> dict:
    """Random weights for every official key; ternary layers get random codes 0..2 (packed) or
    random fp latent weights (packed=False)."""
    g = torch.Generator().manual_seed(seed)
    dim, n_layers, _ = OFFICIAL_DIMS[model]
    cond, p, cin = min(dim, 1024), 2, 4

    def rnd(*shape, s=std):
        return (torch.randn(*shape, generator=g) * s).to(dtype)

    sd = {"x_embedder.weight": rnd(dim, p * p * cin), "x_embedder.bias": rnd(dim),
          "t_embedder.mlp.0.weight": rnd(cond, 256), "t_embedder.mlp.0.bias": rnd(cond),
          "t_embedder.mlp.2.weight": rnd(cond, cond), "t_embedder.mlp.2.bias": rnd(cond),
          "y_embedder.embedding_table.weight": rnd(num_classes + 1, cond, s=1.0),
          "final_layer.linear.weight": rnd(p * p * 2 * cin, dim),
          "final_layer.linear.bias": rnd(p * p * 2 * cin),
          "final_layer.adaLN_modulation.1.weight": rnd(2 * dim, cond),
          "final_layer.adaLN_modulation.1.bias": rnd(2 * dim)}
    ternary, fp = layer_shapes(dim, qk_norm)
    for i in range(n_layers):
        for suffix, (n, k, bias) in ternary.items():
            key = f"layers.{i}.{suffix}"
            if packed:
                codes = torch.randint(0, 3, (n, k), generator=g, dtype=torch.uint8)
                sd[f"{key}.weight"] = hqq_pack(codes)
                # ~ 1/sqrt(fan_in) keeps activations O(1) through the blocks
                sd[f"{key}.alphas"] = (torch.rand(1, generator=g) + 0.5).div(math.sqrt(k)).to(dtype)
            else:
                sd[f"{key}.weight"] = rnd(n, k)
                sd[f"{key}.alphas"] = (torch.rand(1, generator=g) + 0.5).div(math.sqrt(k)).to(dtype)
            if bias:
                sd[f"{key}.bias"] = rnd(n)
        for suffix, shape in fp.items():
            base = 1.0 if suffix.endswith("norm.weight") or suffix.endswith("2.weight") else 0.0
            sd[f"layers.{i}.{suffix}"] = (base + rnd(*shape)).to(dtype)
    return sd


def write_official_dir(path: Path, model: str, image_size: int, state: dict, num_classes=1000,
                       qk_norm=False, ema=True, ternary=True, n_shards=1) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    ns = argparse.Namespace(model=model, image_size=image_size, num_classes=num_classes,
                            qk_norm=qk_norm, vae="ema", precision="bf16", global_bsz=256)
    torch.save(ns, path / "model_args.pth")
    for r in range(n_shards):
        name = f"consolidated{'_ema' if ema else ''}{'_ternary' if ternary else ''}." \
               f"{r:02d}-of-{n_shards:02d}.pth"
        torch.save(state, path / name)
    return path


# ---- the oracle ---------------------------------------------------------------------------------

def _ternarize_official(w: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    gamma = torch.mean(torch.abs(w))
    x = (w / (gamma + eps)).round()
    x = torch.where(x > 1, 1, x)
    return torch.where(x < -1, -1, x)


def official_forward(sd: dict, model: str, image_size: int, x, t, y, qk_norm=False):
    """The official DiT_Llama forward (fp32), straight from an official state dict."""
    dim, n_layers, n_heads = OFFICIAL_DIMS[model]
    raw = sd  # latent ternary weights are ternarized in their stored dtype, as in training
    sd = {k: v.float() if v.is_floating_point() else v for k, v in sd.items()}
    p, eps = 2, 1e-5

    def weight(prefix):
        w = raw[f"{prefix}.weight"]
        t3 = hqq_unpack(w).float() - 1.0 if w.dtype == torch.uint8 else _ternarize_official(w).float()
        return sd[f"{prefix}.alphas"] * t3

    def rms(v, w):
        return v * torch.rsqrt(v.pow(2).mean(-1, keepdim=True) + eps) * w

    def mod(v, shift, scale):
        return v * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)

    B, C, H, W = x.shape
    h = x.view(B, C, H // p, p, W // p, p).permute(0, 2, 4, 1, 3, 5).flatten(-3).flatten(1, 2)
    h = F.linear(h, sd["x_embedder.weight"], sd["x_embedder.bias"])
    half = 128
    freqs = torch.exp(-math.log(10000) * torch.arange(0, half, dtype=torch.float32) / half)
    args = t[:, None].float() * freqs[None]
    tf = torch.cat([torch.cos(args), torch.sin(args)], -1)
    te = F.linear(F.silu(F.linear(tf, sd["t_embedder.mlp.0.weight"], sd["t_embedder.mlp.0.bias"])),
                  sd["t_embedder.mlp.2.weight"], sd["t_embedder.mlp.2.bias"])
    c = te + sd["y_embedder.embedding_table.weight"][y]
    hd = dim // n_heads
    fr = 1.0 / (10000.0 ** (torch.arange(0, hd, 2)[: hd // 2].float() / hd))
    fr = torch.outer(torch.arange(4096), fr).float()
    cis = torch.polar(torch.ones_like(fr), fr)[: h.shape[1]]
    for i in range(n_layers):
        L = f"layers.{i}"
        ada = rms(F.linear(F.silu(c), weight(f"{L}.adaLN_modulation.1"),
                           sd[f"{L}.adaLN_modulation.1.bias"]), sd[f"{L}.adaLN_modulation.2.weight"])
        sm, scm, gm, sf, scf, gf = ada.chunk(6, dim=1)
        a_in = mod(rms(h, sd[f"{L}.attention_norm.weight"]), sm, scm)
        q = F.linear(a_in, weight(f"{L}.attention.wq"))
        k = F.linear(a_in, weight(f"{L}.attention.wk"))
        v = F.linear(a_in, weight(f"{L}.attention.wv"))
        if qk_norm:
            q = F.layer_norm(q, (dim,), sd[f"{L}.attention.q_norm.weight"], sd[f"{L}.attention.q_norm.bias"])
            k = F.layer_norm(k, (dim,), sd[f"{L}.attention.k_norm.weight"], sd[f"{L}.attention.k_norm.bias"])
        T = h.shape[1]
        q, k, v = (z.view(B, T, n_heads, hd) for z in (q, k, v))
        qc = torch.view_as_complex(q.float().reshape(B, T, n_heads, -1, 2))
        kc = torch.view_as_complex(k.float().reshape(B, T, n_heads, -1, 2))
        cb = cis.view(1, T, 1, hd // 2)
        q = torch.view_as_real(qc * cb).flatten(3)
        k = torch.view_as_real(kc * cb).flatten(3)
        o = F.scaled_dot_product_attention(q.permute(0, 2, 1, 3), k.permute(0, 2, 1, 3),
                                           v.permute(0, 2, 1, 3)).permute(0, 2, 1, 3).flatten(-2)
        h = h + gm.unsqueeze(1) * F.linear(o, weight(f"{L}.attention.wo"))
        f_in = mod(rms(h, sd[f"{L}.ffn_norm.weight"]), sf, scf)
        ff = F.linear(F.silu(F.linear(f_in, weight(f"{L}.feed_forward.w1"))) *
                      F.linear(f_in, weight(f"{L}.feed_forward.w3")), weight(f"{L}.feed_forward.w2"))
        h = h + gf.unsqueeze(1) * ff
    shift, scale = F.linear(F.silu(c), sd["final_layer.adaLN_modulation.1.weight"],
                            sd["final_layer.adaLN_modulation.1.bias"]).chunk(2, dim=1)
    h = mod(F.layer_norm(h, (dim,), eps=1e-6), shift, scale)
    h = F.linear(h, sd["final_layer.linear.weight"], sd["final_layer.linear.bias"])
    g = H // p
    h = h.reshape(B, g, g, p, p, 8)
    return torch.einsum("nhwpqc->nchpwq", h).reshape(B, 8, H, W)


def official_forward_with_cfg(sd, model, image_size, x, t, y, cfg_scale, qk_norm=False):
    half = x[: len(x) // 2]
    out = official_forward(sd, model, image_size, torch.cat([half, half]), t, y, qk_norm)
    eps, rest = out[:, :3], out[:, 3:]
    cond, uncond = torch.split(eps, len(eps) // 2, dim=0)
    he = uncond + cfg_scale * (cond - uncond)
    return torch.cat([torch.cat([he, he]), rest], dim=1)
