"""What a training run is built from: the data, the model config checked against it (a preset
follows an image folder's channels and classes), and the initial model."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from terdit_common.errors import UserError

from ..checkpoint import load_checkpoint
from ..config import TerDiTConfig
from ..model import TerDiT
from .train_config import TrainConfig
from .data import ArrayDataset, load_dataset


def load_training_data(tc: TrainConfig) -> ArrayDataset:
    """--data at the model's image size (an image folder keeps its own channel count)."""
    arch = _arch(tc)
    return load_dataset(tc.data, tc.data_path, image_size=arch.input_size,
                        channels=None if tc.data == "folder" else arch.in_channels)


def _arch(tc: TrainConfig) -> TerDiTConfig:
    return load_model_config(tc.model_config) if tc.model_config else \
        TerDiTConfig.from_name(tc.model)


def load_model_config(path: str) -> TerDiTConfig:
    """--model-config: a JSON file of TerDiTConfig fields (UserError naming the file)."""
    fix = ("fix the file (TerDiTConfig fields as JSON, e.g. a checkpoint's config.json 'config' "
           "object)")
    try:
        return TerDiTConfig.load(path, "--model-config", fix)
    except UserError:
        raise
    except ValueError as err:
        raise UserError(f"--model-config {err}; {fix}") from None


def model_config(tc: TrainConfig, dataset: ArrayDataset, log=print) -> TerDiTConfig:
    """The model config from --model-config (JSON) or --model, checked against the data. A
    preset (--model) takes the channel and class counts of an image folder; an explicit
    --model-config must agree with the data."""
    if tc.model_config:
        cfg = load_model_config(tc.model_config)
        what = f"--model-config {tc.model_config}"
    else:
        cfg = TerDiTConfig.from_name(tc.model)
        what = f"--model {tc.model}"
        if tc.data == "folder":
            c = dataset.sample_shape[0]
            if (c, dataset.num_classes) != (cfg.in_channels, cfg.num_classes):
                log(f"note: {what} adapted to the image folder: {c} channel(s), "
                    f"{dataset.num_classes} classes ({', '.join(dataset.classes[:10])}"
                    f"{', ...' if dataset.num_classes > 10 else ''})")
                cfg = cfg.replace(in_channels=c, num_classes=dataset.num_classes)
    cfg = cfg.replace(ternary=not tc.fp, class_dropout_prob=tc.class_dropout)
    c, h, w = dataset.sample_shape
    if (c, h, w) != (cfg.in_channels, cfg.input_size, cfg.input_size):
        raise UserError(f"{dataset.name} holds samples of shape {(c, h, w)} but {what} takes "
                        f"({cfg.in_channels}, {cfg.input_size}, {cfg.input_size})"
                        f"{_preset_note(cfg)}; choose a matching --model / --model-config")
    if dataset.num_classes > cfg.num_classes or (tc.data == "folder" and
                                                 dataset.num_classes != cfg.num_classes):
        raise UserError(f"{dataset.name} has {dataset.num_classes} classes but {what} has "
                        f"{cfg.num_classes}; set num_classes in the model config")
    return cfg


def _preset_note(cfg: TerDiTConfig) -> str:
    if cfg.in_channels == 4:
        return (f" (a latent-space model: {cfg.in_channels}-channel {cfg.input_size}x"
                f"{cfg.input_size} SD-VAE latents, for --data latents)")
    return ""


def build_model(tc: TrainConfig, cfg: TerDiTConfig) -> TerDiT:
    torch.manual_seed(tc.seed)
    model = TerDiT(cfg)
    if tc.init_from:
        init_from_fp(model, tc.init_from)
    return model


@torch.no_grad()
def init_from_fp(model: TerDiT, path: str | Path) -> None:
    """Copy full-precision weights into the model being trained: a latent ternary model (QAT
    from fp weights; every alpha is reset to the absmean (gamma) of its copied latent weight)
    or a full-precision one (fp fine-tuning, e.g. the fp twin of a QAT run)."""
    src = load_checkpoint(path).model
    arch = dataclasses.replace(src.cfg, ternary=model.cfg.ternary, class_dropout_prob=0.1)
    if arch != dataclasses.replace(model.cfg, class_dropout_prob=0.1):
        raise UserError(f"--init-from {path}: its config {src.cfg} does not match the model "
                        f"being trained {model.cfg}")
    if src.cfg.ternary:
        raise UserError(f"--init-from {path}: expected a full-precision checkpoint "
                        f"(weights 'float'), got a ternary one")
    state = src.state_dict()
    own = model.state_dict()
    missing = [k for k in own if k not in state and not k.endswith(".alphas")]
    if missing:
        raise UserError(f"--init-from {path}: missing keys {missing[:5]}")
    model.load_state_dict({k: state.get(k, v) for k, v in own.items()})
    for layer in model.ternary_layers():
        layer.reset_alpha()
