"""What the trainer's flags promise (README "Training", `python -m terdit.train --help`), each
observed through `main(argv)` on TerDiT-tiny with 1-3 steps and compared with the same run
without the flag: --class-dropout, --grad-clip, --weight-decay, --precision, --num-timesteps."""
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.optim.optimizer import register_optimizer_step_pre_hook

import terdit.train.loop as train_mod
from terdit import TerDiTConfig, load_checkpoint
from terdit.diffusion import GaussianDiffusion
from terdit.train import TrainConfig, main, read_log
from terdit.train.setup import build_model

LABEL = 3                                    # every training sample has this class
CFG = TerDiTConfig.from_name("TerDiT-tiny")
NULL = CFG.null_class                        # 10
LR = 1e-2


@pytest.fixture(scope="module")
def latents(tmp_path_factory):
    root = tmp_path_factory.mktemp("train_flags")
    data = np.random.default_rng(0).standard_normal((16, 4, 8, 8)).astype(np.float32)
    np.save(root / "lat.npy", data.clip(-1, 1))
    np.save(root / "lat.labels.npy", np.full(16, LABEL))
    return root


class Run:
    """One `python -m terdit.train` call and what the training loop was seen doing."""

    def __init__(self, out: Path):
        self.out = out
        self.labels: list[list[int]] = []        # y given to the model, per forward
        self.timesteps: list[list[int]] = []     # t given to the model, per forward
        self.out_dtypes: list[torch.dtype] = []  # dtype of the model output, per forward
        self.num_timesteps: list[int] = []       # T of the diffusion, per loss
        self.betas: list[torch.Tensor] = []
        self.step_grad_norms: list[float] = []   # total gradient norm the optimizer stepped with

    @property
    def log(self) -> list[dict]:
        return read_log(self.out / "log.jsonl")

    def params(self) -> dict[str, torch.Tensor]:
        return dict(load_checkpoint(self.out / "final").model.named_parameters())


@pytest.fixture(scope="module")
def run(latents):
    """run(steps, *flags) -> Run, memoized: the same run serves several tests."""
    cache: dict = {}

    def go(steps: int, *flags: str) -> Run:
        key = (steps, flags)
        if key in cache:
            return cache[key]
        out = latents / f"run{len(cache)}"
        rec = Run(out)
        real_call, real_losses = train_mod._call, GaussianDiffusion.training_losses

        def call(model, x, t, y):
            out_ = real_call(model, x, t, y)
            rec.labels.append(y.tolist())
            rec.timesteps.append(t.tolist())
            rec.out_dtypes.append(out_.dtype)
            return out_

        def losses(self, model, x_start, t, noise):
            rec.num_timesteps.append(self.num_timesteps)
            rec.betas.append(self.betas.clone())
            return real_losses(self, model, x_start, t, noise)

        def pre_step(opt, args, kwargs):
            grads = [p.grad.detach().double() for g in opt.param_groups for p in g["params"]
                     if p.grad is not None]
            rec.step_grad_norms.append(float(torch.linalg.vector_norm(
                torch.stack([torch.linalg.vector_norm(g) for g in grads]))))

        handle = register_optimizer_step_pre_hook(pre_step)
        try:
            with pytest.MonkeyPatch.context() as mp:
                mp.setattr(train_mod, "_call", call)
                mp.setattr(GaussianDiffusion, "training_losses", losses)
                mp.setattr(train_mod, "plot_losses", lambda *a, **k: None)   # not under test
                argv = ["--model", "TerDiT-tiny", "--data", "latents", "--data-path",
                        str(latents / "lat.npy"), "--out", str(out), "--steps", str(steps),
                        "--global-batch", "8", "--lr", str(LR), "--lr-schedule", "constant",
                        "--warmup-steps", "0", "--log-every", "1", "--no-progress",
                        "--final-from", "live", "--final-weights", "latent", "--seed", "5",
                        "--device", "cpu", *flags]
                assert main(argv) == 0
        finally:
            handle.remove()
        cache[key] = rec
        return rec

    return go


# "base" runs: everything that the tests vary is set to its neutral value
NEUTRAL = ("--class-dropout", "0", "--grad-clip", "1e6", "--weight-decay", "0",
           "--precision", "fp32")


def _with(**changes) -> tuple:
    flags = dict(zip(NEUTRAL[::2], NEUTRAL[1::2]))
    flags.update({"--" + k.replace("_", "-"): str(v) for k, v in changes.items()})
    return tuple(x for kv in flags.items() for x in kv)


def _init_params() -> dict[str, torch.Tensor]:
    """The run's initial weights, rebuilt from its seed."""
    tc = TrainConfig(model="TerDiT-tiny", data="latents", seed=5)
    return {k: v.detach() for k, v in build_model(tc, CFG).named_parameters()}


# ---- --class-dropout ---------------------------------------------------------------------------

def test_class_dropout_replaces_labels_by_the_null_class(run):
    kept = run(1, *_with(class_dropout=0))
    assert kept.labels == [[LABEL] * 8]
    # 3 steps: the zero-initialised adaLN layers pass no gradient to y's embedding before step 3
    dropped = run(3, *_with(class_dropout=0.5))
    flat = [v for y in dropped.labels for v in y]
    assert set(flat) == {LABEL, NULL}                # a label is kept or becomes the null class
    assert 4 <= flat.count(NULL) <= 20, flat         # ~Binomial(24, 0.5)
    # the null class is what guidance runs as "unconditional": dropout trains its embedding,
    # like that of the class seen, while the classes never seen keep their initial rows
    init = _init_params()["y_embedder.embedding_table.weight"]
    table = dropped.params()["y_embedder.embedding_table.weight"]
    changed = [c for c in range(NULL + 1) if not torch.equal(table[c], init[c])]
    assert changed == [LABEL, NULL]


