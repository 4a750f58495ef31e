"""Evaluate detections: PASCAL VOC mAP and COCO AP, from a checkpoint or from a results file.

    python evaluate.py --voc --weights runs/voc/best.pt                     # VOC2007 test
    python evaluate.py --voc --data-root data/BCCD --split val --weights W --bf16
    python evaluate.py --voc --results dets/          # a folder of comp4_det_test_<class>.txt
    python evaluate.py --coco --weights W --json-out metrics.json       # COCO val2017
    python evaluate.py --coco --results detections_val2017.json         # no images needed
    python evaluate.py --coco --ann instances_val2014.json --results dets.json
    torchrun --nproc_per_node 4 evaluate.py --coco --weights W          # images sharded over GPUs

A results file needs the annotations only (COCO: the json; VOC: Annotations/ and the split file);
images are read only with --weights.

VOC (VOCevaldet.m of the PASCAL VOC 2007 devkit): per class, detections are ranked by score with
a stable sort (equal scores keep image order, then the order within the image). Each detection
takes the ground truth object of its class in its image with the highest IoU, whether that object
is already taken or not (first object on ties). If that IoU is >= 0.5: a `difficult` object makes
the detection count as neither TP nor FP; an object not yet taken makes it a TP and takes the
object; an object already taken makes it a FP (a duplicate). Otherwise it is a FP. Difficult
objects are not counted as positives. AP is the VOC2007 11-point metric or the VOC2010+ area
under the precision envelope; mAP is the mean over the classes that have at least one
non-difficult object (a class without any reports nan and is left out).

Pixel convention: the devkit measures 1-based boxes with +1 in widths, heights and intersections.
Our boxes are 0-based with no +1 (data.py subtracts 1 from xmin/ymin only), so x2 - x1 here is
the devkit's x2 - x1 + 1 on the raw numbers, and plain IoU on our boxes equals the devkit's IoU on
the raw ones. Files in the devkit's comp4 format are 1-based: reading subtracts 1 from x1/y1,
writing adds it back.

COCO: pycocotools COCOeval (bbox) on results in the standard format (`image_id` of the annotation
file, original `category_id`, `bbox` = [x, y, w, h] in original pixels with w = x2 - x1, `score`).
"""
import argparse
import contextlib
import functools
import io
import json
import math
import os
import re
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

import data
import ssd
import weights

IOU_THRESHOLD = 0.5          # devkit minoverlap; a match needs IoU >= 0.5 (py-faster-rcnn uses >)
METRICS = ("11point", "area")  # VOC2007 test / VOC2010+
DEFAULT_ROOT = {"voc": "data/VOCdevkit", "coco": "data/coco"}
PROGRESS_EVERY_S = 2.0
COCO_STAT_NAMES = [  # (short, COCOeval.summarize's line) for its 12 stats, in its order
    (short, f"{short[:2]:<5} IoU={iou:<9} area={area:<6} maxDets={dets}") for short, iou, area, dets
    in zip("AP AP50 AP75 APs APm APl AR1 AR10 AR100 ARs ARm ARl".split(),
           ["0.50:0.95", "0.50", "0.75"] + ["0.50:0.95"] * 9,
           (["all"] * 3 + ["small", "medium", "large"]) * 2, [100] * 6 + [1, 10] + [100] * 4)]
_COMP_FILE = re.compile(r"^comp\d+_det_[A-Za-z0-9]+_(.+)\.txt$")  # devkit results file name


class EvalError(ValueError):
    """Bad evaluation input; the message starts with the file it concerns where there is one."""


