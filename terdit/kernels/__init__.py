"""The fast paths of the ternary product (docs/design.md sections 7 and 8) and what they are
tested against:

- cuda: the CUDA kernels of plugins/kernels through their C ABI (ctypes), registered for CUDA
  tensors as the `terdit::` ops; build: finding or building that library with nvcc;
- accel: AcceleratedTerDiT, the fused model on those kernels with compiled blocks and CUDA
  graphs;
- w2a8 and int8: the definitions of the activation modes (W1.58A8 with float8 e4m3 or int8
  activations) and their reference ops;
- cpu: the terdit CPU kernels (plugins/cpu) registered for CPU tensors.

Importing this package loads nothing native; `cuda.load()` and `cpu.load()` do.
"""
