"""Generic readers for labeled image datasets: Ultralytics YOLO (seg and detect) layout and images.

Reused by the harvest, the preview CLI and the demo. Nothing here imports ultralytics.

* :class:`YoloDataset` resolves a dataset yaml (or a folder) to image files per split, class names
  and label files (Ultralytics' ``/images/`` -> ``/labels/`` rule).
* :func:`parse_yolo_labels` parses one label file into :class:`YoloObject` s (normalized polygons or
  boxes) and a list of :class:`LabelIssue` s (file, line, reason) for every line it had to skip.
* :func:`read_rgb` decodes an image to RGB uint8 and refuses (or converts) grayscale, 16-bit and
  CMYK files with an :class:`ImageError` whose ``reason`` is a short key.
"""
from __future__ import annotations

import io
import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

from genval_aug.errors import DatasetError

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = frozenset({".bmp", ".dng", ".jpeg", ".jpg", ".mpo", ".png", ".tif", ".tiff", ".webp", ".pfm"})
SPLITS = ("train", "val", "test")


# --------------------------------------------------------------------------------------------- issues
@dataclass(frozen=True)
class LabelIssue:
    """One skipped piece of input: ``file`` (and 1-based ``line`` when it is a label line).

    ``count`` is the number of objects lost with it (0 for file-level notes such as orphan labels).
    """

    file: str
    line: int | None
    reason: str  # short key, e.g. "odd_coordinates", "out_of_range", "unknown_class", "missing_image"
    message: str
    count: int = 1

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}" if self.line is not None else self.file
        return f"{where}: {self.message}"


class ImageError(DatasetError):
    """An image cannot be used; ``reason`` is a short key (missing_image, unreadable_image, ...)."""

    def __init__(self, path: str | os.PathLike, reason: str, message: str):
        super().__init__(f"{path}: {message}")
        self.path = str(path)
        self.reason = reason
        self.detail = message


# --------------------------------------------------------------------------------------------- images
_GRAY_MODES = {"L", "LA", "1", "La"}
_HIGH_DEPTH_MODES = {"I", "F", "I;16", "I;16B", "I;16L", "I;16N", "I;16S"}


def _png_bit_depth(data: bytes) -> int | None:
    if data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 24:
        return data[24]
    return None