# ---- --grad-clip -------------------------------------------------------------------------------

def test_grad_clip_bounds_the_norm_the_optimizer_steps_with(run):
    free = run(1, *_with(grad_clip=1e6))
    clipped = run(1, *_with(grad_clip=1e-3))
    logged = free.log[0]["grad_norm"]              # the norm before clipping (log.jsonl)
    assert logged > 1e-2 and clipped.log[0]["grad_norm"] == pytest.approx(logged, rel=1e-6)
    assert free.step_grad_norms == [pytest.approx(logged, rel=1e-5)]
    assert clipped.step_grad_norms == [pytest.approx(1e-3, rel=1e-4)]


# ---- --weight-decay ----------------------------------------------------------------------------

def test_weight_decay_is_decoupled_adamw_decay(run):
    """One AdamW step: p1 = p0 (1 - lr wd) - update, with the update independent of wd, so the
    two runs differ by exactly -lr wd p0 in every parameter."""
    wd = 0.5
    plain = run(1, *_with(weight_decay=0)).params()
    decayed = run(1, *_with(weight_decay=wd)).params()
    init = _init_params()
    assert plain.keys() == decayed.keys() == init.keys()
    for name, p0 in init.items():
        diff = (decayed[name] - plain[name]).detach()
        tol = 1e-6 * float(p0.abs().max()) + 1e-7 * float(plain[name].detach().abs().max())
        assert float((diff + LR * wd * p0).abs().max()) <= tol + 1e-12, name
    # and it does something to every non-zero initial weight
    moved = [n for n, p0 in init.items() if p0.abs().max() > 0]
    assert moved and all(not torch.equal(decayed[n], plain[n]) for n in moved)


# ---- --precision -------------------------------------------------------------------------------

def test_precision_bf16_autocasts_and_auto_is_fp32_on_the_cpu(run):
    fp32 = run(1, *_with(precision="fp32"))
    bf16 = run(1, *_with(precision="bf16"))
    auto = run(1, *_with(precision="auto"))
    assert fp32.out_dtypes == [torch.float32] == auto.out_dtypes
    assert bf16.out_dtypes == [torch.bfloat16]
    assert auto.log[0]["grad_norm"] == fp32.log[0]["grad_norm"]
    a, b = fp32.params(), auto.params()
    assert all(torch.equal(a[k], b[k]) for k in a)
    # bf16 computes the same gradients to bf16's accuracy, not bit for bit
    g32, g16 = fp32.log[0]["grad_norm"], bf16.log[0]["grad_norm"]
    assert g16 != g32 and abs(g16 - g32) <= 5e-2 * g32


# ---- --num-timesteps ---------------------------------------------------------------------------

def test_num_timesteps_sets_the_training_diffusion(run):
    default = run(1, *_with())
    short = run(1, *_with(num_timesteps=50))
    assert default.num_timesteps == [1000] and short.num_timesteps == [50]
    t = short.timesteps[0]
    assert len(t) == 8 and set(t) <= set(range(50)) and len(set(t)) > 1
    assert max(default.timesteps[0]) >= 50
    # Ho et al.'s linear schedule 1e-4 .. 0.02, rescaled to T steps (the official
    # get_named_beta_schedule("linear", T))
    scale = 1000 / 50
    expect = torch.from_numpy(np.linspace(scale * 1e-4, scale * 0.02, 50, dtype=np.float64))
    assert torch.allclose(short.betas[0], expect, rtol=0, atol=1e-15)
    stored = load_checkpoint(short.out / "final").metadata["train_config"]
    assert stored["num_timesteps"] == 50


def test_a_model_trained_with_other_timesteps_is_refused_by_the_samplers(run, tmp_path,
                                                                       monkeypatch, capsys):
    """The samplers run the 1000-step schedule, so a model trained with another T is refused
    (naming --num-timesteps) before anything is written; it is never sampled on T = 1000."""
    from runtime.runtime_cli import main as runtime_main
    from runtime.backends.torch_backend import TorchBackend
    short = run(1, *_with(num_timesteps=50))
    seen = []
    real = TorchBackend.forward

    def forward(self, x, t, y, cfg_scale=None):
        seen.extend(np.asarray(t).flatten().tolist())
        return real(self, x, t, y, cfg_scale)

    monkeypatch.setattr(TorchBackend, "forward", forward)
    code = runtime_main(["sample", "--model", str(short.out / "final"), "--backend", "torch",
                         "--classes", "3", "--steps", "2", "--out", str(tmp_path / "s"),
                         "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and not seen, (code, sorted(set(seen)))
    assert err.splitlines()[-1].startswith("error: ") and err.count("error:") == 1, err
    err = err.splitlines()[-1]
    assert "trained with --num-timesteps 50" in err and "1000-step" in err, err
    assert not (tmp_path / "s").exists()


def test_too_few_timesteps_are_refused_naming_the_flag(latents, tmp_path, capsys):
    code = main(["--model", "TerDiT-tiny", "--data", "latents", "--data-path",
                 str(latents / "lat.npy"), "--out", str(tmp_path / "run"), "--steps", "1",
                 "--global-batch", "2", "--no-progress", "--num-timesteps", "10"])
    err = capsys.readouterr().err
    assert code == 2 and "--num-timesteps 10: must be at least 20" in err, err
    assert not (tmp_path / "run").exists()
