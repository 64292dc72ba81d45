"""The fused inference graph of a packed TerDiT (exact: same function, fewer and larger GEMMs).

- q, k, v -> one TernaryMatMul [3D, D] (per-segment scales live in the per-channel scale vector);
- w1, w3 -> one TernaryMatMul [2H, D] with the SwiGLU gate (`terdit::ternary_matmul_swiglu`);
- the adaLN linears of ALL blocks -> one TernaryMatMul [L*6D, cond] over the shared condition
  vector (every block sees the same silu(c)), followed by each block's RMSNorm.

The exporter emits this structure (`--fuse`, the default) and the runtime's PyTorch/CUDA backend
runs it, so TensorRT and PyTorch execute the same fusions.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .model import DiTBase, TerDiT, attend, modulate, rms_norm
from .ternary import PackedTernaryLinear


def _cat_packed(layers: list[PackedTernaryLinear], with_bias: bool) -> PackedTernaryLinear:
    k = layers[0].in_features
    if any(m.in_features != k or not m.packed for m in layers):
        raise ValueError("only packed layers with the same in_features can be fused")
    codes = torch.cat([m.codes for m in layers])
    scale = torch.cat([m.scale for m in layers])
    bias = torch.cat([m.bias.detach().float() for m in layers]) if with_bias else None
    return PackedTernaryLinear.from_tensors(codes, scale, bias, k)


class FusedBlock(nn.Module):
    def __init__(self, block) -> None:
        super().__init__()
        attn, ffn = block.attention, block.feed_forward
        self.n_heads = attn.n_heads
        self.qkv = _cat_packed([attn.wq, attn.wk, attn.wv], with_bias=False)
        self.wo = attn.wo
        self.q_norm, self.k_norm = attn.q_norm, attn.k_norm
        self.w13 = _cat_packed([ffn.w1, ffn.w3], with_bias=False)
        self.w2 = ffn.w2
        self.attention_norm = block.attention_norm
        self.ffn_norm = block.ffn_norm

    def forward(self, x: Tensor, mod: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mod.chunk(6, dim=1)
        h = modulate(self.attention_norm(x), shift_msa, scale_msa)       # (N, T, D)
        q, k, v = self.qkv(h).chunk(3, dim=-1)
        o = attend(self.q_norm(q), self.k_norm(k), v, cos, sin, self.n_heads)
        x = x + gate_msa.unsqueeze(1) * self.wo(o)
        h = modulate(self.ffn_norm(x), shift_mlp, scale_mlp)
        g = self.w13.swiglu(h)                                           # (N, T, H)
        return x + gate_mlp.unsqueeze(1) * self.w2(g)


class FusedTerDiT(DiTBase):
    """Same forward as `TerDiT` (packed), restructured for inference. Shares the fp modules and
    the ternary buffers of the model it was built from (no copies of unfused layers)."""

    def __init__(self, model: TerDiT) -> None:
        super().__init__()
        if not model.packed:
            raise ValueError("FusedTerDiT needs a packed model (terdit.pack_model_)")
        self.cfg = model.cfg
        self.x_embedder, self.t_embedder = model.x_embedder, model.t_embedder
        self.y_embedder, self.final_layer = model.y_embedder, model.final_layer
        blocks = list(model.layers)
        self.ada = _cat_packed([b.adaLN_modulation[1] for b in blocks], with_bias=True)
        self.ada_norm = nn.Parameter(torch.stack([b.adaLN_modulation[2].weight.detach()
                                                  for b in blocks]), requires_grad=False)
        self.ada_eps = blocks[0].adaLN_modulation[2].eps
        self.layers = nn.ModuleList(FusedBlock(b) for b in blocks)
        self.register_buffer("rope_cos", model.rope_cos, persistent=False)
        self.register_buffer("rope_sin", model.rope_sin, persistent=False)

    def modulation(self, c: Tensor) -> Tensor:
        """All blocks' adaLN outputs in one GEMM: (N, L, 6D)."""
        n, L = c.shape[0], len(self.layers)
        mod = self.ada(F.silu(c)).view(n, L, -1)                         # (N, L, 6D)
        return rms_norm(mod, self.ada_norm, self.ada_eps)

    def forward(self, x: Tensor, t: Tensor, y: Tensor) -> Tensor:
        h, c = self.embed(x, t, y)
        mod = self.modulation(c)
        for i, layer in enumerate(self.layers):
            h = layer(h, mod[:, i], self.rope_cos, self.rope_sin)
        return self.unpatchify(self.final_layer(h, c))
