"""Peak RSS of loading and exporting a synthetic official-layout TerDiT checkpoint (CPU).

    python bench/memory.py --model DiT_Llama_3B_patch2 --image-size 256

Builds (once, cached in --workdir) an official release directory with random codes 0..2 for every
ternary layer, then measures with /usr/bin/time -v, each in a fresh process:
- load:   terdit.load_checkpoint(dir)                       (target for 4.2B: < 2 GB)
- export: python -m exporter dir -o out [--no-validate]       (target for 4.2B: < 8 GB)
Writes bench/results/memory-<date>.json and .md.
"""
from __future__ import annotations

import argparse
import datetime
import json
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def build_checkpoint(path: Path, model: str, image_size: int) -> Path:
    """An official release directory (terdit.save_official) of a random packed TerDiT, built at
    its packed size (bench/e2e_models.random_packed on the CPU)."""
    if (path / "model_args.pth").is_file():
        return path
    from e2e_models import random_packed
    from terdit import TerDiTConfig, save_official
    cfg = TerDiTConfig.from_name(model, input_size=image_size // 8)
    tmp = path.with_name(path.name + ".partial")
    save_official(random_packed(cfg, on="cpu"), tmp, overwrite=True)
    tmp.rename(path)
    return path


def peak_rss(cmd: list[str]) -> tuple[float, float, str]:
    """(max RSS GiB, wall seconds, tail of output) of `cmd` under /usr/bin/time -v."""
    t0 = time.time()
    proc = subprocess.run(["/usr/bin/time", "-v", *cmd], capture_output=True, text=True, cwd=ROOT)
    wall = time.time() - t0
    m = re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr)
    if proc.returncode != 0 or not m:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return int(m.group(1)) / 2**20, wall, (proc.stdout + proc.stderr)[-800:]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="DiT_Llama_3B_patch2",
                   choices=["DiT_Llama_600M_patch2", "DiT_Llama_3B_patch2", "DiT_Llama_7B_patch2"])
    p.add_argument("--image-size", type=int, default=256)
    p.add_argument("--workdir", type=Path, default=Path("/tmp/terdit-memory-bench"))
    p.add_argument("--validate", action="store_true", help="also validate the export (slow on CPU)")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = p.parse_args(argv)
    ckpt = build_checkpoint(args.workdir / f"{args.model}-{args.image_size}", args.model, args.image_size)
    size = sum(f.stat().st_size for f in ckpt.iterdir()) / 2**30
    py = sys.executable
    rows = []
    load_code = ("import sys; sys.path.insert(0, '.'); from terdit import load_checkpoint; "
                 f"m = load_checkpoint({str(ckpt)!r}).model; print(sum(b.numel() for b in m.buffers()))")
    rss, wall, _ = peak_rss([py, "-c", load_code])
    rows.append({"step": "load_checkpoint", "peak_rss_gib": round(rss, 3), "seconds": round(wall, 1)})
    out_dir = args.workdir / "export"
    cmd = [py, "-m", "exporter", str(ckpt), "-o", str(out_dir), "--overwrite"]
    if not args.validate:
        cmd.append("--no-validate")
    rss, wall, tail = peak_rss(cmd)
    rows.append({"step": "export" + (" + validate" if args.validate else " (--no-validate)"),
                 "peak_rss_gib": round(rss, 3), "seconds": round(wall, 1)})
    onnx_bytes = sum(f.stat().st_size for f in out_dir.iterdir()) / 2**30
    result = {"model": args.model, "image_size": args.image_size, "checkpoint_gib": round(size, 3),
              "onnx_dir_gib": round(onnx_bytes, 3), "rows": rows, "machine": platform.platform(),
              "python": platform.python_version(),
              "date": datetime.date.today().isoformat()}
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"memory-{args.model}{'-validate' if args.validate else ''}-{result['date']}"
    stem.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [f"# Peak RSS, synthetic official-layout {args.model} ({size:.2f} GiB on disk), "
             f"{result['date']}", "", "| step | peak RSS (GiB) | wall (s) |", "|---|---|---|"]
    lines += [f"| {r['step']} | {r['peak_rss_gib']:.2f} | {r['seconds']:.0f} |" for r in rows]
    lines += ["", f"ONNX output: {onnx_bytes:.2f} GiB. Machine: {result['machine']}."]
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
