"""What only TensorRT needs: the backend that runs a plan (backend), engine builds with the
TernaryMatMul plugin (build), the build record that ties a plan to its GPU, TensorRT, plugin
library and ONNX file (record), and `python -m runtime build-engine` (cli). TensorRT itself is
imported only by the functions that use it."""
