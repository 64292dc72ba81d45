import argparse
import json
import os
import pickle

import pytest
import torch

from terdit import (CheckpointError, TerDiTConfig, load_checkpoint, save_checkpoint, save_official,
                    save_torch)
from terdit.ternary import pack_model_
from terdit.formats import ternarize
from tests.helpers import random_model
from tests.official_layout import (official_forward, official_forward_with_cfg,
                                   random_official_state, shrink_600m, write_official_dir)

TINY_OFFICIAL = "DiT_Llama_600M_patch2"


def _inputs(n, cfg_or_size, num_classes=1000, seed=1):
    g = torch.Generator().manual_seed(seed)
    size = cfg_or_size
    x = torch.randn(n, 4, size, size, generator=g)
    t = torch.randint(0, 1000, (n,), generator=g).float()
    y = torch.randint(0, num_classes, (n,), generator=g)
    return x, t, y


def _rel(a, b):
    return float((a - b).abs().max() / b.abs().max())


# ---- the acceptance check: a 600M official-layout checkpoint at image_size 64 ------------------

@pytest.fixture(scope="module")
def official_600m(tmp_path_factory):
    path = tmp_path_factory.mktemp("official") / "600M"
    state = random_official_state(TINY_OFFICIAL, 64, seed=3)
    write_official_dir(path, TINY_OFFICIAL, 64, state)
    return path, state


def test_official_600m_forward_matches_oracle(official_600m):
    path, state = official_600m
    loaded = load_checkpoint(path)
    assert loaded.source == "official" and loaded.model.packed
    cfg = loaded.model.cfg
    assert (cfg.dim, cfg.n_layers, cfg.input_size) == (1536, 16, 8)
    x, t, y = _inputs(2, 8, seed=5)
    with torch.no_grad():
        ours = loaded.model(x, t, y)
        ref = official_forward(state, TINY_OFFICIAL, 64, x, t, y)
    assert _rel(ours, ref) <= 1e-4
    # forward_with_cfg in the official 3-channel form
    xc = torch.cat([x[:1], x[:1]])
    tc = torch.cat([t[:1], t[:1]])
    yc = torch.tensor([int(y[0]), 1000])
    with torch.no_grad():
        ours = loaded.model.forward_with_cfg(xc, tc, yc, 4.0)
        ref = official_forward_with_cfg(state, TINY_OFFICIAL, 64, xc, tc, yc, 4.0)
    assert _rel(ours, ref) <= 1e-4


def test_official_roundtrip_through_our_formats(official_600m, tmp_path):
    path, _ = official_600m
    model = load_checkpoint(path).model
    save_checkpoint(model, tmp_path / "ours")
    again = load_checkpoint(tmp_path / "ours").model
    for (k, a), (k2, b) in zip(model.state_dict().items(), again.state_dict().items()):
        assert k == k2 and torch.equal(a, b), k
    save_official(again, tmp_path / "back")
    back = load_checkpoint(tmp_path / "back").model
    for (k, a), b in zip(model.state_dict().items(), back.state_dict().values()):
        assert torch.equal(a, b), k


# ---- small official checkpoints (7B-shaped names need the real dims, so use 600M at 16px) ------

_STATES = {}


@pytest.fixture(autouse=True)
def _small_600m(request, monkeypatch):
    """The official layout at the 600M name, shrunk to 2 layers of dim 64 for every test but the
    600M acceptance ones (fixture official_600m): the format is what they check, not the size."""
    if "official_600m" not in request.fixturenames:
        shrink_600m(monkeypatch)


def _random_state(packed=True, dtype=torch.float32, qk_norm=False):
    key = (packed, dtype, qk_norm)
    if key not in _STATES:
        _STATES[key] = random_official_state(TINY_OFFICIAL, 16, seed=len(_STATES), packed=packed,
                                             dtype=dtype, qk_norm=qk_norm)
    return _STATES[key]


@pytest.fixture
def small_state():
    return {k: v.clone() for k, v in _random_state().items()}


