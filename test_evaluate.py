"""Tests for evaluate.py: the VOC devkit metric, COCO through pycocotools, results files,
checkpoints, the command line and torchrun sharding."""
import contextlib
import io
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

import evaluate
import weights
from bench import make_synthetic_voc

HERE = Path(__file__).resolve().parent


# ----------------------------------------------------------------------------- slow references
def devkit_reference(det_lines, gt_raw, num_classes, thr=0.5):
    """VOCevaldet.m transcribed loop by loop, on raw 1-based numbers with the +1 convention.

    det_lines: [(image, label, score, x1, y1, x2, y2)] in file order; gt_raw: per image a list of
    (label, x1, y1, x2, y2, difficult). Returns ({label: ap11}, {label: ap_area}), nan without GT.
    """
    ap11, ap_area = {}, {}
    for c in range(1, num_classes + 1):
        gts = {i: [g for g in objs if g[0] == c] for i, objs in enumerate(gt_raw)}
        npos = sum(1 for objs in gts.values() for g in objs if not g[5])
        taken = {i: [False] * len(objs) for i, objs in gts.items()}
        dets = sorted([d for d in det_lines if d[1] == c], key=lambda d: -d[2])  # stable
        tp, fp = [], []
        for image, _, _, *bb in dets:
            ovmax, jmax = -math.inf, -1
            for j, (_, *g, _) in enumerate(gts[image]):
                iw = min(bb[2], g[2]) - max(bb[0], g[0]) + 1
                ih = min(bb[3], g[3]) - max(bb[1], g[1]) + 1
                if iw > 0 and ih > 0:
                    ua = ((bb[2] - bb[0] + 1) * (bb[3] - bb[1] + 1)
                          + (g[2] - g[0] + 1) * (g[3] - g[1] + 1) - iw * ih)
                    if iw * ih / ua > ovmax:
                        ovmax, jmax = iw * ih / ua, j
            if ovmax >= thr:
                if gts[image][jmax][5]:
                    tp.append(0), fp.append(0)
                elif not taken[image][jmax]:
                    taken[image][jmax] = True
                    tp.append(1), fp.append(0)
                else:
                    tp.append(0), fp.append(1)
            else:
                tp.append(0), fp.append(1)
        if npos == 0:
            ap11[c] = ap_area[c] = math.nan
            continue
        rec, prec, ctp, cfp = [], [], 0, 0
        for t, f in zip(tp, fp):
            ctp, cfp = ctp + t, cfp + f
            rec.append(ctp / npos)
            prec.append(ctp / (ctp + cfp) if ctp + cfp else math.nan)  # MATLAB max skips NaN
        total = 0.0
        for k in range(11):
            ps = [p for r, p in zip(rec, prec) if r >= k / 10 and not math.isnan(p)]
            total += max(ps) if ps else 0.0
        ap11[c] = total / 11
        mrec = [0.0] + rec + [1.0]
        mpre = [0.0] + [0.0 if math.isnan(p) else p for p in prec] + [0.0]
        for i in range(len(mpre) - 2, -1, -1):
            mpre[i] = max(mpre[i], mpre[i + 1])
        ap_area[c] = sum((mrec[i] - mrec[i - 1]) * mpre[i] for i in range(1, len(mrec))
                         if mrec[i] != mrec[i - 1])
    return ap11, ap_area


def random_voc_problem(rng, num_images=40, num_classes=3):
    """Raw 1-based integer GT (some difficult) and 1-based detections: jittered copies of the
    objects (integer and fractional, some duplicated), exact copies, and random boxes; scores
    rounded to 2 decimals so that ties occur. Detections are listed image by image."""
    gt_raw, det_lines = [], []
    for i in range(num_images):
        objs = []
        for _ in range(rng.integers(0, 5)):
            x1, y1 = rng.integers(1, 200, size=2)
            w, h = rng.integers(5, 120, size=2)
            objs.append((int(rng.integers(1, num_classes + 1)), int(x1), int(y1), int(x1 + w),
                         int(y1 + h), bool(rng.uniform() < 0.25)))
        gt_raw.append(objs)
        for label, x1, y1, x2, y2, _ in objs:
            for _ in range(rng.integers(0, 3)):
                j = rng.normal(0, 6, size=4)
                if rng.uniform() < 0.5:
                    j = np.round(j)
                det_lines.append((i, label, round(float(rng.uniform()), 2), x1 + j[0], y1 + j[1],
                                  x2 + j[2], y2 + j[3]))
            if rng.uniform() < 0.3:
                det_lines.append((i, label, round(float(rng.uniform()), 2), x1, y1, x2, y2))
        for _ in range(rng.integers(0, 6)):
            x1, y1 = rng.uniform(1, 250, size=2)
            w, h = rng.uniform(3, 150, size=2)
            det_lines.append((i, int(rng.integers(1, num_classes + 1)),
                              round(float(rng.uniform()), 2), x1, y1, x1 + w, y1 + h))
    return gt_raw, det_lines


def ground_truth_from_raw(gt_raw):
    """Our convention: 0-based (xmin - 1, ymin - 1, xmax, ymax), as data.py loads VOC XML."""
    out = []
    for objs in gt_raw:
        a = np.array([o[1:5] for o in objs], dtype=np.float32).reshape(-1, 4)
        out.append({"boxes": a - np.array([1, 1, 0, 0], dtype=np.float32),
                    "labels": np.array([o[0] for o in objs], dtype=np.int64),
                    "difficult": np.array([o[5] for o in objs], dtype=bool)})
    return out


def raw_from_ours(detections, ground_truth):
    """The inverse of ground_truth_from_raw, for detections and ground truth in our convention."""
    one_based = np.array([1.0, 1.0, 0.0, 0.0])
    det_lines = [(i, int(l), float(s), *(b + one_based).tolist())
                 for i, (bs, ss, ls) in enumerate(detections)
                 for b, s, l in zip(np.asarray(bs, np.float64), ss, ls)]
    gt_raw = [[(int(l), *(b + one_based).tolist(), bool(d))
               for b, l, d in zip(np.asarray(g["boxes"], np.float64), g["labels"], g["difficult"])]
              for g in ground_truth]
    return det_lines, gt_raw


def write_comp4(folder, det_lines, class_names, image_ids):
    folder.mkdir(parents=True, exist_ok=True)
    for c, name in enumerate(class_names, start=1):
        (folder / f"comp4_det_test_{name}.txt").write_text("".join(
            f"{image_ids[i]} " + " ".join(repr(float(v)) for v in (s, x1, y1, x2, y2)) + "\n"
            for i, label, s, x1, y1, x2, y2 in det_lines if label == c))


