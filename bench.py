"""Speed figures for the SSD code: medians over repeats, side by side with torchvision where it is
installed (torchvision is never needed; its columns are left empty without it).

    python bench.py                                   # every section on the CPU
    python bench.py --device cuda --only kernels --json bench.json

One function per section, `bench_<section>(device, args) -> list of row dicts`, called in order by
main(). A row: section, name, ms per path of ours ("torch", "triton"), torchvision_ms, ratio
(our default path for the device / torchvision) and same (our result equals torchvision's).
"""
import argparse
import contextlib
import json
import math
import os
import statistics
import sys
import time
from functools import partial

import torch

import kernels

try:
    import torchvision
except Exception:  # only used for comparison
    torchvision = None

# ----------------------------------------------------------------------------- config
SECTIONS = ("kernels",)
NMS_SIZES = (200, 1000, 8732, 20000)  # 8732 = SSD300's anchor count
IOU_COLUMNS = 1000  # box_iou is timed as [N, 4] x [min(N, IOU_COLUMNS), 4]
IOU_THRESHOLD = 0.45  # paper / Caffe NMS IoU (facts §10)
SCORE_THRESHOLD = 0.01  # Caffe DetectionOutput confidence threshold (facts §10)
TOPK = 400  # Caffe top_k per class before NMS (facts §10)
SSD_CLASSES = (20, 80)  # VOC, COCO
IMAGE_SIZE = 300.0  # boxes in SSD300 input pixels
THREADS = 1  # torch CPU threads while timing: torchvision's C++ NMS runs on one core, so do we
SLOW_CALL_S = 0.5  # cases slower than this get at most 3 repeats, so the default run stays short


# ----------------------------------------------------------------------------- helpers
@contextlib.contextmanager
def forced_path(path):
    """Run kernels.py on one engine ("torch" / "triton") through its SSD_KERNELS switch."""
    old = os.environ.get("SSD_KERNELS")
    os.environ["SSD_KERNELS"] = path
    try:
        yield
    finally:
        if old is None:
            del os.environ["SSD_KERNELS"]
        else:
            os.environ["SSD_KERNELS"] = old


def time_side_by_side(fns, device, repeat):
    """Median ms of each function in fns {name: fn}; calls alternate so load drifts hit all alike."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    times = {name: [] for name in fns}
    first = {}
    for name, fn in fns.items():  # warm-up: Triton compiles, caches fill
        t = time.perf_counter()
        fn()
        sync()
        first[name] = time.perf_counter() - t
    if max(first.values()) > SLOW_CALL_S:
        repeat = min(repeat, 3)
    for _ in range(repeat):
        for name, fn in fns.items():
            sync()
            t = time.perf_counter()
            fn()
            sync()
            times[name].append(time.perf_counter() - t)
    return {name: statistics.median(ts) * 1e3 for name, ts in times.items()}


def random_boxes(n, gen):
    """Uniform boxes over the image, sides up to 30% of it: sparse overlaps, most boxes kept."""
    xy = torch.rand(n, 2, generator=gen) * IMAGE_SIZE  # [n, 2]
    wh = torch.rand(n, 2, generator=gen) * IMAGE_SIZE * 0.3 + 1  # [n, 2]
    return torch.cat([xy, xy + wh], 1), torch.rand(n, generator=gen)


def clustered_boxes(n, gen, objects=30):
    """Detector-like boxes: many jittered copies around a few dozen objects, so most are suppressed."""
    centre = torch.rand(objects, 2, generator=gen) * IMAGE_SIZE  # [O, 2]
    size = torch.rand(objects, 2, generator=gen) * 100 + 10  # [O, 2]
    obj = torch.randint(objects, (n,), generator=gen)  # [n]
    ctr = centre[obj] + torch.randn(n, 2, generator=gen) * size[obj] * 0.15  # [n, 2]
    wh = size[obj] * (1 + 0.15 * torch.randn(n, 2, generator=gen)).clamp(min=0.3)  # [n, 2]
    return torch.cat([ctr - wh / 2, ctr + wh / 2], 1), torch.rand(n, generator=gen)


def ssd300_anchor_boxes():
    """SSD300's 8,732 default boxes as xyxy pixels (feature maps 38..1, 4 or 6 boxes per cell)."""
    maps, sizes = (38, 19, 10, 5, 3, 1), (30, 60, 111, 162, 213, 264, 315)
    ratios = ((2,), (2, 3), (2, 3), (2, 3), (2,), (2,))
    boxes = []
    for k, f in enumerate(maps):
        s, big = sizes[k], math.sqrt(sizes[k] * sizes[k + 1])
        shapes = [(s, s), (big, big)] + [(s * math.sqrt(r), s / math.sqrt(r)) for r in ratios[k]]
        shapes += [(s / math.sqrt(r), s * math.sqrt(r)) for r in ratios[k]]
        c = (torch.arange(f) + 0.5) * IMAGE_SIZE / f  # [f] cell centres
        cy, cx = torch.meshgrid(c, c, indexing="ij")
        wh = torch.tensor(shapes)  # [K, 2]
        ctr = torch.stack([cx, cy], -1).reshape(-1, 1, 2)  # [f*f, 1, 2]
        boxes.append(torch.cat([ctr - wh / 2, ctr + wh / 2], -1).reshape(-1, 4))  # [f*f*K, 4]
    return torch.cat(boxes)  # [8732, 4]


