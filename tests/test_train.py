"""The QAT trainer on the tiny preset with a small in-memory dataset."""
import dataclasses
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from terdit import TerDiT, TerDiTConfig, load_checkpoint, ternarize
from terdit.train.data import ArrayDataset
from terdit.formats import check_k16, unpack_k16
from terdit.train import TrainConfig, read_log, train

ROOT = Path(__file__).resolve().parents[1]


def tiny_dataset(n=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 10
    # class-dependent smooth patterns, so there is something to learn
    base = torch.randn(10, 4, 8, 8, generator=g).clamp(-1, 1)
    data = (base[labels] + 0.1 * torch.randn(n, 4, 8, 8, generator=g)).clamp(-1, 1)
    return ArrayDataset(data, labels, tuple(str(i) for i in range(10)), "tiny")


def tiny_config(out, **kw):
    base = {"out": str(out), "model": "TerDiT-tiny", "data": "latents", "steps": 4,
            "global_batch": 8, "lr": 1e-3, "ema_decay": 0.9, "log_every": 1, "ckpt_every": 1000,
            "progress": False, "device": "cpu", "seed": 1}
    base.update(kw)
    return TrainConfig(**base)


def params(path):
    return dict(load_checkpoint(path).model.state_dict())


def test_a_few_steps_reduce_the_loss(tmp_path):
    train(tiny_config(tmp_path / "run", steps=24, lr=3e-3, global_batch=8, log_every=6),
          tiny_dataset())
    rows = read_log(tmp_path / "run" / "log.jsonl")
    assert [r["step"] for r in rows] == [6, 12, 18, 24]
    assert rows[-1]["loss"] < 0.8 * rows[0]["loss"]
    assert (tmp_path / "run" / "loss.png").stat().st_size > 0


def test_resume_continues_bit_identically(tmp_path):
    # a constant schedule does not depend on --steps, so a 2-step run can be extended to 4
    ds = tiny_dataset()
    const = {"lr_schedule": "constant", "warmup_steps": 0}
    train(tiny_config(tmp_path / "straight", steps=4, ckpt_every=2, **const), ds)
    train(tiny_config(tmp_path / "split", steps=2, ckpt_every=2, **const), ds)
    train(tiny_config(tmp_path / "split", steps=4, ckpt_every=2, resume="latest", **const), ds)
    for part in ("model", "ema"):
        a = params(tmp_path / "straight" / "checkpoints" / "step_0000004" / part)
        b = params(tmp_path / "split" / "checkpoints" / "step_0000004" / part)
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), (part, k)
    log = read_log(tmp_path / "split" / "log.jsonl")
    assert [r["step"] for r in log] == [1, 2, 3, 4]
    straight = read_log(tmp_path / "straight" / "log.jsonl")
    assert [r["loss"] for r in log] == [r["loss"] for r in straight]


def test_resume_with_warmup_and_cosine_schedule(tmp_path):
    ds = tiny_dataset()
    kw = {"steps": 6, "ckpt_every": 3, "warmup_steps": 2}
    train(tiny_config(tmp_path / "straight", **kw), ds)
    middle = tmp_path / "straight" / "checkpoints" / "step_0000003"
    train(tiny_config(tmp_path / "resumed", resume=str(middle), **kw), ds)
    for part in ("model", "ema"):
        a = params(tmp_path / "straight" / "checkpoints" / "step_0000006" / part)
        b = params(tmp_path / "resumed" / "checkpoints" / "step_0000006" / part)
        assert all(torch.equal(a[k], b[k]) for k in a), part
    lrs = [r["lr"] for r in read_log(tmp_path / "straight" / "log.jsonl")]
    assert lrs[:2] == pytest.approx([5e-4, 1e-3])            # warm-up to the peak
    assert lrs[2] == pytest.approx(1e-3) and lrs[-1] == pytest.approx(1e-4)  # cosine to 10%
    assert all(a >= b for a, b in zip(lrs[1:], lrs[2:]))


