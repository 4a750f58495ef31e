"""Evaluate detections: PASCAL VOC mAP and COCO AP, from a checkpoint or from a results file.

    python evaluate.py --voc --weights runs/voc/best.pt                     # VOC2007 test
    python evaluate.py --voc --results dets/          # a folder of comp4_det_test_<class>.txt
    python evaluate.py --coco --weights W --json-out metrics.json       # COCO val2017
    python evaluate.py --coco --ann instances_val2014.json --results dets.json   # no images
    torchrun --nproc_per_node 4 evaluate.py --coco --weights W          # images sharded over GPUs

VOC: VOCevaldet.m of the VOC2007 devkit. Per class, detections ranked by score (stable: ties keep
image, then in-image order) each take the object of their class and image with the highest IoU
(the first on ties), taken or not; at IoU >= 0.5 (py-faster-rcnn: >) a difficult one makes them
neither TP nor FP, a free one a TP (now taken), a taken one a FP (duplicate); below, a FP.
Difficult objects are not positives. Devkit boxes are 1-based, +1 in sizes; ours 0-based (data.py
subtracts 1 from xmin/ymin), no +1: the same IoU. comp4 files are 1-based (x1/y1 -1 read, +1 write).
"""
import argparse
import contextlib
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

METRICS = ("11point", "area")  # VOC2007 test / VOC2010+
DEFAULT_ROOT = {"voc": "data/VOCdevkit", "coco": "data/coco"}
COCO_STAT_NAMES = [  # (short, COCOeval.summarize's line) for its 12 stats, in its order
    (short, f"{short[:2]:<5} IoU={iou:<9} area={area:<6} maxDets={dets}") for short, iou, area, dets
    in zip("AP AP50 AP75 APs APm APl AR1 AR10 AR100 ARs ARm ARl".split(),
           ["0.50:0.95", "0.50", "0.75"] + ["0.50:0.95"] * 9,
           (["all"] * 3 + ["small", "medium", "large"]) * 2, [100] * 6 + [1, 10] + [100] * 4)]
_COMP_FILE = re.compile(r"^comp\d+_det_[A-Za-z0-9]+_(.+)\.txt$")  # devkit results file name
_NUMBER = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")  # a decimal number, no inf or nan
_DETECTION = ((np.float64, 4), (np.float64, None), (np.int64, None))  # boxes, scores, labels
EvalError = data.DataError  # bad input: the message starts with the file it concerns, if one


def voc_eval(detections, ground_truth, class_names, iou_threshold=0.5):  # devkit minoverlap
    """PASCAL VOC AP per class (nan without objects) and mAP, 11-point and area, as the devkit.
    detections: per image (boxes [k,4], scores [k], labels [k] in 1..C) or None; ground_truth: per
    image {boxes [n,4], labels [n], optional difficult [n]}; boxes xyxy 0-based, no +1.
    -> {map_11point, map_area, per_class_11point, per_class_area: {name: AP}, num_gt: {name: n}}."""
    if len(detections) != len(ground_truth):
        raise ValueError(f"voc_eval: {len(detections)} detections, {len(ground_truth)} images")
    (gt_boxes, gt_labels, gt_difficult), gt_image = _stack(
        [(g["boxes"], g["labels"], g.get("difficult", np.zeros(len(g["labels"]), bool)))
         for g in ground_truth], ((np.float64, 4), (np.int64, None), (bool, None)))
    (det_boxes, det_scores, det_labels), det_image = _stack(detections, _DETECTION)
    result = {"per_class_11point": {}, "per_class_area": {}, "num_gt": {}}
    for c, name in enumerate(class_names, start=1):
        g, d = np.flatnonzero(gt_labels == c), np.flatnonzero(det_labels == c)
        npos = result["num_gt"][name] = int(np.count_nonzero(~gt_difficult[g]))
        d = d[np.argsort(-det_scores[d], kind="mergesort")]  # stable: ties keep image order
        tp, ignored = _match_class(det_boxes[d], det_image[d], gt_boxes[g], gt_image[g],
                                   gt_difficult[g], len(ground_truth), iou_threshold)
        cum_tp = np.cumsum(tp[~ignored])  # ignored detections are neither TP nor FP
        rec, prec = cum_tp / max(npos, 1), cum_tp / np.arange(1, len(cum_tp) + 1)
        for metric in METRICS:
            result[f"per_class_{metric}"][name] = voc_ap(rec, prec, metric) if npos else math.nan
    for metric in METRICS:
        aps = [ap for ap in result[f"per_class_{metric}"].values() if not math.isnan(ap)]
        result[f"map_{metric}"] = float(np.mean(aps)) if aps else math.nan
    return result