def voc_eval(detections, ground_truth, class_names, iou_threshold=IOU_THRESHOLD):
    """PASCAL VOC AP per class and mAP, 11-point and area, as the devkit computes them.

    detections: one entry per image, (boxes [k,4], scores [k], labels [k] in 1..C) or None.
    ground_truth: one dict per image (the same order) with boxes [n,4], labels [n] and optional
    difficult [n] (data.py's annotation). Boxes are xyxy 0-based pixels, no +1 (module docstring).
    Returns {"map_11point", "map_area", "per_class_11point": {name: ap}, "per_class_area",
    "num_gt": {name: non-difficult objects}}; a class without objects has AP nan.
    """
    if len(detections) != len(ground_truth):
        raise ValueError(f"voc_eval: {len(detections)} detection entries for "
                         f"{len(ground_truth)} images")
    num_images = len(ground_truth)
    (gt_boxes, gt_labels, gt_difficult), gt_image = _stack(
        [(g["boxes"], g["labels"], np.zeros(len(g["labels"]), bool)
          if g.get("difficult") is None else g["difficult"]) for g in ground_truth],
        ((np.float64, 4), (np.int64, None), (bool, None)))
    (det_boxes, det_scores, det_labels), det_image = _stack(
        [(None, None, None) if d is None else d for d in detections],
        ((np.float64, 4), (np.float64, None), (np.int64, None)))

    result = {"per_class_11point": {}, "per_class_area": {}, "num_gt": {}}
    for c, name in enumerate(class_names, start=1):
        g = np.flatnonzero(gt_labels == c)
        npos = int(np.count_nonzero(~gt_difficult[g]))
        d = np.flatnonzero(det_labels == c)
        d = d[np.argsort(-det_scores[d], kind="mergesort")]  # stable: ties keep image order
        tp, ignored = _match_class(det_boxes[d], det_image[d], gt_boxes[g], gt_image[g],
                                   gt_difficult[g], num_images, iou_threshold)
        cum_tp = np.cumsum(tp[~ignored])  # ignored detections are neither TP nor FP
        rec, prec = cum_tp / max(npos, 1), cum_tp / np.arange(1, len(cum_tp) + 1)
        result["num_gt"][name] = npos
        for metric in METRICS:
            result[f"per_class_{metric}"][name] = voc_ap(rec, prec, metric) if npos else math.nan
    for metric in METRICS:
        aps = [ap for ap in result[f"per_class_{metric}"].values() if not math.isnan(ap)]
        result[f"map_{metric}"] = float(np.mean(aps)) if aps else math.nan
    return result


def voc_ap(rec, prec, metric="11point"):
    """Average precision of a recall/precision curve (rec non-decreasing, as cumulative sums are).

    "11point" (VOC2007): mean over t = 0, 0.1, ..., 1 of the highest precision at recall >= t,
    0 where recall never reaches t. The thresholds are the doubles nearest to k/10, so a recall of
    exactly 3/10 reaches 0.3 (np.arange(0, 1.1, 0.1) gives 0.30000000000000004 and would not).
    "area" (VOC2010+): area under the precision envelope (precision made non-increasing from the
    right) over the recall steps. An empty curve has AP 0.
    """
    rec, prec = (np.asarray(x, dtype=np.float64).reshape(-1) for x in (rec, prec))
    if rec.shape != prec.shape:
        raise ValueError(f"voc_ap: rec and prec differ in length ({rec.size} vs {prec.size})")
    if np.any(np.diff(rec) < 0):
        raise ValueError("voc_ap: recall must be non-decreasing")
    if metric == "11point":
        if rec.size == 0:
            return 0.0
        envelope = np.maximum.accumulate(prec[::-1])[::-1]  # best precision at this rank or later
        first = np.searchsorted(rec, np.arange(11) / 10, side="left")  # first rank with rec >= t
        return float(np.where(first < rec.size, envelope[np.minimum(first, rec.size - 1)],
                              0.0).mean())
    if metric == "area":
        mrec = np.concatenate(([0.0], rec, [1.0]))
        mpre = np.maximum.accumulate(np.concatenate(([0.0], prec, [0.0]))[::-1])[::-1]
        step = np.flatnonzero(mrec[1:] != mrec[:-1])
        return float(np.sum((mrec[step + 1] - mrec[step]) * mpre[step + 1]))
    raise ValueError(f"voc_ap: metric must be one of {METRICS}, not {metric!r}")


def _stack(per_image, fields):
    """Per-image tuples of arrays -> (one array per field, image index of each row [N]);
    fields: (dtype, width or None) per position. ValueError when an image's lengths differ."""
    cols = [[_numpy(row[k], dtype, width) for row in per_image]
            for k, (dtype, width) in enumerate(fields)]
    counts = [len(a) for a in cols[0]]
    if any([len(a) for a in col] != counts for col in cols[1:]):
        raise ValueError("voc_eval: boxes, labels, scores or difficult of an image differ in "
                         "length")
    arrays = [np.concatenate(col) if col else np.zeros((0, width) if width else 0, dtype)
              for col, (dtype, width) in zip(cols, fields)]
    return arrays, np.repeat(np.arange(len(counts)), counts)