def image_boxes(ground_truth, scores=None):
    """Ground truth fed back as detections (score 1, or the given per-image scores)."""
    return [(g["boxes"], np.ones(len(g["labels"])) if scores is None else scores[i], g["labels"])
            for i, g in enumerate(ground_truth)]


# ----------------------------------------------------------------------------- voc_ap
def test_voc_ap_hand_built_curve():
    # 4 positives; ranked detections TP FP TP FP FP TP; the 4th object is never found.
    rec = np.array([1, 1, 2, 2, 2, 3]) / 4
    prec = np.array([1, 1 / 2, 2 / 3, 2 / 4, 2 / 5, 3 / 6])
    # 11-point: t=0..0.2 -> 1; t=0.3..0.5 -> 2/3; t=0.6, 0.7 -> 1/2; t>=0.8 -> 0.
    assert evaluate.voc_ap(rec, prec, "11point") == pytest.approx((3 + 2 + 1) / 11, abs=1e-15)
    # area: 0.25 * 1 + 0.25 * 2/3 + 0.25 * 1/2
    assert evaluate.voc_ap(rec, prec, "area") == pytest.approx(13 / 24, abs=1e-15)
    assert evaluate.voc_ap([], [], "11point") == 0.0 and evaluate.voc_ap([], [], "area") == 0.0
    # recall exactly 3/10 reaches the t=0.3 point
    assert evaluate.voc_ap([0.1, 0.2, 0.3], [1.0, 1.0, 1.0], "11point") == pytest.approx(4 / 11)
    with pytest.raises(ValueError):
        evaluate.voc_ap([0.5, 0.2], [1.0, 1.0])
    with pytest.raises(ValueError):
        evaluate.voc_ap([0.5], [1.0], "auc")


def test_voc_eval_hand_built_ranking():
    # Same curve through boxes: 4 images with one object each; detections built to give
    # TP FP TP FP FP TP in score order.
    gt = [{"boxes": np.array([[10, 10, 50, 50]], np.float32), "labels": np.array([1])}
          for _ in range(4)]
    hit, miss = [10, 10, 50, 50], [60, 60, 90, 90]
    ranked = [(0, hit), (0, miss), (1, hit), (1, miss), (2, miss), (2, hit)]
    dets = [([], [], []) for _ in range(4)]
    for rank, (image, box) in enumerate(ranked):
        b, s, l = dets[image]
        dets[image] = (list(b) + [box], list(s) + [1.0 - rank / 10], list(l) + [1])
    r = evaluate.voc_eval(dets, gt, ["thing", "unused"])
    assert r["per_class_11point"]["thing"] == pytest.approx(6 / 11)
    assert r["per_class_area"]["thing"] == pytest.approx(13 / 24)
    assert math.isnan(r["per_class_11point"]["unused"])
    assert math.isnan(r["per_class_area"]["unused"])
    assert r["map_11point"] == pytest.approx(6 / 11) and r["map_area"] == pytest.approx(13 / 24)
    assert r["num_gt"] == {"thing": 4, "unused": 0}


def test_ground_truth_as_detections_is_perfect_with_difficult_objects():
    rng = np.random.default_rng(1)
    gt_raw, _ = random_voc_problem(rng, num_images=30, num_classes=4)
    gt = ground_truth_from_raw(gt_raw)
    assert sum(g["difficult"].sum() for g in gt) > 5  # difficult objects are present
    for scores in (None, [rng.uniform(size=len(g["labels"])) for g in gt]):
        r = evaluate.voc_eval(image_boxes(gt, scores), gt, ["a", "b", "c", "d"])
        assert r["map_11point"] == 1.0 and r["map_area"] == 1.0
        assert all(ap == 1.0 for ap in r["per_class_11point"].values())
        assert all(ap == 1.0 for ap in r["per_class_area"].values())
    assert sum(r["num_gt"].values()) == sum((~g["difficult"]).sum() for g in gt)


def test_duplicate_detections_are_false_positives():
    gt = [{"boxes": np.array([[0, 0, 10, 10]], np.float32), "labels": np.array([1])},
          {"boxes": np.array([[0, 0, 10, 10]], np.float32), "labels": np.array([1])}]
    box = [0, 0, 10, 10]
    dets = [([box, box], [0.9, 0.8], [1, 1]), ([box], [0.7], [1])]  # TP, duplicate FP, TP
    r = evaluate.voc_eval(dets, gt, ["x"])
    # rec .5 .5 1, prec 1 .5 2/3: 11-point (6 * 1 + 5 * 2/3) / 11, area .5 + .5 * 2/3
    assert r["map_11point"] == pytest.approx((6 + 10 / 3) / 11)
    assert r["map_area"] == pytest.approx(5 / 6)


def test_best_match_already_taken_is_a_false_positive_not_rematched():
    # Two overlapping objects; the second detection's best object (A) is taken by the first, so
    # the devkit counts it as a FP even though it overlaps B by >= 0.5.
    gt = [{"boxes": np.array([[0, 0, 100, 100], [20, 0, 120, 100]], np.float32),
           "labels": np.array([1, 1])}]
    dets = [([[0, 0, 100, 100], [5, 0, 105, 100]], [0.9, 0.8], [1, 1])]
    r = evaluate.voc_eval(dets, gt, ["x"])
    # TP then FP: rec .5 .5, prec 1 .5 -> 11-point 6/11, area 0.5
    assert r["map_11point"] == pytest.approx(6 / 11) and r["map_area"] == pytest.approx(0.5)


def test_equal_iou_goes_to_the_first_object():
    # A duplicated annotation, first copy plain, second difficult: the devkit's strict '>' scan
    # keeps the first, so the detection is a TP (taking the difficult copy would ignore it).
    gt = [{"boxes": np.array([[0, 0, 10, 10], [0, 0, 10, 10]], np.float32),
           "labels": np.array([1, 1]), "difficult": np.array([False, True])}]
    dets = [([[0, 0, 10, 10]], [1.0], [1])]
    assert evaluate.voc_eval(dets, gt, ["x"])["map_area"] == 1.0
    gt[0]["difficult"] = np.array([True, False])
    assert evaluate.voc_eval(dets, gt, ["x"])["map_area"] == 0.0


def test_iou_of_exactly_half_is_a_match():
    # devkit: ovmax >= 0.5. Raw 1-based GT (1,1,10,10) has +1 area 100; detection (1,1,10,5) 50.
    gt = ground_truth_from_raw([[(1, 1, 1, 10, 10, False)]])
    det = [(np.array([[0, 0, 10, 5]], np.float64), [1.0], [1])]
    assert evaluate.voc_eval(det, gt, ["x"])["map_area"] == 1.0
    det = [(np.array([[0, 0, 10, 4.99]], np.float64), [1.0], [1])]
    assert evaluate.voc_eval(det, gt, ["x"])["map_area"] == 0.0


