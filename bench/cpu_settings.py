"""The settings every part of bench/cpu.py shares (shapes, rows, models, paths)."""
from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

# (label, K, N) per model: fused qkv, wo, fused w1|w3, w2
SHAPES = {
    "600M": [("qkv", 1536, 4608), ("wo", 1536, 1536), ("w13", 1536, 8192), ("w2", 4096, 1536)],
    "4.2B": [("qkv", 3072, 9216), ("wo", 3072, 3072), ("w13", 3072, 16384), ("w2", 8192, 3072)],
}
M_VALUES = (256, 512, 2048)
ROWS = ("ours", "ours-int8", "ours-torch", "ours-torch-int8", "function", "dense-fp32",
        "int8-dynamic", "matmulnbits-2bit", "dense-bf16-torch", "openvino-bf16", "openvino-int8")
# end-to-end models: checkpoint source, images per forward (each + CFG)
# (the demo has 1 channel: --cfg official guides eps channels 0..2, so it exports "standard")
E2E_MODELS = {"demo": {"images": [40], "cfg": "standard"},
              "600M": {"images": [1, 4], "cfg": "official"}}
CFG_SCALE = 4.0
QUICK_SHAPE = ("600M", "wo", 1536, 1536)
QUICK_M = (256,)
DEFAULT_CACHE = Path.home() / ".cache" / "terdit" / "bench-cpu"
INTERESTING_FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "avx_vnni",
                     "amx_bf16", "amx_int8")
