"""``genval-aug preview``: a grid of augmented dataset samples with boxes, masks and class names drawn.

Pasted objects are marked (white dashed frame, ``+`` before the name). Runs the same core as the training
adapters (:class:`genval_aug.paste.PasteEngine`) on a YOLO dataset (segment or detect labels).
"""
from __future__ import annotations

import argparse
import logging
from pathlib import Path

import numpy as np

from genval_aug.errors import ConfigError, DatasetError

logger = logging.getLogger(__name__)


def _int_range(text: str) -> int | tuple[int, int]:
    """``"3"`` -> 3, ``"1-3"`` -> (1, 3)."""
    try:
        if "-" in text:
            lo, hi = (int(v) for v in text.split("-", 1))
            if lo > hi or lo < 0:
                raise ValueError
            return lo, hi
        v = int(text)
        if v < 0:
            raise ValueError
        return v
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected N or LO-HI (non-negative), got {text!r}") from None


def register(subparsers) -> None:
    p = subparsers.add_parser("preview", help="draw a grid of augmented samples (pasted objects marked)",
                              description="Draw a grid of augmented dataset samples: boxes, masks and class names, "
                              "pasted objects marked with a white dashed frame and a + before the name.")
    p.add_argument("--data", required=True, help="dataset: YOLO yaml or folder, COCO json, or VOC folder "
                   "(SegmentationObject/), as for `bank harvest`")
    p.add_argument("--bank", required=True, help="instance bank path")
    p.add_argument("--out", required=True, help="output picture (.png / .jpg)")
    p.add_argument("--n", type=int, default=8, help="number of samples (default 8)")
    p.add_argument("--seed", type=int, default=0, help="seed for image choice and pasting (default 0)")
    p.add_argument("--split", default="train", help="dataset split (default train)")
    p.add_argument("--paste-n", type=_int_range, default=None, help="objects pasted per image: N or LO-HI")
    p.add_argument("--blend", default=None, help="hard | alpha | feather | poisson")
    p.add_argument("--harmonize", default=None, help="none | reinhard | linear_ot")
    p.add_argument("--cols", type=int, default=None, help="grid columns (default: about sqrt of tiles)")
    p.add_argument("--tile", type=int, default=320, help="tile size in pixels (default 320)")
    p.add_argument("--with-original", action="store_true", help="show each original beside its augmented copy")
    p.add_argument("--no-class-map", action="store_true",
                   help="label pasted objects with the bank's category ids instead of matching dataset names")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import cv2

    from genval_aug.bank import InstanceBank
    from genval_aug.class_map import class_map_from_names
    from genval_aug.datasets import YoloDataset, read_rgb
    from genval_aug.harvest.formats import detect_format
    from genval_aug.lazy_engine import make_config
    from genval_aug.paste import PasteEngine, Targets
    from genval_aug.viz import draw_labels, make_grid

    if args.n < 1:
        raise ConfigError("--n must be at least 1")
    rng = np.random.default_rng(args.seed)
    if detect_format(args.data) in ("coco", "voc"):
        names, samples = _mask_samples(args.data, args.split, args.n, rng)
    else:
        ds = YoloDataset(args.data)
        images = ds.images(args.split)
        if not images:
            raise DatasetError(f"{args.data}: split {args.split!r} has no images")
        chosen = rng.choice(len(images), size=min(args.n, len(images)), replace=False)
        names, samples = ds.names, [(images[int(i)], None, ds.read_labels(images[int(i)])) for i in chosen]
    bank = InstanceBank(args.bank)
    if not bank.count():
        raise ConfigError(f"{args.bank}: the bank is empty")
    class_map = None
    if not args.no_class_map and names:
        class_map = class_map_from_names(names, bank)
    names = dict(names)
    if class_map is None:
        names.update({v: k for k, v in bank.category_ids().items() if v not in names})
    options = {k: v for k, v in (("n", args.paste_n), ("blend", args.blend), ("harmonize", args.harmonize))
               if v is not None}
    if class_map is not None:  # bank categories without a dataset class are never drawn (as in the adapters)
        options["sampler_classes"] = sorted(class_map)
    engine = PasteEngine(bank, config=make_config(None, options), class_map=class_map)

    tiles, captions = [], []
    for path, img, labels in samples:
        if img is None:
            try:
                img = read_rgb(path)
            except DatasetError as e:
                logger.warning("skipping %s", e)
                continue
        h, w = img.shape[:2]
        targets = labels if isinstance(labels, Targets) else labels.targets(w, h)
        res = engine(img, targets, rng, channel_order="rgb")
        t = res.targets
        if args.with_original:
            tiles.append(draw_labels(img, targets.boxes, targets.classes, masks=targets.masks,
                                     polygons=targets.polygons, names=names))
            captions.append(f"{path.name} (original)")
        tiles.append(draw_labels(res.image, t.boxes, t.classes, masks=t.masks, polygons=t.polygons,
                                 names=names, pasted=res.pasted))
        captions.append(f"{path.name}: +{int(np.sum(res.pasted))} pasted, {len(res.kept)}/{len(targets.classes)} kept")
    if not tiles:
        raise DatasetError(f"{args.data}: none of the chosen images could be read")
    cols = args.cols or (4 if args.with_original else None)
    grid = make_grid(tiles, cols=cols, tile_size=args.tile, captions=captions)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    params = [cv2.IMWRITE_PNG_COMPRESSION, 9] if out.suffix.lower() == ".png" else [cv2.IMWRITE_JPEG_QUALITY, 90]
    if not cv2.imwrite(str(out), cv2.cvtColor(grid, cv2.COLOR_RGB2BGR), params):
        raise ConfigError(f"{out}: cannot write the picture (unknown extension or unwritable folder)")
    print(f"wrote {out} ({len(tiles)} tiles, {grid.shape[1]}x{grid.shape[0]})")
    return 0