def voc_ap(rec, prec, metric="11point"):
    """AP of a recall (non-decreasing) / precision curve, 0 when empty. "11point" (VOC2007): mean
    over t = 0, 0.1, ..., 1 (the doubles nearest k/10) of the best precision at recall >= t, 0 if
    never reached; "area" (VOC2010+): the area under the precision envelope."""
    rec, prec = (np.asarray(x, dtype=np.float64).reshape(-1) for x in (rec, prec))
    if rec.shape != prec.shape or np.any(np.diff(rec) < 0):
        raise ValueError(f"voc_ap: need as many rec as prec ({rec.size}, {prec.size}), rec sorted")
    envelope = np.maximum.accumulate(np.append(prec, 0.0)[::-1])[::-1]  # best from here; 0 after
    if metric == "11point":
        return float(envelope[np.searchsorted(rec, np.arange(11) / 10, side="left")].mean())
    if metric == "area":  # sum of recall steps x envelope, from recall 0 to 1 (last: precision 0)
        return float(np.diff(np.concatenate(([0.0], rec, [1.0]))) @ envelope)
    raise ValueError(f"voc_ap: metric must be one of {METRICS}, not {metric!r}")


def _stack(per_image, fields):
    """Per-image tuples (None: no rows) -> (an array per field (dtype, width), each row's image)."""
    cols = [[_numpy(None if row is None else row[k], dtype, width) for row in per_image]
            for k, (dtype, width) in enumerate(fields)]
    counts = [len(a) for a in cols[0]]
    if any([len(a) for a in col] != counts for col in cols[1:]):
        raise ValueError("the boxes, scores, labels or difficult of an image differ in length")
    image = np.repeat(np.arange(len(counts)), counts)  # the image of each row [N]
    return [np.concatenate(col + [_numpy(None, dtype, width)])  # the empty one sets the dtype
            for col, (dtype, width) in zip(cols, fields)], image


def _numpy(x, dtype, width):
    x = [] if x is None else x.detach().cpu().numpy() if hasattr(x, "detach") else x
    return np.asarray(x, dtype=dtype).reshape((-1, width) if width else -1)


def _match_class(det_boxes, det_image, gt_boxes, gt_image, gt_difficult, num_images, iou_thr):
    """Devkit matching of detections in rank order -> (tp [D], ignored [D]: difficult best)."""
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
    a, b = det_boxes[has_gt][:, None, :], gt_boxes[gt_index]  # [D', 1, 4], [D', G, 4]
    iw = np.clip(np.minimum(a[..., 2], b[..., 2]) - np.maximum(a[..., 0], b[..., 0]), 0, None)
    ih = np.clip(np.minimum(a[..., 3], b[..., 3]) - np.maximum(a[..., 1], b[..., 1]), 0, None)
    inter = iw * ih  # IoU without +1; 0 where the union is empty
    union = ((a[..., 2] - a[..., 0]) * (a[..., 3] - a[..., 1])
             + (b[..., 2] - b[..., 0]) * (b[..., 3] - b[..., 1]) - inter)
    iou = np.where(union > 0, inter / np.where(union > 0, union, 1.0), 0.0)  # [D', G]
    iou[~valid] = -1.0
    best = iou.argmax(axis=1)  # first object on ties, like the devkit's strict '>' scan
    hit, best_gt = iou[np.arange(has_gt.size), best] >= iou_thr, d_start + best
    on_difficult = hit & gt_difficult[best_gt]
    claim = np.flatnonzero(hit & ~on_difficult)
    _, first = np.unique(best_gt[claim], return_index=True)  # the first claim in rank order wins
    tp[has_gt[claim[first]]] = True
    ignored[has_gt[on_difficult]] = True
    return tp, ignored


