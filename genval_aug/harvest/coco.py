"""COCO instances json (polygons and RLE, decoded with pycocotools) as a harvest source.

``iscrowd`` annotations are skipped and counted (``iscrowd``). LVIS json uses the same layout (its images
carry ``coco_url`` instead of ``file_name``: the last two URL parts, ``<split>/<file>``, are used).
"""
from __future__ import annotations

import json
import os
import warnings
from collections import Counter, defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from genval_aug.datasets import LabelIssue
from genval_aug.errors import ConfigError, DatasetError
from genval_aug.harvest.core import Annotation, SourceImage


def _mask_utils():
    try:
        from pycocotools import mask as mask_utils
    except ImportError:  # pragma: no cover - dependency of the [coco] extra
        raise ConfigError("COCO harvesting needs pycocotools: pip install 'genval-aug[coco]'") from None
    return mask_utils


class CocoSource:
    """Images and instance annotations of a COCO json.

    Image files are looked up as ``images_dir / file_name``; without ``images_dir`` the json's folder,
    its parent, ``images/`` beside either, and ``<parent>/<split>`` (for ``instances_<split>.json``) are
    tried in that order, the first folder holding the first image wins.
    """

    format = "coco"

    def __init__(self, path: str | os.PathLike, *, images_dir: str | os.PathLike | None = None,
                 names: dict[int, str] | None = None, bounds_tolerance: float = 1.0):
        self.path = Path(path)
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise DatasetError(f"{self.path}: COCO json not found") from None
        except (OSError, ValueError) as e:
            raise DatasetError(f"{self.path}: not a readable COCO json ({e})") from None
        if not isinstance(data, dict) or not isinstance(data.get("annotations"), list) \
                or not isinstance(data.get("images"), list):
            raise DatasetError(f"{self.path}: COCO json needs 'images' and 'annotations' lists")
        cats = data.get("categories") or []
        self.names: dict[int, str] = dict(names) if names else {int(c["id"]): str(c["name"]) for c in cats}
        self.name = self.path.stem if self.path.stem not in ("annotations", "instances") else self.path.parent.name
        self.tol = float(bounds_tolerance)
        self._images: list[dict[str, Any]] = []
        self._bad_images: list[LabelIssue] = []
        for i, im in enumerate(data["images"]):
            try:
                if "file_name" not in im and "coco_url" in im:  # LVIS: <split>/<file> at the end of the URL
                    im = {**im, "file_name": "/".join(str(im["coco_url"]).split("/")[-2:])}
                self._images.append({"id": im["id"], "file_name": str(im["file_name"]),
                                     "width": int(im["width"]), "height": int(im["height"])})
            except (KeyError, TypeError, ValueError) as e:
                self._bad_images.append(LabelIssue(str(self.path), None, "bad_image_entry",
                                                   f"images[{i}]: field {e} missing or invalid", count=0))
        by_id = {im["id"]: im for im in self._images}
        self._anns: dict[Any, list[dict[str, Any]]] = defaultdict(list)
        self._orphans = 0
        for a in data["annotations"]:
            if isinstance(a, dict) and a.get("image_id") in by_id:
                self._anns[a["image_id"]].append(a)
            else:
                self._orphans += 1
        self.images_dir = Path(images_dir) if images_dir is not None else self._find_images_dir()

    def _find_images_dir(self) -> Path:
        parent = self.path.parent
        cands = [parent, parent.parent, parent / "images", parent.parent / "images"]
        stem = self.path.stem
        if "_" in stem:
            split = stem.split("_", 1)[1]
            cands += [parent.parent / split, parent.parent / "images" / split]
        first = next((im["file_name"] for im in self._images), None)
        if first is not None:
            for c in cands:
                if (c / first).is_file():
                    return c
        return parent

    def __len__(self) -> int:
        return len(self._images)

    def file_issues(self) -> list[LabelIssue]:
        out = list(self._bad_images)
        if self._orphans:
            out.append(LabelIssue(str(self.path), None, "unknown_image",
                                  f"{self._orphans} annotation(s) refer to no image entry", count=0))
        return out

    def _annotation(self, a: dict[str, Any], w: int, h: int, mu) -> Annotation | LabelIssue:
        aid = a.get("id")
        where = f"annotation id {aid}"

        def bad(reason: str, msg: str) -> LabelIssue:
            return LabelIssue(str(self.path), None, reason, f"{where}: {msg}")

        try:
            cid = int(a["category_id"])
        except (KeyError, TypeError, ValueError):
            return bad("bad_class", "category_id missing or not an integer")
        if cid not in self.names:
            return bad("unknown_class", f"category_id {cid} is not in the categories")
        seg = a.get("segmentation")
        if isinstance(seg, list):
            polys = []
            for part in seg:
                if not isinstance(part, (list, tuple)) or len(part) == 0:
                    continue
                if len(part) % 2:
                    return bad("odd_coordinates", f"polygon with an odd number of coordinates ({len(part)})")
                p = np.asarray(part, np.float64).reshape(-1, 2)
                if not np.all(np.isfinite(p)):
                    return bad("bad_number", "polygon coordinate is not finite")
                if p.min() < -self.tol or p[:, 0].max() > w + self.tol or p[:, 1].max() > h + self.tol:
                    return bad("out_of_range", f"polygon outside the {w}x{h} image")
                if len(p) >= 3:
                    polys.append(np.clip(p, 0, [w, h]).ravel().tolist())
            if not polys:
                return bad("empty_polygon", "no polygon with at least 3 points")
            rle = mu.merge(mu.frPyObjects(polys, h, w))
        elif isinstance(seg, dict) and "counts" in seg and "size" in seg:
            if list(seg["size"]) != [h, w]:
                return bad("size_mismatch", f"RLE size {seg['size']} != image size [{h}, {w}]")
            rle = mu.frPyObjects(seg, h, w) if isinstance(seg["counts"], list) else seg
        else:
            return bad("empty_polygon", "no segmentation (polygons or RLE)")
        try:
            with warnings.catch_warnings():  # pycocotools' numpy-2 copy= deprecation, not ours
                warnings.simplefilter("ignore", DeprecationWarning)
                m = mu.decode(rle)
        except Exception as e:  # noqa: BLE001 - malformed RLE strings raise various errors
            return bad("bad_rle", f"RLE does not decode ({e})")
        return Annotation(cid, self.names[cid], {"annotation": aid}, mask=m.view(bool) if m.dtype == np.uint8 else m)

    def __iter__(self) -> Iterator[SourceImage]:
        mu = _mask_utils()
        for im in self._images:
            anns, issues, skipped = [], [], Counter()
            w, h = im["width"], im["height"]
            for a in self._anns.get(im["id"], []):
                if a.get("iscrowd"):
                    skipped["iscrowd"] += 1
                    continue
                try:
                    r = self._annotation(a, w, h, mu)
                except (TypeError, ValueError, KeyError, AttributeError) as e:  # malformed fields: skip, count
                    r = LabelIssue(str(self.path), None, "bad_annotation",
                                   f"annotation id {a.get('id')}: {type(e).__name__}: {e}")
                (issues if isinstance(r, LabelIssue) else anns).append(r)
            path = self.images_dir / im["file_name"]
            yield SourceImage(path, im["file_name"], anns, issues, info={"image_id": im["id"]},
                              skipped=skipped, expected_size=(w, h))