def test_detection_on_difficult_object_changes_nothing():
    dets, gt, names = make_synthetic_voc(num_images=60, seed=3)
    base = evaluate.voc_eval(dets, gt, names)
    with_extra = []
    for (b, s, l), g in zip(dets, gt):
        d = g["difficult"]
        # exact hits on every difficult object, at the very top and bottom of the ranking
        extra_b = np.concatenate([b, g["boxes"][d], g["boxes"][d]])
        extra_s = np.concatenate([s, np.full(d.sum(), 2.0), np.full(d.sum(), -1.0)])
        with_extra.append((extra_b, extra_s, np.concatenate([l, g["labels"][d], g["labels"][d]])))
    assert sum(g["difficult"].sum() for g in gt) > 20
    assert evaluate.voc_eval(with_extra, gt, names) == base


def test_voc_eval_matches_devkit_reference_through_comp4_files(tmp_path):
    rng = np.random.default_rng(0)
    names = ["cat", "dog", "traffic_light"]
    gt_raw, det_lines = random_voc_problem(rng, num_images=60, num_classes=3)
    image_ids = [f"img_{i:03d}" for i in range(len(gt_raw))]
    write_comp4(tmp_path / "res", det_lines, names, image_ids)
    dets = evaluate.read_voc_results(tmp_path / "res", image_ids, names)
    r = evaluate.voc_eval(dets, ground_truth_from_raw(gt_raw), names)
    ref11, ref_area = devkit_reference(det_lines, gt_raw, 3)
    for c, name in enumerate(names, start=1):
        assert r["per_class_11point"][name] == pytest.approx(ref11[c], abs=1e-12)
        assert r["per_class_area"][name] == pytest.approx(ref_area[c], abs=1e-12)
    assert 0.2 < r["map_area"] < 0.95  # a non-trivial case


def test_synthetic_set_matches_devkit_reference():
    dets, gt, names = make_synthetic_voc(num_images=25, seed=5, detections_per_image=40,
                                                 num_classes=4)
    r = evaluate.voc_eval(dets, gt, names)
    det_lines, gt_raw = raw_from_ours(dets, gt)
    ref11, ref_area = devkit_reference(det_lines, gt_raw, 4)
    for c, name in enumerate(names, start=1):
        assert r["per_class_11point"][name] == pytest.approx(ref11[c], abs=1e-12)
        assert r["per_class_area"][name] == pytest.approx(ref_area[c], abs=1e-12)


def test_voc_results_files_round_trip_exactly(tmp_path):
    dets, gt, names = make_synthetic_voc(num_images=20, seed=2, detections_per_image=30,
                                                 num_classes=3)
    ids = [f"2008_{i:06d}" for i in range(len(dets))]
    paths = evaluate.write_voc_results(tmp_path, dets, ids, names)
    assert [p.name for p in paths] == [f"comp4_det_test_{n}.txt" for n in names]
    back = evaluate.read_voc_results(tmp_path, ids, names)
    for (b, s, l), (b2, s2, l2) in zip(dets, back):
        order = np.lexsort((np.arange(len(l)), l))  # files group by class, file order inside
        np.testing.assert_array_equal(b[order].astype(np.float64), b2)
        np.testing.assert_array_equal(s[order].astype(np.float64), s2)
        np.testing.assert_array_equal(l[order], l2)
    assert evaluate.voc_eval(back, gt, names) == evaluate.voc_eval(dets, gt, names)


def test_voc_results_file_errors(tmp_path):
    names, ids = ["cat", "dog"], ["a", "b"]
    (tmp_path / "comp4_det_test_cat.txt").write_text("a 0.5 1 1 10 10\nzzz 0.4 1 1 10 10\n")
    with pytest.raises(evaluate.EvalError, match=r"comp4_det_test_cat.txt:2: image id 'zzz'"):
        evaluate.read_voc_results(tmp_path, ids, names)
    (tmp_path / "comp4_det_test_cat.txt").write_text("a 0.5 1 1 10\n")
    with pytest.raises(evaluate.EvalError,
                       match=r"comp4_det_test_cat.txt:1: expected .* got 'a 0.5 1 1 10'"):
        evaluate.read_voc_results(tmp_path, ids, names)
    (tmp_path / "comp4_det_test_cat.txt").write_text("a 0.5 1 1 10 ten\n")
    with pytest.raises(evaluate.EvalError,
                       match=r"comp4_det_test_cat.txt:1: expected .* finite numbers, got '.* ten'"):
        evaluate.read_voc_results(tmp_path, ids, names)
    (tmp_path / "comp4_det_test_cat.txt").write_text("b 0.5 1 1 10 10\n")
    (tmp_path / "comp4_det_test_horse.txt").write_text("b 0.5 1 1 10 10\n")
    warnings = []
    dets = evaluate.read_voc_results(tmp_path, ids, names, log=warnings.append)
    assert any("horse" in w for w in warnings) and any("dog" in w for w in warnings)
    assert len(dets[0][1]) == 0 and dets[1][0].tolist() == [[0.0, 0.0, 10.0, 10.0]]
    with pytest.raises(evaluate.EvalError, match="not a folder"):
        evaluate.read_voc_results(tmp_path / "comp4_det_test_cat.txt", ids, names)
    with pytest.raises(evaluate.EvalError, match="no comp4_det_test"):
        evaluate.read_voc_results(tmp_path, ids, ["sheep"], log=lambda m: None)


# ----------------------------------------------------------------------------- COCO
def make_coco_json(path, rng, num_images=12):
    """A COCO json with small / medium / large objects, crowd boxes and an image with none."""
    cats = [{"id": 3, "name": "car"}, {"id": 7, "name": "train"}, {"id": 18, "name": "dog"}]
    images, anns = [], []
    for i in range(num_images):
        w, h = int(rng.integers(300, 641)), int(rng.integers(200, 481))
        images.append({"id": 100 + i, "width": w, "height": h, "file_name": f"{100 + i}.jpg"})
        for _ in range(0 if i == 0 else rng.integers(1, 6)):
            side = float(rng.choice([20, 60, 150]))  # small, medium, large
            bw, bh = side * rng.uniform(0.7, 1.3), side * rng.uniform(0.7, 1.3)
            x, y = rng.uniform(0, w - bw), rng.uniform(0, h - bh)
            anns.append({"id": len(anns) + 1, "image_id": 100 + i,
                         "category_id": int(rng.choice([3, 7, 18])), "bbox": [x, y, bw, bh],
                         "area": bw * bh * 0.8, "iscrowd": int(rng.uniform() < 0.15)})
    path.write_text(json.dumps({"images": images, "annotations": anns, "categories": cats}))
    return images, anns