def write_voc_results(folder, detections, image_ids, class_names, prefix="comp4_det_test_"):
    """Devkit files <prefix><class>.txt of `<image_id> <score> <x1> <y1> <x2> <y2>` (1-based;
    shortest round-trip numbers: read back exactly) of voc_eval's detections -> their paths."""
    lines = {}
    for i, (x1, y1, x2, y2), score, label in _rows(detections, image_ids):
        lines.setdefault(label, []).append(f"{i} {score!r} {x1 + 1!r} {y1 + 1!r} {x2!r} {y2!r}\n")
    paths = [Path(folder) / f"{prefix}{name}.txt" for name in class_names]
    for c, path in enumerate(paths, start=1):
        weights.write_atomic(path, lambda f: f.write("".join(lines.get(c, []))))
    return paths


def read_voc_results(folder, image_ids, class_names, log=print):
    """A folder of comp<N>_det_<set>_<class>.txt files -> per image of image_ids (boxes [k,4]
    0-based, scores [k], labels [k]), rows in file order. EvalError: no folder, a bad line, an
    unknown image id; files of other classes and classes without a file: a warning to `log`."""
    folder, label_of = Path(folder), {name: c for c, name in enumerate(class_names, start=1)}
    if not folder.is_dir():
        raise EvalError(f"{folder}: not a folder of comp4_det_test_<class>.txt files")
    found = [(m[1], p) for p in sorted(folder.iterdir()) if (m := _COMP_FILE.match(p.name))]
    files = {name: path for name, path in found if name in label_of}  # the last one of a class
    for name, path in found:
        if name not in label_of:
            log(f"warning: {path}: class {name!r} is not one of the data's classes; skipped")
        elif files[name] != path:
            raise EvalError(f"{files[name]}: a second file for class {name!r} (first: {path.name})")
    if not files:
        raise EvalError(f"{folder}: no comp4_det_test_<class>.txt of {', '.join(class_names)}")
    if missing := [n for n in class_names if n not in files]:
        log(f"warning: {folder}: no results file for {', '.join(missing)} (no detections)")
    index, rows = {str(i): k for k, i in enumerate(image_ids)}, [[] for _ in image_ids]
    for name, path in files.items():
        for n, fields in enumerate(map(str.split, path.read_text().splitlines()), 1):
            values = [float(v) for v in fields[1:] if _NUMBER.fullmatch(v)]
            if fields and (len(values) != 5 or not all(map(math.isfinite, values))):
                raise EvalError(f"{path}:{n}: expected '<image_id> <score> <x1> <y1> <x2> <y2>' "
                                f"with finite numbers, got {' '.join(fields)!r}")
            if fields and fields[0] not in index:
                raise EvalError(f"{path}:{n}: image id {fields[0]!r} is not in the ground truth")
            if fields:  # per image in file order
                rows[index[fields[0]]].append([label_of[name], *values])
    return [(r[:, 2:] - [1, 1, 0, 0], r[:, 1], r[:, 0].astype(np.int64))  # 1-based -> 0-based
            for r in (np.array(r, np.float64).reshape(-1, 6) for r in rows)]  # [k, 6]


def _rows(detections, image_ids):  # (image_id, [x1, y1, x2, y2], score, label) Python numbers
    (boxes, scores, labels), image = _stack(detections, _DETECTION)
    return zip([image_ids[k] for k in image], boxes.tolist(), scores.tolist(), labels.tolist())


