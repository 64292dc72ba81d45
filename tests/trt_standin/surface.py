"""Which names the real TensorRT Python bindings have, per version, for every class the stand-in
models, and the guard that makes a stand-in class refuse everything else.

Read (not copied) from github NVIDIA/TensorRT at tags v10.16 and v11.1:
  python/src/infer/pyCore.cpp             Logger, Builder, IBuilderConfig, IOptimizationProfile,
                                          Runtime, ICudaEngine, IExecutionContext, BuilderFlag,
                                          NetworkDefinitionCreationFlag, MemoryPoolType,
                                          TensorIOMode
  python/src/infer/pyGraph.cpp            INetworkDefinition, ITensor, ILayer, IPluginV3Layer,
                                          LayerType
  python/src/infer/pyFoundationalTypes.cpp  DataType, IHostMemory (buffer protocol)
  python/src/infer/pyPlugin.cpp           IPluginRegistry, get_plugin_registry, IPluginV3,
                                          IPluginV3OneCore, IPluginCreatorV3One,
                                          PluginCapabilityType
  python/src/parsers/pyOnnx.cpp           OnnxParser, OnnxParserFlag, ParserError
  python/packaging/bindings_wheel/tensorrt/__init__.py   __version__
Each table lists the names our code or the stand-in touches, plus the names that differ between
the two releases for these classes (so the tables say what changed). A name absent from a
version's table is refused by that version's stand-in, whether or not the stand-in implements it.
tests/test_trt_standin.py checks every entry, and every name the stand-ins answer, against those
sources in ../shared/tensorrt-python-src beside the clone (CI has them; elsewhere it skips).
"""
from __future__ import annotations

VERSIONS = ("10.16", "11.1")
BOTH = frozenset(VERSIONS)
V10 = frozenset({"10.16"})
V11 = frozenset({"11.1"})


def _names(both: str = "", v10: str = "", v11: str = "") -> dict[str, frozenset]:
    table = {name: BOTH for name in both.split()}
    table.update({name: V10 for name in v10.split()})
    table.update({name: V11 for name in v11.split()})
    return table


SURFACE: dict[str, dict[str, frozenset]] = {
    "tensorrt": _names(
        "__version__ Logger Builder Runtime OnnxParser OnnxParserFlag get_plugin_registry "
        "BuilderFlag NetworkDefinitionCreationFlag DataType LayerType MemoryPoolType TensorIOMode "
        "PluginCapabilityType ILayer IPluginV3Layer"),
    # Logger(min_severity=WARNING); the Severity values are exported into ILogger's scope
    "Logger": _names("INTERNAL_ERROR ERROR WARNING INFO VERBOSE log min_severity"),
    "IPluginRegistry": _names(
        "load_library deregister_library get_creator all_creators register_creator",
        v10="get_plugin_creator plugin_creator_list"),     # IPluginV2-era lookups, gone in 11
    "IPluginCreatorV3One": _names("name plugin_version plugin_namespace field_names "
                                  "create_plugin"),
    "Builder": _names(
        "create_network create_builder_config create_optimization_profile "
        "build_serialized_network get_plugin_registry",
        v10="platform_has_fast_fp16 platform_has_fast_int8 platform_has_tf32"),
    # 11 is strongly typed only: no reduced-precision builder flags
    "BuilderFlag": _names(
        "TF32 REFIT STRIP_PLAN VERSION_COMPATIBLE DEBUG",
        v10="FP16 BF16 INT8 FP8 INT4 FP4 OBEY_PRECISION_CONSTRAINTS "
            "PREFER_PRECISION_CONSTRAINTS WEIGHTLESS"),
    # STRONGLY_TYPED is still accepted by 11.1 (ignored: always on); EXPLICIT_BATCH is gone
    "NetworkDefinitionCreationFlag": _names("STRONGLY_TYPED", v10="EXPLICIT_BATCH"),
    "INetworkDefinition": _names(
        "num_layers get_layer num_inputs get_input num_outputs get_output name flags get_flag",
        v11="add_attention_v2"),
    "ITensor": _names("name shape dtype is_network_input is_network_output",
                      v10="dynamic_range set_dynamic_range reset_dynamic_range"),
    "ILayer": _names("name type num_inputs get_input num_outputs get_output",
                     v10="precision set_output_type reset_precision precision_is_set"),
    "IPluginV3Layer": _names("name type num_inputs get_input num_outputs get_output plugin",
                             v10="precision set_output_type reset_precision precision_is_set"),
    "IPluginV3": _names("get_capability_interface clone destroy"),
    "IPluginV3OneCore": _names("plugin_name plugin_version plugin_namespace"),
    "PluginCapabilityType": _names("CORE BUILD RUNTIME"),
    "OnnxParser": _names(
        "parse parse_from_file num_errors get_error clear_errors set_flag clear_flag get_flag "
        "flags supports_model_v2",
        v10="supports_model parse_with_weight_descriptors"),
    "OnnxParserFlag": _names("NATIVE_INSTANCENORM ENABLE_PLUGIN_OVERRIDE"),
    "ParserError": _names("code desc node node_name node_operator file line func"),
    "IBuilderConfig": _names(
        "set_memory_pool_limit get_memory_pool_limit set_flag clear_flag get_flag flags "
        "add_optimization_profile num_optimization_profiles builder_optimization_level",
        v10="int8_calibrator set_quantization_flag get_quantization_flag algorithm_selector",
        v11="build_route all_build_routes"),
    "IOptimizationProfile": _names("set_shape get_shape"),
    "IHostMemory": _names("nbytes dtype"),
    "MemoryPoolType": _names("WORKSPACE TACTIC_SHARED_MEMORY"),
    "DataType": _names("FLOAT HALF BF16 INT8 INT32 INT64 BOOL UINT8 FP8 INT4 FP4"),
    "LayerType": _names(
        "PLUGIN_V3 PLUGIN_V2 CONSTANT MATRIX_MULTIPLY ELEMENTWISE SHUFFLE CAST SLICE "
        "CONCATENATION SHAPE UNARY REDUCE QUANTIZE DEQUANTIZE FILL IDENTITY SOFTMAX NORMALIZATION "
        "GATHER ACTIVATION SELECT"),
    "Runtime": _names("deserialize_cuda_engine get_plugin_registry"),
    "ICudaEngine": _names(
        "num_io_tensors get_tensor_name get_tensor_mode get_tensor_dtype get_tensor_shape "
        "get_tensor_profile_shape create_execution_context num_optimization_profiles "
        "device_memory_size_v2 num_layers",
        v10="device_memory_size create_execution_context_without_device_memory "
            "get_device_memory_size_for_profile has_implicit_batch_dimension"),
    "IExecutionContext": _names(
        "set_input_shape set_tensor_address get_tensor_address get_tensor_shape execute_async_v3 "
        "execute_v2 all_binding_shapes_specified infer_shapes",
        v10="all_shape_inputs_specified"),
    "TensorIOMode": _names("NONE INPUT OUTPUT"),
}