def read_rgb(path: str | os.PathLike, *, convert: bool = False) -> np.ndarray:
    """Decode ``path`` to an ``(H, W, 3)`` uint8 RGB array (EXIF orientation applied, as OpenCV does).

    Grayscale, 16-bit and CMYK images raise :class:`ImageError` (reasons ``grayscale_image``,
    ``16bit_image``, ``cmyk_image``) unless ``convert=True``, which turns them into 8-bit RGB.
    Missing and undecodable files raise ``missing_image`` / ``unreadable_image``.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise ImageError(path, "missing_image", "image file not found") from None
    except OSError as e:
        raise ImageError(path, "unreadable_image", f"cannot read file ({e.strerror or e})") from None
    if not data:
        raise ImageError(path, "unreadable_image", "empty file")
    mode = None
    try:
        from PIL import Image

        with Image.open(io.BytesIO(data)) as im:  # header only
            mode = im.mode
    except Exception:  # noqa: BLE001 - PIL cannot parse every format OpenCV can; decide below
        mode = None
    depth = _png_bit_depth(data)
    problem = None
    if mode == "CMYK":
        problem = ("cmyk_image", "CMYK image")
    elif (depth is not None and depth > 8) or mode in _HIGH_DEPTH_MODES:
        problem = ("16bit_image", f"high bit-depth image (mode {mode}, {depth or '?'} bits)")
    elif mode in _GRAY_MODES:
        problem = ("grayscale_image", f"grayscale image (mode {mode})")
    if problem is not None and not convert:
        raise ImageError(path, *problem)
    try:
        return _decode_rgb(data, mode)
    except ImageError as e:
        raise ImageError(path, e.reason, e.detail) from None
    except Exception as e:  # noqa: BLE001 - truncated files and codec errors take many forms
        raise ImageError(path, "unreadable_image", f"cannot decode ({type(e).__name__}: {e})") from None


def _decode_rgb(data: bytes, mode: str | None) -> np.ndarray:
    if mode == "CMYK":
        from PIL import Image, ImageOps

        with Image.open(io.BytesIO(data)) as im:
            return np.asarray(ImageOps.exif_transpose(im).convert("RGB")).copy()
    buf = np.frombuffer(data, np.uint8)
    bgr = cv2.imdecode(buf, cv2.IMREAD_COLOR)  # 8-bit, 3 channels (gray replicated, 16-bit scaled)
    if bgr is None:
        if mode is not None:  # PIL can read it (e.g. a format without an OpenCV codec)
            from PIL import Image

            with Image.open(io.BytesIO(data)) as im:
                return np.asarray(im.convert("RGB")).copy()
        raise ImageError("image", "unreadable_image", "not a decodable image")
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


# --------------------------------------------------------------------------------------------- labels
@dataclass
class YoloObject:
    """One label line. Exactly one of ``polygon`` ((K, 2) normalized x, y) or ``box`` (cx, cy, w, h) is set."""

    cls: int
    line: int  # 1-based line number in the label file
    polygon: np.ndarray | None = None
    box: np.ndarray | None = None

    def polygon_pixels(self, width: int, height: int) -> np.ndarray | None:
        if self.polygon is None:
            return None
        return (self.polygon * np.array([width, height], np.float64)).astype(np.float64)

    def box_xyxy(self, width: int, height: int) -> np.ndarray:
        """Box in pixels (x1, y1, x2, y2); for a polygon line, the polygon's bounding box."""
        if self.box is not None:
            cx, cy, w, h = self.box.astype(np.float64)
            b = np.array([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2])
        else:
            p = self.polygon
            b = np.array([p[:, 0].min(), p[:, 1].min(), p[:, 0].max(), p[:, 1].max()], np.float64)
        return b * np.array([width, height, width, height], np.float64)


def _polygon_area(p: np.ndarray) -> float:
    x, y = p[:, 0], p[:, 1]
    return 0.5 * abs(float(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))))


