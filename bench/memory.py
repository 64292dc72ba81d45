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
    import torch
    from tests.official_layout import write_official_dir, random_official_state  # noqa: F401
    from tests.official_layout import OFFICIAL_DIMS, hqq_pack, layer_shapes
    if (path / "model_args.pth").is_file():
        return path
    dim, n_layers, _ = OFFICIAL_DIMS[model]
    g = torch.Generator().manual_seed(0)
    cond = min(dim, 1024)
    state = {"x_embedder.weight": torch.randn(dim, 16, generator=g) * 0.05,
             "x_embedder.bias": torch.zeros(dim),
             "t_embedder.mlp.0.weight": torch.randn(cond, 256, generator=g) * 0.02,
             "t_embedder.mlp.0.bias": torch.zeros(cond),
             "t_embedder.mlp.2.weight": torch.randn(cond, cond, generator=g) * 0.02,
             "t_embedder.mlp.2.bias": torch.zeros(cond),
             "y_embedder.embedding_table.weight": torch.randn(1001, cond, generator=g),
             "final_layer.linear.weight": torch.randn(32, dim, generator=g) * 0.02,
             "final_layer.linear.bias": torch.zeros(32),
             "final_layer.adaLN_modulation.1.weight": torch.randn(2 * dim, cond, generator=g) * 0.02,
             "final_layer.adaLN_modulation.1.bias": torch.zeros(2 * dim)}
    ternary, fp = layer_shapes(dim, qk_norm=False)
    for i in range(n_layers):
        for suffix, (n, k, bias) in ternary.items():
            key = f"layers.{i}.{suffix}"
            state[f"{key}.weight"] = hqq_pack(torch.randint(0, 3, (n, k), generator=g, dtype=torch.uint8))
            state[f"{key}.alphas"] = torch.full((1,), 1.0 / k ** 0.5)
            if bias:
                state[f"{key}.bias"] = torch.zeros(n)
        for suffix, shape in fp.items():
            state[f"layers.{i}.{suffix}"] = torch.ones(shape)
    tmp = path.with_name(path.name + ".partial")
    write_official_dir(tmp, model, image_size, state)
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
