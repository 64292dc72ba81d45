"""Reliability of `python -m terdit.evaluate` (issue 20), grouped by the class of failure each
case used to show:

- data loss: an output that is, lies inside or contains an input (the checkpoint's
  config.json or weights, the --ref-cache, the --data-path) or another output;
- a flag that would have no effect with the subcommand and the source of its images
  (--ref-count with --ref none, --threads with nothing for torch to do, ...);
- a message that does not name the flag, the path and what to do.

Each case ends with exit code 2 and one `error:` line naming the flag, no traceback, no file
of the user's changed and nothing added (the case's directory and the fixture are hashed before
and after). Temporaries a stopped writer left beside a single-file output are removed by the next
run, which leaves no lock or temporary of its own."""

import numpy as np
import pytest

from terdit.evaluate.classifier import ClassifierConfig, SmallCNN, save_classifier
from tests.cases import assert_refused, copy, mkdir, symlink, write
from tests.helpers import all_of, case_dir, pixel_checkpoint, run_cli_case, tree_state


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A pixel checkpoint (3 classes), a good ADM .npz of 8x8 images and a classifier of 32x32
    one-channel images of 3 classes; cases only read them."""
    root = tmp_path_factory.mktemp("rel-evaluate")
    pixel_checkpoint(root / "ck", n_layers=1, class_names="abc")
    np.savez(root / "good.npz", np.zeros((6, 8, 8, 3), np.uint8), np.arange(6) % 3)
    cc = ClassifierConfig(width=2)
    save_classifier(SmallCNN(1, 3, cc.width).eval(), cc, root / "c.st", {})
    return root


# ---- setups: (tmp, base) -> None; paths in argv use {T} (per case) and {B} (the fixture) ------

def _npz(name, images, *labels):
    def setup(tmp, base):
        np.savez(tmp / name, images, *labels)
    return setup


def _pngs(folder, *sizes):
    def setup(tmp, base):
        from PIL import Image
        (tmp / folder).mkdir()
        for i, size in enumerate(sizes):
            Image.fromarray(np.zeros((size, size), np.uint8)).save(tmp / folder / f"{i}.png")
    return setup


def _log(name, text):
    return write(name, text.encode())


LOSS = '{"step": 1, "loss": 1.0}\n'
METRICS = ["evaluate", "metrics", "--ref", "none", "--samples"]
MODEL = ["--num-images", "1", "--steps", "2", "--no-progress"]
EV_MODEL = ["evaluate", "metrics", "--ref", "none", "--model", "{B}/ck"] + MODEL
GRID = ["evaluate", "grid", "--samples", "{B}/good.npz", "--out", "{T}/g.png"]
GRID_MODEL = ["evaluate", "grid", "--model", "{B}/ck", "--out", "{T}/g.png", "--per-class", "1",
              "--steps", "2", "--no-progress"]
PLOT = ["evaluate", "plot-losses", "--out", "{T}/p.png", "--run", "a={T}/log.jsonl"]
FID_NPZ = ["evaluate", "metrics", "--samples", "{B}/good.npz", "--ref", "{B}/good.npz",
           "--ref-count", "2"]

# (id, argv, regex the error line must match, setup or None)
CASES = [
    # 1. data loss: every output against every input and every other output
    ("ev-out-is-model-config", ["evaluate", "metrics", "--ref", "none", "--model", "{T}/ck", *MODEL, "--out", "{T}/ck/config.json"], r"--out \S*ck/config.json: lies inside the input --model \S*ck; writing it would change the input", copy("ck")),
    ("ev-save-samples-is-weights", ["evaluate", "metrics", "--ref", "none", "--model", "{T}/ck", *MODEL, "--save-samples", "{T}/ck/model.safetensors"], r"--save-samples \S*model.safetensors: lies inside the input --model", copy("ck")),
    ("ev-grid-out-is-weights", ["evaluate", "grid", "--model", "{T}/ck", "--out", "{T}/ck/model.safetensors", "--per-class", "1", "--steps", "2", "--no-progress"], r"--out \S*model.safetensors: lies inside the input --model", copy("ck")),
    ("ev-out-is-save-samples", EV_MODEL + ["--out", "{T}/x.npz", "--save-samples", "{T}/x.npz"], r"--save-samples \S*x.npz: is also the --out output, and one would replace the other", None),
    ("ev-out-in-ref-cache", FID_NPZ + ["--ref-cache", "{T}/cache", "--out", "{T}/cache/m.json"], r"--out \S*cache/m.json: lies inside the input --ref-cache \S*cache", mkdir("cache")),
    ("ev-classifier-out-in-data", ["evaluate", "train-classifier", "--data-path", "{T}/fm", "--out", "{T}/fm/c.st"], r"--out \S*fm/c.st: lies inside the input --data-path \S*fm", mkdir("fm")),
    ("ev-plot-out-exists", PLOT, r"--out \S*p.png: exists; pass --overwrite to replace it", all_of(_log("log.jsonl", LOSS), write("p.png", b"the user's picture"))),
    ("ev-grid-out-exists", GRID, r"--out \S*g.png: exists; pass --overwrite", write("g.png", b"the user's picture")),
    ("ev-metrics-out-exists", METRICS + ["{B}/good.npz", "--out", "{T}/m.json"], r"--out \S*m.json: exists; pass --overwrite", write("m.json", b"{}")),
    ("ev-classifier-out-exists", ["evaluate", "train-classifier", "--out", "{T}/c.st"], r"--out \S*c.st: exists; pass --overwrite", write("c.st", b"mine")),
    ("ev-out-is-a-directory", METRICS + ["{B}/good.npz", "--out", "{T}/d"], r"--out \S*/d: is a directory; pass the path of the file to write", mkdir("d")),
    ("ev-grid-out-is-a-link", GRID[:-1] + ["{T}/g.png"], r"--out \S*g.png: is a symbolic link; we never write through one", symlink("g.png", "mine.png")),
    # 3. every flag acts or is refused
    ("ev-ref-count-ref-none", METRICS + ["{B}/good.npz", "--ref-count", "5"], r"--ref-count 5: only used for FID, and --ref none computes no FID: drop --ref-count", None),
    ("ev-ref-cache-ref-none", METRICS + ["{B}/good.npz", "--ref-cache", "{T}/c"], r"--ref-cache \S*/c: only used for FID.*drop --ref-cache", None),
    ("ev-image-size-npz", METRICS + ["{B}/good.npz", "--image-size", "64"], r"--image-size 64: it sets the size a fashion-mnist --samples set is padded to.*drop --image-size", None),
    ("ev-data-path-npz", METRICS + ["{B}/good.npz", "--data-path", "{T}"], r"--data-path \S*: it locates the Fashion-MNIST files, and --samples is not a fashion-mnist set: drop --data-path", None),
    ("ev-threads-metrics-npz", ["evaluate", "--threads", "2"] + METRICS[1:] + ["{B}/good.npz"], r"--threads 2: metrics --samples with --ref none and no --classifier runs no torch work: drop --threads", None),
    ("ev-image-size-model", EV_MODEL + ["--image-size", "32"], r"--image-size 32: .*the --model samples have the model's size", None),
    ("ev-data-path-model", EV_MODEL + ["--data-path", "{T}"], r"--data-path \S*: .*this command reads no image set \(the images come from --model\)", None),
    ("ev-threads-grid-npz", ["evaluate", "--threads", "2"] + GRID[1:], r"--threads 2: grid --samples runs no torch work: drop --threads", None),
    ("ev-image-size-grid-npz", GRID + ["--image-size", "64"], r"--image-size 64: it sets the size a fashion-mnist --samples set", None),
    ("ev-data-path-grid-model", GRID_MODEL + ["--data-path", "{T}"], r"--data-path \S*: it locates the Fashion-MNIST files", None),
    ("ev-threads-plot", ["evaluate", "--threads", "2"] + PLOT[1:], r"--threads 2: plot-losses runs no torch work: drop --threads", _log("log.jsonl", LOSS)),
    ("ev-classifier-no-labels", METRICS + ["{T}/n.npz", "--classifier", "{B}/c.st"], r"--classifier \S*c.st: the --samples images have no labels.*drop --classifier", _npz("n.npz", np.zeros((2, 32, 32, 1), np.uint8))),
    ("ev-classifier-folder", METRICS + ["{T}/imgs", "--classifier", "{B}/c.st"], r"--classifier \S*c.st: the --samples images have no labels", _pngs("imgs", 32, 32)),
    ("ev-run-label-twice", PLOT + ["--run", "a={T}/log2.jsonl"], r"--run a=\S*log2.jsonl: the label 'a' is already given to --run a=\S*log.jsonl", all_of(_log("log.jsonl", LOSS), _log("log2.jsonl", LOSS))),
    ("ev-run-without-loss", PLOT, r"--run a=\S*log.jsonl: holds no row with a loss, so its curve would be missing", _log("log.jsonl", '{"step": 1, "note": "started"}\n')),
    # 7. messages name the flag, the path and what to do
    ("ev-ref-cache-is-a-file", FID_NPZ + ["--ref-cache", "{T}/f"], r"--ref-cache \S*/f: is not a directory; --ref-cache names a directory.*pass a directory, or none", write("f")),
    ("ev-samples-empty-folder", METRICS + ["{T}/e"], r"--samples \S*/e: holds no images .*pass a folder of images", mkdir("e")),
    ("ev-samples-mixed-sizes", METRICS + ["{T}/imgs"], r"--samples \S*imgs: images of different shapes .*one size", _pngs("imgs", 8, 16)),
    ("ev-samples-no-arr0", METRICS + ["{T}/x.npz"], r"--samples \S*x.npz: no arr_0", lambda t, b: np.savez(t / "x.npz", x=np.zeros(3))),
    ("ev-ref-count-too-many", FID_NPZ[:-1] + ["10", "--ref-cache", "none"], r"--ref \S*good.npz: 10 images requested, it holds 6 .*pass a --ref-count from 2 to 6", None),
    ("ev-grid-no-labels", ["evaluate", "grid", "--samples", "{T}/x.npz", "--out", "{T}/g.png"], r"--samples \S*x.npz: no labels \(arr_1\)", _npz("x.npz", np.zeros((2, 8, 8, 3), np.uint8))),
    ("ev-classifier-garbage", METRICS + ["{B}/good.npz", "--classifier", "{T}/c.st"], r"--classifier \S*c.st: not a classifier written by .*train one with", write("c.st", b"garbage")),
    ("ev-classifier-image-size", METRICS + ["{B}/good.npz", "--classifier", "{B}/c.st"], r"--classifier \S*c.st: scores 32x32 images of 1 channel\(s\), the samples are 8x8", None),
    ("ev-classifier-classes", METRICS + ["{T}/s.npz", "--classifier", "{B}/c.st"], r"--classifier \S*c.st: scores 3 classes, the samples hold label 5", _npz("s.npz", np.zeros((2, 32, 32, 3), np.uint8), np.array([0, 5]))),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_refused_in_one_line(case, base, tmp_path, capsys):
    name, argv, pattern, setup = case
    work = case_dir(tmp_path, base, setup)
    assert_refused(name, argv, pattern, work, base, capsys)


# ---- 6. nothing left behind: a stopped writer's temporaries go with the next run --------------

RUNS = [
    ("metrics", METRICS + ["{B}/good.npz", "--out", "{T}/m.json"], "m.json", None),
    ("grid", GRID + ["--per-class", "2"], "g.png", None),
    ("plot-losses", PLOT, "p.png", _log("log.jsonl", LOSS)),
    ("save-samples", EV_MODEL + ["--save-samples", "{T}/s.npz", "--out", "{T}/m.json"], "s.npz",
     None),
]


@pytest.mark.parametrize("case", RUNS, ids=[c[0] for c in RUNS])
def test_stale_temporaries_of_the_output_are_removed(case, base, tmp_path, capsys):
    name, argv, output, setup = case
    work = case_dir(tmp_path, base, setup)
    stale = work / f".{output}.terdit-abcd1234.tmp"
    stale.write_bytes(b"half")
    neighbour = work / ".notes.txt.terdit-abcd1234.tmp"                # another output's: not ours
    neighbour.write_bytes(b"keep")
    base_before = tree_state(base)
    code, err = run_cli_case(argv, work, base, capsys)
    assert code == 0, (name, err)
    assert f"note: removed {stale}" in err
    assert not stale.exists() and neighbour.read_bytes() == b"keep"
    assert (work / output).is_file()
    left = sorted(p.name for p in work.iterdir() if p.name.startswith("."))
    assert left == [neighbour.name], left                       # no lock, no temporary
    assert tree_state(base) == base_before


def test_overwrite_replaces_an_existing_output(base, tmp_path, capsys):
    """An existing output is replaced only with --overwrite (and then nothing else is left)."""
    (tmp_path / "g.png").write_bytes(b"the user's picture")
    code, err = run_cli_case(GRID + ["--per-class", "2", "--overwrite"], tmp_path, base, capsys)
    assert code == 0, err
    assert (tmp_path / "g.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["g.png"]


class StandInFeatures:
    """A cheap feature network in place of Inception: 4 pixels per image, as float64."""

    def __init__(self, *args, **kwargs):
        pass

    def __call__(self, images, progress=False):
        return images.reshape(len(images), -1)[:, :4].astype(np.float64)


def test_stale_temporaries_of_a_cache_entry_are_removed(base, tmp_path, capsys, monkeypatch):
    """A --ref-cache entry (ref-KEY.npy and ref-KEY.json) is read and written under its own
    lock, which also removes what a stopped writer of either file left."""
    import terdit.evaluate.evaluate_cli as evaluate
    monkeypatch.setattr(evaluate, "InceptionFeatures", StandInFeatures)
    cache = tmp_path / "cache"
    argv = ["metrics", "--samples", str(base / "good.npz"), "--ref", str(base / "good.npz"),
            "--ref-count", "2", "--ref-cache", str(cache), "--no-progress"]
    assert evaluate.main(argv) == 0
    entry = sorted(p.name for p in cache.iterdir())
    assert len(entry) == 2 and entry[0].endswith(".json") and entry[1].endswith(".npy")
    stale = [cache / f".{name}.terdit-abcd1234.tmp" for name in entry]
    for p in stale:
        p.write_bytes(b"half")
    capsys.readouterr()
    assert evaluate.main(argv) == 0
    err = capsys.readouterr().err
    assert all(f"note: removed {p}" in err for p in stale), err
    assert sorted(p.name for p in cache.iterdir()) == entry       # no lock, no temporary
