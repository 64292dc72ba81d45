"""What `terdit`, `exporter` and `runtime` share, written once: the TernaryMatMul op identity and
size rule, classifier-free guidance, the diffusion schedule and samplers, atomic files and hashes,
images / grids / ADM batches, the export manifest and the VAE latent scale.

numpy and the standard library only, so the ONNX Runtime and TensorRT paths need no torch.
"""
