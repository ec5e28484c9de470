"""Harvest on real data: coco128-seg (YOLO polygons), labelme VOC/COCO exports, a box-only copy, bad input."""
from __future__ import annotations

import json
import shutil
from collections import Counter
from pathlib import Path

import cv2
import numpy as np
import pytest

from genval_aug.bank import InstanceBank
from genval_aug.bank.record import content_id
from genval_aug.harvest import HarvestConfig, detect_format, harvest
from genval_aug.harvest.masks import rasterize_polygon
from genval_aug.quality import QualityRules

PERMISSIVE = HarvestConfig(rules=QualityRules(min_area=None, min_side=None, coverage=None, min_largest_fraction=None,
                                              max_aspect=None), reject_truncated=False)


def _label_lines(coco128: Path) -> dict[str, list[str]]:
    """Independent count: non-empty label lines of every image that exists."""
    out = {}
    for img in sorted((coco128 / "images" / "train2017").glob("*.jpg")):
        lab = coco128 / "labels" / "train2017" / (img.stem + ".txt")
        out[img.name] = [ln for ln in lab.read_text().splitlines() if ln.strip()] if lab.is_file() else []
    return out


def _inside_centres(poly: np.ndarray, crop: list[int]) -> np.ndarray:
    """Pixels of the crop whose centre lies in the polygon: a plain crossing-number test per point
    (independent of the scanline rasterizer under test)."""
    x, y, w, h = crop
    py, px = np.mgrid[0:h, 0:w].astype(np.float64)
    px, py = px + x + 0.5, py + y + 0.5
    inside = np.zeros((h, w), bool)
    for (x1, y1), (x2, y2) in zip(poly, np.roll(poly, -1, axis=0), strict=True):
        crosses = (y1 > py) != (y2 > py)
        with np.errstate(divide="ignore", invalid="ignore"):
            xint = x1 + (py - y1) * (x2 - x1) / (y2 - y1)
        inside ^= crosses & (px < xint)
    return inside


@pytest.fixture(scope="module")
def coco128_bank(coco128_seg, tmp_path_factory):
    out = tmp_path_factory.mktemp("harvest") / "coco128.lmdb"
    report = harvest(coco128_seg / "coco128-seg.yaml", out)
    return report, InstanceBank(out)


def test_coco128_counts_add_up(coco128_seg, coco128_bank):
    report, bank = coco128_bank
    lines = _label_lines(coco128_seg)
    assert report.annotations == sum(map(len, lines.values())) == 929
    assert report.images == 128
    # the only bad input in coco128 is the grayscale image and the two orphan label files
    gray = len(lines["000000000086.jpg"])
    assert dict(report.bad_input) == {"grayscale_image": gray}
    assert dict(report.file_issues) == {"orphan_label_file": 2}
    rejected = sum(report.rejected.values())
    assert rejected > 0 and set(report.rejected) <= {"too_small", "truncated", "fragmented", "coverage", "aspect",
                                                     "empty_alpha"}
    assert bank.count() == report.kept == report.annotations - rejected - gray - report.duplicates
    # rejections and the report are persisted in the bank
    stats = bank.stats(refresh=True)
    for reason, n in report.rejected.items():
        assert stats["rejections"][reason] == n
    assert stats["rejections"]["grayscale_image"] == gray
    assert bank.get_status("harvest/coco128-seg")["kept"] == report.kept
    assert stats["sources"] == {"harvest": report.kept}


def test_coco128_alpha_matches_source_polygons(coco128_seg, coco128_bank):
    _, bank = coco128_bank
    ious = []
    for rid in bank.ids():
        inst = bank.get(rid)
        src = inst.meta["source"]
        img = cv2.cvtColor(cv2.imread(str(coco128_seg / src["image"])), cv2.COLOR_BGR2RGB)
        H, W = img.shape[:2]
        assert src["image_size"] == [W, H]
        line = (coco128_seg / src["labels"]).read_text().splitlines()[src["line"] - 1].split()
        assert int(line[0]) == inst.category_id
        assert bank.category_ids()[inst.category] == int(line[0])
        poly = np.array(line[1:], np.float64).reshape(-1, 2) * [W, H]
        x, y, w, h = src["crop"]
        assert inst.rgba.shape[:2] == (h, w)
        expected = _inside_centres(poly, src["crop"])
        got = inst.mask
        iou = (expected & got).sum() / (expected | got).sum()
        ious.append(iou)
        assert iou >= 0.98, f"{src['image']} line {src['line']}: IoU {iou:.3f}"
        # colour under the mask is the source image's (the crop sits where provenance says)
        assert np.array_equal(inst.rgba[..., :3][got], img[y:y + h, x:x + w][got])
        assert inst.id == content_id(inst.category, inst.rgba)  # canonical pixels, BankWriter's id
    assert len(ious) == bank.count() > 300


