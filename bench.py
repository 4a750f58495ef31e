"""Speed figures for the SSD code, side by side with torchvision where it is installed (it is never
needed; its columns show "-" without it). Every figure is a median over repeats.

    python bench.py                                     # every section on the CPU
    python bench.py --device cuda --json bench.json     # the same on a GPU, also as JSON
    python bench.py --only postprocess,eval --repeat 9

Sections (one function each, `bench_<section>(device, args) -> list of rows`): model (forward),
postprocess, e2e (uint8 photos -> detections), data (pipeline per worker), train (SGD steps),
pipeline (train.py's loop on JPEGs: images/s and data wait), eval (VOC mAP), kernels (box_iou /
nms / batched_nms / soft_nms, torch and Triton engines). A row: section, name, ms (ours),
torchvision_ms, speedup (torchvision_ms / ms: > 1 means ours is faster), images_per_s, target
(text) and ok (whether it holds), same (ours equals torchvision's).
Model, e2e, train and pipeline use torch's default threads (all cores; --threads overrides); the
other sections are single-core figures and run on 1 thread, as torchvision's C++ NMS does.
"""
import argparse
import contextlib
import copy
import functools
import io
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from functools import partial

import numpy as np
import torch
from PIL import Image

import data
import evaluate
import kernels
import ssd
import train
import weights

try:
    import torchvision
    from torchvision.models.detection import ssd300_vgg16
    from torchvision.models.detection.image_list import ImageList
except Exception:  # only used for comparison
    torchvision = None

# ----------------------------------------------------------------------------- config
SECTIONS = ("model", "postprocess", "e2e", "data", "train", "pipeline", "eval", "kernels")
BATCHES = (1, 8)
E2E_BATCHES = {"cpu": (1,), "cuda": (1, 32)}  # 32: the paper's batch; the CPU run stays short
PHOTO_HW = (480, 640)  # e2e input: a VOC/COCO-sized photo, uint8 RGB
CONFIDENT_PER_IMAGE = 300  # realistic outputs: anchors a trained model is sure of, per image
E2E_TARGET = 1.25  # end-to-end images/s >= 1.25x torchvision's ssd300_vgg16 (CPU)
POSTPROCESS_TARGET = 3.0  # postprocess >= 3x faster than torchvision's postprocess_detections
EVAL_TARGET_MS = 2000.0  # VOC mAP of a VOC2007-test-sized set in < 2 s on one core
EVAL_IMAGES = 4952  # VOC2007 test
DATA_IMAGES = 48  # images per timed pass of the data pipeline
DECODE_TARGET = 200.0  # images/s per core a decode-only worker (--augment-on device) must give
# train.py runs: (flags, steps, log window); the first window (workers starting, warm-up) is left
# out. Full width on the GPU (--gpus 1, AMP bf16 by default); a narrow model on the CPU, where the
# batched augmentation is memory-bound at full resolution and only the worker path is timed.
PIPELINE = dict(
    cpu=[(["--width", "0.125", "--batch-size", "8", "--augment-on", "cpu"], 30, 10)],
    cuda=[(["--width", "1", "--batch-size", "64", "--augment-on", aug, *more], 160, 20)
          for aug, more in (("cpu", []), ("device", []), ("device", ["--compile"]))])
PIPELINE_IMAGES = 96  # the JPEG folder: several epochs, so epoch boundaries fall in the window
TRAIN_CPU = dict(widths=(0.25, 0.125), batch=8)  # narrow models on the CPU
TRAIN_GPU = dict(widths=(1.0,), batch=64)  # full SSD300, AMP bf16
TRAIN_GPU_TARGET = 2000.0  # images/s of that step on one H200-class GPU (~3,800 is the bf16 peak)
NMS_SIZES = (200, 1000, 8732, 20000)  # 8732 = SSD300's anchor count
IOU_COLUMNS = 1000  # box_iou is timed as [N, 4] x [min(N, IOU_COLUMNS), 4]
IOU_THRESHOLD = 0.45  # NMS IoU of the paper and Caffe's DetectionOutput
SCORE_THRESHOLD = 0.01  # Caffe DetectionOutput confidence threshold
TOPK = 400  # Caffe DetectionOutput top_k per class before NMS
SSD_CLASSES = (20, 80)  # VOC, COCO
IMAGE_SIZE = 300.0  # kernel boxes in SSD300 input pixels
SLOW_ROUND_S = 0.5  # cases slower than this get at most 3 timed rounds, slower than 3 s only 2
FAST_ROUND_S = 0.02  # rounds faster than this are repeated for about a second