def pycocotools_direct(ann_file, results, image_ids=None, cat_ids=None):
    """pycocotools called the documented way (it prints; the output is swallowed)."""
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(ann_file))
        ev = COCOeval(gt, gt.loadRes(results), "bbox")
        if image_ids is not None:
            ev.params.imgIds = image_ids
        if cat_ids is not None:
            ev.params.catIds = cat_ids
        ev.evaluate(), ev.accumulate(), ev.summarize()
    return ev


def test_coco_ground_truth_as_detections_with_crowd_boxes(tmp_path):
    _, anns = make_coco_json(tmp_path / "gt.json", np.random.default_rng(0))
    assert any(a["iscrowd"] for a in anns)
    results = [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"],
                "score": 1.0} for a in anns if not a["iscrowd"]]
    r = evaluate.coco_eval(results, tmp_path / "gt.json")
    assert r["stats"][:6] == [1.0] * 6 and r["stats"][8] == 1.0
    assert r["per_class"] == {"car": 1.0, "train": 1.0, "dog": 1.0}


def test_coco_eval_agrees_with_pycocotools(tmp_path):
    rng = np.random.default_rng(1)
    images, anns = make_coco_json(tmp_path / "gt.json", rng, num_images=15)
    results = []
    for a in anns:
        for _ in range(rng.integers(0, 3)):
            x, y, w, h = a["bbox"]
            results.append({"image_id": a["image_id"], "category_id": int(rng.choice([3, 7, 18])),
                            "bbox": [x + rng.normal(0, 4), y + rng.normal(0, 4),
                                     w * rng.uniform(.8, 1.2), h * rng.uniform(.8, 1.2)],
                            "score": float(rng.uniform())})
    before = json.dumps(results)
    r = evaluate.coco_eval(results, tmp_path / "gt.json", [im["id"] for im in images],
                           ["Car", "Train", "Dog"])
    assert json.dumps(results) == before  # the caller's list is left as it was
    ev = pycocotools_direct(tmp_path / "gt.json", results)
    assert r["stats"] == [float(s) for s in ev.stats]
    assert 0.1 < r["stats"][0] < 0.9
    # per class: the AP of pycocotools run on that category alone
    for cat, name in ((3, "Car"), (7, "Train"), (18, "Dog")):
        ev = pycocotools_direct(tmp_path / "gt.json", results, cat_ids=[cat])
        assert r["per_class"][name] == pytest.approx(ev.stats[0], abs=1e-12)
        assert r["per_class_ap50"][name] == pytest.approx(ev.stats[1], abs=1e-12)
    # a subset of the images: only those images' objects count
    subset = [im["id"] for im in images[:6]]
    r = evaluate.coco_eval([d for d in results if d["image_id"] in subset], tmp_path / "gt.json",
                           subset)
    ev = pycocotools_direct(tmp_path / "gt.json", results, image_ids=subset)
    assert r["stats"] == [float(s) for s in ev.stats]
    assert r["stats"] != pycocotools_direct(tmp_path / "gt.json", [
        d for d in results if d["image_id"] in subset]).stats.tolist()