def test_coco128_size_priors(coco128_seg, coco128_bank):
    report, bank = coco128_bank
    lines = _label_lines(coco128_seg)
    persons = sum(1 for name, ls in lines.items() if name != "000000000086.jpg" for ln in ls if ln.split()[0] == "0")
    prior = bank.size_prior("person")
    assert prior["n"] == persons
    assert 0 < prior["rel_sqrt_area_mean"] < 1 and prior["rel_sqrt_area_std"] > 0
    assert 0.2 < prior["aspect_mean"] < 1.5  # people are taller than wide
    # every class with an annotation in an RGB image has a prior, including fully rejected ones
    assert set(report.size_priors) >= set(bank.categories())


def test_soft_edges_and_class_filter(coco128_seg, tmp_path):
    cfg = HarvestConfig(soft_edges=True, classes=["dog", "cat", 23])  # names or ids (23 = giraffe)
    rep = harvest(coco128_seg / "coco128-seg.yaml", tmp_path / "b.lmdb", config=cfg)
    bank = InstanceBank(tmp_path / "b.lmdb")
    assert set(bank.categories()) <= {"dog", "cat", "giraffe"} and bank.count() == rep.kept > 5
    lines = _label_lines(coco128_seg)
    n_wanted = sum(1 for ls in lines.values() for ln in ls if ln.split()[0] in ("15", "16", "23"))
    assert rep.skipped["class_filter"] == rep.annotations - n_wanted - sum(rep.bad_input.values())
    soft = 0
    for rid in bank.ids():
        inst = bank.get(rid)
        soft += int(((inst.alpha > 0) & (inst.alpha < 255)).sum() > 0)
        src = inst.meta["source"]
        W, H = src["image_size"]
        line = (coco128_seg / src["labels"]).read_text().splitlines()[src["line"] - 1].split()
        poly = np.array(line[1:], np.float64).reshape(-1, 2) * [W, H]
        expected = _inside_centres(poly, src["crop"])
        iou = (expected & inst.mask).sum() / (expected | inst.mask).sum()
        assert iou >= 0.97
    assert soft == bank.count()


def test_size_priors_pool_exactly():
    from genval_aug.harvest.core import _SizeStats, update_prior

    rng = np.random.default_rng(1)
    rows = [(int(a), int(w), int(h)) for a, w, h in rng.integers(50, 5000, size=(40, 3))]
    whole, first, second = _SizeStats(), _SizeStats(), _SizeStats()
    for i, (a, w, h) in enumerate(rows):
        whole.add("x", a, w, h, 640, 480)
        (first if i < 15 else second).add("x", a, w, h, 640, 480)
    pooled = update_prior(first.priors()["x"], second.priors()["x"])
    for k, v in whole.priors()["x"].items():
        assert pooled[k] == pytest.approx(v)
    # replacing a dataset's earlier contribution by its new one leaves the other datasets' share intact
    again = update_prior(pooled, second.priors()["x"], replaced=second.priors()["x"])
    for k, v in pooled.items():
        assert again[k] == pytest.approx(v)


def test_rasterizer_matches_point_in_polygon():
    rng = np.random.default_rng(0)
    for _ in range(30):
        k = rng.integers(3, 12)
        poly = rng.uniform(-5, 45, size=(k, 2))  # random, often self-intersecting, partly outside
        got = rasterize_polygon(poly, (40, 40)) > 0
        assert np.array_equal(got, _inside_centres(poly, [0, 0, 40, 40]))
    square = np.array([[2.0, 2.0], [12.0, 2.0], [12.0, 7.0], [2.0, 7.0]])
    soft = rasterize_polygon(square + 0.25, (12, 16), supersample=4)
    assert abs(soft.sum() / 255.0 - 50.0) < 0.5  # coverage alpha integrates to the area