# ----------------------------------------------------------------------------- timing
@contextlib.contextmanager
def threads(n):
    """torch CPU threads for one section (n = 0: leave as set)."""
    old = torch.get_num_threads()
    torch.set_num_threads(n or old)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def time_side_by_side(fns, device, repeat, warmup=True):
    """({name: median ms}, {name: last result}) for fns {name: fn of no arguments}. Calls alternate
    round by round, so load drifts hit every function alike. warmup=False when a smaller case has
    just warmed the same code (big CPU cases are costly and gain nothing from a warm-up)."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    times, out = {name: [] for name in fns}, {}

    def one_round():
        for name, fn in fns.items():
            sync()
            t = time.perf_counter()
            out[name] = fn()
            sync()
            times[name].append(time.perf_counter() - t)
    one_round()
    slowest = max(ts[0] for ts in times.values())
    if warmup:  # Triton compiles, caches fill; not counted
        times = {name: [] for name in fns}
    rounds = min(repeat, 2 if slowest > 3.0 else 3) if slowest > SLOW_ROUND_S else repeat
    if slowest < FAST_ROUND_S:  # a few ms: many rounds (~1 s), so one slow round moves nothing
        rounds = max(rounds, min(300, int(1.0 / max(slowest, 1e-4))))
    while min(len(ts) for ts in times.values()) < rounds:
        one_round()
    return {name: statistics.median(ts) * 1e3 for name, ts in times.items()}, out


def row(section, name, ms, tv_ms=None, images=None, target=None, ok=None, same=None, **extra):
    """One result row; speedup = torchvision ms / ours (> 1: ours faster)."""
    return {"section": section, "name": name, "ms": ms, "torchvision_ms": tv_ms,
            "speedup": tv_ms / ms if tv_ms else None,
            "images_per_s": images * 1e3 / ms if images else None,
            "target": target, "ok": ok, "same": same, **extra}


# ----------------------------------------------------------------------------- models and outputs
@functools.cache
def model_pair(device_type):
    """(ours, torchvision's ssd300_vgg16 or None) in eval mode with the same random weights: the
    torchvision model's state_dict read by weights.load_model, which maps its keys. Without
    torchvision, ours alone: ssd300(90, anchors="coco", clip="wh"), torchvision's configuration."""
    torch.manual_seed(0)
    if torchvision is None:
        return ssd.ssd300(90, anchors="coco", clip="wh").eval().to(device_type), None
    tv = ssd300_vgg16(weights=None, weights_backbone=None).eval()
    with tempfile.TemporaryDirectory() as tmp:
        torch.save(tv.state_dict(), os.path.join(tmp, "tv.pt"))
        ours = weights.load_model(os.path.join(tmp, "tv.pt"))
    return ours.to(device_type), tv.to(device_type)


def random_photos(batch, gen):
    """uint8 RGB [3, H, W] images: smooth colour fields plus noise, a photo's statistics roughly."""
    h, w = PHOTO_HW
    base = torch.nn.functional.interpolate(torch.rand(batch, 3, 6, 8, generator=gen) * 255,
                                           size=(h, w), mode="bilinear")  # [B, 3, H, W]
    noisy = base + torch.randn(batch, 3, h, w, generator=gen) * 20
    return list(noisy.clamp(0, 255).to(torch.uint8))


def tv_anchors(tv, batch, device):
    """torchvision's anchors per image (xyxy pixels of the 300x300 input) from its own generator."""
    x = torch.zeros(batch, 3, 300, 300, device=device)
    maps = [torch.zeros(batch, 1, f, f, device=device) for f in (38, 19, 10, 5, 3, 1)]
    return tv.anchor_generator(ImageList(x, [(300, 300)] * batch), maps)


def realistic_outputs(model, batch, gen):
    """Raw outputs like a trained model's on a photo: every anchor sure of background, except those
    overlapping one of a few objects (CONFIDENT_PER_IMAGE per image in all), which score that
    object's class by their IoU and regress towards it, as neighbouring anchors do."""
    a, c1 = model.anchors.cpu(), model.config["num_classes"] + 1
    corners = ssd.cxcywh_to_xyxy(a)  # [A, 4]
    cls = torch.randn(batch, len(a), c1, generator=gen)  # [B, A, C+1]
    cls[..., 0] += 9.0  # softmax background ~0.99: a few noise scores pass 0.01
    box = torch.randn(batch, len(a), 4, generator=gen) * 0.5  # [B, A, 4]
    for i in range(batch):
        taken = torch.zeros(len(a), dtype=torch.bool)
        while taken.sum() < CONFIDENT_PER_IMAGE:
            xy, wh = torch.rand(2, generator=gen) * 0.7, torch.rand(2, generator=gen) * 0.4 + 0.1
            obj = torch.cat([xy, (xy + wh).clamp(max=1.0)])  # [4]
            iou = kernels.box_iou(corners, obj[None])[:, 0]  # [A]
            near = (iou > 0.35) & ~taken
            near &= near.cumsum(0) <= CONFIDENT_PER_IMAGE - taken.sum()
            label = int(torch.randint(1, c1, (1,), generator=gen))
            cls[i, near, label] = cls[i, near, 0] + 10 * (iou[near] - 0.3)  # p(label) 0.6..1
            box[i, near] = ssd.encode(obj.expand(int(near.sum()), 4), a[near]) + 0.1 * box[i, near]
            taken |= near
    return cls.to(model.anchors.device), box.to(model.anchors.device)


def same_detections(ours, theirs, sizes):
    """ssd.postprocess's detections (original pixels) equal torchvision's (300x300 pixels)."""
    for (boxes, scores, labels), t, (w, h) in zip(ours, theirs, sizes):
        scale = torch.tensor([w, h, w, h], device=boxes.device) / 300.0
        if len(boxes) != len(t["boxes"]) or not torch.equal(labels, t["labels"]):
            return False
        if not (torch.allclose(scores, t["scores"], atol=1e-6)
                and torch.allclose(boxes / scale, t["boxes"], atol=1e-3)):
            return False
    return True


# ----------------------------------------------------------------------------- sections
def bench_model(device, args):
    """Forward ms at 300x300: ours as stored (NCHW) and in channels_last, torchvision's
    backbone + head on the same input."""
    ours, tv = model_pair(device.type)
    ours_cl, rows = copy.deepcopy(ours).to(memory_format=torch.channels_last), []
    for b in BATCHES:
        x = torch.randn(b, 3, 300, 300, device=device) * 60  # [B, 3, S, S] like a normalised photo
        fns = {"nchw": partial(ours, x),
               "cl": partial(ours_cl, x.contiguous(memory_format=torch.channels_last))}
        if tv is not None:
            fns["tv"] = lambda x=x: tv.head(list(tv.backbone(x).values()))
        with torch.no_grad():
            ms, _ = time_side_by_side(fns, device, args.repeat,
                                      warmup=b == 1 or device.type == "cuda")
        for layout, key in (("NCHW", "nchw"), ("channels_last", "cl")):
            rows.append(row("model", f"forward b={b} {layout}", ms[key], ms.get("tv"), images=b))
    return rows


def bench_postprocess(device, args):
    """ssd.postprocess vs torchvision's postprocess_detections on the same raw outputs: realistic
    ones, and an untrained model's flat softmax (every class ~1/91, so each class passes 0.01 and
    fills its top 400: ~36,000 NMS candidates per image)."""
    ours, tv = model_pair(device.type)
    gen = torch.Generator().manual_seed(1)
    # one forward on all cores for the flat outputs
    with torch.no_grad(), threads(args.model_threads):
        flat = ours(ssd.preprocess([im.to(device) for im in random_photos(max(BATCHES), gen)], 300,
                                   ours.config["mean"]))
    cases = {"realistic": realistic_outputs(ours, max(BATCHES), gen), "untrained": flat}
    rows = []
    for kind, (cls, box) in cases.items():
        for b in BATCHES:
            sizes = [PHOTO_HW[::-1]] * b  # (w, h)
            fns = {"ours": partial(ssd.postprocess, cls[:b], box[:b], ours.anchors, sizes)}
            if tv is not None:
                outputs = {"cls_logits": cls[:b], "bbox_regression": box[:b]}
                fns["tv"] = partial(tv.postprocess_detections, outputs, tv_anchors(tv, b, device),
                                    [(300, 300)] * b)
            ms, out = time_side_by_side(fns, device, args.repeat)
            scores = torch.softmax(cls[:b].float(), -1)[..., 1:]  # [B, A, C]
            per_image = int((scores.topk(TOPK, 1).values > SCORE_THRESHOLD).sum()) // b
            speedup = ms["tv"] / ms["ours"] if "tv" in ms else None
            rows.append(row("postprocess", f"b={b} {kind} ({per_image} cand/img)", ms["ours"],
                            ms.get("tv"), target=f">= {POSTPROCESS_TARGET:g}x tv",
                            ok=speedup >= POSTPROCESS_TARGET if speedup else None,
                            same=same_detections(out["ours"], out["tv"], sizes) if tv else None))
    return rows


def bench_e2e(device, args):
    """uint8 photos -> detections in original pixels: ssd.detect (channels_last model, batched
    preprocess) next to its forward alone on the preprocessed batch, in float32 and in bf16
    (torch.autocast; detect(bf16=True)); the gap is preprocess + postprocess + copies. torchvision:
    model(list of float images in [0, 1]) in float32 (its NMS has no bf16 kernel) and backbone +
    head in both. Untrained weights: flat outputs, the postprocess's worst case."""
    ours, tv = model_pair(device.type)
    ours = copy.deepcopy(ours).to(memory_format=torch.channels_last)  # not the shared model
    gen, rows = torch.Generator().manual_seed(2), []

    def forward(model, x, bf16):
        with torch.autocast(device.type, torch.bfloat16, enabled=bf16):
            return model(x)
    for b in E2E_BATCHES[device.type]:
        photos = random_photos(b, gen)  # on the CPU, as a caller has them
        x = ssd.preprocess(photos, 300, ours.config["mean"], device)  # [B, 3, 300, 300]
        x = x.contiguous(memory_format=torch.channels_last)
        for bf16 in (False, True):
            fns = {"detect": partial(ssd.detect, ours, photos, bf16=bf16),
                   "forward": partial(forward, ours, x, bf16)}
            if tv is not None:
                net = lambda i: tv.head(list(tv.backbone(i).values()))  # noqa: E731
                fns["tv_forward"] = partial(forward, net, x, bf16)
                if not bf16:
                    fns["tv"] = lambda p=photos: tv([im.to(device).float() / 255 for im in p])
            with torch.no_grad():
                ms, _ = time_side_by_side(fns, device, args.repeat, warmup=device.type == "cuda")
            speedup = ms["tv"] / ms["detect"] if "tv" in ms else None
            kind = "bf16" if bf16 else "fp32"
            rows.append(row("e2e", f"b={b} ssd.detect {kind}", ms["detect"], ms.get("tv"),
                            images=b, target=None if bf16 else f">= {E2E_TARGET:g}x tv",
                            ok=speedup >= E2E_TARGET if speedup else None))
            rows.append(row("e2e", f"b={b} forward alone {kind}", ms["forward"],
                            ms.get("tv_forward"), images=b))
    return rows


def synthetic_voc_folder(root, count=DATA_IMAGES, size=PHOTO_HW[::-1]):
    """A VOC-layout folder of `count` photo-like 640x480 JPEGs with two boxes each; split trainval
    (all) and val (the first 4)."""
    gen = torch.Generator().manual_seed(3)
    for sub in ("Annotations", "JPEGImages", "ImageSets/Main"):
        os.makedirs(os.path.join(root, sub))
    for i, photo in enumerate(random_photos(count, gen)):
        Image.fromarray(photo.permute(1, 2, 0).numpy()).resize(size).save(
            os.path.join(root, "JPEGImages", f"{i:06d}.jpg"), quality=90)
        objects = "".join(f"<object><name>{name}</name><difficult>0</difficult><bndbox><xmin>{x}"
                          f"</xmin><ymin>{y}</ymin><xmax>{x + 150}</xmax><ymax>{y + 120}</ymax>"
                          "</bndbox></object>"
                          for name, x, y in (("dog", 40, 60), ("cat", 250, 200)))
        with open(os.path.join(root, "Annotations", f"{i:06d}.xml"), "w") as f:
            f.write(f"<annotation><size><width>{size[0]}</width><height>{size[1]}</height>"
                    f"<depth>3</depth></size>{objects}</annotation>")
    for split, n in (("trainval", count), ("val", min(4, count))):
        with open(os.path.join(root, "ImageSets", "Main", f"{split}.txt"), "w") as f:
            f.write("".join(f"{i:06d}\n" for i in range(n)))
    return root


def bench_data(device, args):
    """data.py items per second in one process on one thread (what one DataLoader worker does) on
    640x480 JPEGs: decode only (the worker of --augment-on device, which draws the augmentation
    but applies none of it), the whole augmentation on the CPU, and the evaluation transform."""
    with tempfile.TemporaryDirectory() as tmp:
        source = data.VOCDetection(synthetic_voc_folder(tmp), "trainval")
        n, rows = min(DATA_IMAGES, len(source)), []
        w, h = source.load_image(0).size
        for name, transform in (("decode only (augment on device)",
                                 data.TrainTransform(300, on_device=True)),
                                ("train transform (augment on cpu)", data.TrainTransform(300)),
                                ("test transform", data.TestTransform(300))):
            dataset = data.DetectionDataset(source, transform)
            ms, _ = time_side_by_side({"ours": lambda d=dataset: [d[i] for i in range(n)]},
                                      torch.device("cpu"), args.repeat)
            decode = transform.__dict__.get("on_device", False)
            rows.append(row("data", f"{name}, {w}x{h}", ms["ours"] / n, images=1,
                            target=f">= {DECODE_TARGET:g} img/s" if decode else None,
                            ok=n * 1e3 / ms["ours"] >= DECODE_TARGET if decode else None))
    return rows


def bench_train(device, args):
    """One SGD step (forward, multibox_loss with matching, backward, update) on random images with
    3 boxes each; no data loading. CPU: narrow models, channels_last and NCHW. GPU: full SSD300,
    AMP bf16, channels_last."""
    spec = TRAIN_GPU if device.type == "cuda" else TRAIN_CPU
    gen, rows = torch.Generator().manual_seed(4), []
    b = spec["batch"]
    x = (torch.randn(b, 3, 300, 300, generator=gen) * 60).to(device)  # [B, 3, S, S]
    xy = torch.rand(b, 3, 2, generator=gen) * 0.6
    boxes = [t.to(device)
             for t in torch.cat([xy, xy + 0.1 + torch.rand(b, 3, 2, generator=gen) * 0.3], 2)]
    labels = [torch.randint(1, 21, (3,), generator=gen).to(device) for _ in range(b)]
    amp = device.type == "cuda"
    layouts = (True,) if device.type == "cuda" else (True, False)
    for width in spec["widths"]:
        fns = {}
        for cl in layouts:
            torch.manual_seed(0)
            model = ssd.ssd300(20, width=width).to(device).train()
            if cl:
                model = model.to(memory_format=torch.channels_last)
            opt = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9, weight_decay=5e-4)
            inp = x.contiguous(memory_format=torch.channels_last) if cl else x

            def step(model=model, opt=opt, inp=inp):
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                    cls, box = model(inp)  # [B, A, C+1], [B, A, 4]
                losses = ssd.multibox_loss(cls, box, model.anchors, boxes, labels)
                opt.zero_grad(set_to_none=True)
                (losses["loss_cls"] + losses["loss_box"]).backward()
                opt.step()
            fns["channels_last" if cl else "NCHW"] = step
        ms, _ = time_side_by_side(fns, device, args.repeat)
        for layout, t in ms.items():
            ok = b * 1e3 / t >= TRAIN_GPU_TARGET if amp else None
            rows.append(row("train", f"SSD300 width {width:g} b={b} {layout}"
                            f"{' AMP bf16' if amp else ''}", t, images=b, ok=ok,
                            target=f">= {TRAIN_GPU_TARGET:g} img/s" if amp else None))
    return rows


