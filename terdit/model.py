"""The reference TerDiT: the official DiT_Llama forward, reproduced with plain PyTorch.

Module and parameter names follow the official model so that state dicts map one to one
(only the packed ternary tensors differ: ours are k16 `codes` + fp32 `scale`).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from terdit_common.guidance import guide, guided_channels

from .config import TerDiTConfig
from .ternary import TERNARY_LAYERS, TernaryLinear, apply_keep_fp32, ternary_linear


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


class RMSNorm(nn.Module):
    """RMSNorm with an affine weight, computed in fp32 (as apex's FusedRMSNorm)."""

    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        return rms_norm(x, self.weight, self.eps)


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    xf = x.float()
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * weight.float()
    return y.to(x.dtype)


def timestep_frequencies(dim: int = 256, max_period: float = 10000.0) -> Tensor:
    """The sinusoidal embedding's frequencies, computed on the CPU in fp32 as the official code
    does (a buffer, so a forward makes no host-to-device copy and can be graph-captured)."""
    half = dim // 2
    return torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32) / half)


def timestep_embedding(t: Tensor, freqs: Tensor, dim: int = 256) -> Tensor:
    """Sinusoidal embedding [cos, sin] of fractional timesteps, fp32 (GLIDE / DiT)."""
    args = t[:, None].float() * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