def test_coco_empty_results_and_bad_ids(tmp_path):
    make_coco_json(tmp_path / "gt.json", np.random.default_rng(2))
    r = evaluate.coco_eval([], tmp_path / "gt.json")
    assert r["stats"] == [0.0] * 12
    assert r["per_class"] == {"car": 0.0, "train": 0.0, "dog": 0.0}
    (tmp_path / "empty.json").write_text("[]")
    assert evaluate.read_coco_results(tmp_path / "empty.json") == []
    good = {"image_id": 100, "category_id": 3, "bbox": [1, 2, 3, 4], "score": 0.5}
    with pytest.raises(evaluate.EvalError, match="image_id 999 is not in the ground truth"):
        evaluate.coco_eval([good, dict(good, image_id=999)], tmp_path / "gt.json", name="res.json")
    with pytest.raises(evaluate.EvalError, match="image_id 101 is not in the ground truth"):
        evaluate.coco_eval([dict(good, image_id=101)], tmp_path / "gt.json", image_ids=[100])
    with pytest.raises(evaluate.EvalError, match="category_id 12 is not a category"):
        evaluate.coco_eval([dict(good, category_id=12)], tmp_path / "gt.json")
    (tmp_path / "bad.json").write_text(json.dumps([dict(good, bbox=[1, 2, 3])]))
    with pytest.raises(evaluate.EvalError, match=r"bad.json: entry 0 is not"):
        evaluate.read_coco_results(tmp_path / "bad.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(evaluate.EvalError, match=r"bad.json: not valid JSON"):
        evaluate.read_coco_results(tmp_path / "bad.json")
    with pytest.raises(evaluate.EvalError, match="annotation file not found"):
        evaluate.coco_eval([], tmp_path / "missing.json")


def test_coco_results_writer_uses_category_ids_and_xywh():
    dets = [(np.array([[10.0, 20.0, 40.0, 60.0]]), np.array([0.5]), np.array([2]))]
    out = evaluate.coco_results(dets, [42], [1, 5, 9])
    assert out == [{"image_id": 42, "category_id": 5, "bbox": [10.0, 20.0, 30.0, 40.0],
                    "score": 0.5}]


def jittered_results(anns, rng, cats=(3, 7, 18)):
    """0-2 detections per object: its box moved and scaled a little, mostly its category, random
    score."""
    results = []
    for a in anns:
        for _ in range(rng.integers(0, 3)):
            x, y, w, h = a["bbox"]
            cat = a["category_id"] if rng.uniform() < 0.8 else int(rng.choice(cats))
            results.append({"image_id": a["image_id"], "category_id": cat,
                            "bbox": [x + rng.normal(0, 4), y + rng.normal(0, 4),
                                     w * rng.uniform(.8, 1.2), h * rng.uniform(.8, 1.2)],
                            "score": float(rng.uniform())})
    return results


def printed_stats(out):
    """The 12 COCO numbers as evaluate.py prints them (one '<short> <long> <value>' line each)."""
    shorts = [short for short, _ in evaluate.COCO_STAT_NAMES]
    return [float(line.split()[-1]) for line in out.splitlines() if line.split()[:1] in [
        [s] for s in shorts]]


def test_coco_results_file_needs_only_the_annotation_json(tmp_path, capsys):
    """No image on disk: --ann A.json and --data-root D (with and without an empty image folder)
    print the 12 numbers of pycocotools called directly."""
    root = tmp_path / "coco"
    (root / "annotations").mkdir(parents=True)
    ann = root / "annotations" / "instances_val2014.json"
    _, anns = make_coco_json(ann, np.random.default_rng(5))
    results = jittered_results(anns, np.random.default_rng(6))
    (tmp_path / "R.json").write_text(json.dumps(results))
    expected = [float(s) for s in pycocotools_direct(ann, results).stats]
    assert 0.1 < expected[0] < 0.9
    runs = [["--ann", ann], ["--data-root", root, "--split", "val2014"], ["--data-root", root]]
    for k, where in enumerate(runs + runs[1:2]):
        if k == 3:
            (root / "val2014").mkdir()  # an empty image folder changes nothing either
        assert evaluate.main(["--coco", *map(str, where), "--results", str(tmp_path / "R.json"),
                              "--json-out", str(tmp_path / "o.json")]) == 0
        assert read_json(tmp_path / "o.json")["stats"] == expected
        assert printed_stats(capsys.readouterr().out) == pytest.approx(expected, abs=5e-5)


def test_voc_results_folder_needs_only_annotations_and_split(tmp_path):
    """A VOC tree without JPEGImages/: comp4 files score as the devkit reference does."""
    rng = np.random.default_rng(7)
    gt_raw, det_lines = random_voc_problem(rng, num_images=20)
    root, names = tmp_path / "voc", evaluate.data.VOC_CLASSES[:3]  # VOC names: labels 1..3
    (root / "Annotations").mkdir(parents=True)
    (root / "ImageSets" / "Main").mkdir(parents=True)
    ids = [f"{i:06d}" for i in range(len(gt_raw))]
    for image_id, objs in zip(ids, gt_raw):
        (root / "Annotations" / f"{image_id}.xml").write_text(VOC_XML.format(
            id=image_id, w=400, h=400, objects="".join(VOC_OBJECT.format(
                name=names[c - 1], difficult=int(d), x1=x1, y1=y1, x2=x2, y2=y2)
                for c, x1, y1, x2, y2, d in objs)))
    (root / "ImageSets" / "Main" / "test.txt").write_text("\n".join(ids) + "\n")
    write_comp4(tmp_path / "dets", det_lines, names, ids)
    assert evaluate.main(["--voc", "--data-root", str(root), "--results", str(tmp_path / "dets"),
                          "--json-out", str(tmp_path / "o.json")]) == 0
    r = read_json(tmp_path / "o.json")
    ref11, ref_area = devkit_reference(det_lines, gt_raw, 3)
    assert r["images"] == 20 and 0.05 < r["map_11point"] < 0.95
    for c, name in enumerate(names, start=1):
        assert r["per_class_11point"][name] == pytest.approx(ref11[c], abs=1e-12)
        assert r["per_class_area"][name] == pytest.approx(ref_area[c], abs=1e-12)


def test_shapes_results_folder_fed_back(tmp_path, capsys):
    """--shapes --results: the val split's objects written as comp4 files score AP 1 per class;
    one class's detections moved to another image score that class 0."""
    import data
    source = data.build_source("shapes", None, None, train=False)
    ids, gt = [source.image_id(i) for i in range(len(source))], [source.annotation(i) for i in
                                                                range(len(source))]
    dets = [(g["boxes"], np.ones(len(g["labels"])), g["labels"]) for g in gt]
    evaluate.write_voc_results(tmp_path / "dets", dets, ids, source.class_names)
    assert evaluate.main(["--shapes", "--results", str(tmp_path / "dets"),
                          "--json-out", str(tmp_path / "o.json")]) == 0
    r = read_json(tmp_path / "o.json")
    assert r["images"] == len(ids) and r["map_11point"] == r["map_area"] == 1.0
    assert "mAP 11-point (VOC2007) 1.0000" in capsys.readouterr().out
    first = source.class_names[0]  # every detection of the first class one image later
    lines = (tmp_path / "dets" / f"comp4_det_test_{first}.txt").read_text().splitlines()
    following = {str(i): str(ids[(k + 1) % len(ids)]) for k, i in enumerate(ids)}
    shifted = [" ".join([following[line.split()[0]], *line.split()[1:]]) for line in lines]
    (tmp_path / "dets" / f"comp4_det_test_{first}.txt").write_text("\n".join(shifted) + "\n")
    assert evaluate.main(["--shapes", "--results", str(tmp_path / "dets"),
                          "--json-out", str(tmp_path / "o.json")]) == 0
    per_class = read_json(tmp_path / "o.json")["per_class_area"]
    assert per_class[first] < 0.2 and all(v == 1.0 for k, v in per_class.items() if k != first)


def test_tiny_coco_ground_truth_fed_back(shared_data):
    ann_file = shared_data / "tiny_coco" / "tiny_coco" / "annotations" / "instances_train2017.json"
    anns = json.loads(ann_file.read_text())["annotations"]
    results = [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"],
                "score": 1.0} for a in anns if not a["iscrowd"]]
    r = evaluate.coco_eval(results, ann_file)
    # the sample's README: AP, AP50, AP75, APs, APm, APl = 1; AR1 0.6697, AR10 0.9928, AR100 1
    assert r["stats"][:6] == [1.0] * 6
    assert r["stats"][6] == pytest.approx(0.6697, abs=1e-4)
    assert r["stats"][7] == pytest.approx(0.9928, abs=1e-4)
    assert r["stats"][8] == 1.0


# ----------------------------------------------------------------------------- sources
def test_coco_json_source_ground_truth_fed_back(tmp_path):
    """Any COCO json as a source (no image on disk): its objects fed back score AP 1; a category
    without objects is nan."""
    images, anns = make_coco_json(tmp_path / "gt.json", np.random.default_rng(3))
    gt = json.loads((tmp_path / "gt.json").read_text())
    gt["categories"].append({"id": 50, "name": "airplane"})
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    source = evaluate._CocoJson(tmp_path / "gt.json")
    assert source.image_dir == tmp_path and source.image_paths[0] == str(tmp_path / "100.jpg")
    label = {c: k for k, c in enumerate(source.category_ids, start=1)}
    dets = []
    for i in range(len(source)):
        objs = [a for a in anns if a["image_id"] == source.image_id(i) and not a["iscrowd"]]
        boxes = np.array([a["bbox"] for a in objs], np.float64).reshape(-1, 4)
        boxes[:, 2:] += boxes[:, :2]  # xywh -> xyxy
        dets.append((boxes, np.ones(len(objs)), [label[a["category_id"]] for a in objs]))
        assert sorted(source.annotation(i)["labels"]) == sorted(
            label[a["category_id"]] for a in anns if a["image_id"] == source.image_id(i))
    r = evaluate.score_detections(source, list(range(len(source))), dets, log=lambda *a: None)
    assert r["map"] == r["stats"][0] == 1.0 and r["images"] == len(images)
    assert r["per_class"]["car"] == 1.0 and math.isnan(r["per_class"]["airplane"])