def bench_pipeline(device, args):
    """train.py's own loop (train.main: its loader, workers, augmentation, step) for a fixed
    number of steps on PIPELINE_IMAGES 640x480 JPEGs written to a temporary folder: images/s and
    the share of the time spent waiting for a batch, from its metrics.jsonl."""
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = synthetic_voc_folder(os.path.join(tmp, "voc"), PIPELINE_IMAGES)
        for k, (flags, steps, window) in enumerate(PIPELINE[device.type]):
            out, log = os.path.join(tmp, f"run{k}"), io.StringIO()
            argv = ["--data", "voc", "--data-root", folder, "--epochs", "1000", "--eval-every",
                    "0", "--max-steps", str(steps), "--log-every", str(window), "--out", out,
                    "--gpus", "1" if device.type == "cuda" else "0", *flags]
            batch = int(flags[3])
            name = f"width {flags[1]} b={batch} augment on {flags[5]}" + " compile" * (
                "--compile" in flags)
            try:
                with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
                    code = train.main(argv)
            except Exception as e:  # e.g. torch.compile without a compiler: a row, not a crash
                code = f"{type(e).__name__}: {e}".splitlines()[0]
            if code != 0:
                print(log.getvalue(), file=sys.stderr)
                rows.append(row("pipeline", name, float("nan"), target="train.py runs", ok=False,
                                failed=f"train.py exit {code}"))
                continue
            with open(os.path.join(out, "metrics.jsonl")) as f:
                timed = [r for r in map(json.loads, f) if "images_per_s" in r][1:]
            seconds = [window / r["images_per_s"] for r in timed]  # each window's s / batch
            wait = sum(r["data_wait"] * t for r, t in zip(timed, seconds)) / sum(seconds)
            # on the GPU, the loop keeps >= 90% of the bare step's rate (the train section, same
            # batch) when it waits for data at most 10% of the time
            gpu = device.type == "cuda"
            rows.append(row("pipeline", name, sum(seconds) * batch * 1e3 / (window * len(timed)),
                            images=batch, data_wait=wait, steps=steps,
                            workers=train.default_workers(gpu, 1),
                            target="data wait <= 10%" if gpu else None,
                            ok=wait <= 0.10 if gpu else None))
    return rows