def test_lr_and_ema_schedules():
    tc = TrainConfig(steps=1000, lr=1e-3)
    assert tc.warmup == 100 and tc.lr_at(0) == pytest.approx(1e-5)
    assert tc.lr_at(99) == pytest.approx(1e-3) and tc.lr_at(999) == pytest.approx(1e-4)
    assert tc.ema_decay_at(0) == pytest.approx(0.1) and tc.ema_decay_at(10**6) == 0.9999
    # the warm-up forgets the initialisation; a plain 0.9999 EMA would still be 90% of it
    assert tc.ema_init_weight() < 1e-6
    plain = dataclasses.replace(tc, ema_warmup=False)
    assert plain.ema_init_weight() == pytest.approx(0.9999 ** 1000)


def test_default_flags_give_an_ema_that_denoises(tmp_path, capsys):
    """200 steps with the trainer's defaults (lr, warm-up + cosine, EMA decay 0.9999 with its
    warm-up): the EMA model predicts the noise better than the untrained model does."""
    from terdit.diffusion import GaussianDiffusion
    ds = tiny_dataset(64)
    tc = TrainConfig(out=str(tmp_path / "run"), model="TerDiT-tiny", data="latents", steps=200,
                     device="cpu", progress=False, ckpt_every=200, log_every=50)
    final = train(tc, ds)
    assert "warning" not in capsys.readouterr().err
    ema = load_checkpoint(tmp_path / "run" / "checkpoints" / "step_0000200" / "ema").model
    untrained = TerDiT(ema.cfg).eval()
    diffusion = GaussianDiffusion.create(None)
    g = torch.Generator().manual_seed(0)
    t = torch.randint(0, 1000, (64,), generator=g)
    noise = torch.randn(ds.data.shape, generator=g)

    def loss(model):
        with torch.no_grad():
            return diffusion.training_losses(lambda x, tt: model(x, tt, ds.labels), ds.data, t,
                                             noise)["mse"].mean().item()
    assert loss(ema) < 0.7 * loss(untrained)
    assert load_checkpoint(final).model.packed
    # without the warm-up, 200 updates at 0.9999 leave 98% of the initialisation: a warning
    train(dataclasses.replace(tc, out=str(tmp_path / "plain"), ema_warmup=False, steps=2), ds)
    assert "still holds 100% of the random initialisation" in capsys.readouterr().err


def test_resume_refuses_changed_settings_and_recovers_kills(tmp_path):
    ds = tiny_dataset()
    tc = tiny_config(tmp_path / "r", steps=2, ckpt_every=1)
    train(tc, ds)
    with pytest.raises(ValueError, match=r"--lr 0.001 -> 0.002"):
        train(dataclasses.replace(tc, steps=3, lr=2e-3, resume="latest"), ds)
    ckpts = tmp_path / "r" / "checkpoints"
    # a kill between moving step 2 aside and renaming its replacement into place
    (ckpts / "step_0000002").rename(ckpts / ".step_0000002.old")
    (ckpts / "latest").unlink()
    (ckpts / ".step_0000002.partial").mkdir()
    train(dataclasses.replace(tc, resume="latest"), ds)     # finds step 2 again, nothing to do
    assert (ckpts / "step_0000002").is_dir() and (ckpts / "latest").read_text() == "step_0000002\n"
    assert not list(ckpts.glob(".*"))
    # a kill before the first checkpoint: starting again (without --resume) is accepted
    shutil.rmtree(ckpts)
    (ckpts / ".step_0000001.partial").mkdir(parents=True)
    with pytest.raises(ValueError, match="start without --resume"):
        train(dataclasses.replace(tc, resume="latest"), ds)
    train(tc, ds)
    assert (ckpts / "step_0000002").is_dir()


