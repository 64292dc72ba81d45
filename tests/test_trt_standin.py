"""The stand-in `tensorrt` modules refuse what the real bindings of their release lack.

The surface tables (tests/trt_standin/surface.py) are checked against the binding sources of
github NVIDIA/TensorRT (python/src at tags v10.16 and v11.1) when a git checkout of it is given
in TERDIT_TENSORRT_GIT (or lies in third_party/TensorRT); without one that check skips.
"""
import os
import re
import subprocess
from pathlib import Path

import pytest

from tests.trt_standin import make_tensorrt, stand_in_classes
from tests.trt_standin.surface import SOURCE_CLASSES, SURFACE, V10, VERSIONS, Guarded, names

ROOT = Path(__file__).resolve().parents[1]


def test_11_1_refuses_apis_the_real_11_1_bindings_lack():
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
    for trt in (trt10, trt11):
        assert trt.get_plugin_registry().load_library(__file__) is not None
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


# ---- the tables against the binding sources ----------------------------------------------------

SOURCES = ["python/src/infer/pyCore.cpp", "python/src/infer/pyGraph.cpp",
           "python/src/infer/pyFoundationalTypes.cpp", "python/src/infer/pyPlugin.cpp",
           "python/src/parsers/pyOnnx.cpp"]
PACKAGE_INIT = "python/packaging/bindings_wheel/tensorrt/__init__.py"
DECLARATION = re.compile(r'py::(?:class_|enum_)<[^;{]*?>\s*(?:\w+\s*)?\(\s*\w+\s*,\s*"(\w+)"', re.S)
MEMBER = re.compile(r'\.\s*(?:def\w*|value)\s*\(\s*"(\w+)"', re.S)
FUNCTION = re.compile(r'\bm\.def\(\s*"(\w+)"', re.S)


def _tensorrt_git():
    env = os.environ.get("TERDIT_TENSORRT_GIT")
    path = Path(env) if env else ROOT / "third_party" / "TensorRT"
    probe = subprocess.run(["git", "-C", str(path), "rev-parse", "--verify", "v11.1^{commit}"],
                           capture_output=True, text=True) if path.exists() else None
    if probe is None or probe.returncode != 0:
        pytest.skip(f"no git checkout of github NVIDIA/TensorRT with tag v11.1 at {path} (set "
                    "TERDIT_TENSORRT_GIT); the surface tables are not re-read from the sources")
    return path


def _binding_surface(git: Path, tag: str) -> dict[str, set]:
    """{class or enum: names its py::class_ / py::enum_ declares} plus '<module>' functions,
    read from the binding sources at `tag` (a member belongs to the declaration before it)."""
    surface: dict[str, set] = {"<module>": set()}
    for source in SOURCES:
        text = subprocess.run(["git", "-C", str(git), "show", f"{tag}:{source}"],
                              capture_output=True, text=True, check=True).stdout
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
    init = subprocess.run(["git", "-C", str(git), "show", f"{tag}:{PACKAGE_INIT}"],
                          capture_output=True, text=True, check=True).stdout
    if re.search(r"^__version__\s*=", init, re.M):
        surface["<module>"].add("__version__")
    return surface


@pytest.mark.parametrize("version", VERSIONS)
def test_surface_tables_match_the_binding_sources(version):
    source = _binding_surface(_tensorrt_git(), f"v{version}")
    wrong = []
    for cls, table in SURFACE.items():
        if cls == "tensorrt":
            real = source["<module>"] | set(source)
        else:
            real = set().union(*(source.get(c, set()) for c in SOURCE_CLASSES.get(cls, (cls,))))
            assert real, f"{cls} is not declared in the sources of v{version}"
        wrong += [f"{cls}.{name}: table says {version in where}, sources {name in real}"
                  for name, where in table.items() if (version in where) != (name in real)]
    assert not wrong, wrong