def make_synthetic_voc(num_images=4952, seed=0, detections_per_image=200, num_classes=20):
    """A VOC2007-test-sized problem: (detections, ground_truth, class_names) for evaluate.voc_eval.

    About 3 objects per image (20% difficult, so ~12,000 positives over 4,952 images), and 200
    detections per image: jittered copies of the objects (some duplicated, some mislabelled) with
    higher scores, the rest random boxes with low scores. Float32, like the model's output.
    """
    rng = np.random.default_rng(seed)
    sizes = rng.integers(300, 501, size=(num_images, 2)).astype(np.float64)  # (w, h)
    n_gt = 1 + rng.poisson(2.0, size=num_images)
    gt_image = np.repeat(np.arange(num_images), n_gt)
    wh = sizes[gt_image]
    box_wh = wh * rng.uniform(0.05, 0.6, size=(len(gt_image), 2))
    xy = (wh - box_wh) * rng.uniform(size=(len(gt_image), 2))
    gt_boxes = np.round(np.concatenate([xy, xy + box_wh], axis=1))
    gt_labels = rng.integers(1, num_classes + 1, size=len(gt_image))
    gt_difficult = rng.uniform(size=len(gt_image)) < 0.2

    copies = rng.integers(0, 4, size=len(gt_image))  # 0..3 detections per object
    src = np.repeat(np.arange(len(gt_image)), copies)
    jitter = rng.normal(0.0, 0.1, size=(len(src), 4)) * box_wh[src][:, [0, 1, 0, 1]]
    hit_boxes = gt_boxes[src] + jitter
    hit_labels = np.where(rng.uniform(size=len(src)) < 0.9, gt_labels[src],
                          rng.integers(1, num_classes + 1, size=len(src)))
    hit_scores = rng.beta(5, 2, size=len(src))
    hits_per_image = np.bincount(gt_image[src], minlength=num_images)
    n_rand = np.maximum(detections_per_image - hits_per_image, 0)
    rand_image = np.repeat(np.arange(num_images), n_rand)
    rwh = sizes[rand_image]
    r_wh = rwh * rng.uniform(0.02, 0.7, size=(len(rand_image), 2))
    r_xy = (rwh - r_wh) * rng.uniform(size=(len(rand_image), 2))
    rand_boxes = np.concatenate([r_xy, r_xy + r_wh], axis=1)
    rand_labels = rng.integers(1, num_classes + 1, size=len(rand_image))
    rand_scores = rng.beta(1, 6, size=len(rand_image))

    det_image = np.concatenate([gt_image[src], rand_image])
    order = np.argsort(det_image, kind="mergesort")
    boxes = np.concatenate([hit_boxes, rand_boxes])[order].astype(np.float32)
    scores = np.concatenate([hit_scores, rand_scores])[order].astype(np.float32)
    labels = np.concatenate([hit_labels, rand_labels])[order]
    det_split = np.cumsum(np.bincount(det_image, minlength=num_images))[:-1]
    gt_split = np.cumsum(n_gt)[:-1]
    detections = list(zip(np.split(boxes, det_split), np.split(scores, det_split),
                          np.split(labels, det_split)))
    ground_truth = [{"boxes": b.astype(np.float32), "labels": lab, "difficult": dif,
                     "width": int(w), "height": int(h)}
                    for b, lab, dif, (w, h) in zip(np.split(gt_boxes, gt_split),
                                                   np.split(gt_labels, gt_split),
                                                   np.split(gt_difficult, gt_split), sizes)]
    return detections, ground_truth, [f"class{c}" for c in range(1, num_classes + 1)]