def parse_yolo_labels(
    path: str | os.PathLike,
    *,
    num_classes: int | None = None,
    valid_classes: Sequence[int] | None = None,
    tolerance: float = 1e-6,
) -> tuple[list[YoloObject], list[LabelIssue]]:
    """Parse a YOLO label file (``class x y x y ...`` polygons or ``class cx cy w h`` boxes).

    Lines that cannot be used are skipped and returned as issues: ``bad_number``, ``bad_class``,
    ``odd_coordinates``, ``empty_polygon`` (fewer than 3 points or zero area), ``out_of_range``
    (a value outside [0, 1] by more than ``tolerance``), ``unknown_class``. A missing file is not an
    issue (an image without labels is a background image): it returns ``([], [])``.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        return [], []
    except OSError as e:
        return [], [LabelIssue(str(path), None, "unreadable_labels", f"cannot read label file ({e})", count=0)]
    valid = set(valid_classes) if valid_classes is not None else None
    objects: list[YoloObject] = []
    issues: list[LabelIssue] = []

    def bad(n: int, reason: str, msg: str) -> None:
        issues.append(LabelIssue(str(path), n, reason, msg))

    for n, raw in enumerate(text.splitlines(), start=1):
        tokens = raw.split()
        if not tokens:
            continue
        try:
            c = float(tokens[0])
        except ValueError:
            bad(n, "bad_class", f"class {tokens[0]!r} is not a number")
            continue
        if not np.isfinite(c) or c != int(c):
            bad(n, "bad_class", f"class {tokens[0]!r} is not an integer")
            continue
        cls = int(c)
        if cls < 0 or (num_classes is not None and cls >= num_classes) or (valid is not None and cls not in valid):
            bad(n, "unknown_class", f"class id {cls} is not in the dataset's names")
            continue
        vals = tokens[1:]
        if len(vals) % 2:
            bad(n, "odd_coordinates", f"odd number of coordinates ({len(vals)})")
            continue
        try:
            v = np.array(vals, dtype=np.float64)
        except ValueError:
            bad(n, "bad_number", "a coordinate is not a number")
            continue
        if not np.all(np.isfinite(v)):
            bad(n, "bad_number", "a coordinate is not finite")
            continue
        if v.size and (v.min() < -tolerance or v.max() > 1 + tolerance):
            bad(n, "out_of_range", f"coordinate outside [0, 1] (min {v.min():.4g}, max {v.max():.4g})")
            continue
        v = np.clip(v, 0.0, 1.0)
        if v.size == 4:
            if v[2] <= 0 or v[3] <= 0:
                bad(n, "empty_polygon", "box with zero width or height")
                continue
            objects.append(YoloObject(cls, n, box=v.astype(np.float32)))
            continue
        if v.size < 6:
            bad(n, "empty_polygon", f"polygon with {v.size // 2} point(s); at least 3 needed")
            continue
        poly = v.reshape(-1, 2)
        if _polygon_area(poly) <= 0:
            bad(n, "empty_polygon", "polygon with zero area")
            continue
        objects.append(YoloObject(cls, n, polygon=poly))
    return objects, issues


# --------------------------------------------------------------------------------------------- names
def load_names(path: str | os.PathLike, id_key: str | None = None) -> dict[int, str]:
    """Class names ``{id: name}`` from a names table.

    Accepts a dataset ``.yaml`` (``names:`` list or dict), ``.txt`` (one name per line, id = line
    index), ``.csv`` (columns ``id``/``name``), or ``.json``: a list of names, a ``{id: name}`` dict,
    or objects with a ``categories`` list (COCO annotations, ``coco_categories.json``,
    ``lvis_v1_categories.json``). ``id_key`` picks the id field of category objects; by default
    ``yolo_index`` when present (contiguous YOLO ids), else ``id``.
    """
    import csv
    import json

    p = Path(path)
    if not p.is_file():
        raise DatasetError(f"{p}: names file not found")
    suffix = p.suffix.lower()
    try:
        if suffix in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
            return normalize_names(data.get("names") if isinstance(data, dict) else data, p)
        if suffix == ".txt":
            return {i: s.strip() for i, s in enumerate(p.read_text(encoding="utf-8-sig").splitlines()) if s.strip()}
        if suffix == ".csv":  # utf-8-sig: tables saved by Excel start with a byte-order mark
            with p.open(newline="", encoding="utf-8-sig") as f:
                rows = list(csv.DictReader(f))
            key = id_key or ("yolo_index" if rows and "yolo_index" in rows[0] else "id")
            return {int(r[key]): r["name"] for r in rows}
        if suffix == ".json":
            data = json.loads(p.read_text(encoding="utf-8-sig"))
            if isinstance(data, dict) and "categories" in data:
                cats = data["categories"]
                key = id_key or ("yolo_index" if cats and "yolo_index" in cats[0] else "id")
                return {int(c[key]): str(c["name"]) for c in cats}
            return normalize_names(data, p)
    except (KeyError, ValueError, TypeError) as e:
        raise DatasetError(f"{p}: cannot read class names ({type(e).__name__}: {e})") from None
    raise DatasetError(f"{p}: unsupported names file type {suffix!r} (use .yaml, .txt, .csv or .json)")


def normalize_names(names, source: str | os.PathLike = "names") -> dict[int, str]:
    """``names`` as a list or dict (YOLO yaml style) -> ``{int id: str name}``."""
    if names is None:
        return {}
    if isinstance(names, (list, tuple)):
        return {i: str(n) for i, n in enumerate(names)}
    if isinstance(names, dict):
        try:
            return {int(k): str(v) for k, v in names.items()}
        except (TypeError, ValueError):
            raise DatasetError(f"{source}: 'names' keys must be integer class ids") from None
    raise DatasetError(f"{source}: 'names' must be a list or a mapping, got {type(names).__name__}")


# --------------------------------------------------------------------------------------------- dataset
def label_path_for(image: str | os.PathLike) -> Path:
    """Ultralytics' rule: the last ``/images/`` path component becomes ``/labels/``, suffix ``.txt``.

    Without an ``images`` folder in the path the label file sits next to the image.
    """
    s = str(image)
    sa, sb = f"{os.sep}images{os.sep}", f"{os.sep}labels{os.sep}"
    if sa in s:
        s = sb.join(s.rsplit(sa, 1))
    return Path(os.path.splitext(s)[0] + ".txt")


def _list_images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())


@dataclass
class YoloSample:
    """One image of a YOLO dataset with its parsed labels (normalized coordinates)."""

    image: Path
    label_file: Path
    objects: list[YoloObject]
    issues: list[LabelIssue] = field(default_factory=list)

    def targets(self, width: int, height: int):
        """The sample's objects as paste-engine ``Targets`` in pixels: polygons when every object has one,
        else boxes only (boxes clipped to the image)."""
        from genval_aug.paste import Targets

        objs = self.objects
        boxes = np.array([o.box_xyxy(width, height) for o in objs], np.float32).reshape(-1, 4)
        boxes = np.clip(boxes, 0, [width, height, width, height]).astype(np.float32)
        classes = np.array([o.cls for o in objs], np.int64)
        polys = [o.polygon_pixels(width, height) for o in objs]
        if objs and all(p is not None for p in polys):
            return Targets(boxes=boxes, classes=classes, masks=None,
                           polygons=[np.asarray(p, np.float32) for p in polys])
        return Targets(boxes=boxes, classes=classes, masks=None, polygons=None)


class YoloDataset:
    """An Ultralytics-layout dataset: ``YoloDataset("data.yaml")`` or ``YoloDataset("folder/")``.

    A yaml's ``path`` (if any) is resolved against the yaml's folder; ``train``/``val``/``test`` may be
    folders, ``.txt`` image lists (relative lines are relative to the list's folder) or lists of either. A folder may hold exactly one yaml (used), an
    ``images/`` tree (split ``train`` = all of it, or ``images/<split>`` sub-folders), or images directly.
    Names come from the yaml, a ``classes.txt`` next to it, or ``names=`` (ids are kept as given).
    """

    def __init__(self, data: str | os.PathLike, names: dict[int, str] | None = None):
        self.source = Path(data)
        if not self.source.exists():
            raise DatasetError(f"{self.source}: dataset not found")
        self.yaml_path: Path | None = None
        if self.source.is_dir():
            yamls = sorted(self.source.glob("*.yaml")) + sorted(self.source.glob("*.yml"))
            if len(yamls) == 1:
                self.yaml_path = yamls[0]
        elif self.source.suffix.lower() in (".yaml", ".yml"):
            self.yaml_path = self.source
        else:
            raise DatasetError(f"{self.source}: expected a dataset yaml or a folder")
        self._split_specs: dict[str, list[Path]] = {}
        yaml_names: dict[int, str] = {}
        if self.yaml_path is not None:
            self.root, yaml_names = self._read_yaml(self.yaml_path)
        else:
            self.root = self.source
            images = self.root / "images"
            if images.is_dir():
                subs = [s for s in SPLITS if (images / s).is_dir()]
                if subs:
                    self._split_specs = {s: [images / s] for s in subs}
                else:
                    self._split_specs = {"train": [images]}
            else:
                self._split_specs = {"train": [self.root]}
            classes_txt = self.root / "classes.txt"
            if classes_txt.is_file():
                yaml_names = load_names(classes_txt)
        self.names: dict[int, str] = dict(names) if names else yaml_names
        self.name = (self.yaml_path.stem if self.yaml_path is not None else self.root.name) or "dataset"
        self._images: dict[str, list[Path]] = {}

    def _read_yaml(self, path: Path) -> tuple[Path, dict[int, str]]:
        import yaml

        try:
            cfg = yaml.safe_load(path.read_text(encoding="utf-8"))
        except (OSError, yaml.YAMLError) as e:
            raise DatasetError(f"{path}: cannot read dataset yaml ({e})") from None
        if not isinstance(cfg, dict):
            raise DatasetError(f"{path}: dataset yaml must be a mapping")
        root = Path(cfg["path"]) if cfg.get("path") else Path(".")
        if not root.is_absolute():  # relative to the yaml's folder (Ultralytics would use its datasets_dir)
            root = (path.parent / root).resolve()
        for split in SPLITS:
            spec = cfg.get(split)
            if not spec:
                continue
            items = spec if isinstance(spec, (list, tuple)) else [spec]
            self._split_specs[split] = [Path(s) if Path(s).is_absolute() else root / s for s in map(str, items)]
        if not self._split_specs:
            raise DatasetError(f"{path}: no 'train', 'val' or 'test' entry")
        names = normalize_names(cfg.get("names"), path)
        if not names and cfg.get("nc"):
            names = {i: str(i) for i in range(int(cfg["nc"]))}
        return root, names

    @property
    def splits(self) -> list[str]:
        return list(self._split_specs)

    def images(self, split: str = "train") -> list[Path]:
        """Image files of ``split`` (``"all"``: every split, duplicates removed), sorted per source."""
        if split == "all":
            seen: dict[Path, None] = {}
            for s in self._split_specs:
                for p in self.images(s):
                    seen.setdefault(p.resolve(), None)
            return list(seen)
        if split not in self._split_specs:
            raise DatasetError(f"{self.source}: no split {split!r} (have {', '.join(self._split_specs)})")
        if split not in self._images:
            out: list[Path] = []
            for spec in self._split_specs[split]:
                if spec.is_dir():
                    out.extend(_list_images(spec))
                elif spec.suffix == ".txt" and spec.is_file():
                    for line in spec.read_text(encoding="utf-8").splitlines():
                        line = line.strip()
                        if line:
                            q = Path(line)
                            out.append(q if q.is_absolute() else (spec.parent / q).resolve())
                elif spec.suffix.lower() in IMAGE_EXTENSIONS:
                    out.append(spec)
                else:
                    raise DatasetError(f"{self.source}: split {split!r} entry {spec} does not exist")
            self._images[split] = out
        return self._images[split]

    def label_file(self, image: str | os.PathLike) -> Path:
        return label_path_for(image)

    def orphan_label_files(self, split: str = "train") -> list[Path]:
        """Label files under the split's label folders that have no image (Ultralytics ignores them)."""
        images = self.images(split)
        wanted = {self.label_file(p) for p in images}
        folders = {self.label_file(p).parent for p in images}
        return sorted(p for d in folders for p in d.glob("*.txt") if p not in wanted)

    def read_labels(self, image: str | os.PathLike) -> YoloSample:
        label = self.label_file(image)
        valid = list(self.names) if self.names else None
        objects, issues = parse_yolo_labels(label, valid_classes=valid)
        return YoloSample(Path(image), label, objects, issues)

    def __iter__(self) -> Iterator[YoloSample]:
        for split in self._split_specs:
            for img in self.images(split):
                yield self.read_labels(img)

    def class_name(self, cls: int) -> str:
        return self.names.get(cls, str(cls))

    def label_kind(self, split: str = "train", sample: int = 50) -> str:
        """``"segment"`` if any of the first ``sample`` label files has a polygon line, else ``"detect"``."""
        for img in self.images(split)[:sample]:
            objs, _ = parse_yolo_labels(self.label_file(img))
            if any(o.polygon is not None for o in objs):
                return "segment"
        return "detect"

    def __repr__(self) -> str:
        return f"YoloDataset({str(self.source)!r}, splits={self.splits}, classes={len(self.names)})"