def test_coco_json_and_voc_pngs_agree(shared_data, tmp_path):
    root = shared_data / "labelme_voc_examples"
    assert detect_format(root / "data_dataset_coco" / "annotations.json") == "coco"
    assert detect_format(root / "data_dataset_voc") == "voc"
    rc = harvest(root / "data_dataset_coco" / "annotations.json", tmp_path / "c.lmdb", config=PERMISSIVE)
    rv = harvest(root / "data_dataset_voc", tmp_path / "v.lmdb", config=PERMISSIVE)
    assert rc.kept == rv.kept == 12 and rc.annotations == rv.annotations == 12
    bc, bv = InstanceBank(tmp_path / "c.lmdb"), InstanceBank(tmp_path / "v.lmdb")
    assert bc.categories() == bv.categories() == {"person": 6, "bottle": 1, "chair": 1, "sofa": 1, "bus": 2, "car": 1}

    def full_masks(bank):
        out = []
        for rid in bank.ids():
            inst = bank.get(rid)
            s = inst.meta["source"]
            W, H = s["image_size"]
            x, y, w, h = s["crop"]
            m = np.zeros((H, W), bool)
            m[y:y + h, x:x + w] = inst.mask
            out.append((Path(s["image"]).name, inst.category, m))
        return out

    voc = full_masks(bv)
    ious = []
    for img, cat, m in full_masks(bc):
        best = max(((m & v).sum() / (m | v).sum(), c) for i, c, v in voc if i == img)
        assert best[1] == cat and best[0] >= 0.9, (img, cat, best)
        ious.append(best[0])
    assert np.mean(ious) >= 0.96


def test_coco_rle_and_iscrowd(shared_data, tmp_path):
    from pycocotools import mask as mask_utils

    root = shared_data / "labelme_voc_examples" / "data_dataset_coco"
    data = json.loads((root / "annotations.json").read_text())
    img = {i["id"]: i for i in data["images"]}
    a0 = data["annotations"][0]
    h, w = img[a0["image_id"]]["height"], img[a0["image_id"]]["width"]
    rle = mask_utils.merge(mask_utils.frPyObjects(a0["segmentation"], h, w))
    rle["counts"] = rle["counts"].decode()
    data["annotations"].append({**a0, "id": 100, "segmentation": rle})  # same object, as compressed RLE
    data["annotations"].append({**data["annotations"][1], "id": 101, "iscrowd": 1})
    data["annotations"].append({**data["annotations"][2], "id": 102, "category_id": 99})
    data["annotations"].append({**data["annotations"][2], "id": 103, "segmentation": [[1, 2, 3]]})
    (tmp_path / "JPEGImages").symlink_to(root / "JPEGImages")
    (tmp_path / "ann.json").write_text(json.dumps(data))
    rep = harvest(tmp_path / "ann.json", tmp_path / "b.lmdb", config=PERMISSIVE)
    assert rep.annotations == 16
    assert rep.skipped == Counter({"iscrowd": 1})
    assert rep.bad_input == Counter({"unknown_class": 1, "odd_coordinates": 1})
    assert rep.duplicates == 1 and rep.kept == 12  # the RLE copy decodes to the very same crop
    assert any("annotation id 102" in str(i) and "ann.json" in str(i) for i in rep.issues)
    # LVIS-style image entries (coco_url, no file_name) resolve to <split>/<file>
    for im in data["images"]:
        im["coco_url"] = "http://images.example.org/" + im.pop("file_name")
    (tmp_path / "lvis.json").write_text(json.dumps(data))
    lvis = harvest(tmp_path / "lvis.json", tmp_path / "l.lmdb", config=PERMISSIVE)
    assert lvis.kept == 12 and not lvis.bad_input.get("missing_image")


def _detection_copy(coco128: Path, dst: Path, n: int) -> Path:
    """coco128-seg with polygons replaced by their boxes (class cx cy w h), first n label files."""
    from genval_aug.datasets import parse_yolo_labels

    (dst / "labels" / "train2017").mkdir(parents=True)
    (dst / "images" / "train2017").mkdir(parents=True)
    for lab in sorted((coco128 / "labels" / "train2017").glob("*.txt"))[:n]:
        img = coco128 / "images" / "train2017" / (lab.stem + ".jpg")
        if not img.is_file():
            continue
        (dst / "images" / "train2017" / img.name).symlink_to(img)
        objs, _ = parse_yolo_labels(lab)
        rows = []
        for o in objs:
            x1, y1, x2, y2 = o.box_xyxy(1, 1)
            rows.append(f"{o.cls} {(x1 + x2) / 2:.6f} {(y1 + y2) / 2:.6f} {x2 - x1:.6f} {y2 - y1:.6f}")
        (dst / "labels" / "train2017" / lab.name).write_text("\n".join(rows) + "\n")
    shutil.copy(coco128 / "coco128-seg.yaml", dst / "det.yaml")
    return dst / "det.yaml"


