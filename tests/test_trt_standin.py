"""The stand-in `tensorrt` modules refuse what the real bindings of their release lack.

The surface tables (tests/trt_standin/surface.py) and every name the stand-ins answer are checked
against the binding sources of github NVIDIA/TensorRT (python/src at tags v10.16 and v11.1) in
../shared/tensorrt-python-src beside the clone (CI has them; elsewhere those checks skip).
"""
import re
from pathlib import Path

import pytest

from tests.trt_standin import make_tensorrt, stand_in_classes
from tests.trt_standin.surface import SOURCE_CLASSES, SURFACE, V10, VERSIONS, Guarded, names

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def plugin_libraries(trt_plugin_build):
    """{release: the real plugin library built against its headers} (tests/conftest.py)."""
    return {version: trt_plugin_build(version).library for version in VERSIONS}


def test_11_1_refuses_apis_the_real_11_1_bindings_lack(plugin_libraries):
    trt10, trt11 = make_tensorrt("10.16"), make_tensorrt("11.1")
    for flag in ("FP16", "BF16", "INT8", "FP8"):
        assert getattr(trt10.BuilderFlag, flag).name == flag
        with pytest.raises(AttributeError, match=f"BuilderFlag.{flag} does not exist in the "
                                                 "real TensorRT 11.1"):
            getattr(trt11.BuilderFlag, flag)
    assert not hasattr(trt11.BuilderFlag, "BF16") and hasattr(trt11.BuilderFlag, "TF32")
    with pytest.raises(AttributeError, match="EXPLICIT_BATCH does not exist.*exists in "
                                             "TensorRT 10.16"):
        getattr(trt11.NetworkDefinitionCreationFlag, "EXPLICIT_BATCH")
    # an API the stand-in implements (for 10.16) is still refused by the 11.1 stand-in
    for version, trt in (("10.16", trt10), ("11.1", trt11)):
        assert trt.get_plugin_registry().load_library(str(plugin_libraries[version])) is not None
    creator = trt10.get_plugin_registry().get_plugin_creator("TernaryMatMul", "1", "")
    assert creator.name == "TernaryMatMul"
    with pytest.raises(AttributeError, match="IPluginRegistry.get_plugin_creator does not "
                                             "exist in the real TensorRT 11.1"):
        trt11.get_plugin_registry().get_plugin_creator("TernaryMatMul", "1", "")
    assert trt11.get_plugin_registry().get_creator("TernaryMatMul", "1", "") is not None
    builder = trt11.Builder(trt11.Logger(trt11.Logger.WARNING))
    with pytest.raises(AttributeError, match="Builder.platform_has_fast_fp16 does not exist"):
        getattr(builder, "platform_has_fast_fp16")
    with pytest.raises(AttributeError, match="cannot be set"):
        builder.max_threads = 2


@pytest.mark.parametrize("version", VERSIONS)
def test_load_library_takes_only_a_plugin_library(version, plugin_libraries,
                                                  cuda_kernels_any_arch):
    """As TensorRT's loadLibrary: a file that dlopen refuses, a shared library without the
    plugin entry points and a library whose creators are registered already give None; the
    real plugin library registers the creator its getCreators exports."""
    registry = make_tensorrt(version).get_plugin_registry()
    assert registry.load_library(__file__) is None
    assert "cannot dlopen" in registry._errors[-1]
    assert registry.load_library(str(cuda_kernels_any_arch.library)) is None
    assert "does not export getCreators, setLoggerFinder" in registry._errors[-1]
    assert registry.get_creator("TernaryMatMul", "1", "") is None
    assert registry.load_library(str(plugin_libraries[version])) == 1
    creator = registry.get_creator("TernaryMatMul", "1", "")
    assert (creator.name, creator.plugin_version, creator.plugin_namespace) == (
        "TernaryMatMul", "1", "")
    assert list(registry._creators) == [("TernaryMatMul", "1", "")]
    assert registry.load_library(str(plugin_libraries[version])) is None
    assert "already registered" in registry._errors[-1]


def test_every_name_missing_from_a_release_is_refused():
    for version in VERSIONS:
        trt = make_tensorrt(version)
        classes = trt._standin_classes
        for cls, table in SURFACE.items():
            for name, where in table.items():
                if version in where or cls == "tensorrt":
                    continue
                with pytest.raises(AttributeError, match=f"does not exist in the real TensorRT "
                                                         f"{version}"):
                    getattr(classes[cls], name)
        missing = {n for n, w in SURFACE["tensorrt"].items() if version not in w}
        assert not any(hasattr(trt, n) for n in missing)


def test_the_stand_in_invents_no_api():
    """Every public name a stand-in class defines exists in the real bindings of a release."""
    for name, cls in stand_in_classes().items():
        defined = {n for klass in cls.__mro__ if klass not in (Guarded, object, bytes)
                   for n in vars(klass) if not n.startswith("_")}
        assert defined <= set(SURFACE[name]), (name, defined - set(SURFACE[name]))
    for version in VERSIONS:
        trt = make_tensorrt(version)
        public = {n for n in vars(trt) if not n.startswith("_") or n == "__version__"}
        assert public == set(names(version, "tensorrt"))


