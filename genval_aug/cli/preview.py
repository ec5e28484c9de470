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
    p.add_argument("--data", required=True, help="dataset yaml or folder (Ultralytics YOLO layout)")
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
    from genval_aug.lazy_engine import make_config
    from genval_aug.paste import PasteEngine
    from genval_aug.viz import draw_labels, make_grid

    if args.n < 1:
        raise ConfigError("--n must be at least 1")
    ds = YoloDataset(args.data)
    images = ds.images(args.split)
    if not images:
        raise DatasetError(f"{args.data}: split {args.split!r} has no images")
    bank = InstanceBank(args.bank)
    if not bank.count():
        raise ConfigError(f"{args.bank}: the bank is empty")
    class_map = None
    if not args.no_class_map and ds.names:
        class_map = class_map_from_names(ds.names, bank)
    names = dict(ds.names)
    if class_map is None:
        names.update({v: k for k, v in bank.category_ids().items() if v not in names})
    options = {k: v for k, v in (("n", args.paste_n), ("blend", args.blend), ("harmonize", args.harmonize))
               if v is not None}
    if class_map is not None:  # bank categories without a dataset class are never drawn (as in the adapters)
        options["sampler_classes"] = sorted(class_map)
    engine = PasteEngine(bank, config=make_config(None, options), class_map=class_map)

    rng = np.random.default_rng(args.seed)
    chosen = rng.choice(len(images), size=min(args.n, len(images)), replace=False)
    tiles, captions = [], []
    for idx in chosen:
        path = images[int(idx)]
        try:
            img = read_rgb(path)
        except DatasetError as e:
            logger.warning("skipping %s", e)
            continue
        h, w = img.shape[:2]
        sample = ds.read_labels(path)
        targets = sample.targets(w, h)
        res = engine(img, targets, rng, channel_order="rgb")
        t = res.targets
        if args.with_original:
            tiles.append(draw_labels(img, targets.boxes, targets.classes, polygons=targets.polygons, names=names))
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