def bench_eval(device, args):
    """evaluate.voc_eval (11-point and area AP) on make_synthetic_voc: 4,952 images, ~12,000
    objects, 200 detections per image. Single core."""
    dets, gts, names = make_synthetic_voc(EVAL_IMAGES, 0)
    ms, out = time_side_by_side({"ours": partial(evaluate.voc_eval, dets, gts, names)},
                                torch.device("cpu"), max(args.repeat, 3), warmup=False)
    return [row("eval", f"VOC mAP, {EVAL_IMAGES} images x 200 dets", ms["ours"],
                target=f"< {EVAL_TARGET_MS / 1e3:g} s", ok=ms["ours"] < EVAL_TARGET_MS,
                map_11point=out["ours"]["map_11point"])]


# ----------------------------------------------------------------------------- kernels
def on_engine(path, fn):
    """fn() with kernels.py forced onto one engine ("torch" / "triton") by its SSD_KERNELS
    switch."""
    old = os.environ.get("SSD_KERNELS")
    os.environ["SSD_KERNELS"] = path
    try:
        return fn()
    finally:
        if old is None:
            del os.environ["SSD_KERNELS"]
        else:
            os.environ["SSD_KERNELS"] = old


def random_boxes(n, gen):
    """Uniform boxes over the image, sides up to 30% of it: sparse overlaps, most boxes kept."""
    xy = torch.rand(n, 2, generator=gen) * IMAGE_SIZE  # [n, 2]
    wh = torch.rand(n, 2, generator=gen) * IMAGE_SIZE * 0.3 + 1  # [n, 2]
    return torch.cat([xy, xy + wh], 1), torch.rand(n, generator=gen)


