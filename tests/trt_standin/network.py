"""Stand-in build side: logger, plugin registry, builder, network, ONNX parser, builder config.

The parser reads a real ONNX file with `onnx` and maps every terdit::TernaryMatMul node the way
the TensorRT 10.15+ / 11.x parser does (docs/design.md section 5, from the onnx-tensorrt sources): to the
registered plugin when the node has `plugin_namespace` (or ENABLE_PLUGIN_OVERRIDE is set), else to
its local function (inlined as ordinary layers), else to a registered plugin, else an error. Other
nodes become ordinary layers. A "plan" is this module's header plus the ONNX model, which the
stand-in runtime (engine.py) executes with ONNX Runtime.
"""
from __future__ import annotations

import json

import onnx

from .library import NotAPluginLibrary, read_creators
from .surface import EnumValue, Guarded

PLAN_MAGIC = b"TERDIT-TENSORRT-STANDIN-PLAN\n"
ONNX_TYPES = {onnx.TensorProto.FLOAT: "FLOAT", onnx.TensorProto.FLOAT16: "HALF",
              onnx.TensorProto.BFLOAT16: "BF16", onnx.TensorProto.INT32: "INT32",
              onnx.TensorProto.INT64: "INT64", onnx.TensorProto.BOOL: "BOOL",
              onnx.TensorProto.INT8: "INT8", onnx.TensorProto.UINT8: "UINT8",
              onnx.TensorProto.FLOAT8E4M3FN: "FP8"}
LAYER_TYPES = {"MatMul": "MATRIX_MULTIPLY", "Gemm": "MATRIX_MULTIPLY", "Constant": "CONSTANT",
               "Reshape": "SHUFFLE", "Unsqueeze": "SHUFFLE", "Transpose": "SHUFFLE",
               "Cast": "CAST", "CastLike": "CAST", "Slice": "SLICE", "Concat": "CONCATENATION",
               "Shape": "SHAPE", "Abs": "UNARY", "ReduceMax": "REDUCE", "ReduceMean": "REDUCE",
               "QuantizeLinear": "QUANTIZE", "DequantizeLinear": "DEQUANTIZE",
               "ConstantOfShape": "FILL", "Softmax": "SOFTMAX", "Gather": "GATHER",
               "LayerNormalization": "NORMALIZATION", "Sigmoid": "ACTIVATION", "Where": "SELECT"}


class StandIn(Guarded):
    """A stand-in object; its per-version class carries `_trt`, the stand-in module, through which
    it makes objects of its own version's classes. Internal construction goes through `_init`;
    classes that user code constructs define the binding's `__init__`."""

    _trt = None

    def _new(self, cls: str, *args):
        return self._trt._standin_classes[cls](*args)

    def __init__(self, *args) -> None:
        self._init(*args)

    def _init(self) -> None:
        pass


class Logger(StandIn):
    INTERNAL_ERROR, ERROR, WARNING, INFO, VERBOSE = (
        EnumValue("Severity", n) for n in ("INTERNAL_ERROR", "ERROR", "WARNING", "INFO", "VERBOSE"))

    def __init__(self, min_severity=None) -> None:          # Logger(trt.Logger.WARNING)
        self._min_severity = min_severity
        self._messages: list[str] = []

    def log(self, severity, msg) -> None:
        self._messages.append(f"{severity}: {msg}")


class IPluginCreatorV3One(StandIn):
    def _init(self, name: str, version: str, namespace: str) -> None:
        self._key = (name, version, namespace)

    name = property(lambda self: self._key[0])
    plugin_version = property(lambda self: self._key[1])
    plugin_namespace = property(lambda self: self._key[2])


class IPluginRegistry(StandIn):
    """load_library dlopens the file and registers the creators its getCreators exports
    (library.py), as TensorRT's loadLibrary does; it returns None, keeping the reason in
    `_errors`, for a file that is no plugin library and for one whose creators are registered
    already. The module's `_library_creators`, when not None, is registered instead of what the
    library exports (a library built from other sources)."""

    def _init(self) -> None:
        self._creators: dict[tuple, IPluginCreatorV3One] = {}
        self._libraries: list[str] = []
        self._errors: list[str] = []

    def load_library(self, plugin_path):
        try:
            keys = read_creators(plugin_path)
        except NotAPluginLibrary as e:
            self._errors.append(str(e))
            return None
        if self._trt._library_creators is not None:
            keys = list(self._trt._library_creators)
        if any(tuple(key) in self._creators for key in keys):
            self._errors.append(f"{plugin_path}: a creator of it is already registered")
            return None
        self._libraries.append(str(plugin_path))
        for key in keys:
            self._creators[tuple(key)] = self._new("IPluginCreatorV3One", *key)
        return len(self._libraries)

    def get_creator(self, type, version, plugin_namespace=""):     # noqa: A002 (binding's names)
        return self._creators.get((type, version, plugin_namespace))

    def get_plugin_creator(self, type, version, plugin_namespace=""):   # noqa: A002
        return self.get_creator(type, version, plugin_namespace)


