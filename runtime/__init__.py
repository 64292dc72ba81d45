"""TerDiT Deploy runtime: batch sampling over ONNX Runtime, TensorRT or PyTorch."""
from .backends import BACKENDS, BackendError, ModelInfo, OrtBackend, TorchBackend, open_backend
from .pipeline import (Pipeline, SampleOptions, SamplingError, guide, image_rng,
                       imagenet_to_model_label)
from .schedulers import (DDIMScheduler, DDPMScheduler, DPMSolverScheduler, make_scheduler,
                         space_timesteps)

__all__ = ["BACKENDS", "BackendError", "ModelInfo", "OrtBackend", "TorchBackend", "open_backend",
           "Pipeline", "SampleOptions", "SamplingError", "guide", "image_rng",
           "imagenet_to_model_label", "DDIMScheduler", "DDPMScheduler", "DPMSolverScheduler",
           "make_scheduler", "space_timesteps"]