def _match_class(det_boxes, det_image, gt_boxes, gt_image, gt_difficult, num_images, iou_thr):
    """Devkit matching of one class's detections, already in rank order -> (tp bool [D],
    ignored bool [D]): ignored = the best match is a difficult object."""
    tp, ignored = np.zeros(len(det_boxes), bool), np.zeros(len(det_boxes), bool)
    count = np.bincount(gt_image, minlength=num_images)  # gt_image ascending: a CSR layout
    start = np.cumsum(count) - count
    has_gt = np.flatnonzero(count[det_image] > 0)  # detections in images without objects are FP
    if has_gt.size == 0:
        return tp, ignored
    d_start, d_count = start[det_image[has_gt]], count[det_image[has_gt]]
    cols = np.arange(d_count.max())
    valid = cols[None, :] < d_count[:, None]                       # [D', G]
    gt_index = np.where(valid, d_start[:, None] + cols[None, :], 0)  # [D', G]
    iou = _box_iou_pairs(det_boxes[has_gt][:, None, :], gt_boxes[gt_index])  # [D', G]
    iou[~valid] = -1.0
    best = iou.argmax(axis=1)  # first object on ties, like the devkit's strict '>' scan
    best_iou = iou[np.arange(has_gt.size), best]
    best_gt = d_start + best
    hit = best_iou >= iou_thr
    on_difficult = hit & gt_difficult[best_gt]
    claim = np.flatnonzero(hit & ~on_difficult)
    # An object goes to the first detection (in rank order) whose best match it is; the later
    # ones are duplicates. Their best object is fixed, so no sequential loop is needed.
    _, first = np.unique(best_gt[claim], return_index=True)
    tp[has_gt[claim[first]]] = True
    ignored[has_gt[on_difficult]] = True
    return tp, ignored


def _box_iou_pairs(a, b):
    """IoU of a [..., 4] with b [..., 4] elementwise (xyxy, no +1); 0 where the union is empty."""
    iw = np.clip(np.minimum(a[..., 2], b[..., 2]) - np.maximum(a[..., 0], b[..., 0]), 0, None)
    ih = np.clip(np.minimum(a[..., 3], b[..., 3]) - np.maximum(a[..., 1], b[..., 1]), 0, None)
    inter = iw * ih
    union = ((a[..., 2] - a[..., 0]) * (a[..., 3] - a[..., 1])
             + (b[..., 2] - b[..., 0]) * (b[..., 3] - b[..., 1]) - inter)
    return np.where(union > 0, inter / np.where(union > 0, union, 1.0), 0.0)


def write_voc_results(folder, detections, image_ids, class_names, prefix="comp4_det_test_"):
    """Write devkit result files, one per class: `<image_id> <score> <x1> <y1> <x2> <y2>` 1-based.

    detections: per image (boxes [k,4] 0-based pixels, scores, labels 1..C) or None, aligned with
    image_ids. Numbers are written in Python's shortest round-trip form, so reading the files back
    gives exactly the same boxes and scores (and the same metrics). Returns the file paths.
    """
    lines = {c: [] for c in range(1, len(class_names) + 1)}
    for image_id, (x1, y1, x2, y2), score, label in _rows(detections, image_ids):
        if label in lines:
            lines[label].append(f"{image_id} {score!r} {x1 + 1!r} {y1 + 1!r} {x2!r} {y2!r}\n")
    paths = [Path(folder) / f"{prefix}{name}.txt" for name in class_names]
    for c, path in enumerate(paths, start=1):
        weights.write_atomic(path, lambda f: f.write("".join(lines[c])))
    return paths