def coco_eval(results, coco_gt, image_ids=None, class_names=None, name="results"):
    """pycocotools COCOeval (bbox) of results ([] scores 0) over image_ids (default all) of coco_gt
    (a json path or COCO); class_names: the categories' by ascending id (default the json's).
    EvalError: a result of another image or category. -> {stats: the 12 (-1: no object of that
    size), map: stats[0], images, per_class (AP@[.5:.95]), per_class_ap50: {name: AP or nan}}."""
    gt = coco_gt if isinstance(coco_gt, COCO) else _load_coco(coco_gt)
    image_ids, cat_ids = sorted(gt.getImgIds() if image_ids is None else image_ids), gt.getCatIds()
    for key, known, what in (("image_id", set(image_ids), "in the ground truth"),
                             ("category_id", gt.cats, "a category of the ground truth")):
        if bad := [(i, r[key]) for i, r in enumerate(results) if r[key] not in known]:
            raise EvalError(f"{name}: entry {bad[0][0]}: {key} {bad[0][1]!r} is not {what}")
    names = [gt.cats[c]["name"] for c in sorted(cat_ids)] if class_names is None else class_names
    if len(names) != len(cat_ids):
        raise ValueError(f"coco_eval: {len(names)} class names for {len(cat_ids)} categories")
    with contextlib.redirect_stdout(None):  # pycocotools prints progress; we print ours
        dt = gt.loadRes([dict(r) for r in results]) if results else COCO()  # loadRes edits them
        dt.dataset.setdefault("annotations", [])  # COCOeval reads it when image_ids is empty
        ev = COCOeval(gt, dt, "bbox")
        ev.params.imgIds = image_ids
        for step in (ev.evaluate, ev.accumulate, ev.summarize):
            step()
    result = {"stats": [float(s) for s in ev.stats], "per_class": {}, "per_class_ap50": {}}
    precision = ev.eval["precision"]  # [T iou, R recall, K class, A area, M maxDets]; -1 = no GT
    for k, cls in enumerate(names):  # area "all", maxDets 100, as stats[0] and stats[1]
        for key, iou in (("per_class", slice(None)), ("per_class_ap50", 0)):
            p = precision[iou, :, k, 0, -1]
            result[key][cls] = float(p[p > -1].mean()) if (p > -1).any() else math.nan
    return dict(result, map=result["stats"][0], images=len(image_ids))


def coco_results(detections, image_ids, category_ids):
    """Per-image (boxes xyxy, scores, labels 1..C) -> COCO results: category_ids[label-1], xywh."""
    return [{"image_id": i, "category_id": category_ids[label - 1],
             "bbox": [x1, y1, x2 - x1, y2 - y1], "score": score}  # w = x2 - x1, no +1
            for i, (x1, y1, x2, y2), score, label in _rows(detections, image_ids)]