# ----------------------------------------------------------------------------- checkpoints, CLI
VOC_XML = """<annotation><filename>{id}.jpg</filename>
<size><width>{w}</width><height>{h}</height><depth>3</depth></size>{objects}
</annotation>"""
VOC_OBJECT = """<object><name>{name}</name><difficult>{difficult}</difficult><bndbox>
<xmin>{x1}</xmin><ymin>{y1}</ymin><xmax>{x2}</xmax><ymax>{y2}</ymax></bndbox></object>"""


def model_objects(model, images, picks=(0, 3, 11), whole_pixels=True):
    """Per image (uint8 [H, W, 3]), some of an untrained model's own detections as objects
    [(label, x1, y1, x2, y2)] (0-based; whole pixels at least 2 wide for VOC XML), so that scoring
    that model gives a non-trivial AP, which the results-file paths must then reproduce exactly."""
    import torch
    import ssd
    detections = ssd.detect(model, [torch.from_numpy(im).permute(2, 0, 1) for im in images])
    out = []
    for image, (boxes, _, labels) in zip(images, detections):
        h, w = image.shape[:2]
        out.append([])
        for k in [k for k in picks if k < len(boxes)]:
            x1, y1, x2, y2 = boxes[k].tolist()
            if whole_pixels:
                x1, y1 = min(math.floor(x1), w - 2), min(math.floor(y1), h - 2)
                x2, y2 = min(max(round(x2), x1 + 2), w), min(max(round(y2), y1 + 2), h)
            out[-1].append((int(labels[k]), x1, y1, x2, y2))
    return out


def random_images(rng, num_images):
    return [rng.integers(0, 255, size=(int(rng.integers(60, 100)), int(rng.integers(80, 130)), 3),
                         dtype=np.uint8) for _ in range(num_images)]