def rope_tables(head_dim: int, n_tokens: int, theta: float = 10000.0) -> tuple[Tensor, Tensor]:
    """cos / sin [n_tokens, head_dim // 2] of the official 1-D RoPE (fp32)."""
    freqs = 1.0 / (theta ** (torch.arange(0, head_dim, 2)[: head_dim // 2].float() / head_dim))
    angles = torch.outer(torch.arange(n_tokens), freqs).float()
    return torch.cos(angles), torch.sin(angles)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate interleaved pairs (x[2i], x[2i+1]) of x [N, T, H, hd] by the token's angle, in
    fp32 (the official complex multiply written with real ops, so it exports to ONNX)."""
    xf = x.float().reshape(*x.shape[:-1], -1, 2)        # (N, T, H, hd/2, 2)
    a, b = xf[..., 0], xf[..., 1]
    c = cos[None, :, None, :]                            # (1, T, 1, hd/2)
    s = sin[None, :, None, :]
    out = torch.stack([a * c - b * s, a * s + b * c], dim=-1)
    return out.flatten(-2).to(x.dtype)


class TimestepEmbedder(nn.Module):
    def __init__(self, hidden: int, freq_dim: int = 256) -> None:
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden))
        nn.init.normal_(self.mlp[0].weight, std=0.02)
        nn.init.normal_(self.mlp[2].weight, std=0.02)
        nn.init.zeros_(self.mlp[0].bias)
        nn.init.zeros_(self.mlp[2].bias)
        self.register_buffer("freqs", timestep_frequencies(freq_dim), persistent=False)

    def _apply(self, fn, recurse=True):
        return apply_keep_fp32(self, fn, recurse, buffers=("freqs",))

    def forward(self, t: Tensor) -> Tensor:
        freq = timestep_embedding(t, self.freqs, self.freq_dim)
        return self.mlp(freq.to(self.mlp[0].weight.dtype))


class LabelEmbedder(nn.Module):
    """Class table with one extra row (id num_classes) for the unconditional label."""

    def __init__(self, num_classes: int, hidden: int) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.embedding_table = nn.Embedding(num_classes + 1, hidden)
        nn.init.normal_(self.embedding_table.weight, std=0.02)

    def forward(self, labels: Tensor) -> Tensor:
        return self.embedding_table(labels)


class Attention(nn.Module):
    def __init__(self, cfg: TerDiTConfig, packed: bool) -> None:
        super().__init__()
        self.n_heads = cfg.n_heads
        self.head_dim = cfg.head_dim
        d = cfg.dim
        self.wq = ternary_linear(d, d, False, packed)
        self.wk = ternary_linear(d, d, False, packed)
        self.wv = ternary_linear(d, d, False, packed)
        self.wo = ternary_linear(d, d, False, packed)
        if cfg.qk_norm:
            self.q_norm: nn.Module = nn.LayerNorm(d)
            self.k_norm: nn.Module = nn.LayerNorm(d)
        else:
            self.q_norm = self.k_norm = nn.Identity()

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        n, t, _ = x.shape
        q = self.q_norm(self.wq(x))                                    # (N, T, D)
        k = self.k_norm(self.wk(x))
        v = self.wv(x)
        return self.wo(attend(q, k, v, cos, sin, self.n_heads))


def attend(q: Tensor, k: Tensor, v: Tensor, cos: Tensor, sin: Tensor, n_heads: int) -> Tensor:
    """RoPE + SDPA over (N, T, D) projections; returns (N, T, D)."""
    n, t, d = q.shape
    q = apply_rope(q.view(n, t, n_heads, -1), cos, sin)                 # (N, T, H, hd)
    k = apply_rope(k.view(n, t, n_heads, -1), cos, sin)
    v = v.view(n, t, n_heads, -1)
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return out.transpose(1, 2).reshape(n, t, d)                         # (N, T, D)


class FeedForward(nn.Module):
    def __init__(self, cfg: TerDiTConfig, packed: bool) -> None:
        super().__init__()
        d, h = cfg.dim, cfg.ffn_hidden
        self.w1 = ternary_linear(d, h, False, packed)
        self.w2 = ternary_linear(h, d, False, packed)
        self.w3 = ternary_linear(d, h, False, packed)

    def forward(self, x: Tensor) -> Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class TransformerBlock(nn.Module):
    def __init__(self, cfg: TerDiTConfig, packed: bool) -> None:
        super().__init__()
        self.attention = Attention(cfg, packed)
        self.feed_forward = FeedForward(cfg, packed)
        self.attention_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        ada = ternary_linear(cfg.cond_dim, 6 * cfg.dim, True, packed)
        if not packed:
            nn.init.zeros_(ada.weight)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), ada, RMSNorm(6 * cfg.dim, cfg.norm_eps))

    def forward(self, x: Tensor, c: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        mod = self.adaLN_modulation(c)                                 # (N, 6D)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mod.chunk(6, dim=1)
        h = modulate(self.attention_norm(x), shift_msa, scale_msa)
        x = x + gate_msa.unsqueeze(1) * self.attention(h, cos, sin)
        h = modulate(self.ffn_norm(x), shift_mlp, scale_mlp)
        return x + gate_mlp.unsqueeze(1) * self.feed_forward(h)


class FinalLayer(nn.Module):
    def __init__(self, cfg: TerDiTConfig) -> None:
        super().__init__()
        self.norm_final = nn.LayerNorm(cfg.dim, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(cfg.dim, cfg.patch_size ** 2 * cfg.out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(cfg.cond_dim, 2 * cfg.dim))
        for lin in (self.linear, self.adaLN_modulation[1]):
            nn.init.zeros_(lin.weight)
            nn.init.zeros_(lin.bias)

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


class DiTBase(nn.Module):
    """What the reference model and its fused inference form share: the embedders, fp32 RoPE
    tables (kept fp32 under dtype casts), patchify / unpatchify and the condition vector."""

    cfg: TerDiTConfig

    def _apply(self, fn, recurse=True):
        return apply_keep_fp32(self, fn, recurse, buffers=("rope_cos", "rope_sin"))

    @property
    def dtype(self) -> torch.dtype:
        return self.x_embedder.weight.dtype

    def patchify(self, x: Tensor) -> Tensor:
        return patchify(x, self.cfg)

    def unpatchify(self, x: Tensor) -> Tensor:
        return unpatchify(x, self.cfg)

    def embed(self, x: Tensor, t: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        """Tokens (N, T, D) of x and the condition c = t_emb + y_emb (N, cond)."""
        h = self.x_embedder(self.patchify(x.to(self.dtype)))           # (N, T, D)
        c = self.t_embedder(t) + self.y_embedder(y)                     # (N, cond)
        return h, c


class TerDiT(DiTBase):
    """Ternary DiT_Llama. `packed=True` builds the inference form (k16 codes, no latent fp
    weights are ever allocated); `packed=False` the trainable latent form."""

    def __init__(self, cfg: TerDiTConfig, packed: bool = False) -> None:
        super().__init__()
        if packed and not cfg.ternary:
            raise ValueError("a full-precision config (ternary=False) has no packed form")
        self.cfg = cfg
        p, c = cfg.patch_size, cfg.in_channels
        self.x_embedder = nn.Linear(p * p * c, cfg.dim)
        nn.init.xavier_uniform_(self.x_embedder.weight)
        nn.init.zeros_(self.x_embedder.bias)
        self.t_embedder = TimestepEmbedder(cfg.cond_dim)
        self.y_embedder = LabelEmbedder(cfg.num_classes, cfg.cond_dim)
        self.layers = nn.ModuleList(TransformerBlock(cfg, packed) for _ in range(cfg.n_layers))
        self.final_layer = FinalLayer(cfg)
        cos, sin = rope_tables(cfg.head_dim, cfg.num_tokens)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        if not cfg.ternary:
            _make_full_precision_(self)
        elif not packed:
            for m in self.ternary_layers():
                m.reset_alpha()

    def ternary_layers(self) -> list[nn.Module]:
        """Every ternary linear layer (latent TernaryLinear or PackedTernaryLinear)."""
        return [m for m in self.modules() if isinstance(m, TERNARY_LAYERS)]

    @property
    def packed(self) -> bool:
        layers = self.ternary_layers()
        return bool(layers) and all(m.packed for m in layers)

    def forward(self, x: Tensor, t: Tensor, y: Tensor) -> Tensor:
        """x (N, C, H, W), t (N,) timesteps, y (N,) labels (num_classes = unconditional)."""
        h, c = self.embed(x, t, y)
        for layer in self.layers:
            h = layer(h, c, self.rope_cos, self.rope_sin)
        return self.unpatchify(self.final_layer(h, c))

    def forward_with_cfg(self, x: Tensor, t: Tensor, y: Tensor, cfg_scale: float,
                         mode: str = "official") -> Tensor:
        """The official CFG forward: x, t, y hold [cond half, uncond half]; both halves are run
        on the first half's x. `official` guides eps channels 0..2 only (the release's
        "exact reproducibility" choice); `standard` guides all eps channels."""
        g = guided_channels(mode, self.cfg.in_channels)
        n = len(x) // 2
        out = self.forward(torch.cat([x[:n], x[:n]], 0), t, y)
        guided = guide(out, cfg_scale, mode, self.cfg.in_channels)      # (n, C', H, W)
        # both halves carry the guided eps; the other channels stay each half's own
        return torch.cat([guided, torch.cat([guided[:, :g], out[n:, g:]], dim=1)])


def patchify(x: Tensor, cfg: TerDiTConfig) -> Tensor:
    """(N, C, H, W) -> tokens (N, T, C*p*p), each flattened in (C, ph, pw) order (official)."""
    n, c, h, w = x.shape
    p = cfg.patch_size
    if (h, w) != (cfg.input_size, cfg.input_size) or c != cfg.in_channels:
        raise ValueError(f"x has shape {tuple(x.shape)}; this model takes "
                         f"(N, {cfg.in_channels}, {cfg.input_size}, {cfg.input_size})")
    x = x.view(n, c, h // p, p, w // p, p)
    return x.permute(0, 2, 4, 1, 3, 5).flatten(-3).flatten(1, 2)        # (N, T, C*p*p)


def unpatchify(x: Tensor, cfg: TerDiTConfig) -> Tensor:
    """tokens (N, T, p*p*C') read in (ph, pw, C') order -> (N, C', H, W) (official)."""
    c, p = cfg.out_channels, cfg.patch_size
    h = w = cfg.input_size // p
    x = x.reshape(x.shape[0], h, w, p, p, c)
    x = x.permute(0, 5, 1, 3, 2, 4)                                     # einsum nhwpqc->nchpwq
    return x.reshape(x.shape[0], c, h * p, w * p)                       # (N, C', H, W)


class _FloatLinear(nn.Linear):
    """Full-precision stand-in for TernaryLinear (ternary=False configs)."""


def _make_full_precision_(model: nn.Module) -> None:
    for name, child in list(model.named_children()):
        if isinstance(child, TernaryLinear):
            lin = _FloatLinear(child.in_features, child.out_features, child.bias is not None)
            with torch.no_grad():
                lin.weight.copy_(child.weight)
                if lin.bias is not None:
                    lin.bias.zero_()
            setattr(model, name, lin)
        else:
            _make_full_precision_(child)
