"""Unit behaviour of the paste kernels: augment, placement, blend, harmonize, label helpers."""
from __future__ import annotations

import cv2
import numpy as np
import pytest
from label_checks import rasterize

from genval_aug.paste import augment as A
from genval_aug.paste.blend import blend_patch, composite_alpha, feather_alpha, poisson_clone
from genval_aug.paste.harmonize import (
    context_window,
    harmonize_linear_ot,
    harmonize_matrix,
    harmonize_reinhard,
    linear_ot_matrix,
    sample_pixels,
)
from genval_aug.paste.labels import mask_to_polygon, polygon_boxes, rasterize_polygon
from genval_aug.paste.placement import box_ioa, place


def _blob(h=80, w=60, fill=255) -> np.ndarray:
    a = np.zeros((h, w), np.uint8)
    cv2.ellipse(a, (w // 2, h // 2), (w // 2 - 4, h // 2 - 4), 0, 0, 360, fill, -1)
    return a


def _textured(h, w, seed=0, mean=(120, 120, 120), spread=40) -> np.ndarray:
    rng = np.random.default_rng(seed)
    noise = cv2.GaussianBlur(rng.normal(0, spread, (h, w, 3)).astype(np.float32), (0, 0), 2)
    return np.clip(noise + np.array(mean, np.float32), 0, 255).astype(np.uint8)


# ------------------------------------------------------------------------------------------------ augment


def test_crop_to_alpha_and_target_size():
    rgba = np.zeros((200, 300, 4), np.uint8)
    rgba[50:150, 100:160, 3] = 255
    rgba[50:150, 98:100, 3] = 60  # soft fringe, not label
    crop, area = A.crop_to_alpha(rgba)
    assert crop.shape[:2] == (100, 62) and area == 100 * 60
    h, w = A.target_size(crop.shape[:2], area, (640, 640), 0.2, 1.0)
    # label area scales to (0.2 * 640)^2
    assert (h * w) * (area / (crop.shape[0] * crop.shape[1])) == pytest.approx((0.2 * 640) ** 2, rel=0.03)
    # never larger than the image, never below min_side
    assert A.target_size(crop.shape[:2], area, (100, 100), 5.0, 1.0)[0] <= 100
    assert min(A.target_size(crop.shape[:2], area, (640, 640), 1e-4, 1.0, min_side=8)) >= 8


def test_crop_from_meta_matches_scan():
    rgba = np.zeros((120, 90, 4), np.uint8)
    rgba[30:70, 20:50, 3] = 255
    meta = {"width": 90, "height": 120, "mask": {"area": 1200, "bbox": [20, 30, 30, 40]}}
    crop, area = A.crop_from_meta(rgba, meta, pad=4)
    assert area == 1200 and crop.shape[:2] == (48, 38)
    assert A.crop_from_meta(rgba, {"width": 91, "height": 120, "mask": meta["mask"]}) is None  # stale
    assert A.crop_from_meta(rgba, {}) is None


def test_resize_rgba_keeps_scale_and_is_antialiased():
    rgba = np.zeros((403, 301, 4), np.uint8)
    rgba[::2, :, :3] = 255  # 1-px stripes alias badly without a box filter
    rgba[..., 3] = 255
    out = A.resize_rgba(rgba, (40, 30))
    assert abs(out.shape[0] - 40) <= 1 and abs(out.shape[1] - 30) <= 1
    inner = out[2:-2, 2:-2, 0].astype(int)
    assert abs(inner.mean() - 127) < 20 and inner.std() < 20


def test_sample_relative_size_prior_and_range():
    rng = np.random.default_rng(0)
    prior = {"rel_sqrt_area_mean": 0.15, "rel_sqrt_area_std": 0.02}
    r = [A.sample_relative_size(rng, prior, (0.01, 1.0)) for _ in range(500)]
    assert np.mean(r) == pytest.approx(0.15, abs=0.01) and min(r) >= 0.15 - 2 * 0.02 - 1e-9
    r = [A.sample_relative_size(rng, None, (0.1, 0.4)) for _ in range(500)]
    assert min(r) >= 0.1 and max(r) <= 0.4
    # prior bounded by scale_range
    assert A.sample_relative_size(rng, {"rel_sqrt_area_mean": 0.9, "rel_sqrt_area_std": 0}, (0.1, 0.4)) == 0.4


def test_colour_matrix_identity_and_grey_preserved():
    rng = np.random.default_rng(1)
    m = A.colour_matrix(rng, 0, 0, 0, 0, 100.0)
    np.testing.assert_allclose(m, np.eye(3, 4), atol=1e-12)
    m = A.colour_matrix(rng, 0, 0, 0.5, 0.3, 100.0)  # saturation + hue keep greys grey
    grey = m[:, :3] @ np.array([90.0, 90.0, 90.0]) + m[:, 3]
    np.testing.assert_allclose(grey, 90.0, atol=1e-9)


def test_colour_jitter_in_bgr_is_channel_swap():
    rng = np.random.default_rng(2)
    rgba = np.dstack([rng.integers(0, 255, (20, 30, 3), np.uint8), np.full((20, 30), 255, np.uint8)])
    m = A.colour_matrix(rng, 0.2, 0.2, 0.2, 0.05, A.mean_luma(rgba))
    rgb = cv2.transform(A.split_patch(rgba, bgr=False).rgb, m)
    bgr = cv2.transform(A.split_patch(rgba, bgr=True).rgb, A.to_channel_order(m, True))
    np.testing.assert_array_equal(rgb, bgr[..., ::-1])
    np.testing.assert_array_equal(A.split_patch(rgba, bgr=True).rgb, rgba[..., 2::-1])


def test_rotation_grows_canvas_and_keeps_area():
    rgba = np.zeros((40, 100, 4), np.uint8)
    rgba[..., 3] = 255
    out = A.resize_rotate_flip(rgba, (40, 100), 90, False)
    assert abs(out.shape[0] - 100) <= 2 and abs(out.shape[1] - 40) <= 2
    assert (out[..., 3] >= 128).sum() == pytest.approx(4000, rel=0.05)


# ---------------------------------------------------------------------------------------------- placement


def test_place_respects_max_ioa_and_bounds():
    rng = np.random.default_rng(0)
    occupied = np.array([[100, 100, 300, 300], [400, 50, 600, 200]], np.float32)
    for _ in range(200):
        pos = place(rng, (80, 60), (480, 640), occupied, max_ioa=0.1, allow_truncation=False)
        assert pos is not None
        x, y = pos
        assert 0 <= x <= 640 - 60 and 0 <= y <= 480 - 80
        assert box_ioa(np.array([x, y, x + 60, y + 80], float), occupied).max() <= 0.1 + 1e-9
    # truncation keeps at least min_inside of each side inside
    for _ in range(200):
        x, y = place(rng, (80, 60), (480, 640), np.zeros((0, 4)), allow_truncation=True, min_inside=0.5)
        assert -30 <= x <= 640 - 30 and -40 <= y <= 480 - 40
    # impossible: the whole image is one occupied object
    full = np.array([[0, 0, 640, 480]], np.float32)
    assert place(rng, (400, 400), (480, 640), full, max_ioa=0.1, allow_truncation=False) is None


def test_place_is_deterministic():
    occ = np.array([[0, 0, 100, 100]], np.float32)
    a = [place(np.random.default_rng(5), (30, 30), (200, 200), occ) for _ in range(3)]
    assert a[0] == a[1] == a[2]


# ------------------------------------------------------------------------------------------------- blend


def test_feather_alpha_only_softens_inward():
    a = _blob()
    f = feather_alpha(a, 1.5)
    assert (f <= a).all()
    assert (f[a == 0] == 0).all()
    assert f[40, 30] == 255  # deep inside unchanged
    edge = (a == 255) & (cv2.erode(a, np.ones((3, 3), np.uint8)) == 0)
    assert f[edge].mean() < 200  # boundary softened


def test_composite_alpha_matches_float_reference():
    rng = np.random.default_rng(0)
    dst = rng.integers(0, 256, (50, 40, 3), np.uint8)
    src = rng.integers(0, 256, (50, 40, 3), np.uint8)
    alpha = rng.integers(0, 256, (50, 40), np.uint8)
    ref = src * (alpha[..., None] / 255.0) + dst * (1 - alpha[..., None] / 255.0)
    out = dst.copy()
    composite_alpha(out, src, alpha)
    assert np.abs(out.astype(float) - ref).max() <= 1.0
    out = dst.copy()
    composite_alpha(out, src, np.full((50, 40), 255, np.uint8))
    np.testing.assert_array_equal(out, src)


@pytest.mark.parametrize("mode", ["hard", "alpha", "feather", "poisson"])
def test_blend_modes_touch_only_the_patch(mode):
    img = _textured(200, 240, seed=3)
    before = img.copy()
    colour = _textured(80, 60, seed=4, mean=(200, 40, 40))
    alpha = _blob()
    used = blend_patch(img, colour, alpha, 90, 60, mode)
    assert used == mode
    outside = np.ones(img.shape[:2], bool)
    outside[60:140, 90:150] = False
    np.testing.assert_array_equal(img[outside], before[outside])
    inside = np.zeros(img.shape[:2], bool)
    inside[60:140, 90:150] = alpha >= 250
    if mode == "poisson":  # keeps the object's gradients (not its colours), exactly where asked

        def corr(dx, dy):
            sel = alpha[:, 1:] >= 250
            g = np.diff(img[60 + dy : 140 + dy, 90 + dx : 150 + dx].astype(int), axis=1)[sel]
            return np.corrcoef(g.ravel(), np.diff(colour.astype(int), axis=1)[sel].ravel())[0, 1]

        c0 = corr(0, 0)
        assert c0 > 0.6 and all(c0 > corr(dx, dy) for dx, dy in [(-1, 0), (1, 0), (0, -1), (0, 1)])
        return
    assert np.abs(img[inside].astype(int) - before[inside]).mean() > 20
    if mode == "hard":
        np.testing.assert_array_equal(img[60:140, 90:150][alpha >= 128], colour[alpha >= 128])
        np.testing.assert_array_equal(img[60:140, 90:150][alpha < 128], before[60:140, 90:150][alpha < 128])


def test_poisson_border_guard_falls_back():
    img = _textured(200, 240, seed=3)
    colour, alpha = _textured(80, 60, seed=4), _blob()
    assert blend_patch(img.copy(), colour, alpha, 0, 60, "poisson") == "feather"  # touches the border
    assert blend_patch(img.copy(), colour, alpha, -20, 60, "poisson") == "feather"  # truncated
    assert not poisson_clone(img.copy(), colour, np.zeros((80, 60), np.uint8), 50, 50)  # empty mask
    assert blend_patch(img.copy(), colour, alpha, 50, 50, "poisson") == "poisson"


def test_truncated_patch_is_clipped():
    img = _textured(100, 100, seed=1)
    before = img.copy()
    colour, alpha = _textured(80, 60, seed=2), _blob()
    blend_patch(img, colour, alpha, -30, 50, "feather")
    np.testing.assert_array_equal(img[:50], before[:50])
    np.testing.assert_array_equal(img[:, 30:], before[:, 30:])
    assert not np.array_equal(img, before)


@pytest.mark.parametrize("mode", ["hard", "alpha", "feather", "poisson"])
@pytest.mark.parametrize("xy", [(3, 4), (-5, 0), (9, 9)])
def test_one_pixel_region_of_an_rgba_image(mode, xy):
    """The engine blends into the colour view of an RGBA image; a region clipped to 1x1 px (a tiny object, or
    one mostly outside the image) is a view numpy calls contiguous but OpenCV cannot write into."""
    rgba = np.zeros((10, 10, 4), np.uint8)
    h, w = (1, 1) if xy == (3, 4) else (1, 6) if xy == (-5, 0) else (5, 5)
    colour, alpha = np.full((h, w, 3), 200, np.uint8), np.full((h, w), 255, np.uint8)
    blend_patch(rgba[..., :3], colour, alpha, *xy, mode, feather_sigma=0)
    x, y = max(xy[0], 0), max(xy[1], 0)
    np.testing.assert_array_equal(rgba[y, x], [200, 200, 200, 0])
    assert np.count_nonzero(rgba) == 3


# --------------------------------------------------------------------------------------------- harmonize


def _lab_mean(img, mask=None):
    return np.array(cv2.mean(cv2.cvtColor(img, cv2.COLOR_RGB2Lab), mask=mask)[:3])


@pytest.mark.parametrize("side", [60, 200])  # per-pixel path and fitted path
def test_reinhard_moves_colour_towards_window(side):
    obj = _textured(side, side, seed=5, mean=(220, 60, 50))
    mask = np.zeros((side, side), np.uint8)
    cv2.circle(mask, (side // 2, side // 2), side // 2 - 2, 1, -1)
    ref = _textured(150, 150, seed=6, mean=(60, 90, 200))
    out0 = harmonize_reinhard(obj, mask, ref, bgr=False, strength=0.0)
    assert out0 is obj
    d = [np.abs(_lab_mean(harmonize_reinhard(obj, mask, ref, False, strength=s), mask) - _lab_mean(ref)).sum()
         for s in (0.0, 0.5, 1.0)]
    assert d[0] > d[1] > d[2]
    full = harmonize_reinhard(obj, mask, ref, False, strength=1.0, chroma=1.0, max_gain=100)
    np.testing.assert_allclose(_lab_mean(full, mask), _lab_mean(ref), atol=6)


def test_reinhard_fitted_path_close_to_per_pixel():
    obj = _textured(200, 200, seed=7, mean=(150, 110, 90))
    mask = np.zeros((200, 200), np.uint8)
    cv2.circle(mask, (100, 100), 95, 1, -1)
    ref = _textured(150, 150, seed=8, mean=(90, 120, 140))
    exact = harmonize_reinhard(obj, mask, ref, False, exact_max_pixels=10**9)
    fitted = harmonize_reinhard(obj, mask, ref, False, exact_max_pixels=0)
    diff = np.abs(exact.astype(int) - fitted.astype(int))[mask.astype(bool)]
    assert diff.mean() < 2.0


def test_reinhard_flat_object_and_bgr():
    obj = np.full((40, 40, 3), (200, 30, 30), np.uint8)  # flat: std 0 in every channel
    mask = np.ones((40, 40), np.uint8)
    ref = _textured(100, 100, seed=9, mean=(50, 50, 200))
    out = harmonize_reinhard(obj, mask, ref, bgr=False, strength=1.0)
    assert np.isfinite(out).all() and out.std(axis=(0, 1)).max() < 1.0  # stays flat, mean shifted
    assert not np.array_equal(out, obj)
    out_bgr = harmonize_reinhard(obj[..., ::-1].copy(), mask, ref[..., ::-1].copy(), bgr=True, strength=1.0)
    np.testing.assert_array_equal(out_bgr[..., ::-1], out)


def test_linear_ot_matches_mean_and_covariance():
    rng = np.random.default_rng(0)
    src = rng.multivariate_normal([120, 80, 60], [[300, 50, 0], [50, 200, 10], [0, 10, 100]], 5000)
    ref = rng.multivariate_normal([60, 100, 150], [[150, -20, 5], [-20, 250, 30], [5, 30, 300]], 5000)
    m = linear_ot_matrix(src, ref, strength=1.0, reg=0.0, max_gain=10)
    mapped = src @ m[:, :3].T + m[:, 3]
    np.testing.assert_allclose(mapped.mean(0), ref.mean(0), atol=1.0)
    np.testing.assert_allclose(np.cov(mapped, rowvar=False), np.cov(ref, rowvar=False), rtol=0.1, atol=8)
    ident = linear_ot_matrix(src, ref, strength=0.0)
    np.testing.assert_allclose(ident, np.eye(3, 4), atol=1e-9)


def test_linear_ot_kernel_on_image():
    obj = _textured(80, 80, seed=10, mean=(200, 200, 60))
    mask = np.ones((80, 80), np.uint8)
    ref = _textured(120, 120, seed=11, mean=(40, 60, 160))
    out = harmonize_linear_ot(obj, mask, ref, strength=1.0)
    assert np.abs(out.reshape(-1, 3).mean(0) - ref.reshape(-1, 3).mean(0)).max() < 15


def test_colour_affine_helpers_match_opencv():
    rng = np.random.default_rng(3)
    img = _textured(40, 50, seed=12, mean=(140, 90, 60))
    inner = A.colour_matrix(rng, 0.3, 0.3, 0.3, 0.05, 100.0)
    outer = np.array([[0.9, 0.05, 0.0, 12.0], [0.0, 1.1, 0.0, -5.0], [0.02, 0.0, 0.95, 3.0]])
    two_steps = cv2.transform(cv2.transform(img, inner), outer).astype(int)
    one_step = cv2.transform(img, A.compose_affine(outer, inner)).astype(int)
    assert np.abs(two_steps - one_step).max() <= 2  # only the intermediate rounding / saturation differs
    px = img.reshape(-1, 3)
    diff = A.apply_affine_uint8(px, inner).astype(int) - cv2.transform(img, inner).reshape(-1, 3)
    assert np.abs(diff).max() <= 1 and (diff == 0).mean() > 0.95  # OpenCV computes in float32
    bgr = np.ascontiguousarray(img[..., ::-1])
    np.testing.assert_array_equal(cv2.transform(bgr, A.to_channel_order(inner, True))[..., ::-1],
                                  cv2.transform(img, inner))


def test_colour_samples_cover_only_label_pixels():
    rgba = np.zeros((120, 100, 4), np.uint8)
    rgba[..., :3] = (10, 200, 30)
    rgba[20:100, 10:90, 3] = 255
    rgba[20:100, 10:90, :3] = (250, 40, 40)
    rgba[0:20, :, 3] = 60  # soft haze below the label threshold
    s = A.colour_samples(rgba, area=80 * 80, n=400)
    assert s.dtype == np.uint8 and s.shape[1] == 3 and 300 <= len(s) <= 1700
    assert (s == (250, 40, 40)).all()
    thin = np.zeros((200, 200, 4), np.uint8)
    thin[np.arange(199), np.arange(1, 200)] = (5, 6, 7, 255)  # a 1-px line off every grid point (i, i+1)
    assert len(A.colour_samples(thin, area=199, n=8)) == 199
    cache = A.SourceCache(1 << 20)
    a = cache.samples("id", rgba, 80 * 80, 128)
    assert cache.samples("id", rgba, 80 * 80, 128) is a and not a.flags.writeable and cache.hits == 1


def test_harmonize_matrix_is_the_fitted_reinhard_map():
    obj = _textured(200, 200, seed=7, mean=(150, 110, 90))
    mask = np.zeros((200, 200), np.uint8)
    cv2.circle(mask, (100, 100), 95, 1, -1)
    ref = _textured(150, 150, seed=8, mean=(90, 120, 140))
    px = sample_pixels(obj, mask, 400)
    m = harmonize_matrix("reinhard", px, ref, False, fit_samples=len(px))
    np.testing.assert_array_equal(cv2.transform(obj, m), harmonize_reinhard(obj, mask, ref, False, exact_max_pixels=0))
    ot = harmonize_matrix("linear_ot", sample_pixels(obj, mask, 1024), ref, False)
    np.testing.assert_array_equal(cv2.transform(obj, ot), harmonize_linear_ot(obj, mask, ref))
    assert harmonize_matrix("none", px, ref, False) is None
    assert harmonize_matrix("reinhard", px, ref, False, strength=0.0) is None
    assert harmonize_matrix("reinhard", px[:3], ref, False) is None


def test_context_window_is_local_and_clipped():
    img = np.zeros((300, 400, 3), np.uint8)
    w = context_window(img, 10, 20, 50, 40, 0.5)
    assert w.shape[:2] == (20 + 50 + 25, 10 + 40 + 20)  # clipped at the top/left
    assert context_window(img, 500, 500, 10, 10, 0.5).size == 0


# ------------------------------------------------------------------------------------------------ labels


def test_polygon_keeps_long_one_pixel_thin_parts():
    """A 1-px-thin part is a long line, not a sliver: its contour has 2 vertices whatever its length, which the
    part-size estimate used to count as ~1 px, so the part (and the box extent it spans) was dropped."""
    m = np.zeros((40, 120), np.uint8)
    cv2.rectangle(m, (60, 10), (100, 30), 1, -1)  # main part
    m[35, 5:55] = 1  # 50 px line, apart from it (what a cut leaves of a thin object)
    m[2, 2] = 1  # a real 1-px sliver: still dropped
    poly = mask_to_polygon(m.astype(bool), "all")
    got = rasterize(poly, *m.shape)
    assert got[35, 5:55].all() and not got[2, 2]
    x, y, w, h = cv2.boundingRect(poly)
    assert (x, x + w) == (5, 101)
    line_only = np.zeros((40, 120), bool)
    line_only[35, 5:55] = True
    line_only[10:12, 60:62] = True  # a 2x2 block: the line is the largest part
    np.testing.assert_array_equal(rasterize(mask_to_polygon(line_only, "largest"), 40, 120)[35], line_only[35])


def test_polygon_roundtrip_with_parts_and_holes():
    m = np.zeros((120, 150), np.uint8)
    cv2.rectangle(m, (10, 10), (80, 90), 1, -1)
    cv2.rectangle(m, (30, 30), (50, 50), 0, -1)  # hole
    cv2.circle(m, (120, 40), 15, 1, -1)  # second part
    poly = mask_to_polygon(m.astype(bool), "all")
    x0, y0, r = rasterize_polygon(poly, 120, 150)
    full = np.zeros_like(m, bool)
    full[y0 : y0 + r.shape[0], x0 : x0 + r.shape[1]] = r
    inter = (full & m.astype(bool)).sum()
    assert inter / m.sum() > 0.99 and inter / (full | m.astype(bool)).sum() > 0.95
    largest = mask_to_polygon(m.astype(bool), "largest")
    assert polygon_boxes([largest])[0].tolist() == [10, 10, 81, 91]
    assert len(mask_to_polygon(np.zeros((5, 5), bool))) == 0


@pytest.mark.parametrize("angle", [0.0, 25.0])
def test_no_dark_outline_from_transparent_black(angle):
    """Bank instances have RGB zeroed under alpha == 0; resizing/rotating must not bleed it into the edge."""
    a = np.zeros((600, 600), np.uint8)
    cv2.circle(a, (300, 300), 250, 255, -1)
    rgba = np.zeros((600, 600, 4), np.uint8)
    rgba[..., :3] = 255
    rgba[..., 3] = a
    rgba[a == 0, :3] = 0
    for size in [(60, 60), (97, 97), (600, 600), (900, 900)]:
        out = A.resize_rotate_flip(rgba, size, angle, flip=True)
        visible = out[..., 3] > 0
        assert out[..., :3][visible].min() >= 250, size
        naive = A.resize_rotate_flip(rgba, size, angle, flip=True, unbleed=False)
        if size[0] < 600:
            assert naive[..., :3][naive[..., 3] > 0].min() < 200  # what the fix prevents


def test_source_cache_gives_identical_patches_and_stays_bounded():
    """The per-instance source cache memoizes exact work: cached, uncached and repeated results are equal."""
    import pickle

    rng = np.random.default_rng(3)
    rgba = rng.integers(0, 256, (173, 131, 4), dtype=np.uint8)  # arbitrary colour under alpha == 0 too
    a = np.zeros((173, 131), np.uint8)
    cv2.ellipse(a, (65, 86), (55, 70), 20, 0, 360, 255, -1)
    rgba[..., 3] = cv2.GaussianBlur(a, (9, 9), 3)
    cache = A.SourceCache(1 << 20)
    for size, angle, flip in [((40, 30), 0.0, False), ((173, 131), 0.0, True), ((90, 61), 17.0, True),
                              ((300, 250), 0.0, False), ((40, 30), 0.0, True), ((21, 16), -40.0, False)]:
        ref = A.resize_rotate_flip(rgba, size, angle, flip)
        for _ in range(2):  # miss, then hit
            got = A.resize_rotate_flip(rgba, size, angle, flip, cache=cache, key="inst-1")
            assert got.dtype == np.uint8 and np.array_equal(got, ref), (size, angle, flip)
            assert got.flags.writeable
    assert cache.hits >= 6 and cache.misses <= 6 and 0 < cache.nbytes <= cache.max_bytes
    small = A.SourceCache(40_000)  # room for one small level only
    for k, size in enumerate([(40, 30), (20, 15), (10, 8)]):
        A.resize_rotate_flip(rgba, size, 0.0, False, cache=small, key=k)
        assert small.nbytes <= small.max_bytes
    clone = pickle.loads(pickle.dumps(cache))  # DataLoader workers start empty
    assert len(clone) == 0 and clone.max_bytes == cache.max_bytes
    cache._lru._pid = -1  # as seen from a forked child: starts empty, then caches its own
    A.resize_rotate_flip(rgba, (40, 30), 0.0, False, cache=cache, key="inst-1")
    assert (cache.hits, cache.misses, len(cache)) == (0, 1, 1)