def test_existing_run_needs_resume_or_overwrite(tmp_path):
    ds = tiny_dataset()
    train(tiny_config(tmp_path / "r", steps=1), ds)
    with pytest.raises(ValueError, match="--resume latest"):
        train(tiny_config(tmp_path / "r", steps=1), ds)
    train(tiny_config(tmp_path / "r", steps=1, overwrite=True), ds)


def test_trained_checkpoint_packs_to_valid_ternary_codes(tmp_path):
    final = train(tiny_config(tmp_path / "run", steps=3, lr=1e-2), tiny_dataset())
    latent_dir = tmp_path / "run" / "checkpoints" / "step_0000003" / "ema"
    latent = load_checkpoint(latent_dir).model
    packed = load_checkpoint(latent_dir, packed=True).model
    assert packed.packed
    layers = dict(latent.named_modules())
    for name, m in packed.named_modules():
        if hasattr(m, "codes"):
            check_k16(m.codes, m.in_features)
            assert torch.equal(unpack_k16(m.codes, m.in_features),
                               ternarize(layers[name].weight.detach()).to(torch.int8))
            assert torch.equal(m.scale, layers[name].alphas.detach().expand(m.out_features))
    # OUT/final is the packed EMA model, identical to packing the EMA checkpoint
    final_model = load_checkpoint(final).model
    assert final_model.packed
    sd_final, sd_packed = final_model.state_dict(), packed.state_dict()
    assert all(torch.equal(sd_final[k], sd_packed[k]) for k in sd_packed)
    # --final-from live: the last step's weights, here finalised again through a resume
    live = train(tiny_config(tmp_path / "run", steps=3, lr=1e-2, resume="latest",
                             final_from="live", final_weights="latent"), tiny_dataset())
    sd_live = load_checkpoint(live).model.state_dict()
    sd_step = params(tmp_path / "run" / "checkpoints" / "step_0000003" / "model")
    assert all(torch.equal(sd_live[k], sd_step[k]) for k in sd_step)


def test_fp_twin_and_init_from(tmp_path):
    ds = tiny_dataset()
    fp_final = train(tiny_config(tmp_path / "fp", fp=True, steps=2), ds)
    fp = load_checkpoint(fp_final).model
    assert not fp.cfg.ternary and not fp.ternary_layers()
    run = tmp_path / "qat"
    train(tiny_config(run, init_from=str(fp_final), steps=1, lr=0.0), ds)
    # lr 0: the live model after one step is the initialisation itself
    qat = load_checkpoint(run / "checkpoints" / "step_0000001" / "model").model
    fp_sd = fp.state_dict()
    for name, m in qat.named_modules():
        if hasattr(m, "alphas"):
            w = fp_sd[f"{name}.weight"]
            assert torch.equal(m.weight.detach(), w)
            expected = w.abs().mean() if w.abs().mean() > 0 else torch.tensor(m.in_features ** -0.5)
            assert torch.allclose(m.alphas.detach(), expected.reshape(1))
    assert torch.equal(qat.x_embedder.weight, fp.x_embedder.weight)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_worker(rank, world, port, tc_dict):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world),
                      RANK=str(rank), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    import torch.distributed as dist
    try:
        train(TrainConfig(**tc_dict), tiny_dataset())
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def test_two_gloo_ranks_match_one_rank(tmp_path):
    import torch.multiprocessing as mp
    one = tiny_config(tmp_path / "one", steps=3)
    train(one, tiny_dataset())
    two = dataclasses.replace(one, out=str(tmp_path / "two"))
    mp.spawn(_rank_worker, args=(2, _free_port(), two.to_dict()), nprocs=2, join=True)
    # The two runs differ only in the order of the gradient reduction (fp32 rounding); Adam
    # divides by sqrt(v), so where a gradient is ~0 that rounding can move a weight by up to
    # ~lr * 1e-2 over a few steps. Everything else agrees to ~1e-7.
    for part in ("model", "ema"):
        la = params(tmp_path / "one" / "checkpoints" / "step_0000003" / part)
        lb = params(tmp_path / "two" / "checkpoints" / "step_0000003" / part)
        assert la.keys() == lb.keys()
        for k in la:
            assert torch.allclose(la[k], lb[k], rtol=1e-5, atol=1e-5), (part, k)
    # rank 0 logs the mean over both ranks' halves of the batch: the one-rank run's loss of the
    # whole batch (equal halves), up to the same fp32 rounding of the slightly different weights
    one_log, two_log = (read_log(tmp_path / run / "log.jsonl") for run in ("one", "two"))
    assert [r["step"] for r in one_log] == [r["step"] for r in two_log] == [1, 2, 3]
    for a, b in zip(one_log, two_log):
        for key in ("loss", "mse", "vb"):
            assert b[key] == pytest.approx(a[key], rel=1e-5), (a["step"], key, a[key], b[key])