def test_box_only_grabcut(coco128_seg, tmp_path):
    yaml_path = _detection_copy(coco128_seg, tmp_path / "det", 16)
    assert detect_format(yaml_path) == "yolo-det"
    rep = harvest(yaml_path, tmp_path / "b.lmdb")
    bank = InstanceBank(tmp_path / "b.lmdb")
    assert rep.format == "yolo-det" and bank.count() == rep.kept >= 10
    assert bank.stats()["sources"] == {"harvest-grabcut": rep.kept}
    ious = []
    for rid in bank.ids():
        inst = bank.get(rid)
        s = inst.meta["source"]
        assert s["kind"] == "harvest-grabcut"
        W, H = s["image_size"]
        poly_line = (coco128_seg / "labels" / "train2017" / Path(s["labels"]).name).read_text().splitlines()[s["line"] - 1]
        box_line = (tmp_path / "det" / s["labels"]).read_text().splitlines()[s["line"] - 1].split()
        cx, cy, bw, bh = (float(v) for v in box_line[1:])
        x, y, w, h = s["crop"]
        mx, my, mw, mh = s["bbox"]  # mask bbox lies inside the box
        assert (cx - bw / 2) * W - 1 <= mx and mx + mw <= (cx + bw / 2) * W + 1
        assert (cy - bh / 2) * H - 1 <= my and my + mh <= (cy + bh / 2) * H + 1
        poly = np.array(poly_line.split()[1:], np.float64).reshape(-1, 2) * [W, H]
        truth = _inside_centres(poly, [x, y, w, h])
        ious.append((truth & inst.mask).sum() / (truth | inst.mask).sum())
    assert np.mean(ious) >= 0.5  # GrabCut is a guess, but a useful one


