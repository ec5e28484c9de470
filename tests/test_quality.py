import numpy as np

from genval_aug.quality import QualityRules, alpha_stats, check_instance, largest_component


def canvas(h=40, w=40):
    return np.zeros((h, w), np.uint8)


def test_alpha_stats_counts_components_and_bbox():
    a = canvas()
    a[5:15, 5:15] = 255
    a[30:32, 30:33] = 200
    s = alpha_stats(a)
    assert s.area == 106 and s.components == 2 and s.bbox == (5, 5, 28, 27)
    assert s.largest_fraction == 100 / 106 and s.coverage == 106 / 1600
    assert alpha_stats(canvas()).area == 0


def test_rules_reject_by_reason():
    rules = QualityRules(min_area=50, coverage=(0.05, 0.95), min_largest_fraction=0.9, max_aspect=4,
                         reject_border=True)
    assert check_instance(canvas(), rules) == ["empty_alpha"]
    a = canvas()
    a[10:30, 10:30] = 255
    assert check_instance(a, rules) == []
    assert check_instance(a, rules, truncated=True) == ["truncated"]
    tiny = canvas()
    tiny[1:4, 1:4] = 255
    assert "too_small" in check_instance(tiny, rules)
    full = np.full((40, 40), 255, np.uint8)
    assert {"coverage", "touches_border"} <= set(check_instance(full, rules))
    frag = canvas()
    frag[2:12, 2:12] = 255
    frag[25:35, 25:35] = 255
    assert "fragmented" in check_instance(frag, rules)
    assert largest_component(frag).sum() == 100
    thin = canvas(10, 100)
    thin[4:6, 5:95] = 255
    assert "aspect" in check_instance(thin, QualityRules(min_area=None, coverage=None, max_aspect=4))
