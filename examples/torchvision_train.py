"""Train a torchvision Mask R-CNN on a YOLO-seg dataset with bank instances pasted in by ``GenValPaste``.

The dataset is read with ``genval_aug.datasets.YoloDataset`` (polygons -> per-instance masks; label id =
YOLO class + 1, 0 is background). The training pipeline is a torchvision ``transforms.v2`` Compose with
``GenValPaste`` first, run in DataLoader worker processes; the loop prints Mask R-CNN's losses. If ``--bank``
does not exist it is harvested from the same dataset first.

Real run (GPU, COCO-pretrained Mask R-CNN with new heads for the dataset's classes):

    python examples/torchvision_train.py --data ../shared/data/coco128-seg/coco128-seg.yaml \
        --bank cache/coco128.lmdb --weights DEFAULT --device cuda --epochs 10 --batch-size 4 --workers 4

``--weights DEFAULT`` loads torchvision's COCO weights (downloaded once into the torch hub cache) and replaces
the box and mask predictors; ``--weights-backbone DEFAULT`` starts from ImageNet backbone weights only; with
neither the model is randomly initialised.

``--smoke``: 4 images, 2 iterations of batch 2 at 128 px, random init (``weights=None, weights_backbone=None``),
2 DataLoader workers, CPU; checks the whole path in well under a minute.
"""
from __future__ import annotations

import argparse
import logging
import math
import os
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import torch
from torchvision import tv_tensors
from torchvision.transforms import v2

from genval_aug.datasets import DatasetError, YoloDataset, read_rgb
from genval_aug.transforms import GenValPaste, class_map_from_names

ROOT = Path(__file__).resolve().parents[1]
log = logging.getLogger("torchvision_train")


class YoloSegDetection(torch.utils.data.Dataset):
    """(image, target) samples in the torchvision detection-reference layout from a YOLO-seg dataset.

    target: ``boxes`` (``BoundingBoxes`` XYXY), ``masks`` (``Mask`` (N, H, W) uint8), ``labels`` (YOLO class + 1).
    Box-only label lines get their box as mask. An image that cannot be read is replaced by the next one
    (counted in ``self.skipped``, logged once).
    """

    def __init__(self, data: str | os.PathLike, transforms=None, limit: int | None = None):
        self.ds = YoloDataset(data)
        self.images = self.ds.images("train")[:limit]
        self.transforms = transforms
        self.skipped = 0

    def __len__(self) -> int:
        return len(self.images)

    def load(self, i: int):
        path = self.images[i]
        img = read_rgb(path, convert=True)                      # grayscale / 16-bit / CMYK -> 8-bit RGB
        h, w = img.shape[:2]
        sample = self.ds.read_labels(path)
        masks = np.zeros((len(sample.objects), h, w), np.uint8)
        boxes, labels = [], []
        for k, obj in enumerate(sample.objects):
            poly = obj.polygon_pixels(w, h)
            if poly is not None:
                cv2.fillPoly(masks[k], [np.round(poly).astype(np.int32)], 1)
            else:
                x1, y1, x2, y2 = np.round(obj.box_xyxy(w, h)).astype(int)
                masks[k, max(y1, 0):y2, max(x1, 0):x2] = 1
            boxes.append(obj.box_xyxy(w, h))
            labels.append(obj.cls + 1)
        target = {
            "boxes": tv_tensors.BoundingBoxes(np.asarray(boxes, np.float32).reshape(-1, 4), format="XYXY",
                                              canvas_size=(h, w)),
            "masks": tv_tensors.Mask(torch.from_numpy(masks)),
            "labels": torch.as_tensor(labels, dtype=torch.int64),
        }
        return tv_tensors.Image(torch.from_numpy(img).permute(2, 0, 1).contiguous()), target

    def __getitem__(self, i: int):
        for j in range(len(self.images)):                       # never die on one bad image
            try:
                image, target = self.load((i + j) % len(self.images))
                break
            except DatasetError as e:
                if not self.skipped:
                    log.warning("skipping unreadable sample: %s", e)
                self.skipped += 1
        else:
            raise DatasetError(f"{self.ds.source}: no readable image")
        if self.transforms is not None:
            image, target = self.transforms(image, target)
        return image, target


def collate(batch):
    return tuple(zip(*batch, strict=True))