def _write_bad_dataset(coco128: Path, root: Path) -> Path:
    from PIL import Image

    imgs, labs = root / "images" / "train", root / "labels" / "train"
    imgs.mkdir(parents=True)
    labs.mkdir(parents=True)
    good_src = coco128 / "images" / "train2017" / "000000000009.jpg"
    good_lab = (coco128 / "labels" / "train2017" / "000000000009.txt").read_text().splitlines()
    shutil.copy(good_src, imgs / "good.jpg")
    bad_lines = [
        good_lab[0],
        "45 0.1 0.2 0.3",  # 2: odd coordinate count
        "45 0.1 0.2 1.5 0.4 0.3 0.9",  # 3: out of range
        "99 0.1 0.2 0.5 0.4 0.3 0.9",  # 4: unknown class
        "45 0.1 0.2",  # 5: one point
        "",  # blank lines are fine
        "cat 0.1 0.2 0.5 0.4 0.3 0.9",  # 7: class not a number
        "45 0.1 0.2 0.5 nan 0.3 0.9",  # 8: not finite
        "45 0.1 0.1 0.2 0.2 0.3 0.3",  # 9: zero-area polygon
        good_lab[2],
        "45 0.5 0.5 0.2 0.2",  # 11: a box line in a segmentation dataset: skipped by option
    ]
    (labs / "good.txt").write_text("\n".join(bad_lines) + "\n")
    rgb = np.asarray(Image.open(good_src))
    Image.fromarray(rgb).convert("L").save(imgs / "gray.png")
    Image.fromarray(rgb).convert("CMYK").save(imgs / "cmyk.jpg")
    cv2.imwrite(str(imgs / "deep.png"), (rgb[..., ::-1].astype(np.uint16) * 257))
    (imgs / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 definitely not a jpeg")
    for stem in ("gray", "cmyk", "deep", "broken"):
        (labs / f"{stem}.txt").write_text("\n".join(good_lab[:2]) + "\n")
    (labs / "orphan.txt").write_text(good_lab[0] + "\n")
    listing = root / "train.txt"
    listing.write_text("\n".join(f"images/train/{n}" for n in
                                 ["good.jpg", "gray.png", "cmyk.jpg", "deep.png", "broken.jpg", "missing.jpg"]))
    (labs / "missing.txt").write_text(good_lab[0] + "\n")
    names = {i: str(i) for i in range(80)}
    (root / "bad.yaml").write_text(json.dumps({"train": "train.txt", "names": names}))
    return root / "bad.yaml"


def test_bad_input_is_reported_counted_and_skipped(coco128_seg, tmp_path):
    yaml_path = _write_bad_dataset(coco128_seg, tmp_path / "bad")
    rep = harvest(yaml_path, tmp_path / "b.lmdb", config=PERMISSIVE)
    assert rep.bad_input == Counter({
        "odd_coordinates": 1, "out_of_range": 1, "unknown_class": 1, "empty_polygon": 2, "bad_class": 1,
        "bad_number": 1, "grayscale_image": 2, "cmyk_image": 2, "16bit_image": 2, "unreadable_image": 2,
        "missing_image": 1,
    })
    assert rep.kept == 2 and InstanceBank(tmp_path / "b.lmdb").count() == 2
    assert rep.skipped == Counter({"box_line": 1})
    assert rep.file_issues == Counter({"orphan_label_file": 1})
    where = {str(i) for i in rep.issues}
    lab = tmp_path / "bad" / "labels" / "train" / "good.txt"
    for line in (2, 3, 4, 5, 7, 8, 9):
        assert any(w.startswith(f"{lab}:{line}:") for w in where), line
    for name in ("gray.png", "cmyk.jpg", "deep.png", "broken.jpg", "missing.jpg"):
        assert any(name in w for w in where), name
    rep.check()
    # the same images, converted instead of skipped
    conv = harvest(yaml_path, tmp_path / "c.lmdb", config=HarvestConfig(**{**PERMISSIVE.__dict__, "convert_images": True}))
    assert set(conv.bad_input) == set(rep.bad_input) - {"grayscale_image", "cmyk_image", "16bit_image"}
    assert conv.kept + conv.duplicates == 2 + 3 * 2


def test_malformed_coco_fields_are_skipped(shared_data, tmp_path):
    root = shared_data / "labelme_voc_examples" / "data_dataset_coco"
    data = json.loads((root / "annotations.json").read_text())
    data["annotations"][0]["segmentation"] = [["a", "b", "c", "d", "e", "f"]]
    data["annotations"][1]["segmentation"] = {"size": [338, 500], "counts": 17}
    data["images"][2]["file_name"] = "JPEGImages/truncated.jpg"
    (tmp_path / "JPEGImages").mkdir()
    for p in (root / "JPEGImages").iterdir():
        (tmp_path / "JPEGImages" / p.name).symlink_to(p)
    good = (root / "JPEGImages" / "2011_000006.jpg").read_bytes()
    (tmp_path / "JPEGImages" / "truncated.jpg").write_bytes(good[: len(good) // 3])
    (tmp_path / "ann.json").write_text(json.dumps(data))
    rep = harvest(tmp_path / "ann.json", tmp_path / "b.lmdb", config=PERMISSIVE)
    rep.check()
    assert rep.bad_input["bad_annotation"] == 1 and rep.bad_input["bad_rle"] == 1
    # a truncated JPEG either decodes partially (libjpeg pads it) or is reported: never a crash
    assert rep.kept + sum(rep.bad_input.values()) == 12


def test_workers_give_the_same_bank(coco128_seg, tmp_path):
    cfg = dict(max_images=24, store_rejected=True)
    one = harvest(coco128_seg / "coco128-seg.yaml", tmp_path / "a.lmdb", config=HarvestConfig(**cfg))
    two = harvest(coco128_seg / "coco128-seg.yaml", tmp_path / "b.lmdb", config=HarvestConfig(**cfg, workers=2))
    a, b = InstanceBank(tmp_path / "a.lmdb"), InstanceBank(tmp_path / "b.lmdb")
    assert sorted(a.ids()) == sorted(b.ids()) and a.count() == one.kept > 10
    for name in ("annotations", "kept", "duplicates", "rejected", "bad_input", "skipped", "size_priors"):
        assert getattr(one, name) == getattr(two, name), name
    assert a.stats()["rejected"] == b.stats()["rejected"] == sum(one.rejected.values())
