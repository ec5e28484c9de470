"""Train an Ultralytics YOLO model with instances from a genval_aug bank pasted into every training batch.

If ``--bank`` does not exist yet, it is first harvested from the training dataset itself (every annotated
object cut out as an RGBA instance), so the script runs on any YOLO-seg dataset with nothing else.

Real run (GPU 0, pretrained weights; the Python API, ``attach``):

    python examples/yolo_train.py --data ../shared/data/coco128-seg/coco128-seg.yaml \
        --bank cache/coco128.lmdb --model yolo11n-seg.pt --epochs 30 --imgsz 640 --device 0 --n 3

The same with the command line (what ``--cli`` runs, through ``genval_aug.cli.main``):

    genval-aug bank harvest --data ../shared/data/coco128-seg/coco128-seg.yaml --out cache/coco128.lmdb
    genval-aug yolo train model=yolo11n-seg.pt data=../shared/data/coco128-seg/coco128-seg.yaml \
        bank=cache/coco128.lmdb epochs=30 imgsz=640 device=0 paste_n=3

Ultralytics writes ``labels/*.cache`` next to the dataset's labels (it warns and goes on if that folder is
read-only). The script sets up ``genval_aug.offline.use_offline_environment`` before Ultralytics is imported:
YOLO_OFFLINE=1 (no connectivity/update checks, no analytics) and a local font where Ultralytics looks for
Arial.ttf (see README, "Ultralytics YOLO"); variables you set yourself are kept. Ultralytics' weight downloads are
not gated by YOLO_OFFLINE; on a machine without network name a local ``.pt`` or a ``.yaml`` as ``--model``.

``--smoke`` copies the first 8 images of the dataset to a temporary folder (the bank, unless given, is harvested
from those) and trains a randomly initialised ``yolo11n-seg.yaml`` (unless ``--model`` says otherwise) for 1 epoch
at imgsz 64, batch 4, on the CPU with ``val=False``: a check of the whole path in seconds.

Outputs: the bank, Ultralytics' run folder (``--project``/``--name``: weights, ``train_batch*.jpg`` pictures of
pasted batches when ``--plots``) and, at the end, how many objects were pasted in this process.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def small_copy(data: Path, dst: Path, n: int) -> Path:
    """The first ``n`` training images of a YOLO dataset with their labels, copied to ``dst`` (Ultralytics writes a
    label cache beside the labels); returns the new data yaml."""
    import yaml

    from genval_aug.datasets import YoloDataset

    ds = YoloDataset(data)
    (dst / "images" / "train").mkdir(parents=True, exist_ok=True)
    (dst / "labels" / "train").mkdir(parents=True, exist_ok=True)
    for img in ds.images("train")[:n]:
        shutil.copy(img, dst / "images" / "train" / img.name)
        label = ds.label_file(img)
        if label.is_file():
            shutil.copy(label, dst / "labels" / "train" / label.name)
    out = dst / "data.yaml"
    names = [ds.names[i] for i in sorted(ds.names)]
    out.write_text(yaml.safe_dump({"path": str(dst), "train": "images/train", "val": "images/train", "names": names}))
    return out


def ensure_bank(bank: Path, data: Path) -> Path:
    """Harvest ``data`` into ``bank`` unless the bank already exists."""
    from genval_aug.bank import InstanceBank

    if not bank.exists():
        from genval_aug.harvest import harvest

        print(f"no bank at {bank}: harvesting {data}")
        print(harvest(data, bank).summary())
    cats = InstanceBank(bank).categories()
    print(f"bank {bank}: {sum(cats.values())} instances in {len(cats)} categories")
    return bank


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    default_data = Path(os.environ.get("GENVAL_AUG_SHARED_DATA", ROOT.parent / "shared" / "data"))
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, default=default_data / "coco128-seg" / "coco128-seg.yaml",
                   help="Ultralytics dataset yaml (detect or segment)")
    p.add_argument("--bank", type=Path, default=None,
                   help="LMDB bank; harvested from --data if missing (default: cache/<dataset>.lmdb)")
    p.add_argument("--model", default=None, help="yolo11n-seg.pt, a local .pt, or a .yaml (random init)")
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--imgsz", type=int, default=640)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--device", default=None, help="0, 0,1, cpu (Ultralytics' default when omitted)")
    p.add_argument("--workers", type=int, default=8)
    p.add_argument("--n", type=int, default=3, help="instances pasted per image")
    p.add_argument("--project", type=Path, default=ROOT / "runs" / "genval")
    p.add_argument("--name", default="train")
    p.add_argument("--plots", action="store_true", help="write train_batch*.jpg etc. (default off in --smoke)")
    p.add_argument("--cli", action="store_true", help="train through `genval-aug yolo train` instead of attach()")
    p.add_argument("--smoke", action="store_true", help="8 images, 1 epoch, imgsz 64, CPU (smoke test)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="genval-yolo-train-"))
    from genval_aug.offline import use_offline_environment

    use_offline_environment(work)      # before ultralytics is imported; variables you set are kept
    data = args.data
    if not data.is_file():
        print(f"dataset yaml not found: {data} (give --data)", file=sys.stderr)
        return 2
    train = dict(epochs=args.epochs, imgsz=args.imgsz, batch=args.batch, workers=args.workers,
                 project=str(args.project.resolve()), name=args.name, exist_ok=True, plots=args.plots)
    if args.device is not None:
        train["device"] = args.device
    model_name = args.model or "yolo11n-seg.pt"
    if args.smoke:
        import torch

        torch.set_num_threads(1)
        data = small_copy(data, work / "data", 8)
        model_name = args.model or "yolo11n-seg.yaml"
        train.update(epochs=1, imgsz=64, batch=4, workers=0, device="cpu", val=False, amp=False, seed=0,
                     verbose=False)
    default_bank = (work if args.smoke else ROOT / "cache") / f"{Path(data).stem}.lmdb"
    bank = ensure_bank(args.bank or default_bank, Path(data))

    if args.cli:
        from genval_aug.cli import main as cli_main

        cmd = ["yolo", "train", f"model={model_name}", f"data={data}", f"bank={bank}",
               f"paste_n={args.n}",
               *(f"{k}={v}" for k, v in train.items())]
        print("genval-aug " + " ".join(cmd))
        rc = cli_main(cmd)
    else:
        from ultralytics import YOLO

        from genval_aug.ultralytics import attach

        model = attach(YOLO(model_name), bank=bank, n=args.n)       # the one line that adds the paste
        stats = {}
        model.add_callback("on_train_end", lambda trainer: stats.update(paste_stats(trainer)))
        model.train(data=str(data), **train)
        print(f"pasted {stats.get('pasted', 0)} objects into {stats.get('images', 0)} images in this process "
              f"(loader worker processes count their own); skipped {stats.get('errors', 0)} failures")
        rc = 0
    run_dir = args.project.resolve() / args.name
    print(f"run folder: {run_dir} (weights/last.pt{', train_batch*.jpg' if args.plots else ''})")
    shutil.rmtree(work, ignore_errors=True)
    return rc


def paste_stats(trainer) -> dict[str, int]:
    """Sum the counters of the paste transforms in the trainer's training dataset (this process only)."""
    from genval_aug.ultralytics import YoloPaste

    total: dict[str, int] = {}
    for t in getattr(trainer.train_loader.dataset.transforms, "transforms", []):
        if isinstance(t, YoloPaste):
            for k, v in t.stats.items():
                total[k] = total.get(k, 0) + v
    return total


if __name__ == "__main__":
    sys.exit(main())