def clustered_boxes(n, gen, objects=30):
    """Detector-like boxes: many jittered copies around a few dozen objects, so most are
    suppressed."""
    centre = torch.rand(objects, 2, generator=gen) * IMAGE_SIZE  # [O, 2]
    size = torch.rand(objects, 2, generator=gen) * 100 + 10  # [O, 2]
    obj = torch.randint(objects, (n,), generator=gen)  # [n]
    ctr = centre[obj] + torch.randn(n, 2, generator=gen) * size[obj] * 0.15  # [n, 2]
    wh = size[obj] * (1 + 0.15 * torch.randn(n, 2, generator=gen)).clamp(min=0.3)  # [n, 2]
    return torch.cat([ctr - wh / 2, ctr + wh / 2], 1), torch.rand(n, generator=gen)


def ssd_postprocess_input(num_classes, gen):
    """What batched_nms sees in SSD post-processing: per class, scores > SCORE_THRESHOLD, top TOPK,
    over slightly jittered anchors (the decoded boxes). Random logits make it the largest case."""
    anchors = ssd.cxcywh_to_xyxy(ssd.anchors(ssd.make_config(300, 20))) * IMAGE_SIZE  # [8732, 4]
    boxes = anchors + torch.randn(anchors.shape, generator=gen) * 2  # [A, 4]
    logits = torch.randn(len(anchors), num_classes + 1, generator=gen) * 2  # [A, C+1]
    probs = logits.softmax(1)[:, 1:].t()  # [C, A], background dropped
    top, idx = probs.topk(TOPK, dim=1)  # [C, TOPK]
    labels = torch.arange(1, num_classes + 1).unsqueeze(1).expand_as(idx)  # [C, TOPK]
    ok = top > SCORE_THRESHOLD
    return boxes[idx[ok]], top[ok], labels[ok]