def test_model_config_json_and_shape_check(tmp_path):
    cfg = TerDiTConfig.from_name("TerDiT-tiny", dim=32, n_heads=2)
    path = tmp_path / "m.json"
    path.write_text(cfg.to_json())
    final = train(tiny_config(tmp_path / "r", model_config=str(path), steps=1), tiny_dataset())
    assert load_checkpoint(final).model.cfg.dim == 32
    bad = tmp_path / "bad.json"
    bad.write_text(cfg.replace(in_channels=3).to_json())
    with pytest.raises(ValueError, match="samples of shape"):
        train(tiny_config(tmp_path / "r2", model_config=str(bad), steps=1), tiny_dataset())


def test_cli_end_to_end(tmp_path):
    ds = tiny_dataset(16)
    np.save(tmp_path / "lat.npy", ds.data.numpy())
    np.save(tmp_path / "lat.labels.npy", ds.labels.numpy())
    out = tmp_path / "cli"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.run(
        [sys.executable, "-m", "terdit.train", "--model", "TerDiT-tiny", "--data", "latents",
         "--data-path", str(tmp_path / "lat.npy"), "--out", str(out), "--steps", "2",
         "--global-batch", "4", "--log-every", "1", "--threads", "1", "--no-progress",
         "--sample-every", "2", "--sample-steps", "2", "--sample-cfg-scale", "2.0"],
        capture_output=True, text=True, env=env, timeout=120, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "final model" in proc.stdout
    assert load_checkpoint(out / "final").model.packed
    state = json.loads((out / "checkpoints" / "step_0000002" / "train_state.json").read_text())
    assert state["step"] == 2 and state["train_config"]["global_batch"] == 4
    assert (out / "samples" / "step_0000002.png").is_file()
    bad = subprocess.run([sys.executable, "-m", "terdit.train", "--data", "folder",
                          "--out", str(tmp_path / "x")], capture_output=True, text=True,
                         env=env, timeout=60)
    assert bad.returncode == 2 and "needs a path" in bad.stderr


def test_two_gloo_ranks_with_fsdp_match_one_rank_and_resume(tmp_path):
    import torch.multiprocessing as mp
    one = tiny_config(tmp_path / "one", steps=3, ckpt_every=2)
    train(one, tiny_dataset())
    two = dataclasses.replace(one, out=str(tmp_path / "two"), strategy="fsdp")
    mp.spawn(_rank_worker, args=(2, _free_port(), two.to_dict()), nprocs=2, join=True)
    resumed = dataclasses.replace(two, resume=str(tmp_path / "two" / "checkpoints" /
                                                  "step_0000002"))
    mp.spawn(_rank_worker, args=(2, _free_port(), resumed.to_dict()), nprocs=2, join=True)
    for part in ("model", "ema"):
        la = params(tmp_path / "one" / "checkpoints" / "step_0000003" / part)
        lb = params(tmp_path / "two" / "checkpoints" / "step_0000003" / part)
        for k in la:
            assert torch.allclose(la[k], lb[k], rtol=1e-5, atol=1e-5), (part, k)