class ITensor(StandIn):
    def _init(self, name: str, dims: list, dtype: str) -> None:
        self._name, self._dims, self._dtype = name, dims, dtype

    name = property(lambda self: self._name)
    shape = property(lambda self: tuple(d if isinstance(d, int) else -1 for d in self._dims))
    dtype = property(lambda self: getattr(self._trt.DataType, self._dtype))


class IPluginV3OneCore(StandIn):
    def _init(self, key: tuple) -> None:
        self._key = key

    plugin_name = property(lambda self: self._key[0])
    plugin_version = property(lambda self: self._key[1])
    plugin_namespace = property(lambda self: self._key[2])


class IPluginV3(StandIn):
    def _init(self, key: tuple) -> None:
        self._key = key

    def get_capability_interface(self, type):                      # noqa: A002
        if type is self._trt.PluginCapabilityType.CORE:
            return self._new("IPluginV3OneCore", self._key)
        return None


class _InputsOutputs(StandIn):
    """num_inputs / get_input / num_outputs / get_output over `_inputs` and `_outputs`, as
    ILayer and INetworkDefinition have them."""

    num_inputs = property(lambda self: len(self._inputs))
    num_outputs = property(lambda self: len(self._outputs))

    def get_input(self, index):
        return self._inputs[index]

    def get_output(self, index):
        return self._outputs[index]


class ILayer(_InputsOutputs):
    """What INetworkDefinition.get_layer returns: the ILayer base, whatever the layer is (code
    reaches IPluginV3Layer.plugin by setting __class__, as Polygraphy does)."""

    def _init(self, name: str, kind: str, inputs: list, outputs: list, plugin_key=None) -> None:
        self._name, self._kind, self._inputs, self._outputs = name, kind, inputs, outputs
        self._plugin_key = plugin_key

    name = property(lambda self: self._name)
    type = property(lambda self: getattr(self._trt.LayerType, self._kind))


class IPluginV3Layer(ILayer):
    @property
    def plugin(self):
        if self._plugin_key is None:
            raise RuntimeError("stand-in: this layer is not a plugin layer; the real bindings "
                               "would hand back an unusable object")
        return self._new("IPluginV3", self._plugin_key)


class INetworkDefinition(_InputsOutputs):
    def _init(self, flags: int) -> None:
        self._flags, self._inputs, self._outputs, self._layers = flags, [], [], []
        self._model: bytes | None = None

    num_layers = property(lambda self: len(self._layers))

    def get_layer(self, index):
        return self._layers[index]


class ParserError(StandIn):
    def _init(self, desc: str, node_name: str = "", node_operator: str = "") -> None:
        self._desc, self._node_name, self._node_operator = desc, node_name, node_operator

    desc = property(lambda self: self._desc)
    node_name = property(lambda self: self._node_name)
    node_operator = property(lambda self: self._node_operator)

    def __str__(self) -> str:
        return f"In node {self._node_name} ({self._node_operator}): {self._desc}"


