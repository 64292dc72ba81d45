"""TerDiT Deploy runtime: batch sampling over ONNX Runtime, TensorRT or PyTorch.

    from runtime import TerDiTPipeline
    pipe = TerDiTPipeline.from_pretrained("out/demo/onnx")
    images = pipe(["Trouser", "Bag"], num_inference_steps=50, guidance_scale=3.0).images

The pipeline (runtime.pipeline) is the one front door; the backends follow one protocol
(runtime.backends.protocol); runtime.writer writes runs; runtime.tensorrt holds what only
TensorRT needs (the backend, engine builds and their records). Importing it needs no torch (only
the torch backend and TensorRT's do), and the names below load on first use
(terdit_common.lazy). Bad arguments raise `UserError` (a ValueError;
BackendError and SamplingError are its subclasses) with the text the CLI prints.
"""
from terdit_common.lazy import lazy_exports

_EXPORTS = {
    "UserError": "terdit_common.errors",
    **dict.fromkeys(("ModelInfo", "SampleOptions", "SamplingError", "image_rng",
                     "imagenet_to_model_label"), "terdit_common.sampling"),
    **dict.fromkeys(("DDIMScheduler", "DDPMScheduler", "DPMSolverScheduler", "make_scheduler"),
                    "terdit_common.schedulers"),
    "BackendError": ".backends",
    **dict.fromkeys(("BACKENDS", "open_backend"), ".backends.opener"),
    **dict.fromkeys(("TerDiTPipeline", "TerDiTPipelineOutput"), ".pipeline"),
}
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)

__all__ = list(_EXPORTS)