def _mask_samples(data: str, split: str, n: int, rng: np.random.Generator) -> tuple[dict[int, str], list]:
    """``n`` random images of a COCO json / VOC dataset (read by the harvest readers) as (path, RGB image,
    Targets with one full-image mask per object); uniform over the dataset in one pass (reservoir sampling)."""
    from genval_aug.datasets import ImageError, read_rgb
    from genval_aug.harvest.core import Harvester
    from genval_aug.harvest.formats import open_source
    from genval_aug.paste import Targets
    from genval_aug.paste.labels import mask_extent

    try:
        source = open_source(data, split=split)
    except DatasetError:
        if split != "train":  # a VOC folder without ImageSets/Segmentation/train.txt: the default means all
            raise
        source = open_source(data, split=None)
    keep: list = []
    for i, sample in enumerate(source):
        if i < n:
            keep.append(sample)
        elif (j := int(rng.integers(0, i + 1))) < n:
            keep[j] = sample
    cutter = Harvester()
    out = []
    for sample in keep:
        try:
            img = sample.image if sample.image is not None else read_rgb(sample.path)
        except (DatasetError, ImageError) as e:
            logger.warning("skipping %s", e)
            continue
        H, W = img.shape[:2]
        masks, boxes, classes = [], [], []
        for ann in sample.annotations:
            if ann.box is not None and ann.polygons is None and ann.mask is None:
                continue  # box-only annotations would need GrabCut: not drawn in a preview
            win, x, y = cutter.instance_mask(img, ann)
            local = win >= 128
            ext = mask_extent(local) if local.size else None
            if ext is None:
                continue
            m = np.zeros((H, W), bool)
            m[y:y + win.shape[0], x:x + win.shape[1]] = local
            masks.append(m)
            boxes.append((x + ext[0], y + ext[1], x + ext[2], y + ext[3]))
            classes.append(ann.category_id)
        stack = np.stack(masks) if masks else np.zeros((0, H, W), bool)
        out.append((sample.path, img, Targets(np.asarray(boxes, np.float32).reshape(-1, 4),
                                              np.asarray(classes, np.int64), masks=stack)))
    if not out:
        raise DatasetError(f"{data}: none of the chosen images could be read")
    return dict(source.names), out