class OnnxParser(StandIn):
    def __init__(self, network, logger) -> None:
        self._network, self._errors, self._override = network, [], False

    num_errors = property(lambda self: len(self._errors))

    def get_error(self, index):
        return self._errors[index]

    def set_flag(self, flag) -> None:
        self._override |= flag is self._trt.OnnxParserFlag.ENABLE_PLUGIN_OVERRIDE

    def parse_from_file(self, model) -> bool:
        proto = onnx.load(str(model))
        graph, net = proto.graph, self._network
        types = {v.name: v.type.tensor_type for v in
                 [*graph.input, *graph.value_info, *graph.output]}
        tensors: dict[str, ITensor] = {}

        def tensor(name: str):
            if name not in tensors:
                t = types.get(name)
                dims = [d.dim_param or (d.dim_value if d.HasField("dim_value") else "?")
                        for d in t.shape.dim] if t is not None else []
                tensors[name] = self._new("ITensor", name, dims,
                                          ONNX_TYPES.get(t.elem_type, "FLOAT") if t else "FLOAT")
            return tensors[name]

        inits = {i.name for i in graph.initializer}
        net._inputs = [tensor(i.name) for i in graph.input if i.name not in inits]
        functions = {(f.domain, f.name): f for f in proto.functions}
        registry = self._trt.get_plugin_registry()
        for node in graph.node:
            ins = [tensor(n) for n in node.input if n]
            outs = [tensor(n) for n in node.output]
            if node.domain in ("", "ai.onnx"):
                net._layers.append(self._new("ILayer", node.name, LAYER_TYPES.get(
                    node.op_type, "ELEMENTWISE"), ins, outs))
                continue
            attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
            namespace = attrs.get("plugin_namespace")
            key = (node.op_type, attrs.get("plugin_version", b"1").decode(),
                   (namespace or b"").decode())
            creator = registry.get_creator(*key)
            function = functions.get((node.domain, node.op_type))
            if creator is not None and (namespace is not None or self._override or
                                        function is None):
                net._layers.append(self._new("ILayer", node.name, "PLUGIN_V3", ins, outs, key))
            elif function is not None:                 # inlined: the body's ops as layers
                net._layers.extend(self._new("ILayer", f"{node.name}/{n.op_type}_{i}",
                                             LAYER_TYPES.get(n.op_type, "ELEMENTWISE"), ins, outs)
                                   for i, n in enumerate(function.node))
            else:
                self._errors.append(self._new(
                    "ParserError", f"No importer registered for op: {node.op_type}. Attempting "
                    f"to import as plugin. Plugin not found", node.name, node.op_type))
        net._outputs = [tensor(o.name) for o in graph.output]
        net._model = proto.SerializeToString()             # onnx.load read any external data
        return not self._errors


class IOptimizationProfile(StandIn):
    def _init(self) -> None:
        self._shapes: dict[str, tuple] = {}

    def set_shape(self, input, min, opt, max) -> None:             # noqa: A002
        self._shapes[input] = (tuple(min), tuple(opt), tuple(max))

    def get_shape(self, input):                                      # noqa: A002
        return list(self._shapes.get(input, ()))


class IBuilderConfig(StandIn):
    def _init(self) -> None:
        self._flags, self._pools, self._profiles = [], {}, []

    def set_memory_pool_limit(self, pool, pool_size) -> None:
        self._pools[pool.name] = pool_size

    def set_flag(self, flag) -> None:
        self._flags.append(flag.name)

    def add_optimization_profile(self, profile) -> int:
        self._profiles.append(profile)
        return len(self._profiles) - 1


class IHostMemory(bytes, StandIn):
    """The serialized plan: bytes with the buffer protocol, as the real IHostMemory has."""

    def __init__(self, blob: bytes) -> None:
        pass

    nbytes = property(lambda self: len(self))


class Builder(StandIn):
    def __init__(self, logger) -> None:
        self._logger = logger

    def create_network(self, flags=0):
        return self._new("INetworkDefinition", flags)

    def create_builder_config(self):
        return self._new("IBuilderConfig")

    def create_optimization_profile(self):
        return self._new("IOptimizationProfile")

    def build_serialized_network(self, network, config):
        """The checks a real build makes on the profile, then a plan; None (and a log line) when
        a dynamic input has no profile or a profile disagrees with the input's rank / static
        dims or is not min <= opt <= max."""
        profile = config._profiles[0]._shapes if config._profiles else {}
        inputs = []
        for t in network._inputs:
            shapes = profile.get(t.name)
            if shapes is None and -1 in t.shape:
                self._logger.log("ERROR", f"input {t.name} is dynamic and has no profile")
                return None
            for s in shapes or ():
                if len(s) != len(t.shape) or any(d >= 0 and d != v for d, v in zip(t.shape, s)):
                    self._logger.log("ERROR", f"profile {s} does not fit {t.name} {t.shape}")
                    return None
            if shapes and any(a > b for lo, hi in zip(shapes, shapes[1:]) for a, b in zip(lo, hi)):
                self._logger.log("ERROR", f"profile of {t.name} is not min <= opt <= max")
                return None
            inputs.append({"name": t.name, "dims": t._dims, "dtype": t._dtype,
                           "profile": [list(s) for s in shapes] if shapes else None})
        header = {"tensorrt": self._trt.__version__, "inputs": inputs, "flags": config._flags,
                  "outputs": [{"name": t.name, "dims": t._dims, "dtype": t._dtype}
                              for t in network._outputs]}
        blob = PLAN_MAGIC + json.dumps(header).encode() + b"\n" + network._model
        return self._trt._standin_classes["IHostMemory"](blob)
