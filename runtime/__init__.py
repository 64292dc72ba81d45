"""TerDiT Deploy runtime: batch sampling over ONNX Runtime, TensorRT or PyTorch.

    from runtime import TerDiTPipeline
    pipe = TerDiTPipeline.from_pretrained("out/demo/onnx")
    images = pipe(["Trouser", "Bag"], num_inference_steps=50, guidance_scale=3.0).images

The pipeline (runtime.pipeline) is the one front door; the backends follow one protocol
(runtime.backends.protocol); runtime.writer writes runs; runtime.tensorrt holds what only
TensorRT needs (the backend, engine builds and their records). Importing it needs no torch (only
the torch backend and TensorRT's do). Bad arguments raise `UserError` (a ValueError;
BackendError and SamplingError are its subclasses) with the text the CLI prints.
"""
from terdit_common.errors import UserError
from terdit_common.sampling import (ModelInfo, SampleOptions, SamplingError, image_rng,
                                    imagenet_to_model_label)
from terdit_common.schedulers import (DDIMScheduler, DDPMScheduler, DPMSolverScheduler,
                                      make_scheduler)

from .backends import BackendError
from .backends.opener import BACKENDS, open_backend
from .pipeline import TerDiTPipeline, TerDiTPipelineOutput

__all__ = ["TerDiTPipeline", "TerDiTPipelineOutput", "SampleOptions", "UserError",
           "SamplingError", "ModelInfo", "BACKENDS", "BackendError", "open_backend", "image_rng",
           "imagenet_to_model_label", "DDIMScheduler", "DDPMScheduler", "DPMSolverScheduler",
           "make_scheduler"]