def _small_official(tmp_path, packed=True, dtype=torch.float32, **kw):
    state = _random_state(packed, dtype, kw.get("qk_norm", False))
    write_official_dir(tmp_path, TINY_OFFICIAL, 16, state, **kw)
    return state


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_official_low_precision_storage(tmp_path, dtype):
    state = _small_official(tmp_path / "ck", dtype=dtype)
    model = load_checkpoint(tmp_path / "ck").model
    x, t, y = _inputs(2, 2)
    with torch.no_grad():
        assert _rel(model(x, t, y), official_forward(state, TINY_OFFICIAL, 16, x, t, y)) <= 1e-4


def test_official_qk_norm(tmp_path):
    state = _small_official(tmp_path / "ck", qk_norm=True)
    model = load_checkpoint(tmp_path / "ck").model
    assert model.cfg.qk_norm
    x, t, y = _inputs(2, 2)
    with torch.no_grad():
        ref = official_forward(state, TINY_OFFICIAL, 16, x, t, y, qk_norm=True)
        assert _rel(model(x, t, y), ref) <= 1e-4


def test_official_fp_consolidated_is_ternarized_like_training(tmp_path):
    state = _small_official(tmp_path / "ck", packed=False, ternary=False, dtype=torch.bfloat16)
    loaded = load_checkpoint(tmp_path / "ck")
    assert loaded.metadata["official_file"] == "consolidated_ema.00-of-01.pth"
    layer = loaded.model.layers[1].feed_forward.w2
    w = state["layers.1.feed_forward.w2.weight"]
    assert torch.equal(layer.ternary_values(), ternarize(w).to(torch.int8))
    x, t, y = _inputs(2, 2)
    with torch.no_grad():
        assert _rel(loaded.model(x, t, y), official_forward(state, TINY_OFFICIAL, 16, x, t, y)) <= 1e-4


def test_official_file_choice(tmp_path):
    state = _small_official(tmp_path / "ck")
    write_official_dir(tmp_path / "ck", TINY_OFFICIAL, 16, state, ema=False)
    assert load_checkpoint(tmp_path / "ck").metadata["official_file"].startswith("consolidated_ema_")
    got = load_checkpoint(tmp_path / "ck", ema=False).metadata["official_file"]
    assert got == "consolidated_ternary.00-of-01.pth"
    single = load_checkpoint(tmp_path / "ck" / "consolidated_ternary.00-of-01.pth")
    assert single.source == "official"
    with pytest.raises(CheckpointError, match="ternary=False"):
        load_checkpoint(tmp_path / "ck", ternary=False)


# ---- our formats -------------------------------------------------------------------------------

def _tiny_model(packed=False, seed=0):
    model = random_model(TerDiTConfig.from_name("TerDiT-tiny"), seed=seed)
    return pack_model_(model) if packed else model