def ssd_postprocess_input(num_classes, gen):
    """What batched_nms sees in SSD post-processing: per class, scores > SCORE_THRESHOLD, top TOPK,
    over slightly jittered anchors (the decoded boxes). Random logits make it the largest case."""
    anchors = ssd300_anchor_boxes()  # [A, 4]
    boxes = anchors + torch.randn(anchors.shape, generator=gen) * 2  # [A, 4]
    logits = torch.randn(len(anchors), num_classes + 1, generator=gen) * 2  # [A, C+1]
    probs = logits.softmax(1)[:, 1:].t()  # [C, A], background dropped
    top, idx = probs.topk(TOPK, dim=1)  # [C, TOPK]
    labels = torch.arange(1, num_classes + 1).unsqueeze(1).expand_as(idx)  # [C, TOPK]
    ok = top > SCORE_THRESHOLD
    return boxes[idx[ok]], top[ok], labels[ok]


def compare_paths(name, ours, reference, device, args, check, paths=None):
    """One row: time our engines and torchvision's op (when given) on the same inputs.
    ours / reference: functions of no arguments; check(ours_result, reference_result) -> bool."""
    if paths is None:
        paths = ["torch"] + (["triton"] if device.type == "cuda" and kernels.triton is not None else [])
    fns = {}
    for path in paths:
        def run(path=path):
            with forced_path(path):
                return ours()
        fns[path] = run
    if reference is not None:
        fns["torchvision"] = reference
    ms = time_side_by_side(fns, device, args.repeat)
    default = paths[-1]  # what kernels.py picks for this device
    row = {"section": "kernels", "name": name, "default_path": default,
           **{f"{p}_ms": ms[p] for p in paths}, "torchvision_ms": ms.get("torchvision"),
           "ratio": None, "same": None}
    if reference is not None:
        row["ratio"] = ms[default] / ms["torchvision"]
        row["same"] = all(check(fns[p](), reference()) for p in paths)
    return row


def same_keep(a, b):
    return torch.equal(a.sort().values, b.sort().values)  # same kept set (score order checked in tests)


def same_iou(a, b):
    return torch.allclose(a, b, atol=1e-6, rtol=0)


# ----------------------------------------------------------------------------- sections
def bench_kernels(device, args):
    """IoU and NMS at several N (single class), then class-aware NMS and Soft-NMS at SSD300 shapes."""
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
        rows.append(compare_paths(f"box_iou {n}x{len(other)}", partial(kernels.box_iou, boxes, other), ref,
                                  device, args, same_iou))
    for c in SSD_CLASSES:
        boxes, scores, labels = (t.to(device) for t in ssd_postprocess_input(c, gen))
        ours = partial(kernels.batched_nms, boxes, scores, labels, IOU_THRESHOLD)
        ref = partial(tv.batched_nms, boxes, scores, labels, IOU_THRESHOLD) if tv else None
        rows.append(compare_paths(f"batched_nms SSD300 {c} classes (N={len(boxes)})", ours, ref,
                                  device, args, same_keep))
    # Soft-NMS has one engine (torch) on every device and no torchvision counterpart
    boxes, scores, labels = (t.to(device) for t in ssd_postprocess_input(SSD_CLASSES[0], gen))
    rows.append(compare_paths(f"soft_nms SSD300 {SSD_CLASSES[0]} classes (N={len(boxes)})",
                              partial(kernels.soft_nms, boxes, scores, labels), None, device, args, None,
                              paths=["torch"]))
    return rows


# ----------------------------------------------------------------------------- main
def print_table(rows):
    paths = [p for p in ("torch", "triton") if any(f"{p}_ms" in r for r in rows)]
    head = f"{'name':<44}" + "".join(f"{p + ' ms':>12}" for p in paths) + f"{'tv ms':>12}{'ratio':>8}  same"
    print(head)
    print("-" * len(head))
    for r in rows:
        cells = "".join(f"{r[p + '_ms']:12.3f}" if f"{p}_ms" in r else f"{'-':>12}" for p in paths)
        tv = f"{r['torchvision_ms']:12.3f}" if r["torchvision_ms"] is not None else f"{'-':>12}"
        ratio = f"{r['ratio']:8.2f}" if r["ratio"] is not None else f"{'-':>8}"
        same = {True: "yes", False: "NO", None: "-"}[r["same"]]
        print(f"{r['name']:<44}{cells}{tv}{ratio}  {same}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--only", default=",".join(SECTIONS),
                        help=f"comma-separated sections to run, from: {', '.join(SECTIONS)}")
    parser.add_argument("--repeat", type=int, default=5, help="timed runs per case (median reported)")
    parser.add_argument("--threads", type=int, default=THREADS,
                        help=f"torch CPU threads (default {THREADS}; 0 = torch's own default)")
    parser.add_argument("--json", metavar="FILE", help="also write the rows and the set-up as JSON")
    args = parser.parse_args(argv)
    wanted = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = [s for s in wanted if s not in SECTIONS]
    if unknown or not wanted:
        parser.error(f"--only: unknown section(s) {unknown or args.only!r}; "
                     f"choose from {', '.join(SECTIONS)}")
    if args.repeat < 1:
        parser.error("--repeat must be >= 1")
    if args.json and not os.path.isdir(os.path.dirname(os.path.abspath(args.json))):
        parser.error(f"--json {args.json}: its folder does not exist")
    if args.device == "cuda" and not torch.cuda.is_available():
        print("bench.py: --device cuda but torch sees no CUDA device", file=sys.stderr)
        return 2
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    setup = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
             "torch": torch.__version__, "threads": torch.get_num_threads(),
             "torchvision": torchvision.__version__ if torchvision is not None else None,
             "triton": kernels.triton.__version__ if kernels.triton is not None else None}
    print(" ".join(f"{k}={v}" for k, v in setup.items()))

    rows = []  # sections run in this order; a new section is one more `if` here
    if "kernels" in wanted:
        rows += bench_kernels(device, args)

    print_table(rows)
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
