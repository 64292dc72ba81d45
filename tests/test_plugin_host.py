"""Builds the TernaryMatMul plugin's C++ tests with CMake and runs them with ctest, on the CPU.

- Always: the TensorRT-free plugin logic (field validation, shape rules, format table), built
  without CUDA, and the written contract TernaryMatMul_PluginConfig.yaml against the logic's tables.
The plugin library itself (against the TensorRT 10.0.1, 10.7.0, 10.16 and 11.1 headers), its
exported symbols and the dlopen host test: tests/test_plugin_matrix.py.
"""

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CONTRACT = ROOT / "plugins" / "ternaryMatMulPlugin" / "TernaryMatMul_PluginConfig.yaml"
JOBS = str(max(1, min(4, os.cpu_count() or 1)))

pytestmark = pytest.mark.skipif(
    shutil.which("cmake") is None or shutil.which("c++") is None and shutil.which("g++") is None,
    reason="needs cmake and a C++ compiler",
)


def _run(cmd, timeout):
    result = subprocess.run(
        [str(c) for c in cmd], check=False, capture_output=True, text=True, timeout=timeout
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, f"{' '.join(map(str, cmd))} failed:\n{output[-6000:]}"
    return output


@pytest.fixture(scope="module")
def logic_build(tmp_path_factory):
    build = tmp_path_factory.mktemp("plugin-logic-build")
    configure = _run(
        [
            "cmake",
            "-S",
            ROOT,
            "-B",
            build,
            "-DTERDIT_BUILD_KERNELS=OFF",
            "-DTERDIT_WARNINGS_AS_ERRORS=ON",
        ],
        timeout=120,
    )
    _run(["cmake", "--build", build, "-j", JOBS], timeout=300)
    return build, configure


def test_logic_tests_build_and_pass_without_cuda_or_tensorrt(logic_build):
    build, configure = logic_build
    assert "TerDiT kernels: skipped (TERDIT_BUILD_KERNELS=OFF)" in configure
    assert "TernaryMatMul TensorRT plugin: skipped" in configure
    output = _run(["ctest", "--test-dir", build, "--output-on-failure"], timeout=120)
    assert "ternaryMatMulLogicTest" in output
    assert "100% tests passed, 0 tests failed out of 1" in output


def test_contract_yaml_matches_the_plugin_logic(logic_build):
    build, _ = logic_build
    out = _run([build / "ternaryMatMulLogicTest", "--contract-json"], timeout=60)
    logic = json.loads(out)
    contract = yaml.safe_load(CONTRACT.read_text())

    assert contract["name"] == logic["name"] == "TernaryMatMul"
    assert contract["interface"] == "IPluginV3"
    assert contract["onnx_domain"] == "terdit"
    assert list(contract["versions"]) == [logic["version"]] == ["1"]
    version = contract["versions"][logic["version"]]
    assert version["plugin_namespace"] == logic["namespace"] == ""
    assert version["inputs"] == logic["inputs"]
    assert version["optional_inputs"] == logic["optional_inputs"]
    assert version["outputs"] == logic["outputs"]

    fields = logic["fields"]
    assert [f["name"] for f in fields] == ["K", "N", "act_quant"]
    assert version["plugin_fields"] == [f["name"] for f in fields]
    assert version["plugin_field_types"] == {f["name"]: f["type"] for f in fields}
    assert version["plugin_field_length"] == {f["name"]: f["length"] for f in fields}
    for f in fields:
        if f["type"] == "int32":
            assert version["attribute_types"][f["name"]] == "int"
            assert version["attribute_options"][f["name"]] == {
                "min": logic["size_multiple"],
                "multiple_of": logic["size_multiple"],
            }
        else:
            # A STRING attribute reaches the creator as a kCHAR field of any length (length 0 here).
            assert (f["type"], f["length"]) == ("char", 0)
            assert version["attribute_types"][f["name"]] == "string"
    # the contract's values are what the plugin runs plus what it refuses (int8: CPU kernels only)
    assert version["attribute_options"]["act_quant"] == {
        "values": ["none", "int8", "fp8"],
        "default": logic["act_quant_default"],
        "plugin_refuses": logic["act_quant_refused"],
    }
    assert logic["act_quant_values"] == ["none", "fp8"] and logic["act_quant_default"] == "none"
    assert logic["act_quant_refused"] == ["int8"]
    assert sorted(logic["act_quant_values"] + logic["act_quant_refused"]) == sorted(
        version["attribute_options"]["act_quant"]["values"])
    assert version["attribute_values"] == {
        "plugin_version": logic["version"],
        "plugin_namespace": logic["namespace"],
    }
    fixed = {"plugin_version", "plugin_namespace"}
    assert set(version["attributes"]) == {f["name"] for f in fields} | fixed
    assert set(version["attributes_required"]) == {f["name"] for f in fields if f["required"]} | fixed
    assert set(version["attributes"]) - set(version["attributes_required"]) == {"act_quant"}
    assert set(version["attribute_types"]) == set(version["attributes"])
    assert version["workspace"]["alignment"] == logic["workspace_alignment"] == 256

    assert version["configs"] == logic["formats"]
    for role in ("X", "W", "scale", "bias"):
        assert sorted(version["input_types"][role]) == sorted(
            {row[role] for row in logic["formats"].values()}
        )
    assert all(row["Y"] == row["X"] for row in logic["formats"].values())
    assert version["input_dims"]["W"] == f"N, ceil(K / {logic['codes_per_word']})"