# Where the sources declare a table's names, when not under the class's own name.
SOURCE_CLASSES = {"Logger": ("Logger", "Severity"), "IPluginV3Layer": ("IPluginV3Layer", "ILayer")}


def names(version: str, cls: str) -> frozenset:
    """The names class `cls` has in the real bindings of `version`."""
    if version not in VERSIONS:
        raise ValueError(f"no stand-in surface for TensorRT {version}; have {', '.join(VERSIONS)}")
    return frozenset(n for n, where in SURFACE[cls].items() if version in where)


def refusal(version: str, cls: str, name: str) -> str:
    where = SURFACE.get(cls, {}).get(name)
    other = f" (it exists in TensorRT {', '.join(sorted(where))})" if where else ""
    return (f"tensorrt {version} stand-in: {cls}.{name} does not exist in the real TensorRT "
            f"{version} Python bindings{other}; surface in tests/trt_standin/surface.py")


class _GuardedType(type):
    """Refuses class-level access (enum values, class constants) outside the version's surface."""

    def __getattribute__(cls, name):
        if not name.startswith("_"):
            surface = type.__getattribute__(cls, "_surface")
            if surface is not None and name not in surface:
                raise AttributeError(refusal(cls._version, cls._trt_name, name))
        return type.__getattribute__(cls, name)


class Guarded(metaclass=_GuardedType):
    """Base of every stand-in class. A per-version subclass (made by the stand-in module) sets
    `_surface`; names outside it raise AttributeError, as pybind11 does for a missing attribute.
    Private state lives in `_`-prefixed attributes, which the guard lets through."""

    _surface: frozenset | None = None
    _version = ""
    _trt_name = ""

    def __getattribute__(self, name):
        if not name.startswith("_"):
            surface = type(self)._surface
            if surface is not None and name not in surface:
                raise AttributeError(refusal(type(self)._version, type(self)._trt_name, name))
        return object.__getattribute__(self, name)

    def __getattr__(self, name):          # Python's fallback after __getattribute__ failed
        cls = type(self)
        if cls._surface is not None and name not in cls._surface and not name.startswith("_"):
            raise AttributeError(refusal(cls._version, cls._trt_name, name))
        raise AttributeError(f"tensorrt {cls._version} stand-in: {cls._trt_name}.{name} is not "
                             f"implemented by the stand-in")

    def __setattr__(self, name, value):
        if not name.startswith("_"):
            raise AttributeError(f"tensorrt {type(self)._version} stand-in: {type(self)._trt_name}."
                                 f"{name} cannot be set through the stand-in")
        object.__setattr__(self, name, value)


class EnumValue:
    """One value of a pybind11 enum: compares by identity, `.name`, str 'Enum.NAME'."""

    def __init__(self, enum: str, name: str) -> None:
        self.name = name
        self._enum = enum

    def __repr__(self) -> str:
        return f"<{self._enum}.{self.name}>"

    def __str__(self) -> str:
        return f"{self._enum}.{self.name}"


def enum_class(name: str, values: str) -> type:
    """A stand-in enum class (unguarded base; the module makes per-version subclasses)."""
    namespace = {v: EnumValue(name, v) for v in values.split()}
    namespace["_trt_name"] = name
    return type(name, (Guarded,), namespace)