@pytest.mark.parametrize("packed", [False, True])
def test_safetensors_roundtrip_is_lossless(tmp_path, packed):
    model = _tiny_model(packed)
    save_checkpoint(model, tmp_path / "ck")
    cfg = json.loads((tmp_path / "ck" / "config.json").read_text())
    assert cfg["weights"] == ("packed" if packed else "latent")
    loaded = load_checkpoint(tmp_path / "ck").model
    assert loaded.packed == packed
    for (k, a), (k2, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert k == k2 and a.dtype == b.dtype and torch.equal(a, b), k
    if not packed:
        assert all(p.requires_grad for p in loaded.parameters())


def test_latent_checkpoint_packs_on_load(tmp_path):
    model = _tiny_model(False)
    save_checkpoint(model, tmp_path / "ck")
    packed = load_checkpoint(tmp_path / "ck", packed=True).model
    assert packed.packed
    x, t, y = torch.randn(2, 4, 8, 8), torch.tensor([3.0, 700.0]), torch.tensor([1, 10])
    with torch.no_grad():
        assert torch.allclose(packed(x, t, y), model(x, t, y), rtol=1e-5, atol=1e-5)


def test_torch_file_roundtrip(tmp_path):
    model = _tiny_model(True)
    save_torch(model, tmp_path / "m.pt")
    loaded = load_checkpoint(tmp_path / "m.pt")
    assert loaded.source == "torch"
    for a, b in zip(model.state_dict().values(), loaded.model.state_dict().values()):
        assert torch.equal(a, b)


def test_save_refuses_overwrite(tmp_path):
    model = _tiny_model(True)
    save_checkpoint(model, tmp_path / "ck")
    with pytest.raises(ValueError, match="overwrite"):
        save_checkpoint(model, tmp_path / "ck")
    save_checkpoint(model, tmp_path / "ck", overwrite=True)
    mask = os.umask(0o022)
    os.umask(mask)
    for name in ("config.json", "model.safetensors"):          # not the 0600 of a temp file
        assert (tmp_path / "ck" / name).stat().st_mode & 0o777 == 0o666 & ~mask, name


def test_save_official_refuses_per_channel_scales(tmp_path):
    _small_official(tmp_path / "ck")
    model = load_checkpoint(tmp_path / "ck").model
    model.layers[0].attention.wq.scale[0] += 1
    with pytest.raises(ValueError, match="per-channel"):
        save_official(model, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    with pytest.raises(ValueError, match="DiT_Llama"):
        save_official(_tiny_model(True), tmp_path / "out2")


# ---- bad input ---------------------------------------------------------------------------------

def test_refuses_code_executing_pickle(tmp_path):
    state = dict(_small_official(tmp_path / "ck"))
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    state["evil"] = Evil()
    torch.save(state, tmp_path / "ck" / "consolidated_ema_ternary.00-of-01.pth")
    with pytest.raises(CheckpointError, match="refused to unpickle") as info:
        load_checkpoint(tmp_path / "ck")
    assert not marker.exists()
    assert "weights_only=False" not in str(info.value)      # no advice to load it unsafely
    assert "posix.system" in str(info.value) or "os.system" in str(info.value), str(info.value)
    # the same in model_args.pth
    torch.save({"model": TINY_OFFICIAL, "evil": Evil()}, tmp_path / "ck" / "model_args.pth")
    with pytest.raises(CheckpointError, match="model_args.pth: refused to unpickle"):
        load_checkpoint(tmp_path / "ck")
    assert not marker.exists()


def test_refuses_raw_pickle_with_code(tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    (tmp_path / "m.pt").write_bytes(pickle.dumps(Evil(), protocol=2))
    with pytest.raises(CheckpointError, match="refused to unpickle|cannot read"):
        load_checkpoint(tmp_path / "m.pt")
    assert not marker.exists()


def test_truncated_and_non_zip_files(tmp_path):
    _small_official(tmp_path / "ck")
    f = tmp_path / "ck" / "consolidated_ema_ternary.00-of-01.pth"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="consolidated_ema_ternary.00-of-01.pth"):
        load_checkpoint(tmp_path / "ck")
    f.write_bytes(b"this is not a checkpoint")
    with pytest.raises(CheckpointError, match="not a PyTorch checkpoint"):
        load_checkpoint(tmp_path / "ck")
    f.write_bytes(b"")
    with pytest.raises(CheckpointError, match="empty"):
        load_checkpoint(tmp_path / "ck")


def test_missing_files(tmp_path):
    with pytest.raises(CheckpointError, match="no such file"):
        load_checkpoint(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="not a checkpoint directory"):
        load_checkpoint(tmp_path / "empty")
    _small_official(tmp_path / "ck")
    (tmp_path / "ck" / "consolidated_ema_ternary.00-of-01.pth").unlink()
    with pytest.raises(CheckpointError, match="no consolidated"):
        load_checkpoint(tmp_path / "ck")
    model = _tiny_model(True)
    save_checkpoint(model, tmp_path / "ours")
    (tmp_path / "ours" / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="model.safetensors: file not found"):
        load_checkpoint(tmp_path / "ours")


@pytest.mark.parametrize("edit, match", [  # the 600M layout shrunk to dim 64, 2 layers
    (lambda sd: sd.pop("layers.1.attention.wk.alphas"), r"missing key\(s\) \['layers.1.attention.wk.alphas'\]"),
    (lambda sd: sd.__setitem__("extra.weight", torch.zeros(3)), r"unexpected key\(s\) \['extra.weight'\]"),
    (lambda sd: sd.__setitem__("layers.0.feed_forward.w1.weight", torch.zeros(10, 64, dtype=torch.uint8)),
     r"'layers.0.feed_forward.w1.weight' is torch.uint8 \(10, 64\), expected uint8 \(64, 64\)"),
    (lambda sd: sd.__setitem__("x_embedder.weight", torch.zeros(64, 16, dtype=torch.int64)),
     r"'x_embedder.weight' has dtype torch.int64"),
    (lambda sd: sd.__setitem__("x_embedder.bias", torch.zeros(7)), r"'x_embedder.bias' has shape \(7,\), expected \(64,\)"),
    (lambda sd: sd["layers.1.attention.wo.alphas"].fill_(float("nan")), r"'layers.1.attention.wo.alphas' holds a non-finite value"),
    (lambda sd: sd["final_layer.linear.weight"].view(-1)[5].fill_(float("inf")), r"'final_layer.linear.weight' holds a non-finite value \(inf\)"),
    (lambda sd: sd["layers.1.feed_forward.w2.weight"].view(-1)[17].fill_(0xFF),
     r"'layers.1.feed_forward.w2.weight': code 3 \(invalid\)"),
])
def test_bad_official_tensors(tmp_path, small_state, edit, match):
    state = small_state
    edit(state)
    write_official_dir(tmp_path / "ck", TINY_OFFICIAL, 16, state)
    with pytest.raises(CheckpointError, match=match) as info:
        load_checkpoint(tmp_path / "ck")
    assert "consolidated_ema_ternary.00-of-01.pth" in str(info.value)


@pytest.mark.parametrize("args, match", [
    (argparse.Namespace(model="DiT_Llama_1B_patch2", image_size=256, num_classes=1000),
     "'DiT_Llama_1B_patch2', not a known TerDiT model"),
    (argparse.Namespace(model=TINY_OFFICIAL, image_size=250, num_classes=1000), "multiple of 8"),
    (argparse.Namespace(model=TINY_OFFICIAL, num_classes=1000), "'image_size' is missing"),
    ([1, 2, 3], "expected an argparse.Namespace"),
])
def test_bad_model_args(tmp_path, args, match):
    _small_official(tmp_path / "ck")
    torch.save(args, tmp_path / "ck" / "model_args.pth")
    with pytest.raises(CheckpointError, match=match):
        load_checkpoint(tmp_path / "ck")


def test_model_parallel_shards_are_refused(tmp_path):
    _small_official(tmp_path / "ck", n_shards=2)
    with pytest.raises(CheckpointError, match="one of 2 model-parallel shards"):
        load_checkpoint(tmp_path / "ck")


def test_bad_safetensors_dir(tmp_path):
    model = _tiny_model(True)
    save_checkpoint(model, tmp_path / "ck")
    cfg_file = tmp_path / "ck" / "config.json"
    doc = json.loads(cfg_file.read_text())
    doc["config"]["dim"] = 96
    cfg_file.write_text(json.dumps(doc))
    with pytest.raises(CheckpointError, match="shape"):
        load_checkpoint(tmp_path / "ck")
    doc["config"]["dim"] = 64
    doc["config"]["bogus"] = 1
    cfg_file.write_text(json.dumps(doc))
    with pytest.raises(CheckpointError, match=r"unknown config field\(s\) \['bogus'\]"):
        load_checkpoint(tmp_path / "ck")
    del doc["config"]["bogus"]
    cfg_file.write_text(json.dumps(doc))
    from safetensors.torch import load_file, save_file
    tensors = load_file(str(tmp_path / "ck" / "model.safetensors"))
    tensors["layers.0.attention.wq.codes"][0, 0] = -1  # sixteen codes of 3
    save_file(tensors, str(tmp_path / "ck" / "model.safetensors"))
    with pytest.raises(CheckpointError, match="code 3"):
        load_checkpoint(tmp_path / "ck")
    (tmp_path / "ck" / "model.safetensors").write_bytes(b"\x10\x00\x00")
    with pytest.raises(CheckpointError, match="not a valid safetensors"):
        load_checkpoint(tmp_path / "ck")


def test_bare_state_dict_without_config_is_refused(tmp_path):
    torch.save(_tiny_model(True).state_dict(), tmp_path / "sd.pt")
    with pytest.raises(CheckpointError, match="bare torch file needs"):
        load_checkpoint(tmp_path / "sd.pt")