def read_coco_results(path):
    """A COCO results json: a list of {image_id, category_id, bbox [x,y,w,h], score}."""
    try:
        results = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise EvalError(f"{path}: results file not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise EvalError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(results, list):
        raise EvalError(f"{path}: expected a JSON list of detections, got {type(results).__name__}")
    for i, r in enumerate(results):
        with contextlib.suppress(KeyError, TypeError):  # a missing field; not a dict, list, number
            if (all(isinstance(r[k], int) for k in ("image_id", "category_id"))
                    and len(r["bbox"]) == 4 and all(map(math.isfinite, [*r["bbox"], r["score"]]))):
                continue
        raise EvalError(f"{path}: entry {i} is not {{image_id: int, category_id: int, bbox: "
                        f"[x, y, w, h], score}} with finite numbers: {json.dumps(r)[:120]}")
    return results


def _load_coco(ann_file):
    """pycocotools COCO object for an annotation json, quietly; EvalError names a bad file."""
    try:
        with contextlib.redirect_stdout(None):
            coco = COCO(str(ann_file))
    except FileNotFoundError:
        raise EvalError(f"{ann_file}: annotation file not found") from None
    except (ValueError, KeyError, TypeError, AttributeError, AssertionError) as e:  # json, schema
        raise EvalError(f"{ann_file}: not a COCO annotation file ({e!r})") from None
    if "images" not in coco.dataset or "categories" not in coco.dataset:
        raise EvalError(f"{ann_file}: not a COCO annotation file (no 'images' or 'categories')")
    return coco


def evaluate_model(model, source, batch_size=8, device=None, workers=2, metric="11point", log=print,
                   progress=True, name="model", bf16=False, **detect_options):
    """score_detections of every image of a source + failed_images (logged, left out); mode kept."""
    if metric not in METRICS:
        raise ValueError(f"evaluate_model: metric must be one of {METRICS}, not {metric!r}")
    model = getattr(model, "module", model).to(device)  # a DDP-wrapped model; device None: stays
    mapping, was_training = _class_mapping(model, source, name), model.training
    try:
        indices, detections, failed = _predict(model.eval(), source, mapping, batch_size, workers,
                                               progress, bf16, **detect_options)
    finally:
        model.train(was_training)
    for line in failed:
        log(f"warning: skipped {line}")
    return dict(score_detections(source, indices, detections, metric, log),
                failed_images=len(failed))


def score_detections(source, indices, detections, metric="11point", log=print):
    """Printed metrics of detections (source labels, pixels) of images `indices`: coco_eval's on the
    json of sources with ann_file and category_ids, else voc_eval's + "map" (`metric`), "images"."""
    if not indices:
        raise EvalError("no images to evaluate")
    if hasattr(source, "ann_file") and hasattr(source, "category_ids"):
        ids = [source.image_id(i) for i in indices]
        gt = getattr(source, "coco", source.ann_file)  # _CocoJson has parsed the json already
        result = coco_eval(coco_results(detections, ids, source.category_ids), gt, ids,
                           source.class_names)
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
    """int64 [C_model + 1]: each model label's source label (0: none), by COCO id, else by name."""
    cfg = model.config
    by = ("category_ids" if cfg.get("category_ids") is not None
          and getattr(source, "category_ids", None) is not None else "class_names")
    if cfg.get(by) is None:
        raise EvalError(f"{name}: the model config has no class_names to match the data's classes")
    model_keys, label = list(cfg[by]), {k: c for c, k in enumerate(getattr(source, by), start=1)}
    if unknown := [c for k, c in label.items() if k not in model_keys]:  # only now: slow for shapes
        present = {int(c) for i in range(len(source)) for c in source.annotation(i)["labels"]}
        if missing := [source.class_names[c - 1] for c in unknown if c in present]:
            known = ", ".join(map(str, model_keys[:8])) + (", ..." if len(model_keys) > 8 else "")
            raise EvalError(f"{name}: the model does not know {len(missing)} class(es) that the "
                            f"data has objects of ({', '.join(missing)}); it knows {known}")
    return np.array([0] + [label.get(k, 0) for k in model_keys], dtype=np.int64)


def _predict(model, source, mapping, batch_size, workers, progress, bf16, rank=0, world=1,
             **detect_options):
    """Detect on images rank::world -> rank 0: (indices read, detections, errors); others: None."""
    shard = range(rank, len(source), world)
    loader = torch.utils.data.DataLoader([(source, i) for i in shard], batch_size=batch_size,
                                         num_workers=workers, collate_fn=_load_batch)
    detections, failed = {}, []
    start = last = time.perf_counter()
    for ok, errors in loader:
        failed += errors
        outputs = ssd.detect(model, [im for _, im in ok], bf16, **detect_options) if ok else []
        for (i, _), (boxes, scores, labels) in zip(ok, outputs):
            labels = mapping[labels.numpy()]  # source labels, 0: not a class of the data
            detections[i] = tuple(x[labels > 0] for x in (boxes.numpy(), scores.numpy(), labels))
        done, now = len(detections) + len(failed), time.perf_counter()
        if progress and (now - last >= 2.0 or done == len(shard)):
            rate = done / max(now - start, 1e-9)
            print(f"eval {done}/{len(shard)} images  {rate:.1f} img/s  "
                  f"ETA {data.duration((len(shard) - done) / rate)}", file=sys.stderr, flush=True)
            last = now
    if world > 1:
        gathered = [None] * world
        dist.all_gather_object(gathered, (detections, failed))
        if rank != 0:
            return None
        detections = {i: d for part, _ in gathered for i, d in part.items()}
        failed = [line for _, part in gathered for line in part]
    return sorted(detections), [detections[i] for i in sorted(detections)], failed


def _load_batch(batch):
    """DataLoader collate of (source, index) -> ([(index, uint8 [3,H,W])], [errors])."""
    ok, failed = [], []
    for source, i in batch:
        try:
            ok.append((i, data.to_tensor(source.load_image(i).convert("RGB"))))  # [3, H, W]
        except (OSError, ValueError) as e:  # data.DataError is a ValueError
            failed.append(str(e))
    return ok, failed


class _CocoJson(data.FileSource):
    """A COCO json as source (labels only); images: image_dir, else <root>/<split>, else beside."""

    def __init__(self, ann_file, image_dir=None):
        self.ann_file, coco, p = str(ann_file), _load_coco(ann_file), Path(ann_file)
        layout = p.parent.name == "annotations" and p.stem.startswith("instances_")
        split = p.parent.parent / p.stem.removeprefix("instances_")  # <root>/<split>
        self.image_dir = Path(image_dir or (split if layout and split.is_dir() else p.parent))
        self.coco, self.category_ids = coco, sorted(coco.getCatIds())
        self.class_names = [str(coco.cats[c]["name"]) for c in self.category_ids]
        self.ids = [im["id"] for im in coco.dataset["images"]]
        self.image_paths = [str(self.image_dir / coco.imgs[i]["file_name"]) for i in self.ids]
        label = {c: k for k, c in enumerate(self.category_ids, start=1)}
        self._annotations = [{"labels": np.array([label.get(a["category_id"], 0) for a in
                                                  coco.imgToAnns[i]], np.int64)} for i in self.ids]


def main(argv=None):
    args, rank, world, device = parse_args(argv), 0, int(os.environ.get("WORLD_SIZE", "1")), None
    if world > 1:  # torchrun: each process detects on its shard of the images, rank 0 scores
        if torch.cuda.is_available():
            device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device else "gloo")
        rank = dist.get_rank()
    try:  # a results file is scored by rank 0 alone
        result, failed = _run(args, rank, world, device) if args.weights or rank == 0 else (None, 0)
        if result is not None and args.json_out:  # nan (a class without objects) -> null
            doc = json.loads(json.dumps(result), parse_constant=lambda _: None)
            weights.write_atomic(args.json_out, lambda f: print(json.dumps(doc, indent=1), file=f))
    except (data.DataError, weights.CheckpointError, OSError) as e:  # EvalError is a DataError
        print(f"evaluate.py: error: {e}", file=sys.stderr)
        return 2
    finally:
        if world > 1:
            dist.destroy_process_group()
    return 1 if failed else 0


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        prog="evaluate.py", description=__doc__.split("\n")[0], epilog="examples:\n"
        + __doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    kind = p.add_mutually_exclusive_group(required=True)
    kind.add_argument("--voc", action="store_true", help="PASCAL VOC devkit metric")
    kind.add_argument("--coco", action="store_true", help="COCO metric (pycocotools, bbox)")
    kind.add_argument("--shapes", action="store_true", help="VOC metric, built-in shapes set (val)")
    p.add_argument("--data-root", help=f"VOC: a VOCdevkit or VOC-layout folder (default "
                   f"{DEFAULT_ROOT['voc']}); COCO: one with annotations/instances_<split>.json and "
                   f"<split>/ (default {DEFAULT_ROOT['coco']})")
    p.add_argument("--split", help="VOC: ImageSets/Main/<split>.txt (default test, else val; "
                   "VOC2007 test in a VOCdevkit); COCO: instances_<split>.json (default val2017, "
                   "else the only one)")
    p.add_argument("--ann", metavar="FILE", help="COCO: an annotation json, no --data-root/--split")
    p.add_argument("--images", metavar="DIR", help="COCO with --weights: the image folder (default "
                   "<root>/<split> for <root>/annotations/instances_<split>.json, else beside it)")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--weights", help="checkpoint, any format weights.load_model reads")
    what.add_argument("--results", help="no images needed; COCO: a results json; VOC: a folder of "
                      "comp4_det_test_<class>.txt (<image_id> <score> <x1> <y1> <x2> <y2> 1-based)")
    p.add_argument("--metric", choices=METRICS, default="11point", help="VOC headline metric: "
                   "11point (VOC2007) or area (VOC2010+); both are printed (default %(default)s)")
    p.add_argument("--json-out", help="write every number (per-class APs included) to this json")
    p.add_argument("--batch-size", type=int, default=8,
                   help="images per batch and process (default %(default)s)")
    p.add_argument("--device", help="cpu, cuda, cuda:1 (default: cuda when available)")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast (CUDA/CPU; default float32)")
    p.add_argument("--workers", type=int, default=2, help="image loaders (default %(default)s)")
    p.add_argument("--save-results", help="with --weights: also write the detections (VOC: comp4 "
                   "files in this folder; COCO: a results json) to score again with --results")
    args = p.parse_args(argv)
    for bad, message in (
            (args.batch_size < 1 or args.workers < 0, "--batch-size must be >= 1, --workers >= 0"),
            (args.save_results and not args.weights, "--save-results needs --weights"),
            ((args.ann or args.images) and not args.coco, "--ann and --images are for --coco"),
            (args.ann and (args.data_root or args.split), "--ann replaces --data-root, --split")):
        if bad:
            p.error(message)
    return args