def compare_paths(name, ours, reference, device, args, check):
    """One row: time our engines and torchvision's op (when given) on the same inputs.
    ours / reference: functions of no arguments; check(ours_result, reference_result) -> bool
    (without a reference: Triton's result against the torch engine's, where both ran)."""
    paths = ["torch"] + (["triton"] if device.type == "cuda" and kernels.triton is not None
                         else [])
    fns = {p: partial(on_engine, p, ours) for p in paths}
    if reference is not None:
        fns["torchvision"] = reference
    ms, out = time_side_by_side(fns, device, args.repeat)
    default = paths[-1]  # what kernels.py picks for this device
    same = (all(check(out[p], out["torchvision"]) for p in paths) if reference is not None
            else check(out[paths[-1]], out["torch"]) if len(paths) > 1 else None)
    return row("kernels", name, ms[default], ms.get("torchvision"), same=same, default_path=default,
               **{f"{p}_ms": ms[p] for p in paths})


def same_keep(a, b):
    # same kept set (score order checked in tests)
    return torch.equal(a.sort().values, b.sort().values)


SOFT_NMS_GPU_TARGET_MS = 2.0


def same_soft(a, b):
    # same picks in the same order, scores within float32 rounding of exp
    return torch.equal(a[0], b[0]) and torch.allclose(a[1], b[1], rtol=1e-5, atol=0)


def same_iou(a, b):
    return torch.allclose(a, b, atol=1e-6, rtol=0)


def bench_kernels(device, args):
    """IoU and NMS at several N (single class), then class-aware NMS and Soft-NMS at SSD300
    shapes."""
    gen = torch.Generator().manual_seed(0)
    tv = torchvision.ops if torchvision is not None else None
    rows = []
    for n in NMS_SIZES:
        for kind, make in (("clustered", clustered_boxes), ("random", random_boxes)):
            boxes, scores = (t.to(device) for t in make(n, gen))
            ours = partial(kernels.nms, boxes, scores, IOU_THRESHOLD)
            ref = partial(tv.nms, boxes, scores, IOU_THRESHOLD) if tv else None
            rows.append(compare_paths(f"nms N={n} {kind}", ours, ref, device, args, same_keep))
        other = boxes[: min(n, IOU_COLUMNS)]
        ref = partial(tv.box_iou, boxes, other) if tv else None
        rows.append(compare_paths(f"box_iou {n}x{len(other)}",
                                  partial(kernels.box_iou, boxes, other), ref, device, args,
                                  same_iou))
    for c in SSD_CLASSES:
        boxes, scores, labels = (t.to(device) for t in ssd_postprocess_input(c, gen))
        ours = partial(kernels.batched_nms, boxes, scores, labels, IOU_THRESHOLD)
        ref = partial(tv.batched_nms, boxes, scores, labels, IOU_THRESHOLD) if tv else None
        rows.append(compare_paths(f"batched_nms SSD300 {c} classes (N={len(boxes)})", ours, ref,
                                  device, args, same_keep))
    # Soft-NMS: no torchvision counterpart; the Triton kernel against the torch engine on CUDA
    boxes, scores, labels = (t.to(device) for t in ssd_postprocess_input(SSD_CLASSES[0], gen))
    for method in ("gaussian", "linear"):
        rows.append(compare_paths(
            f"soft_nms {method} SSD300 {SSD_CLASSES[0]} classes (N={len(boxes)})",
            partial(kernels.soft_nms, boxes, scores, labels, method=method), None, device, args,
            same_soft))
        if device.type == "cuda":  # the Triton kernel's goal on an H100 / H200 class GPU
            rows[-1].update(target=f"<= {SOFT_NMS_GPU_TARGET_MS:g} ms",
                            ok=rows[-1]["ms"] <= SOFT_NMS_GPU_TARGET_MS)
    return rows


