"""Model configuration: one frozen dataclass, named presets, JSON round trip."""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from terdit_common.guidance import default_cfg_mode
from terdit_common.inputs import parse_json, read_json_file
from terdit_common.limits import check_model_config

# Official `model_args.model` names of the TerDiT release -> our preset names.
OFFICIAL_NAMES = {
    "DiT_Llama_600M_patch2": "TerDiT-600M",
    "DiT_Llama_3B_patch2": "TerDiT-4.2B",
    "DiT_Llama_7B_patch2": "TerDiT-7B",
}


@dataclass(frozen=True)
class TerDiTConfig:
    """Every field the official DiT_Llama takes, plus `ternary` (False trains the same
    architecture in full precision)."""

    input_size: int = 32
    patch_size: int = 2
    in_channels: int = 4
    dim: int = 1536
    n_layers: int = 16
    n_heads: int = 32
    n_kv_heads: Optional[int] = None
    multiple_of: int = 256
    ffn_dim_multiplier: Optional[float] = None
    norm_eps: float = 1e-5
    class_dropout_prob: float = 0.1
    num_classes: int = 1000
    learn_sigma: bool = True
    qk_norm: bool = False
    ternary: bool = True

    def __post_init__(self) -> None:
        def bad(field: str, rule: str) -> None:
            raise ValueError(f"TerDiTConfig.{field}={getattr(self, field)!r}: {rule}")

        try:
            check_model_config(self.to_dict())
        except ValueError as err:
            raise ValueError(f"TerDiTConfig.{err}") from None
        if self.input_size % self.patch_size:
            bad("input_size", f"must be divisible by patch_size={self.patch_size}")
        if self.dim % self.n_heads:
            bad("dim", f"must be divisible by n_heads={self.n_heads}")
        if (self.dim // self.n_heads) % 2:
            bad("dim", "dim // n_heads must be even (RoPE rotates pairs)")
        if self.n_kv_heads is not None and self.n_kv_heads != self.n_heads:
            bad("n_kv_heads", "grouped-query attention is not supported (the official models use "
                              "none); leave it None")
        if not 0.0 <= self.class_dropout_prob < 1.0:
            bad("class_dropout_prob", "must be in [0, 1)")
        for field in ("learn_sigma", "qk_norm", "ternary"):
            if not isinstance(getattr(self, field), bool):
                bad(field, "must be true or false")

    # ---- derived sizes -------------------------------------------------------------------
    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def cond_dim(self) -> int:
        """Width of the condition vector c = t_emb + y_emb."""
        return min(self.dim, 1024)

    @property
    def ffn_hidden(self) -> int:
        hidden = int(2 * (4 * self.dim) / 3)
        if self.ffn_dim_multiplier is not None:
            hidden = int(self.ffn_dim_multiplier * hidden)
        return self.multiple_of * math.ceil(hidden / self.multiple_of)

    @property
    def out_channels(self) -> int:
        return self.in_channels * 2 if self.learn_sigma else self.in_channels

    @property
    def num_tokens(self) -> int:
        return (self.input_size // self.patch_size) ** 2

    @property
    def null_class(self) -> int:
        """Label id of the unconditional (dropped) class."""
        return self.num_classes

    @property
    def default_cfg_mode(self) -> str:
        return default_cfg_mode(self.in_channels)

    @property
    def official_name(self) -> Optional[str]:
        """The official `model_args.model` name whose architecture this config has, if any."""
        for official, ours in OFFICIAL_NAMES.items():
            preset = PRESETS[ours]
            if all(getattr(self, f) == getattr(preset, f) for f in
                   ("patch_size", "in_channels", "dim", "n_layers", "n_heads", "multiple_of",
                    "ffn_dim_multiplier", "norm_eps", "learn_sigma")):
                return official
        return None

    # ---- construction and serialisation ------------------------------------------------
    @classmethod
    def from_name(cls, name: str, **overrides: Any) -> "TerDiTConfig":
        """A preset by our name (TerDiT-600M, ...) or the official one (DiT_Llama_600M_patch2)."""
        key = OFFICIAL_NAMES.get(name, name)
        if key not in PRESETS:
            known = sorted(PRESETS) + sorted(OFFICIAL_NAMES)
            raise ValueError(f"unknown model name {name!r}; known names: {', '.join(known)}")
        return dataclasses.replace(PRESETS[key], **overrides)

    def replace(self, **changes: Any) -> "TerDiTConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict, source: str = "config") -> "TerDiTConfig":
        if not isinstance(data, dict):
            raise ValueError(f"{source}: expected a JSON object of config fields, got "
                             f"{type(data).__name__}")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"{source}: unknown config field(s) {unknown}; known fields: "
                             f"{sorted(names)}")
        try:
            return cls(**data)
        except (TypeError, ValueError) as err:
            raise ValueError(f"{source}: {err}") from None

    def to_json(self, indent: int = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent, sort_keys=True)

    @classmethod
    def from_json(cls, text: str, source: str = "config") -> "TerDiTConfig":
        return cls.from_dict(parse_json(text, source), source)

    @classmethod
    def load(cls, path: str | Path, flag: str = "",
             fix: str = "pass a JSON file of TerDiTConfig fields") -> "TerDiTConfig":
        return cls.from_dict(read_json_file(path, flag, fix), source=str(path))


PRESETS: dict[str, TerDiTConfig] = {
    # The official DiT_Llama presets (latent 32x32 = 256x256 images by default).
    "TerDiT-600M": TerDiTConfig(dim=1536, n_layers=16, n_heads=32),
    "TerDiT-4.2B": TerDiTConfig(dim=3072, n_layers=32, n_heads=32),
    "TerDiT-7B": TerDiTConfig(dim=4096, n_layers=32, n_heads=32),
    # Small presets for tests and demos.
    "TerDiT-tiny": TerDiTConfig(input_size=8, dim=64, n_layers=2, n_heads=4, multiple_of=32,
                                num_classes=10),
    # The embedded demo (terdit/demo): Fashion-MNIST, pixel space, 32x32, 64 tokens.
    "TerDiT-demo": TerDiTConfig(input_size=32, patch_size=4, in_channels=1, dim=192,
                                n_layers=8, n_heads=4, multiple_of=64, num_classes=10),
}