def read_voc_results(folder, image_ids, class_names, log=print):
    """Read a folder of comp<N>_det_<set>_<class>.txt files into per-image detections.

    Returns a list aligned with image_ids of (boxes [k,4] 0-based, scores [k], labels [k]), each
    image's rows in file order (so equal scores rank as the devkit ranks them when a file lists
    its images in order, as write_voc_results does). Raises EvalError for a missing folder, a
    malformed line or an image id not in image_ids. Files of classes not in class_names are
    skipped with a warning; a class without a file has no detections (warned too).
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise EvalError(f"{folder}: not a folder (--voc --results wants a folder of "
                        "comp4_det_test_<class>.txt files)")
    label_of = {name: c for c, name in enumerate(class_names, start=1)}
    files = {}
    for path in sorted(folder.iterdir()):
        name = m.group(1) if (m := _COMP_FILE.match(path.name)) else None
        if name is not None and name not in label_of:
            log(f"warning: {path}: class {name!r} is not one of the data's classes; skipped")
        elif name in files:
            raise EvalError(f"{path}: a second results file for class {name!r} "
                            f"(first: {files[name].name})")
        elif name is not None:
            files[name] = path
    if not files:
        raise EvalError(f"{folder}: no comp4_det_test_<class>.txt file of any of the classes "
                        f"{', '.join(class_names)}")
    if missing := [n for n in class_names if n not in files]:
        log(f"warning: {folder}: no results file for {', '.join(missing)} (no detections)")
    index = {str(i): k for k, i in enumerate(image_ids)}
    image, rows = [], []  # rows: (label, score, x1, y1, x2, y2) in file order
    for name, path in files.items():
        for n, fields in enumerate(map(str.split, path.read_text().splitlines()), 1):
            if not fields:
                continue
            if len(fields) != 6:
                raise EvalError(f"{path}:{n}: expected '<image_id> <score> <x1> <y1> <x2> <y2>', "
                                f"got {len(fields)} fields")
            if fields[0] not in index:
                raise EvalError(f"{path}:{n}: image id {fields[0]!r} is not in the ground truth")
            try:
                rows.append([label_of[name], *map(float, fields[1:])])
            except ValueError:
                raise EvalError(f"{path}:{n}: score and box must be numbers") from None
            if not all(map(math.isfinite, rows[-1])):
                raise EvalError(f"{path}: non-finite score or coordinate")
            image.append(index[fields[0]])
    order = np.argsort(image, kind="mergesort")  # per image; file order kept within an image
    rows = np.array(rows, np.float64).reshape(-1, 6)[order]  # [N, 6]
    split = np.cumsum(np.bincount(np.array(image, np.int64), minlength=len(image_ids)))[:-1]
    return [(r[:, 2:] - [1, 1, 0, 0], r[:, 1], r[:, 0].astype(np.int64))  # 1-based -> 0-based
            for r in np.split(rows, split)]


def _rows(detections, image_ids):
    """(image_id, [x1, y1, x2, y2], score, label) of every detection, as Python numbers."""
    for image_id, det in zip(image_ids, detections):
        if det is not None:
            yield from ((image_id, *row) for row in zip(
                _numpy(det[0], np.float64, 4).tolist(), _numpy(det[1], np.float64).tolist(),
                _numpy(det[2], np.int64).tolist()))


def coco_eval(results, coco_gt, image_ids=None, class_names=None, name="results"):
    """pycocotools COCOeval (bbox) over image_ids (default: every image of the annotation file).

    coco_gt: an annotation json path or a pycocotools COCO object. class_names: report names for
    the categories in ascending id order (default: the json's names). Results naming an image
    not in image_ids or an unknown category raise EvalError; an empty list scores 0 (pycocotools'
    loadRes cannot take one). Returns {"stats": the 12 COCOeval numbers (-1 where the ground truth
    has no object in that area range), "per_class": {name: AP@[.5:.95]}, "per_class_ap50"}; a
    category without objects in these images has AP nan.
    """
    gt = coco_gt if isinstance(coco_gt, COCO) else _load_coco(coco_gt)
    image_ids = sorted(gt.getImgIds() if image_ids is None else image_ids)
    known_images, cat_ids = set(image_ids), sorted(gt.getCatIds())
    for i, r in enumerate(results):
        if r["image_id"] not in known_images:
            raise EvalError(f"{name}: entry {i}: image_id {r['image_id']!r} is not in the "
                            "ground truth")
        if r["category_id"] not in gt.cats:
            raise EvalError(f"{name}: entry {i}: category_id {r['category_id']!r} is not a "
                            "category of the ground truth")
    class_names = [gt.cats[c]["name"] for c in cat_ids] if class_names is None else class_names
    if len(class_names) != len(cat_ids):
        raise ValueError(f"coco_eval: {len(class_names)} class names for {len(cat_ids)} "
                         "categories")
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress; we print ours
        if results:
            dt = gt.loadRes([dict(r) for r in results])  # loadRes adds fields to the dicts it gets
        else:  # loadRes cannot take an empty list: no detections at all
            dt, dt.dataset = COCO(), dict(gt.dataset, annotations=[])
            dt.createIndex()
        ev = COCOeval(gt, dt, "bbox")
        ev.params.imgIds = image_ids
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    precision = ev.eval["precision"]  # [T iou, R recall, K class, A area, M maxDets]; -1 = no GT
    per_class, per_class_ap50 = {}, {}
    for k, cls in enumerate(class_names):  # area "all", maxDets 100, as stats[0] and stats[1]
        for out, p in ((per_class, precision[:, :, k, 0, -1]),
                       (per_class_ap50, precision[0, :, k, 0, -1])):
            p = p[p > -1]
            out[cls] = float(p.mean()) if p.size else math.nan
    return {"stats": [float(s) for s in ev.stats], "per_class": per_class,
            "per_class_ap50": per_class_ap50}


def coco_results(detections, image_ids, category_ids):
    """COCO results list from per-image (boxes xyxy pixels, scores, labels 1..C) detections:
    [{"image_id", "category_id": category_ids[label-1], "bbox": [x, y, x2-x, y2-y], "score"}]."""
    return [{"image_id": i, "category_id": category_ids[label - 1],
             "bbox": [x1, y1, x2 - x1, y2 - y1], "score": score}  # w = x2 - x1, no +1
            for i, (x1, y1, x2, y2), score, label in _rows(detections, image_ids)]


def read_coco_results(path):
    """A COCO results json: a list of {image_id, category_id, bbox [x,y,w,h], score}."""
    path = Path(path)
    try:
        results = json.loads(path.read_text())
    except FileNotFoundError:
        raise EvalError(f"{path}: results file not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise EvalError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(results, list):
        raise EvalError(f"{path}: expected a JSON list of detections, "
                        f"got {type(results).__name__}")
    keys = ("image_id", "category_id", "bbox", "score")
    for i, r in enumerate(results):
        if not (isinstance(r, dict) and all(k in r for k in keys)
                and all(isinstance(r[k], int) for k in keys[:2])
                and isinstance(r["bbox"], list) and len(r["bbox"]) == 4
                and all(isinstance(v, (int, float)) and math.isfinite(v)
                        for v in r["bbox"] + [r["score"]])):
            raise EvalError(f"{path}: entry {i} is not {{image_id: int, category_id: int, bbox: "
                            f"[x, y, w, h], score}} with finite numbers: {json.dumps(r)[:120]}")
    return results


def _load_coco(ann_file):
    """pycocotools COCO object for an annotation json, quietly; EvalError names a bad file."""
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            coco = COCO(str(ann_file))
    except FileNotFoundError:
        raise EvalError(f"{ann_file}: annotation file not found") from None
    except (ValueError, KeyError, TypeError, AttributeError) as e:  # json or schema errors
        raise EvalError(f"{ann_file}: not a COCO annotation file "
                        f"({type(e).__name__}: {e})") from None
    if "images" not in coco.dataset or "categories" not in coco.dataset:
        raise EvalError(f"{ann_file}: not a COCO annotation file (no 'images' or 'categories')")
    return coco


def evaluate_model(model, source, batch_size=8, device=None, workers=2, metric="11point", log=print,
                   progress=True, name="model", bf16=False, **detect_options):
    """Detect on every image of a data.py source and score it (train.py's --eval-every).

    Returns the --json-out dict (VOC: map_11point, map_area, per_class_11point, per_class_area;
    COCO: stats, per_class) plus "map" (the headline: VOC `metric` mAP for VOC-layout and shapes
    sources, COCO AP for COCO sources), "images" and "failed_images". Images that cannot be read
    are reported through `log` and left out. The model's train/eval mode is restored afterwards.
    """
    if metric not in METRICS:
        raise ValueError(f"evaluate_model: metric must be one of {METRICS}, not {metric!r}")
    model = getattr(model, "module", model)  # a DDP-wrapped model
    if device is not None:
        model.to(device)
    mapping = _class_mapping(model, source, name)
    was_training = model.training
    model.eval()
    try:
        detections, failed = _predict(model, source, range(len(source)), mapping, batch_size,
                                      workers, progress, bf16, **detect_options)
    finally:
        model.train(was_training)
    for line in failed:
        log(f"warning: skipped {line}")
    indices = [i for i in range(len(source)) if i in detections]
    result = score_detections(source, indices, [detections[i] for i in indices], metric, log)
    result["failed_images"] = len(failed)
    return result


def score_detections(source, indices, detections, metric="11point", log=print):
    """Metrics of per-image detections (source labels, pixels), aligned with `indices`, printed
    through `log`. VOC-layout and shapes sources: voc_eval, "map" = the `metric` mAP. COCO
    sources (with ann_file and category_ids): coco_eval on their json, "map" = AP@[.5:.95].
    Adds "images"."""
    if not indices:
        raise EvalError("no images to evaluate")
    if hasattr(source, "ann_file") and hasattr(source, "category_ids"):
        ids = [source.image_id(i) for i in indices]
        result = coco_eval(coco_results(detections, ids, source.category_ids), source.ann_file,
                           ids, source.class_names)
        result.update(map=result["stats"][0], images=len(indices))
    else:
        result = voc_eval(detections, [source.annotation(i) for i in indices], source.class_names)
        result.update(map=result[f"map_{metric}"], metric=metric, images=len(indices))
    print_result(result, log)
    return result


def print_result(result, log=print):
    """The per-class table and the headline numbers ('-' for a class without ground truth)."""
    ap = lambda v, width: f"{'-':>{width}}" if math.isnan(v) else f"{v:{width}.4f}"  # noqa: E731
    if "stats" in result:
        log(f"{'class':<20} {'AP':>7} {'AP50':>7}")
        for name, value in result["per_class"].items():
            log(f"{name:<20} {ap(value, 7)} {ap(result['per_class_ap50'][name], 7)}")
        for (short, long), value in zip(COCO_STAT_NAMES, result["stats"]):
            log(f"{short:<6} {long:<44} {value:7.4f}")
        log(f"COCO AP {result['stats'][0]:.4f} over {result['images']} images")
        return
    log(f"{'class':<20} {'objects':>7} {'AP 11pt':>8} {'AP area':>8}")
    for name, value in result["per_class_11point"].items():
        log(f"{name:<20} {result['num_gt'][name]:>7} {ap(value, 8)} "
            f"{ap(result['per_class_area'][name], 8)}")
    log(f"mAP 11-point (VOC2007) {result['map_11point']:.4f}   "
        f"mAP area (VOC2010+) {result['map_area']:.4f}   over {result['images']} images")


def _class_mapping(model, source, name="model"):
    """int64 [C_model + 1]: the source label of each model label (0 = a class the data lacks).

    By COCO category id when both the model config ("category_ids") and the source have them,
    else by class name. A data class the model does not know is fine when the data has no object
    of it (its AP is nan either way); otherwise EvalError names those classes.
    """
    cfg, src_names = model.config, list(source.class_names)
    src_cats = getattr(source, "category_ids", None)
    if cfg.get("category_ids") is not None and src_cats is not None:
        model_keys, src_keys = list(cfg["category_ids"]), list(src_cats)
    elif cfg.get("class_names") is not None:
        model_keys, src_keys = list(cfg["class_names"]), src_names
    else:
        raise EvalError(f"{name}: the model config has no class_names to match the data's "
                        "classes")
    unknown = [c for c, k in enumerate(src_keys, start=1) if k not in set(model_keys)]
    if unknown:  # only now read every annotation (shapes renders its images to make them)
        present = {int(label) for i in range(len(source))
                   for label in source.annotation(i)["labels"]}
        if missing := [src_names[c - 1] for c in unknown if c in present]:
            raise EvalError(f"{name}: the model does not know {len(missing)} class(es) that the "
                            f"data has objects of ({_some(missing)}); it knows "
                            f"{_some(model_keys)}")
    src_label = {k: c for c, k in enumerate(src_keys, start=1)}
    return np.array([0] + [src_label.get(k, 0) for k in model_keys], dtype=np.int64)


def _some(items, shown=8):
    """'a, b, c, ...': the first few items of a list, for messages."""
    return ", ".join(map(str, items[:shown])) + (", ..." if len(items) > shown else "")


def _predict(model, source, indices, mapping, batch_size, workers, progress, bf16,
             **detect_options):
    """The model on source images `indices` in batches -> ({index: (boxes [k,4] pixels, scores,
    source labels)}, error lines of unreadable images). Model classes the data lacks (mapping 0)
    are dropped; with `progress`, a line goes to stderr every few seconds."""
    loader = torch.utils.data.DataLoader(list(indices), batch_size=batch_size, num_workers=workers,
                                         collate_fn=functools.partial(_load_batch, source))
    detections, failed = {}, []
    start = last = time.perf_counter()
    done, total = 0, len(indices)
    for batch in loader:
        failed += [err for _, image, err in batch if image is None]
        ok = [(i, image) for i, image, _ in batch if image is not None]
        outputs = ssd.detect(model, [im for _, im in ok], bf16, **detect_options) if ok else []
        for (i, _), (boxes, scores, labels) in zip(ok, outputs):
            labels = mapping[labels.numpy()]
            keep = labels > 0
            detections[i] = (boxes.numpy()[keep], scores.numpy()[keep], labels[keep])
        done += len(batch)
        now = time.perf_counter()
        if progress and (now - last >= PROGRESS_EVERY_S or done == total):
            rate = done / max(now - start, 1e-9)
            print(f"eval {done}/{total} images  {rate:.1f} img/s  "
                  f"ETA {data.duration((total - done) / rate)}", file=sys.stderr, flush=True)
            last = now
    return detections, failed


def _load_batch(source, indices):
    """DataLoader collate: (index, uint8 [3,H,W] tensor or None, error or None) per image."""
    out = []
    for i in indices:
        try:
            out.append((i, data.to_tensor(source.load_image(i).convert("RGB")), None))  # [3, H, W]
        except (OSError, ValueError) as e:  # data.DataError is a ValueError
            out.append((i, None, str(e)))
    return out


class _CocoJson(data.FileSource):
    """data.py's source interface over any COCO annotation json, in the file's image order.
    Images are looked for only when read, in `image_dir`: by default <root>/<split> for
    <root>/annotations/instances_<split>.json, else the json's own folder. annotation(i) holds the
    labels only: pycocotools scores the boxes on the json itself."""

    def __init__(self, ann_file, image_dir=None):
        self.ann_file, coco, p = str(ann_file), _load_coco(ann_file), Path(ann_file)
        layout = p.parent.parent / p.stem[len("instances_"):]
        self.image_dir = Path(image_dir or (layout if p.parent.name == "annotations"
                                            and p.stem.startswith("instances_")
                                            and layout.is_dir() else p.parent))
        self.category_ids = sorted(coco.getCatIds())
        self.class_names = [str(coco.cats[c]["name"]) for c in self.category_ids]
        self.ids = [im["id"] for im in coco.dataset["images"]]
        self.image_paths = [str(self.image_dir / coco.imgs[i]["file_name"]) for i in self.ids]
        label = {c: k for k, c in enumerate(self.category_ids, start=1)}
        self._annotations = [{"labels": np.array([label[a["category_id"]] for a in
                                                  coco.imgToAnns[i]], np.int64)} for i in self.ids]


def main(argv=None):
    args = parse_args(argv)
    rank, world, device = _init_distributed()
    try:
        result, failed = _run(args, rank, world, device)
        if result is not None and args.json_out:
            text = json.dumps(_json_safe(result), indent=1, allow_nan=False) + "\n"
            weights.write_atomic(args.json_out, lambda f: f.write(text))
    except (EvalError, data.DataError, weights.CheckpointError, OSError) as e:
        print(f"evaluate.py: error: {e}", file=sys.stderr)
        return 2
    finally:
        if world > 1:
            dist.destroy_process_group()
    return 1 if failed else 0


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        prog="evaluate.py", formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n" + __doc__.split("\n\n")[1] + "\n\n" + __doc__.split("\n\n")[2],
        description="VOC mAP (11-point and area, difficult objects ignored) or COCO AP "
                    "(pycocotools) of a checkpoint or of a results file. Under torchrun the "
                    "images are sharded over the processes.")
    kind = p.add_mutually_exclusive_group(required=True)
    kind.add_argument("--voc", action="store_true", help="PASCAL VOC devkit metric")
    kind.add_argument("--coco", action="store_true",
                      help="COCO metric (pycocotools COCOeval, bbox)")
    kind.add_argument("--shapes", action="store_true",
                      help="VOC metric on the built-in synthetic shapes set (split val; no files)")
    p.add_argument("--data-root", help="VOC: a VOCdevkit folder (split 'test' means VOC2007 test) "
                   f"or any VOC-layout folder (default {DEFAULT_ROOT['voc']}); COCO: a folder with "
                   "annotations/instances_<split>.json and, for --weights, <split>/ "
                   f"(default {DEFAULT_ROOT['coco']})")
    p.add_argument("--split", help="VOC: ImageSets/Main/<split>.txt (default: test, or val in a "
                   "folder without a test split; VOC2007 test under a VOCdevkit); COCO: the "
                   "<split> of instances_<split>.json (default: val2017, or the only "
                   "instances_*.json there)")
    p.add_argument("--ann", metavar="FILE", help="COCO: this annotation json instead of "
                   "--data-root/--split (any name, any folder)")
    p.add_argument("--images", metavar="DIR", help="COCO with --weights: the images' folder "
                   "(default: <root>/<split> for <root>/annotations/instances_<split>.json, "
                   "else the folder of --ann)")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--weights", help="checkpoint, any format weights.load_model reads")
    what.add_argument("--results", help="COCO: a results json [{image_id, category_id, bbox: "
                      "[x,y,w,h], score}]; VOC: a folder of comp4_det_test_<class>.txt files "
                      "(<image_id> <score> <x1> <y1> <x2> <y2>, 1-based). Needs no image")
    p.add_argument("--metric", choices=METRICS, default="11point",
                   help="VOC headline metric: 11point (VOC2007) or area (VOC2010+); both are "
                        "printed (default %(default)s)")
    p.add_argument("--json-out", help="write every number (per-class APs included) to this json")
    p.add_argument("--batch-size", type=int, default=8,
                   help="images per batch, per process (default %(default)s)")
    p.add_argument("--device", help="cpu, cuda, cuda:1 (default: cuda when available)")
    p.add_argument("--bf16", action="store_true",
                   help="run the model under bfloat16 autocast (CUDA or CPU; default float32)")
    p.add_argument("--workers", type=int, default=2,
                   help="image loading processes (default %(default)s)")
    p.add_argument("--save-results", help="with --weights: also write the detections (VOC: a "
                   "folder of comp4 files; COCO: a results json) to score again with --results")
    args = p.parse_args(argv)
    if args.batch_size < 1 or args.workers < 0:
        p.error("--batch-size must be >= 1 and --workers >= 0")
    if args.save_results and not args.weights:
        p.error("--save-results needs --weights")
    if (args.ann or args.images) and not args.coco:
        p.error("--ann and --images are for --coco")
    if args.ann and (args.data_root or args.split):
        p.error("--ann replaces --data-root and --split: give one or the other")
    return args


def _run(args, rank=0, world=1, device=None):
    """Evaluate as the arguments say; returns (result dict or None on ranks > 0, failed count)."""
    name = "coco" if args.coco else "shapes" if args.shapes else "voc"
    root = args.data_root or DEFAULT_ROOT.get(name)
    if not args.shapes and not args.ann and not Path(root).is_dir():
        raise EvalError(f"{root}: folder does not exist"
                        + ("" if args.data_root else " (the default; give --data-root DIR)"))
    ann = args.ann  # --ann comes with --coco only
    if args.coco and not ann:  # data.build_source's choice of json
        split = data.coco_split(root, args.split, train=False)
        ann = Path(root) / "annotations" / f"instances_{split}.json"
    if args.results:
        return (_score_results(args, root, ann) if rank == 0 else None), 0
    source = _image_source(args, name, root, ann)
    model = weights.load_model(args.weights, device=device or args.device or (
        "cuda" if torch.cuda.is_available() else "cpu"))
    indices = list(range(len(source)))
    detections, failed = _predict(model, source, indices[rank::world],
                                  _class_mapping(model, source, args.weights), args.batch_size,
                                  args.workers, rank == 0, args.bf16)
    if world > 1:  # rank 0 gathers every shard and scores
        gathered = [None] * world
        dist.all_gather_object(gathered, (detections, failed))
        if rank != 0:
            return None, 0
        detections = {i: d for part, _ in gathered for i, d in part.items()}
        failed = [line for _, part in gathered for line in part]
    for line in failed:
        print(f"evaluate.py: skipped {line}", file=sys.stderr)
    indices = [i for i in indices if i in detections]
    if not indices:
        raise EvalError(f"{ann or root}: none of the {len(source)} images could be read")
    ordered = [detections[i] for i in indices]
    if args.save_results:
        ids = [source.image_id(i) for i in indices]
        if args.coco:
            results = coco_results(ordered, ids, source.category_ids)
            weights.write_atomic(args.save_results, lambda f: json.dump(results, f))
        else:
            write_voc_results(args.save_results, ordered, ids, source.class_names)
        print(f"detections written to {args.save_results}")
    return score_detections(source, indices, ordered, args.metric), len(failed)


def _score_results(args, root, ann):
    """--results: scored on the annotations alone, no image looked for."""
    if args.coco:
        gt = _load_coco(ann)
        result = coco_eval(read_coco_results(args.results), gt, name=args.results)
        result.update(map=result["stats"][0], images=len(gt.getImgIds()))
        print_result(result)
        return result
    source = data.build_source("shapes" if args.shapes else "voc", root, args.split, train=False,
                               images=False)
    indices = list(range(len(source)))
    detections = read_voc_results(args.results, [source.image_id(i) for i in indices],
                                  source.class_names)
    return score_detections(source, indices, detections, args.metric)


def _image_source(args, name, root, ann):
    """--weights: data.build_source's source, or any COCO json with all its images present."""
    if not args.coco:
        source = data.build_source(name, root, args.split, train=False)
    else:
        source = _CocoJson(ann, args.images)
        missing = [p for p in source.image_paths if not os.path.isfile(p)]
        if missing and not source.image_dir.is_dir():
            raise EvalError(f"{source.image_dir}: image folder not found (give --images DIR)")
        if missing:
            more = f" (and {len(missing) - 1} more of {len(source)})" if len(missing) > 1 else ""
            raise EvalError(f"{missing[0]}: image not found{more}")
    if not len(source):
        raise EvalError(f"{ann or root}: no images to evaluate")
    return source


def _init_distributed():
    """(rank, world size, device or None) from torchrun's environment; (0, 1, None) otherwise."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1, None
    device = None
    if torch.cuda.is_available():
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device else "gloo")
    return dist.get_rank(), world, device


def _json_safe(x):
    """nan -> None (JSON has no nan; a class without ground truth has no AP)."""
    return json.loads(json.dumps(x), parse_constant=lambda _: None)


def _numpy(x, dtype, width=None):
    """A tensor, array, list or None as a numpy array of `dtype`, [n, width] or [n]."""
    x = [] if x is None else x.detach().cpu().numpy() if hasattr(x, "detach") else x
    return np.asarray(x, dtype=dtype).reshape((-1, width) if width else -1)


if __name__ == "__main__":
    sys.exit(main())