# ----------------------------------------------------------------------------- main
def describe(device, args):
    """The set-up printed above the table and stored in the JSON."""
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        cpu = platform.processor() or platform.machine()
    return {"cpu": cpu, "cores": os.cpu_count(), "load_avg_1min": round(os.getloadavg()[0], 2),
            "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
            "threads": args.model_threads, "threads_single_core_sections": 1,
            "torch": torch.__version__, "triton": getattr(kernels.triton, "__version__", None),
            "torchvision": getattr(torchvision, "__version__", None)}


def cell(value, spec, width):
    return f"{value:{width}{spec}}" if value is not None else f"{'-':>{width}}"


def print_table(rows):
    head = (f"{'name':<46}{'ours ms':>11}{'tv ms':>11}{'x faster':>9}{'img/s':>9}  same  "
            "target        note")
    section = None
    for r in rows:
        if r["section"] != section:
            section = r["section"]
            print(f"\n[{section}]\n{head}\n{'-' * len(head)}")
        verdict = {True: "ok", False: "NO", None: "n/a"}[r["ok"]]  # n/a: no torchvision to compare
        target = f"{r['target']} {verdict}" if r["target"] else "-"
        same = {True: "yes", False: "NO", None: "-"}[r["same"]]
        note = (f"torch {r['torch_ms']:.2f} ms" if r.get("default_path") == "triton" else
                f"data wait {r['data_wait']:.0%}, {r['workers']} workers" if "workers" in r else
                f"mAP {r['map_11point']:.3f}" if "map_11point" in r else r.get("failed", ""))
        print(f"{r['name']:<46}{cell(r['ms'], '.2f', 11)}{cell(r['torchvision_ms'], '.2f', 11)}"
              f"{cell(r['speedup'], '.2f', 9)}{cell(r['images_per_s'], '.1f', 9)}  {same:<4}  "
              f"{target:<13} {note}")


def main(argv=None):
    parser = argparse.ArgumentParser(description="\n\n".join(__doc__.split("\n\n")[:2]),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--only", default=",".join(SECTIONS),
                        help=f"comma-separated sections to run, from: {', '.join(SECTIONS)}")
    parser.add_argument("--repeat", type=int, default=5,
                        help="timed rounds per case, median reported (slow cases: at most 3, or 2)")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch CPU threads for model, e2e and train (default 0: all cores); "
                             "the other sections use 1")
    parser.add_argument("--json", metavar="FILE", help="also write the set-up and the rows as JSON")
    args = parser.parse_args(argv)
    wanted = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = [s for s in wanted if s not in SECTIONS]
    if unknown or not wanted:
        parser.error(f"--only: unknown section(s) {unknown or args.only!r}; "
                     f"choose from {', '.join(SECTIONS)}")
    if args.repeat < 1 or args.threads < 0:
        parser.error("--repeat must be >= 1 and --threads >= 0")
    if args.json and not os.path.isdir(os.path.dirname(os.path.abspath(args.json))):
        parser.error(f"--json {args.json}: its folder does not exist")
    if args.device == "cuda" and not torch.cuda.is_available():
        print("bench.py: --device cuda but torch sees no CUDA device", file=sys.stderr)
        return 2
    args.model_threads = args.threads or torch.get_num_threads()
    device = torch.device(args.device)
    setup = describe(device, args)
    print(" ".join(f"{k}={v}" for k, v in setup.items()), flush=True)
    if device.type == "cpu" and args.model_threads > 1 and setup["load_avg_1min"] >= os.cpu_count():
        print(f"warning: load average {setup['load_avg_1min']} >= {os.cpu_count()} cores: "
              f"{args.model_threads} threads wait on each other's time slices and many-op code "
              "(NMS, backward) slows down several-fold; --threads 1 gives steadier figures",
              flush=True)

    benches = {"model": bench_model, "postprocess": bench_postprocess, "e2e": bench_e2e,
               "data": bench_data, "train": bench_train, "pipeline": bench_pipeline,
               "eval": bench_eval,
               "kernels": bench_kernels}
    rows = []
    for name in (s for s in SECTIONS if s in wanted):  # in SECTIONS order
        t = time.perf_counter()
        with threads(args.model_threads if name in ("model", "e2e", "train", "pipeline") else 1):
            rows += benches[name](device, args)
        print(f"{name}: {time.perf_counter() - t:.0f} s", file=sys.stderr, flush=True)
    print_table(rows)
    setup["load_avg_1min_end"] = round(os.getloadavg()[0], 2)
    print(f"\nload average (1 min) {setup['load_avg_1min']} at start, "
          f"{setup['load_avg_1min_end']} at end")
    if args.json:
        try:
            with open(args.json, "w") as f:
                json.dump({"setup": setup, "rows": rows}, f, indent=1)
        except OSError as e:
            print(f"bench.py: cannot write {args.json}: {e.strerror}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