def build_model(num_classes: int, weights: str | None, weights_backbone: str | None, size: int | None):
    from torchvision.models.detection import maskrcnn_resnet50_fpn
    from torchvision.models.detection.faster_rcnn import FastRCNNPredictor
    from torchvision.models.detection.mask_rcnn import MaskRCNNPredictor

    kw = {"min_size": size, "max_size": size} if size else {}
    if weights:                                                 # COCO weights, new heads for our classes
        model = maskrcnn_resnet50_fpn(weights=weights, **kw)
        box_in = model.roi_heads.box_predictor.cls_score.in_features
        model.roi_heads.box_predictor = FastRCNNPredictor(box_in, num_classes)
        model.roi_heads.mask_predictor = MaskRCNNPredictor(256, 256, num_classes)
        return model
    return maskrcnn_resnet50_fpn(weights=None, weights_backbone=weights_backbone, num_classes=num_classes, **kw)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    default_data = Path(os.environ.get("GENVAL_AUG_SHARED_DATA", ROOT.parent / "shared" / "data"))
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, default=default_data / "coco128-seg" / "coco128-seg.yaml")
    p.add_argument("--bank", type=Path, default=None, help="LMDB bank; harvested from --data if missing")
    p.add_argument("--weights", default=None, help="DEFAULT = COCO-pretrained Mask R-CNN")
    p.add_argument("--weights-backbone", default=None, help="DEFAULT = ImageNet ResNet-50")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--workers", type=int, default=4)
    p.add_argument("--lr", type=float, default=0.01)
    p.add_argument("--size", type=int, default=None, help="model input size (default: torchvision's 800/1333)")
    p.add_argument("--max-steps", type=int, default=None, help="stop after this many iterations")
    p.add_argument("--limit", type=int, default=None, help="use the first N images")
    p.add_argument("--out", type=Path, default=None, help="save the final state_dict (.pt) here")
    p.add_argument("--smoke", action="store_true", help="4 images, 2 steps, 128 px, random init, CPU")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    if args.smoke:
        torch.set_num_threads(1)
        args.weights = args.weights_backbone = None
        args.device, args.epochs, args.batch_size, args.workers = "cpu", 1, 2, 2
        args.size, args.max_steps, args.limit = 128, 2, 4
    bank = args.bank or ROOT / "cache" / f"{args.data.stem}.lmdb"
    if not bank.exists():
        from genval_aug.harvest import harvest

        print(f"no bank at {bank}: harvesting {args.data}")
        print(harvest(args.data, bank).summary())
    torch.manual_seed(0)

    names = YoloDataset(args.data).names                        # {yolo id: name}
    class_map = class_map_from_names({i + 1: n for i, n in names.items()}, bank)   # bank name -> label id
    train_tf = v2.Compose([
        GenValPaste(bank, class_map=class_map, n=(1, 3)),      # paste first, on the uint8 image
        v2.RandomHorizontalFlip(),
        v2.ToDtype(torch.float32, scale=True),
        v2.SanitizeBoundingBoxes(),
    ])
    dataset = YoloSegDetection(args.data, transforms=train_tf, limit=args.limit)
    _, raw = YoloSegDetection(args.data, limit=1)[0]
    _, pasted = dataset[0]
    print(f"sample 0: {len(raw['labels'])} objects labelled -> {len(pasted['labels'])} after GenValPaste "
          f"({len(class_map)} bank categories mapped to dataset classes)")

    loader = torch.utils.data.DataLoader(dataset, batch_size=args.batch_size, shuffle=True,
                                         num_workers=args.workers, collate_fn=collate,
                                         persistent_workers=args.workers > 0)
    model = build_model(max(names) + 2, args.weights, args.weights_backbone, args.size).to(args.device)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=args.lr, momentum=0.9, weight_decay=1e-4)
    model.train()
    step, t0 = 0, time.perf_counter()
    for epoch in range(args.epochs):
        for images, targets in loader:
            images = [im.to(args.device) for im in images]
            targets = [{k: v.to(args.device) for k, v in t.items()} for t in targets]
            losses = model(images, targets)
            loss = sum(losses.values())
            if not math.isfinite(loss.item()):
                print(f"non-finite loss {loss.item()} at step {step}: {losses}", file=sys.stderr)
                return 1
            opt.zero_grad()
            loss.backward()
            opt.step()
            objs = sum(len(t["labels"]) for t in targets)
            print(f"epoch {epoch} step {step}: loss {loss.item():.4f} "
                  + " ".join(f"{k}={v.item():.4f}" for k, v in losses.items())
                  + f" | {objs} objects in {len(images)} images")
            step += 1
            if args.max_steps and step >= args.max_steps:
                break
        if args.max_steps and step >= args.max_steps:
            break
    print(f"{step} steps in {time.perf_counter() - t0:.1f} s on {args.device}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        torch.save(model.state_dict(), args.out)
        print(f"saved {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