def test_surface_names_are_per_release():
    assert names("10.16", "BuilderFlag") - names("11.1", "BuilderFlag") >= {"FP16", "BF16"}
    assert "get_plugin_creator" in SURFACE["IPluginRegistry"] and \
        SURFACE["IPluginRegistry"]["get_plugin_creator"] == V10
    with pytest.raises(ValueError, match="no stand-in surface for TensorRT 10.6"):
        names("10.6", "Builder")


# ---- the tables and the stand-in against the binding sources -----------------------------------

SOURCE_DIR = ROOT.parent / "shared" / "tensorrt-python-src"
SOURCES = ["python/src/infer/pyCore.cpp", "python/src/infer/pyGraph.cpp",
           "python/src/infer/pyFoundationalTypes.cpp", "python/src/infer/pyPlugin.cpp",
           "python/src/parsers/pyOnnx.cpp"]
PACKAGE_INIT = "python/packaging/bindings_wheel/tensorrt/__init__.py"
DECLARATION = re.compile(r'py::(?:class_|enum_)<[^;{]*?>\s*(?:\w+\s*)?\(\s*\w+\s*,\s*"(\w+)"', re.S)
MEMBER = re.compile(r'(?<!\bm)\.\s*(?:def\w*|value)\s*\(\s*"(\w+)"', re.S)  # not m.def
FUNCTION = re.compile(r'\bm\.def\(\s*"(\w+)"', re.S)


def _binding_surface(version: str) -> dict[str, set]:
    """{class or enum: names its py::class_ / py::enum_ declares} plus '<module>' functions,
    read from TensorRT `version`'s binding sources in ../shared (a member belongs to the
    declaration before it); a skip when they are absent."""
    root = SOURCE_DIR / version
    paths = [root / source for source in [*SOURCES, PACKAGE_INIT]]
    missing = [str(path) for path in paths if not path.is_file()]
    if missing:
        pytest.skip(f"TensorRT {version} binding sources not found ({missing[0]}; CI keeps them in "
                    "../shared/tensorrt-python-src beside the clone): the stand-in's names are "
                    "not checked against the real bindings")
    surface: dict[str, set] = {"<module>": set()}
    for path in paths[:-1]:
        text = path.read_text()
        events = sorted([(m.start(), "class", m.group(1)) for m in DECLARATION.finditer(text)]
                        + [(m.start(), "member", m.group(1)) for m in MEMBER.finditer(text)])
        current = None
        for _, kind, name in events:
            if kind == "class":
                current = name
                surface.setdefault(name, set())
            elif current:
                surface[current].add(name)
        surface["<module>"] |= set(FUNCTION.findall(text))
    if re.search(r"^__version__\s*=", paths[-1].read_text(), re.M):
        surface["<module>"].add("__version__")
    return surface


def _declared(source: dict[str, set], cls: str) -> set:
    """The names the sources declare for the stand-in class `cls` (SOURCE_CLASSES: where)."""
    if cls == "tensorrt":
        return source["<module>"] | (set(source) - {"<module>"})
    return set().union(*(source.get(c, set()) for c in SOURCE_CLASSES.get(cls, (cls,))))


@pytest.mark.parametrize("version", VERSIONS)
def test_surface_tables_match_the_binding_sources(version):
    """Each table entry says per release whether the name exists; the sources agree."""
    source = _binding_surface(version)
    wrong = []
    for cls, table in SURFACE.items():
        real = _declared(source, cls)
        assert real, f"{cls} is not declared in the TensorRT {version} binding sources"
        wrong += [f"{cls}.{name}: table says {version in where}, sources {name in real}"
                  for name, where in table.items() if (version in where) != (name in real)]
    assert not wrong, wrong


@pytest.mark.parametrize("version", VERSIONS)
def test_the_stand_in_names_exist_in_the_binding_sources(version):
    """Every name the `version` stand-in answers (module attributes, classes, enum values,
    methods and properties) is declared by the real bindings of that release."""
    source = _binding_surface(version)
    trt = make_tensorrt(version)
    module = {n for n in vars(trt) if not n.startswith("_") or n == "__version__"}
    assert module - _declared(source, "tensorrt") == set()
    invented = {}
    for name, cls in trt._standin_classes.items():
        assert name in source, f"class {name} is not declared in the TensorRT {version} bindings"
        defined = {n for klass in cls.__mro__ if klass not in (Guarded, object, bytes)
                   for n in vars(klass) if not n.startswith("_")}
        answered = defined & cls._surface          # the guard refuses the rest
        if answered - _declared(source, name):
            invented[name] = sorted(answered - _declared(source, name))
    assert not invented, f"not in the TensorRT {version} binding sources: {invented}"