def make_voc_tree(root, rng, num_images=4, model=None, names=("cat", "dog", "person")):
    """A VOC-layout folder with split 'test' of small random images: one random big object each,
    plus (with a model) three of the model's own detections, the third one difficult."""
    from PIL import Image
    for d in ("Annotations", "JPEGImages", "ImageSets/Main"):
        (root / d).mkdir(parents=True, exist_ok=True)
    ids = [f"00{i:04d}" for i in range(num_images)]
    images = random_images(rng, num_images)
    found = model_objects(model, images) if model else [[] for _ in images]
    for image_id, image, found_here in zip(ids, images, found):
        h, w = image.shape[:2]
        Image.fromarray(image).save(root / "JPEGImages" / f"{image_id}.png")  # lossless
        x1, y1 = int(rng.integers(1, w // 3)), int(rng.integers(1, h // 3))
        objects = [VOC_OBJECT.format(name=names[int(rng.integers(len(names)))], difficult=0,
                                     x1=x1, y1=y1, x2=int(rng.integers(x1 + w // 3, w + 1)),
                                     y2=int(rng.integers(y1 + h // 3, h + 1)))]
        for k, (label, x1, y1, x2, y2) in enumerate(found_here):
            objects.append(VOC_OBJECT.format(name=model.config["class_names"][label - 1],
                                             difficult=int(k == 2), x1=x1 + 1, y1=y1 + 1,
                                             x2=x2, y2=y2))
        (root / "Annotations" / f"{image_id}.xml").write_text(
            VOC_XML.format(id=image_id, w=w, h=h, objects="".join(objects)))
    (root / "ImageSets" / "Main" / "test.txt").write_text("\n".join(ids) + "\n")
    return ids


def make_coco_tree(root, rng, model, category_ids=(3, 7, 18), num_images=4):
    """A COCO layout (val2017) of random images whose objects are some of the model's own
    detections, one random object and, on every other image, a crowd region."""
    from PIL import Image
    (root / "annotations").mkdir(parents=True)
    (root / "val2017").mkdir()
    records, anns = [], []
    images = random_images(rng, num_images)
    found_in = model_objects(model, images, whole_pixels=False)
    for i, (image, found) in enumerate(zip(images, found_in)):
        h, w = image.shape[:2]
        Image.fromarray(image).save(root / "val2017" / f"{i + 1}.png")
        records.append({"id": i + 1, "width": w, "height": h, "file_name": f"{i + 1}.png"})
        objects = [(int(rng.integers(1, 4)), 5, 5, w // 2 + 5, h // 2 + 5, 0)]
        objects += [(*o, 0) for o in found]
        if i % 2:
            objects.append((1, w // 2, h // 2, w, h, 1))
        for label, x1, y1, x2, y2, crowd in objects:
            anns.append({"id": len(anns) + 1, "image_id": i + 1,
                         "category_id": category_ids[label - 1],
                         "bbox": [x1, y1, x2 - x1, y2 - y1], "area": (x2 - x1) * (y2 - y1),
                         "iscrowd": crowd})
    cats = [{"id": c, "name": n} for c, n in zip(category_ids, model.config["class_names"])]
    (root / "annotations" / "instances_val2017.json").write_text(
        json.dumps({"images": records, "annotations": anns, "categories": cats}))


@pytest.fixture(scope="module")
def tiny_checkpoints(tmp_path_factory):
    """Untrained width-1/8 SSD300s saved as checkpoints (3 classes each: post-processing time
    grows with the class count)."""
    import torch
    import ssd
    root = tmp_path_factory.mktemp("weights")
    torch.manual_seed(0)
    weights.save_checkpoint(root / "voc.pt", model=ssd.ssd300(
        3, width=0.125, class_names=["cat", "dog", "person"]))
    weights.save_checkpoint(root / "coco.pt", model=ssd.ssd300(
        3, width=0.125, anchors="coco", class_names=["car", "train", "dog"]))
    weights.save_checkpoint(root / "blood.pt", model=ssd.ssd300(
        3, width=0.125, class_names=["RBC", "WBC", "Platelets"]))
    return root


def read_json(path):
    return json.loads(Path(path).read_text())


@pytest.fixture(scope="module")
def voc_run(tmp_path_factory, tiny_checkpoints):
    """A VOC tree scored from the "voc" checkpoint by the CLI, which also saved its detections."""
    root = tmp_path_factory.mktemp("voc_run")
    make_voc_tree(root / "voc", np.random.default_rng(0),
                  model=weights.load_model(tiny_checkpoints / "voc.pt"))
    args = ["--voc", "--data-root", str(root / "voc"), "--split", "test",
            "--weights", str(tiny_checkpoints / "voc.pt")]
    assert evaluate.main(args + ["--workers", "0", "--batch-size", "3", "--device", "cpu",
                                 "--json-out", str(root / "a.json"),
                                 "--save-results", str(root / "dets")]) == 0
    return {"root": root, "args": args, "json": read_json(root / "a.json")}


def test_voc_checkpoint_and_results_file_paths_agree(voc_run, tiny_checkpoints):
    import data
    root, a = voc_run["root"], voc_run["json"]
    assert evaluate.main(["--voc", "--data-root", str(root / "voc"), "--split", "test",
                          "--results", str(root / "dets"), "--json-out", str(root / "b.json")]) == 0
    assert read_json(root / "b.json") == a
    # data.py gives the tree VOC's 20 classes; the model knows 3, the only ones with objects
    no_gt = [name for name, ap in a["per_class_11point"].items() if ap is None]  # nan -> null
    assert a["images"] == 4 and len(no_gt) == 17
    assert 0.1 < a["map_11point"] < 0.9 and 0.1 < a["map_area"] < 0.9
    # and evaluate_model (train.py's entry; here with a loader process) gives the same numbers
    source = data.build_source("voc", root / "voc", "test", train=False)
    model = weights.load_model(tiny_checkpoints / "voc.pt")
    model.train()
    r = evaluate.evaluate_model(model, source, batch_size=4, workers=1, log=lambda *a: None,
                                progress=False)
    assert model.training  # mode restored
    assert r["map"] == r["map_11point"] == a["map_11point"]
    assert json.loads(json.dumps(r["per_class_area"]), parse_constant=lambda _: None) == a[
        "per_class_area"]  # nan -> null, as --json-out writes it


def test_coco_checkpoint_and_results_file_paths_agree(tmp_path, tiny_checkpoints, capsys):
    import data
    make_coco_tree(tmp_path / "coco", np.random.default_rng(1),
                   weights.load_model(tiny_checkpoints / "coco.pt"))
    common = ["--coco", "--data-root", str(tmp_path / "coco")]
    assert evaluate.main(common + ["--weights", str(tiny_checkpoints / "coco.pt"), "--workers", "0",
                                   "--json-out", str(tmp_path / "a.json"),
                                   "--save-results", str(tmp_path / "dets.json")]) == 0
    results = read_json(tmp_path / "dets.json")
    assert results and {r["category_id"] for r in results} <= {3, 7, 18}
    assert evaluate.main(common + ["--results", str(tmp_path / "dets.json"),
                                   "--json-out", str(tmp_path / "b.json")]) == 0
    a, b = read_json(tmp_path / "a.json"), read_json(tmp_path / "b.json")
    assert a == b and a["images"] == 4 and 0.1 < a["stats"][0] < 0.9
    ev = pycocotools_direct(tmp_path / "coco" / "annotations" / "instances_val2017.json", results)
    assert a["stats"] == [float(s) for s in ev.stats]
    # --ann: instances_val2017.json of the layout finds <root>/val2017; a json elsewhere reads
    # its images from --images (and without them says which are missing)
    ann, other = tmp_path / "coco" / "annotations" / "instances_val2017.json", tmp_path / "x.json"
    other.write_text(ann.read_text())
    w = ["--weights", str(tiny_checkpoints / "coco.pt"), "--workers", "0",
         "--json-out", str(tmp_path / "d.json")]
    images = str(tmp_path / "coco" / "val2017")
    for where in (["--ann", str(ann)], ["--ann", str(other), "--images", images]):
        assert evaluate.main(["--coco", *where, *w]) == 0 and read_json(tmp_path / "d.json") == a
    capsys.readouterr()
    assert evaluate.main(["--coco", "--ann", str(other), *w]) == 2
    assert f"{tmp_path / '1.png'}: image not found (and 3 more of 4)" in capsys.readouterr().err
    source = data.build_source("coco", tmp_path / "coco", None, train=False)
    r = evaluate.evaluate_model(weights.load_model(tiny_checkpoints / "coco.pt"), source, workers=0,
                                log=lambda *a: None, progress=False)
    assert r["map"] == a["stats"][0] and r["stats"] == a["stats"]
    # an empty results file scores 0 instead of crashing
    (tmp_path / "empty.json").write_text("[]")
    assert evaluate.main(common + ["--results", str(tmp_path / "empty.json"),
                                   "--json-out", str(tmp_path / "c.json")]) == 0
    # (-1 stays where the ground truth has no object of that size, as pycocotools reports it)
    assert read_json(tmp_path / "c.json")["stats"] == [-1.0 if s == -1 else 0.0 for s in a["stats"]]


def test_subset_source_checkpoint(tmp_path, tiny_checkpoints):
    import data

    class Subset:  # the source interface over a few images of a larger source
        def __init__(self, source, indices):
            self.source, self.indices = source, indices
            self.class_names = source.class_names

        def __len__(self):
            return len(self.indices)

        def image_id(self, i):
            return self.source.image_id(self.indices[i])

        def load_image(self, i):
            return self.source.load_image(self.indices[i])

        def annotation(self, i):
            return self.source.annotation(self.indices[i])

    names = ("RBC", "WBC", "Platelets")
    make_voc_tree(tmp_path / "blood", np.random.default_rng(4), num_images=6, names=names)
    source = Subset(data.build_source("voc", tmp_path / "blood", "test", train=False), [0, 2, 4])
    model = weights.load_model(tiny_checkpoints / "blood.pt")
    r = evaluate.evaluate_model(model, source, workers=0, log=lambda *a: None, progress=False)
    assert r["images"] == 3 and set(r["per_class_11point"]) == set(source.class_names) <= set(names)
    assert 0.0 <= r["map_area"] <= 1.0
    present = sorted({source.class_names[int(c) - 1] for i in range(3)
                      for c in source.annotation(i)["labels"]})
    message = (rf"voc.pt: the model does not know {len(present)} class\(es\) that the data has "
               rf"objects of \({', '.join(present)}\)")
    with pytest.raises(evaluate.EvalError, match=message):
        evaluate.evaluate_model(weights.load_model(tiny_checkpoints / "voc.pt"), source, workers=0,
                                name=str(tiny_checkpoints / "voc.pt"))


def test_cli_errors_are_one_line(tmp_path, tiny_checkpoints, capsys):
    make_voc_tree(tmp_path / "voc", np.random.default_rng(2), num_images=2)
    common = ["--voc", "--data-root", str(tmp_path / "voc")]
    cases = [
        (["--split", "nosuch", "--results", str(tmp_path)], "nosuch.txt: split file not found"),
        (["--split", "test", "--weights", str(tiny_checkpoints / "coco.pt")], "does not know"),
        (["--split", "test", "--weights", str(tmp_path / "missing.pt")], "missing.pt"),
        (["--split", "test", "--results", str(tmp_path / "none")], "none: not a folder"),
    ]
    for extra, message in cases:
        assert evaluate.main(common + extra) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("evaluate.py: error: "), err
        assert message in err[0], err
    # an unreadable image: the others are scored, the exit code says some inputs failed
    (tmp_path / "voc" / "JPEGImages" / "000001.png").write_bytes(b"not an image")
    assert evaluate.main(common + ["--split", "test", "--workers", "0", "--json-out",
                                   str(tmp_path / "r.json"),
                                   "--weights", str(tiny_checkpoints / "voc.pt")]) == 1
    assert "000001.png" in capsys.readouterr().err
    assert read_json(tmp_path / "r.json")["images"] == 1


def test_cli_subprocess_help_and_error(tmp_path):
    run = lambda *a: subprocess.run([sys.executable, str(HERE / "evaluate.py"), *a],  # noqa: E731
                                    capture_output=True, text=True, cwd=tmp_path, timeout=120)
    p = run("--help")
    assert p.returncode == 0 and "--json-out" in p.stdout and "comp4_det_test" in p.stdout
    assert "(default 8)" in p.stdout and "examples:" in p.stdout and "--ann" in p.stdout
    (tmp_path / "r.json").write_text("[]")
    p = run("--coco", "--data-root", str(tmp_path / "nothing"),
            "--results", str(tmp_path / "r.json"))
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert p.stderr.strip() == f"evaluate.py: error: {tmp_path / 'nothing'}: folder does not exist"


def test_torchrun_shards_give_the_same_numbers(voc_run):
    """Two processes (gloo on the CPU) each detect on half of the images; rank 0 gathers and
    scores: the JSON must equal the single-process one."""
    out = voc_run["root"] / "two.json"
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                        "--nproc_per_node", "2", str(HERE / "evaluate.py"), *voc_run["args"],
                        "--workers", "0", "--json-out", str(out)],
                       capture_output=True, text=True, timeout=300, cwd=voc_run["root"])
    assert p.returncode == 0, p.stderr[-2000:]
    assert p.stdout.count("mAP 11-point") == 1  # only rank 0 reports
    assert "eval 2/2 images" in p.stderr  # rank 0's progress over its half
    assert read_json(out) == voc_run["json"]


def test_bf16_map_is_within_0_002_of_float32(tmp_path):
    """test_detect.py's blob finder made to grade its scores: the green channel passes through the
    backbone too, so after L2Norm the red one is 20 r / |(r, g)| and a patch's score falls as its
    green rises. 300x300 images (no resize) hold 4x4-pixel patches, each inside one 8-pixel cell:
    exactly that cell fires, with its 30x30 anchor. Some patches are objects (a 30x30 box around
    the patch), the others are false positives, and one object per image has no patch. The head
    also widens its boxes a little, so that bfloat16 rounding reaches boxes and scores alike: the
    VOC mAP (in [0, 1]) under bf16 autocast is within 0.002 (0.2 points) of float32's, and the
    convolutions did run in bfloat16."""
    import torch
    from PIL import Image
    import data
    from test_detect import blob_finder
    rng, root = np.random.default_rng(8), tmp_path / "voc"
    for d in ("Annotations", "JPEGImages", "ImageSets/Main"):
        (root / d).mkdir(parents=True)
    ids = [f"{i:06d}" for i in range(6)]
    # green levels whose scores stay apart by more than bfloat16's step (0.125 at L2Norm's 14-20):
    # near-equal scores may swap ranks under bf16, which moves an AP by about a point
    greens = iter(rng.permutation(np.linspace(177, 255, 4 * len(ids)).round().astype(int)))
    cells = [(cx, cy) for cx in (4, 12, 20, 28) for cy in (4, 12, 20, 28)]  # centres 8 c + 4
    for image_id in ids:
        image, objects = Image.new("RGB", (300, 300)), []
        for k, j in enumerate(rng.permutation(len(cells))[:5]):
            cx, cy = cells[j]
            if k < 4:  # patches 0-2 are objects, 3 a false positive; 4: an object it misses
                image.paste((255, int(next(greens)), 0),
                            (8 * cx + 2, 8 * cy + 2, 8 * cx + 6, 8 * cy + 6))
            if k != 3:  # a 30x30 box around the cell centre (1-based VOC pixels)
                objects.append(VOC_OBJECT.format(name="blob", difficult=0, x1=8 * cx - 10,
                                                 y1=8 * cy - 10, x2=8 * cx + 19, y2=8 * cy + 19))
        image.save(root / "JPEGImages" / f"{image_id}.png")
        (root / "Annotations" / f"{image_id}.xml").write_text(
            VOC_XML.format(id=image_id, w=300, h=300, objects="".join(objects)))
    (root / "ImageSets" / "Main" / "test.txt").write_text("\n".join(ids) + "\n")
    source = data.build_source("voc", root, "test", train=False)
    model = blob_finder()
    with torch.no_grad():
        for layer in model.vgg[:23]:
            if isinstance(layer, torch.nn.Conv2d):
                layer.weight[1, 1, 1, 1] = 1.0  # green passes through as well
        model.box_heads[0].weight[2, 0, 1, 1] = 0.01  # anchor 0's dw ~ 0.1-0.2 where it fires
    dtypes, threads = [], torch.get_num_threads()
    model.vgg[0].register_forward_hook(lambda m, i, out: dtypes.append(out.dtype))
    torch.set_num_threads(1)  # tiny convolutions: more threads only spin (see test_detect.py)
    try:
        results = [evaluate.evaluate_model(model, source, workers=0, log=lambda *a: None,
                                           progress=False, bf16=bf16) for bf16 in (False, True)]
    finally:
        torch.set_num_threads(threads)
    assert dtypes[0] == torch.float32 and dtypes[-1] == torch.bfloat16
    maps = [r["map_11point"] for r in results] + [r["map_area"] for r in results]
    assert 0.3 < maps[0] < 0.95 and 0.3 < maps[2] < 0.95, maps  # graded: neither 0 nor 1
    assert abs(maps[1] - maps[0]) <= 0.002 and abs(maps[3] - maps[2]) <= 0.002, maps