def _run(args, rank, world, device):
    """-> (result, None on ranks > 0; unreadable images). Results files need no image."""
    name = "coco" if args.coco else "shapes" if args.shapes else "voc"
    root = args.data_root or DEFAULT_ROOT.get(name)
    if not args.shapes and not args.ann and not Path(root).is_dir():
        raise EvalError(f"{root}: folder does not exist"
                        + ("" if args.data_root else " (the default; give --data-root DIR)"))
    ann = args.ann or (Path(root, "annotations", "instances_" + data.coco_split(
        root, args.split, train=False) + ".json") if args.coco else None)  # as data.build_source
    source = (_CocoJson(ann, args.images) if args.coco
              else data.build_source(name, root, args.split, train=False, images=not args.results))
    if not len(source):
        raise EvalError(f"{ann or root}: no images to evaluate")
    if args.results and args.coco:
        result = coco_eval(read_coco_results(args.results), source.coco, name=args.results)
        print_result(result)
        return result, 0
    if args.results:
        ids = [source.image_id(i) for i in range(len(source))]
        return score_detections(source, range(len(source)), read_voc_results(
            args.results, ids, source.class_names), args.metric), 0
    if args.coco and (missing := [p for p in source.image_paths if not os.path.isfile(p)]):
        more = f" (and {len(missing) - 1} more of {len(source)})" if len(missing) > 1 else ""
        raise EvalError(f"{missing[0]}: image not found{more}" if source.image_dir.is_dir() else
                        f"{source.image_dir}: image folder not found (give --images DIR)")
    model = weights.load_model(args.weights, device=device or args.device or (
        "cuda" if torch.cuda.is_available() else "cpu"))
    out = _predict(model, source, _class_mapping(model, source, args.weights), args.batch_size,
                   args.workers, rank == 0, args.bf16, rank, world)
    if out is None:  # ranks > 0: rank 0 scores
        return None, 0
    indices, detections, failed = out
    for line in failed:
        print(f"evaluate.py: skipped {line}", file=sys.stderr)
    if not indices:
        raise EvalError(f"{ann or root}: none of the {len(source)} images could be read")
    if args.save_results:
        ids = [source.image_id(i) for i in indices]
        if args.coco:
            results = coco_results(detections, ids, source.category_ids)
            weights.write_atomic(args.save_results, lambda f: json.dump(results, f))
        else:
            write_voc_results(args.save_results, detections, ids, source.class_names)
        print(f"detections written to {args.save_results}")
    return score_detections(source, indices, detections, args.metric), len(failed)


if __name__ == "__main__":
    sys.exit(main())
