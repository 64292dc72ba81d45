"""Builds the CPU emulation of libterdit_kernels.so: the real kernel sources of plugins/kernels
(and the C ABI of plugins/kernels_capi) compiled with g++ against fake/emu.h and the emulated
ternaryPtx.cuh in this folder. The only rewrites of the sources are mechanical: kernel launches
`k<<<grid, block, smem, stream>>>(args)` become `emu::launch(k, grid, block, smem, stream, args)`,
`extern __shared__` arrays become the CTA's dynamic shared memory and static `__shared__` arrays
become function statics (CTAs run one at a time). The C ABI's terditLastKernelPath names the
kernel family the calling thread's last product ran (terdit::lastKernelPath)."""
from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
KERNELS = REPO / "plugins" / "kernels"
C_API = REPO / "plugins" / "kernels_capi" / "terditKernelsC.cpp"

_LAUNCH = re.compile(r"([A-Za-z_]\w*(?:<[^<>;]*>)?)<<<([^;]*?)>>>\(([^;]*)\);")
_EXTERN_SHARED = re.compile(r"extern __shared__ (?:__align__\(\d+\) )?(\w+) (\w+)\[\];")
_STATIC_SHARED = re.compile(r"(?<!extern )__shared__ ")


def transform(source: str) -> str:
    source = _LAUNCH.sub(r"::emu::launch(\1, \2, \3);", source)
    source = _EXTERN_SHARED.sub(r"\1* const \2 = static_cast<\1*>(::emu::dynamicSmem());", source)
    return _STATIC_SHARED.sub("static ", source)


def compiler() -> str | None:
    return shutil.which("g++")


def build(out_dir: Path) -> Path:
    """Copies and rewrites the sources into out_dir/src and compiles libterdit_kernels_emu.so."""
    src = out_dir / "src"
    src.mkdir(parents=True, exist_ok=True)
    sources = []
    for path in sorted(KERNELS.iterdir()):
        if path.suffix in (".cu", ".cuh", ".h"):
            text = transform(path.read_text())
            name = path.name if path.suffix != ".cu" else path.stem + ".cpp"
            (src / name).write_text(text)
            if path.suffix == ".cu":
                sources.append(src / name)
    shutil.copy(HERE / "ternaryPtx.cuh", src / "ternaryPtx.cuh")  # the emulated instructions
    (src / "terditKernelsC.cpp").write_text(C_API.read_text())
    sources += [src / "terditKernelsC.cpp"]
    out = out_dir / "libterdit_kernels_emu.so"
    cmd = [compiler() or "g++", "-std=c++20", "-O1", "-g", "-shared", "-fPIC", "-pthread",
           "-Wno-unknown-pragmas", f"-I{HERE / 'fake'}", f"-I{src}",
           *map(str, sources), "-o", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"emulator build failed:\n{' '.join(cmd)}\n{proc.stdout}{proc.stderr}")
    return out
