import pytest

from terdit import OFFICIAL_NAMES, PRESETS, TerDiTConfig


@pytest.mark.parametrize("name, dim, layers, hidden", [
    ("TerDiT-600M", 1536, 16, 4096), ("TerDiT-4.2B", 3072, 32, 8192), ("TerDiT-7B", 4096, 32, 11008),
])
def test_official_presets(name, dim, layers, hidden):
    cfg = TerDiTConfig.from_name(name)
    assert (cfg.dim, cfg.n_layers, cfg.n_heads, cfg.ffn_hidden) == (dim, layers, 32, hidden)
    assert (cfg.patch_size, cfg.in_channels, cfg.out_channels, cfg.cond_dim) == (2, 4, 8, 1024)
    assert cfg.num_classes == 1000 and cfg.null_class == 1000 and cfg.norm_eps == 1e-5
    assert cfg.default_cfg_mode == "official"
    assert OFFICIAL_NAMES[cfg.official_name] == name


def test_official_names_map_to_presets():
    for official, ours in OFFICIAL_NAMES.items():
        assert TerDiTConfig.from_name(official) == PRESETS[ours]


def test_json_roundtrip(tmp_path):
    for cfg in PRESETS.values():
        assert TerDiTConfig.from_json(cfg.to_json()) == cfg
    cfg = TerDiTConfig.from_name("TerDiT-600M", input_size=64, qk_norm=True, ffn_dim_multiplier=1.3)
    (tmp_path / "c.json").write_text(cfg.to_json())
    assert TerDiTConfig.load(tmp_path / "c.json") == cfg


def test_small_preset_cond_dim_and_cfg_mode():
    demo = TerDiTConfig.from_name("TerDiT-demo")
    assert demo.cond_dim == demo.dim and demo.default_cfg_mode == "standard"
    assert demo.official_name is None


@pytest.mark.parametrize("kwargs, match", [
    (dict(dim=100, n_heads=3), "divisible by n_heads"),
    (dict(input_size=33), "divisible by patch_size"),
    (dict(n_kv_heads=8), "grouped-query"),
    (dict(dim=0), "integer from 2 to"),
    (dict(n_layers=10**6), "n_layers=1000000: must be an integer from 1 to 512"),
    (dict(input_size=2**40), "input_size"),
    (dict(ffn_dim_multiplier=-1), "ffn_dim_multiplier"),
    (dict(num_classes=-5), "num_classes=-5"),
    (dict(class_dropout_prob=1.0), r"\[0, 1\)"),
])
def test_invalid_configs(kwargs, match):
    with pytest.raises(ValueError, match=match):
        TerDiTConfig.from_name("TerDiT-600M", **kwargs)


def test_unknown_names_and_fields():
    with pytest.raises(ValueError, match="unknown model name 'DiT-XL'"):
        TerDiTConfig.from_name("DiT-XL")
    with pytest.raises(ValueError, match=r"unknown config field\(s\) \['depth'\]"):
        TerDiTConfig.from_dict({"depth": 28})
    with pytest.raises(ValueError, match="not valid JSON"):
        TerDiTConfig.from_json("{")
