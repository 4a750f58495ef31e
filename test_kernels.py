"""Tests for kernels.py: the torch code and the Triton kernels (run by Triton's interpreter on the
CPU, see conftest.py) against slow, obviously-correct references written with numpy and loops."""
import importlib.util
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import kernels

# The "triton" path runs the kernels on CPU tensors, which only the interpreter can do; on a GPU
# machine (conftest.py leaves the interpreter off there) test_triton_on_gpu_matches_cpu covers them.
PATHS = ["torch", pytest.param("triton", marks=pytest.mark.skipif(
    kernels.triton is None or os.environ.get("TRITON_INTERPRET") != "1",
    reason="needs Triton and TRITON_INTERPRET=1 (CPU tensors)"))]
needs_gpu = pytest.mark.skipif(not torch.cuda.is_available() or kernels.triton is None,
                               reason="needs a CUDA GPU and Triton")


@pytest.fixture(params=PATHS)
def path(request, monkeypatch):
    monkeypatch.setenv("SSD_KERNELS", request.param)
    return request.param


# ----------------------------------------------------------------------------- references
def ref_iou(a, b):
    """IoU matrix in float32, straight from the definition (empty boxes: 0)."""
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    area = lambda x: np.maximum(x[:, 2] - x[:, 0], 0) * np.maximum(x[:, 3] - x[:, 1], 0)
    iw = np.maximum(np.minimum(a[:, None, 2], b[None, :, 2])
                    - np.maximum(a[:, None, 0], b[None, :, 0]), 0)
    ih = np.maximum(np.minimum(a[:, None, 3], b[None, :, 3])
                    - np.maximum(a[:, None, 1], b[None, :, 1]), 0)
    inter = iw * ih
    union = (area(a)[:, None] + area(b)[None, :]) - inter
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(union > 0, inter / union, np.float32(0)).astype(np.float32)


def ref_order(scores):
    """torchvision's order: NaN scores first (torch.sort's descending order), then by decreasing
    score in the scores' own precision, equal scores lower index first."""
    s = scores.double().tolist()
    return sorted(range(len(s)), key=lambda i: (not math.isnan(s[i]), -s[i], i))


def ref_nms(boxes, scores, labels, thr):
    """Greedy NMS, one box at a time: walk down ref_order, keep a box unless a kept box of its
    label overlaps it with IoU > thr (the float32 IoU compared exactly with thr; a box with a
    non-finite coordinate gets a NaN or infinite area, so its IoU is NaN or 0, never > thr)."""
    with np.errstate(invalid="ignore", over="ignore"):
        iou = ref_iou(boxes, boxes).astype(np.float64)
    labels = np.zeros(len(scores), np.int64) if labels is None else labels.numpy()
    suppressed = np.zeros(len(scores), bool)
    kept = []
    for i in ref_order(scores):
        if not suppressed[i]:
            kept.append(i)
            suppressed |= (iou[i] > thr) & (labels == labels[i])
    return kept  # already by decreasing score, ties lower index first


def ref_soft_nms(boxes, scores, labels, sigma, score_threshold, method, iou_threshold):
    """Soft-NMS, one box at a time, in float32; ties go to the earlier box in
    (score desc, index)."""
    with np.errstate(invalid="ignore", over="ignore"):
        iou = ref_iou(boxes, boxes)
    cur = scores.float().numpy().copy()
    labels = [0] * len(cur) if labels is None else labels.tolist()
    rank = {i: r for r, i in enumerate(ref_order(scores.float()))}
    alive = {i for i in range(len(cur)) if cur[i] >= score_threshold}
    out = []
    while alive:
        best = max(alive, key=lambda i: (cur[i], -rank[i]))
        out.append((best, float(cur[best])))
        alive.remove(best)
        for j in [j for j in alive if labels[j] == labels[best]]:
            v = iou[best, j]
            if method == "gaussian":
                cur[j] = cur[j] * np.exp(-(v * v) / np.float32(sigma))
            elif v > iou_threshold:
                cur[j] = cur[j] * (np.float32(1) - v)
            if cur[j] < score_threshold:
                alive.remove(j)
    out.sort(key=lambda t: (-t[1], t[0]))
    return [i for i, _ in out], [s for _, s in out]


# ----------------------------------------------------------------------------- inputs
def hard_boxes(n, seed, labels=1):
    """Boxes on a small integer grid, so exact IoUs like 1/2, 1/3 and 1/4 occur, with duplicates,
    zero-area boxes and integer scores (many exact ties)."""
    g = torch.Generator().manual_seed(seed)
    xy = torch.randint(0, 24, (n, 2), generator=g).float()
    wh = torch.randint(0, 9, (n, 2), generator=g).float()  # 0 -> zero-area box
    boxes = torch.cat([xy, xy + wh], 1)
    if n > 4:
        boxes[n // 2: n // 2 + n // 4] = boxes[: n // 4]  # exact duplicates
    scores = torch.randint(0, 8, (n,), generator=g).float()
    return boxes, scores, torch.randint(0, labels, (n,), generator=g)


def smooth_boxes(n, seed):
    """Random float boxes with distinct scores."""
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(n, 2, generator=g) * 100
    return torch.cat([xy, xy + torch.rand(n, 2, generator=g) * 30], 1), torch.rand(n, generator=g)


# ----------------------------------------------------------------------------- box_iou
def test_box_iou_known_values(path):
    a = torch.tensor([[0.0, 0, 2, 2], [0, 0, 2, 2], [5, 5, 5, 9], [0, 0, 3, 1]])
    b = torch.tensor([[1.0, 1, 3, 3], [0, 0, 2, 2], [5, 5, 5, 9], [0, 0, 1, 1]])
    iou = kernels.box_iou(a, b)
    assert iou.dtype == torch.float32 and iou.shape == (4, 4)
    assert iou[0, 0].item() == pytest.approx(1 / 7)
    assert iou[1, 1].item() == 1.0
    assert iou[2, 2].item() == 0.0  # a zero-area box has IoU 0 even with itself
    assert iou[3, 3].item() == np.float32(1 / 3)
    assert iou[2].abs().sum().item() == 0.0 and iou[:, 2].abs().sum().item() == 0.0


@pytest.mark.parametrize("n,m", [(0, 5), (5, 0), (1, 1), (63, 65), (300, 200)])
def test_box_iou_matches_reference(path, n, m):
    a, _, _ = hard_boxes(n, seed=n)
    b, _ = smooth_boxes(m, seed=m)
    b = torch.cat([b, a[: m // 3]])[:m]  # shared boxes as well
    got = kernels.box_iou(a, b)
    assert got.shape == (n, m) and got.dtype == torch.float32
    np.testing.assert_array_equal(got.numpy(), ref_iou(a, b))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_box_iou_other_dtypes_compute_in_float32(path, dtype):
    a, _ = smooth_boxes(40, seed=1)
    a = a.to(dtype)
    got = kernels.box_iou(a, a)
    assert got.dtype == torch.float32
    np.testing.assert_array_equal(got.numpy(), ref_iou(a.float(), a.float()))


# ----------------------------------------------------------------------------- nms
@pytest.mark.parametrize("n", [0, 1, 2, 63, 64, 65, 500])
@pytest.mark.parametrize("thr", [0.5, 1 / 3, 0.0])
def test_nms_matches_reference(path, n, thr):
    boxes, scores, _ = hard_boxes(n, seed=n)
    got = kernels.nms(boxes, scores, thr)
    assert got.dtype == torch.int64
    assert got.tolist() == ref_nms(boxes, scores, None, thr)


def test_nms_3000_torch_path(monkeypatch):
    # too slow for the interpreter; the Triton kernels get 500 and 1000 boxes above and below
    monkeypatch.setenv("SSD_KERNELS", "torch")
    for boxes, scores in (hard_boxes(3000, seed=3)[:2], smooth_boxes(3000, seed=3)):
        assert kernels.nms(boxes, scores, 0.45).tolist() == ref_nms(boxes, scores, None, 0.45)
        labels = torch.arange(3000) % 2  # two labels of 1500: each label on its own (one big class)
        want = ref_nms(boxes, scores, labels, 0.45)
        assert kernels.batched_nms(boxes, scores, labels, 0.45).tolist() == want


def test_nms_1000_smooth(path):
    boxes, scores = smooth_boxes(1000, seed=7)
    assert kernels.nms(boxes, scores, 0.45).tolist() == ref_nms(boxes, scores, None, 0.45)


def test_nms_threshold_is_strict_and_exact(path):
    # IoU([0,0,2,1], [0,0,1,1]) is exactly 1/2 and IoU([0,0,3,1], [0,0,1,1]) is float32(1/3), which
    # is just above 1/3: torchvision compares the float32 IoU with the threshold exactly.
    boxes = torch.tensor([[0.0, 0, 2, 1], [0, 0, 1, 1], [10, 0, 13, 1], [10, 0, 11, 1]])
    scores = torch.tensor([0.9, 0.8, 0.7, 0.6])
    assert kernels.nms(boxes, scores, 0.5).tolist() == [0, 1, 2, 3]  # 1/2 > 1/2 is false
    assert kernels.nms(boxes, scores, 0.4999).tolist() == [0, 2, 3]
    assert kernels.nms(boxes, scores, 1 / 3).tolist() == [0, 2]  # float32(1/3) > 1/3
    assert kernels.nms(boxes, scores, float(np.float32(1 / 3))).tolist() == [0, 2, 3]


def test_nms_ties_keep_lower_index_first(path):
    boxes = torch.tensor([[0.0, 0, 10, 10]] * 3 + [[50.0, 50, 60, 60]] * 2)
    scores = torch.tensor([1.0, 2.0, 2.0, 2.0, 1.0])
    assert kernels.nms(boxes, scores, 0.5).tolist() == [1, 3]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_nms_half_precision_same_keep_as_float32(path, dtype):
    boxes, scores = smooth_boxes(300, seed=11)
    boxes, scores = boxes.to(dtype), scores.to(dtype)
    got = kernels.nms(boxes, scores, 0.45)
    assert got.tolist() == kernels.nms(boxes.float(), scores.float(), 0.45).tolist()
    assert got.tolist() == ref_nms(boxes.float(), scores.float(), None, 0.45)


# ----------------------------------------------------------------------------- batched_nms
@pytest.mark.parametrize("n,num_labels", [(0, 1), (1, 1), (65, 3), (500, 40), (150, 150)])
def test_batched_nms_matches_reference(path, n, num_labels):
    boxes, scores, labels = hard_boxes(n, seed=n + num_labels, labels=num_labels)
    got = kernels.batched_nms(boxes, scores, labels, 0.5)
    assert got.dtype == torch.int64
    assert got.tolist() == ref_nms(boxes, scores, labels, 0.5)


def test_batched_nms_uneven_labels(path):
    # one big label and hundreds of singletons: the torch code splits labels by size and the
    # Triton code falls back to one segment that compares labels inside the kernel
    boxes, scores, _ = hard_boxes(1000, seed=5)
    labels = torch.arange(1000) * 10**12  # huge labels: a coordinate-offset trick would break here
    labels[:800] = -7
    got = kernels.batched_nms(boxes, scores, labels, 0.5)
    assert got.tolist() == ref_nms(boxes, scores, labels, 0.5)


def test_batched_nms_many_small_labels_torch_path(monkeypatch):
    # like an untrained SSD's candidates: hundreds of labels of up to 400 boxes, so the torch code
    # goes through blocks of labels and several chunks per label; grid boxes (ties, duplicates,
    # empty boxes, heavy suppression) and spread-out float boxes (most kept) in turn
    monkeypatch.setenv("SSD_KERNELS", "torch")
    g = torch.Generator().manual_seed(13)
    sizes = torch.randint(1, 401, (150,), generator=g).tolist()
    parts = [hard_boxes(n, seed=i)[:2] if i % 2 else smooth_boxes(n, seed=i)
             for i, n in enumerate(sizes)]
    boxes, scores = torch.cat([b for b, _ in parts]), torch.cat([s for _, s in parts])
    labels = torch.repeat_interleave(torch.arange(len(sizes)) * 7 - 500, torch.tensor(sizes))
    shuffle = torch.randperm(len(boxes), generator=g)  # labels interleaved in the input
    boxes, scores, labels = boxes[shuffle], scores[shuffle], labels[shuffle]
    got = kernels.batched_nms(boxes, scores, labels, 0.45)
    want = []  # labels never interact: the reference runs per label, then merges by score
    for lab in labels.unique():
        idx = (labels == lab).nonzero().flatten()
        want += idx[ref_nms(boxes[idx], scores[idx], None, 0.45)].tolist()
    want.sort(key=lambda i: (-scores[i].item(), i))
    assert got.tolist() == want


@pytest.mark.parametrize("per_label", [3, 129, 130])  # banded path (<= 129 a label) / rows path
def test_batched_nms_chains(path, per_label):
    # boxes sliding along x: each overlaps the next (IoU 0.6) but not the one after, so greedy
    # NMS keeps every other box, and each decision depends on the one before (a chain as long as
    # the label); two labels interleaved, a third with a single box
    x = torch.arange(per_label).float() * 2.5
    row = torch.stack([x, torch.zeros_like(x), x + 10, torch.full_like(x, 10)], 1)
    boxes = torch.cat([row, row + 0.25, row[:1]])
    scores = torch.cat([1 - x / 1000, 1 - x / 1000 - 1e-4, torch.ones(1)])
    labels = torch.cat([torch.zeros(per_label), torch.ones(per_label),
                        torch.full((1,), 5.0)]).long()
    shuffle = torch.randperm(len(boxes), generator=torch.Generator().manual_seed(per_label))
    boxes, scores, labels = boxes[shuffle], scores[shuffle], labels[shuffle]
    got = kernels.batched_nms(boxes, scores, labels, 0.5)
    want = ref_nms(boxes, scores, labels, 0.5)
    assert got.tolist() == want and len(want) == 2 * ((per_label + 1) // 2) + 1


def test_batched_nms_separates_labels(path):
    boxes = torch.tensor([[0.0, 0, 10, 10]] * 4)
    scores = torch.tensor([0.1, 0.4, 0.3, 0.2])
    labels = torch.tensor([1, 2, 1, 2])
    assert kernels.batched_nms(boxes, scores, labels, 0.5).tolist() == [1, 2]


# ----------------------------------------------------------------------------- nms_rows
def ref_nms_rows(boxes, labels, valid, thr, max_kept):
    """Per row: walk the columns in order, keep a valid box unless a kept box of its label
    overlaps it with IoU > thr; stop at max_kept kept."""
    keep = torch.zeros(labels.shape, dtype=torch.bool)
    for r in range(labels.shape[0]):
        iou = ref_iou(boxes[r], boxes[r]).astype(np.float64)
        kept = []
        for j in range(labels.shape[1]):
            if len(kept) == max_kept:
                break
            if valid[r, j] and not any(iou[i, j] > thr and labels[r, i] == labels[r, j]
                                       for i in kept):
                kept.append(j)
        keep[r, kept] = True
    return keep


@pytest.mark.parametrize("n,num_labels,max_kept", [(0, 1, 5), (1, 1, 1), (70, 1, 1000),
                                                   (300, 4, 1000), (300, 4, 25), (500, 30, 64),
                                                   (200, 200, 0)])
def test_nms_rows_matches_reference(n, num_labels, max_kept):
    # rows of grid boxes (exact IoU ties with the threshold, duplicates, empty boxes) and of
    # smooth boxes; some entries invalid; max_kept both cutting the rows short and not
    rows = [hard_boxes(n, seed=n + r, labels=num_labels) for r in range(2)]
    smooth = smooth_boxes(n, seed=n)
    boxes = torch.stack([rows[0][0], rows[1][0], smooth[0]])  # [3, n, 4]
    labels = torch.stack([rows[0][2], rows[1][2], rows[0][2]])  # [3, n]
    valid = torch.rand(3, n, generator=torch.Generator().manual_seed(n)) > 0.2
    valid[2] &= torch.arange(n) % 10 == 0  # a row that fills up late or never
    for thr in (0.5, 1 / 3):
        got = kernels.nms_rows(boxes, labels, valid, thr, max_kept)
        want = ref_nms_rows(boxes, labels, valid, thr, max_kept)
        # a full row is not looked at after the chunk where it filled up; the extra kept boxes
        # of that chunk are the next ones the reference would keep
        cut = got & (got.cumsum(1) <= max_kept)
        for r in range(3):
            if max_kept and int(got[r].sum()) >= max_kept:
                last = int(cut[r].nonzero()[-1])  # where the row filled up
                assert not got[r, (last // kernels._CHUNK + 1) * kernels._CHUNK:].any()
        assert torch.equal(cut, want)


def test_nms_rows_agrees_with_batched_nms_on_each_row():
    # the contract: the first max_kept of what batched_nms keeps, row by row
    g = torch.Generator().manual_seed(3)
    boxes, scores = smooth_boxes(800, seed=3)
    labels = torch.randint(0, 5, (800,), generator=g)
    order = torch.sort(scores, descending=True, stable=True).indices
    keep = kernels.nms_rows(boxes[order][None], labels[order][None],
                            torch.ones(1, 800, dtype=torch.bool), 0.45, 10**6)
    assert order[keep[0]].tolist() == kernels.batched_nms(boxes, scores, labels, 0.45).tolist()


# ----------------------------------------------------------------------------- soft_nms
@pytest.mark.parametrize("method", ["gaussian", "linear"])
@pytest.mark.parametrize("n,num_labels", [(1, 0), (64, 0), (200, 0), (300, 7)])
def test_soft_nms_matches_reference(method, n, num_labels):
    boxes, scores = smooth_boxes(n, seed=n)
    labels = (torch.randint(0, num_labels, (n,), generator=torch.Generator().manual_seed(1))
              if num_labels else None)
    keep, new = kernels.soft_nms(boxes, scores, labels, sigma=0.5, score_threshold=0.05,
                                 method=method, iou_threshold=0.3)
    ref_keep, ref_new = ref_soft_nms(boxes, scores, labels, 0.5, 0.05, method, 0.3)
    assert keep.dtype == torch.int64 and keep.tolist() == ref_keep
    np.testing.assert_allclose(new.numpy(), ref_new, rtol=1e-5)
    assert (new[:-1] >= new[1:]).all()


@pytest.mark.filterwarnings("ignore:invalid value:RuntimeWarning")  # inf score * (1 - IoU 1)
@pytest.mark.parametrize("method", ["gaussian", "linear"])
@pytest.mark.parametrize("n,num_labels", [(64, 1), (120, 5)])
def test_soft_nms_engines_match_reference_and_each_other(path, monkeypatch, method, n, num_labels):
    # the Triton kernel (interpreted) and the torch code: same kept set, order and decayed scores
    # as the reference, also with non-finite boxes and NaN / inf scores
    boxes, scores = smooth_boxes(n, seed=n)
    boxes[:: n // 4] = boxes[1:: n // 4]  # duplicates: IoU 1
    _, _, labels = nonfinite_boxes(n, seed=n, labels=num_labels)
    boxes[5, 2], boxes[9, 1], scores[3], scores[7], scores[11] = math.nan, math.inf, math.nan, \
        math.inf, -math.inf
    args = dict(sigma=0.5, score_threshold=0.05, method=method, iou_threshold=0.3)
    keep, new = kernels.soft_nms(boxes, scores, labels, **args)
    ref_keep, ref_new = ref_soft_nms(boxes, scores, labels, 0.5, 0.05, method, 0.3)
    assert keep.tolist() == ref_keep
    np.testing.assert_allclose(new.numpy(), ref_new, rtol=1e-5)
    monkeypatch.setenv("SSD_KERNELS", "torch")
    torch_keep, torch_new = kernels.soft_nms(boxes, scores, labels, **args)
    assert torch.equal(keep, torch_keep)
    np.testing.assert_allclose(new.numpy(), torch_new.numpy(), rtol=1e-6)


def test_soft_nms_known_values():
    boxes = torch.tensor([[0.0, 0, 2, 1], [0, 0, 1, 1], [5, 5, 6, 6]])  # IoU(0, 1) = 1/2
    scores = torch.tensor([0.9, 0.8, 0.01])
    keep, new = kernels.soft_nms(boxes, scores, method="gaussian", sigma=0.5, score_threshold=0.001)
    assert keep.tolist() == [0, 1, 2]
    assert new.tolist() == pytest.approx([0.9, 0.8 * math.exp(-0.25 / 0.5), 0.01])
    keep, new = kernels.soft_nms(boxes, scores, method="linear", iou_threshold=0.3,
                                 score_threshold=0.02)
    assert keep.tolist() == [0, 1] and new.tolist() == pytest.approx([0.9, 0.4])
    keep, new = kernels.soft_nms(boxes, scores, method="linear", iou_threshold=0.5)
    assert new.tolist() == pytest.approx([0.9, 0.8, 0.01])  # IoU 1/2 is not > 1/2: no decay
    keep, new = kernels.soft_nms(boxes, scores.half(), labels=torch.tensor([1, 2, 1]))
    assert keep.tolist() == [0, 1, 2] and new.dtype == torch.float16  # other label: no decay


# ----------------------------------------------------------------------------- contract edges
def test_empty_inputs(path):
    boxes, scores = torch.zeros(0, 4), torch.zeros(0)
    assert kernels.nms(boxes, scores, 0.5).shape == (0,)
    assert kernels.nms(boxes, scores, 0.5).dtype == torch.int64
    assert kernels.batched_nms(boxes, scores, torch.zeros(0, dtype=torch.long), 0.5).shape == (0,)
    keep, new = kernels.soft_nms(boxes, scores)
    assert keep.shape == (0,) and new.shape == (0,)
    # all below threshold
    keep, new = kernels.soft_nms(torch.ones(2, 4), torch.tensor([1e-4, 2e-4]))
    assert keep.shape == (0,) and keep.dtype == torch.int64


def test_bad_arguments():
    with pytest.raises(ValueError, match="boxes must be"):
        kernels.nms(torch.zeros(3, 5), torch.zeros(3), 0.5)
    with pytest.raises(ValueError, match="scores must be"):
        kernels.nms(torch.zeros(3, 4), torch.zeros(4), 0.5)
    with pytest.raises(ValueError, match="labels must be"):
        kernels.batched_nms(torch.zeros(3, 4), torch.zeros(3), torch.zeros(2), 0.5)
    with pytest.raises(ValueError, match="iou_threshold"):
        kernels.nms(torch.zeros(3, 4), torch.zeros(3), -0.1)
    with pytest.raises(ValueError, match="method"):
        kernels.soft_nms(torch.zeros(3, 4), torch.zeros(3), method="hard")


def test_dispatch_switch(monkeypatch):
    boxes, scores = smooth_boxes(10, seed=0)
    monkeypatch.setenv("SSD_KERNELS", "cuda")
    with pytest.raises(ValueError, match="SSD_KERNELS"):
        kernels.nms(boxes, scores, 0.5)
    if kernels.triton is not None:
        monkeypatch.setenv("SSD_KERNELS", "triton")
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)
        with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
            kernels.nms(boxes, scores, 0.5)


def test_import_and_run_without_triton(monkeypatch):
    monkeypatch.setitem(sys.modules, "triton", None)  # makes `import triton` raise ImportError
    monkeypatch.setitem(sys.modules, "triton.language", None)
    spec = importlib.util.spec_from_file_location("kernels_without_triton", Path(kernels.__file__))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.triton is None
    boxes, scores, _ = hard_boxes(65, seed=2)
    monkeypatch.delenv("SSD_KERNELS", raising=False)
    assert module.nms(boxes, scores, 0.5).tolist() == ref_nms(boxes, scores, None, 0.5)
    monkeypatch.setenv("SSD_KERNELS", "triton")
    with pytest.raises(RuntimeError, match="Triton cannot be imported"):
        module.nms(boxes, scores, 0.5)


# ----------------------------------------------------------------------------- real GPU
COMPILE_FOR_GPU = """
import itertools, sys
import kernels
from triton._C.libtriton import ir
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, make_backend
target = GPUTarget("cuda", 90, 32)  # H100 / H200
backend = make_backend(target)
options = backend.parse_options({"enable_fp_fusion": False})
for name, types, fixed, flags in [
        ("_iou_kernel", "*fp32 *fp32 *fp32 i32 i32", dict(BLOCK=64), []),
        ("_nms_mask_kernel", "*fp32 *i64 *i64 i32 i32 *i64 fp32", dict(ROWS=64),
         ["COMPARE_LABELS", "SEGMENTED"]),
        ("_nms_sweep_kernel", "*i64 *i64 i32 i32 *i64 *i64 *u8", dict(CHUNK=128),
         ["SEGMENTED", "PERMUTED"]),
        ("_soft_nms_kernel", "*fp32 *fp32 *i64 *i64 *i64 *fp32 *i64 fp32 fp32 fp32",
         dict(BLOCK=512), ["LINEAR"])]:
    fn = getattr(kernels, name)
    for values in itertools.product([False, True], repeat=len(flags)):
        const = dict(fixed, **dict(zip(flags, values)))
        sig = dict(zip(fn.arg_names, types.split() + ["constexpr"] * len(const)))
        context = ir.context()
        ir.load_dialects(context)
        backend.load_dialects(context)
        ASTSource(fn=fn, signature=sig, constexprs=const).make_ir(
            target, options, backend.get_codegen_implementation(options),
            backend.get_module_map(), context)
"""


@pytest.mark.skipif(kernels.triton is None, reason="needs Triton")
def test_kernels_compile_for_the_gpu():
    # the interpreter runs code that the GPU compiler refuses (e.g. a loop-carried variable that
    # changes shape): build every kernel variant's Triton IR for a CUDA target, which needs no GPU,
    # in a process without the interpreter
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, "-c", COMPILE_FOR_GPU], env=env, capture_output=True,
                         text=True, cwd=Path(kernels.__file__).parent, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]


@needs_gpu
def test_triton_on_gpu_matches_cpu(monkeypatch):
    monkeypatch.delenv("SSD_KERNELS", raising=False)  # CUDA tensors take the Triton kernels
    for n, num_labels in ((65, 1), (3000, 1), (8000, 20), (20000, 80), (5000, 5000)):
        boxes, scores, labels = hard_boxes(n, seed=n, labels=num_labels)
        cpu_keep = kernels.batched_nms(boxes, scores, labels, 0.5)
        assert torch.equal(
            kernels.batched_nms(boxes.cuda(), scores.cuda(), labels.cuda(), 0.5).cpu(), cpu_keep)
        boxes, scores = smooth_boxes(n, seed=n)
        assert torch.equal(kernels.nms(boxes.cuda(), scores.cuda(), 0.45).cpu(),
                           kernels.nms(boxes, scores, 0.45))
        assert torch.equal(kernels.box_iou(boxes.cuda(), boxes[:300].cuda()).cpu(),
                           kernels.box_iou(boxes, boxes[:300]))
        boxes, scores, labels = nonfinite_boxes(n, seed=n, labels=num_labels)
        want = kernels.batched_nms(boxes, scores, labels, 0.5)
        assert torch.equal(
            kernels.batched_nms(boxes.cuda(), scores.cuda(), labels.cuda(), 0.5).cpu(), want)
        assert torch.equal(kernels.nms(boxes.cuda(), scores.cuda(), 0.5).cpu(),
                           kernels.nms(boxes, scores, 0.5))
        if n <= 8000:  # Soft-NMS: the kernel against the torch engine
            boxes, scores = smooth_boxes(n, seed=n)
            keep, new = kernels.soft_nms(boxes.cuda(), scores.cuda(), labels.cuda())
            ref_keep, ref_new = kernels.soft_nms(boxes, scores, labels)
            assert torch.equal(keep.cpu(), ref_keep)
            torch.testing.assert_close(new.cpu(), ref_new, rtol=1e-5, atol=0)


# ----------------------------------------------------------------------------- non-finite input
def test_nan_box_suppresses_nothing_and_is_not_suppressed(path):
    # torchvision.ops.nms keeps [0, 1] here: IoU with the NaN box is NaN, and NaN > 0.5 is false
    boxes = torch.tensor([[0.0, 0, 10, 10], [math.nan, 0, 10, 10], [0, 0, 10, 10]])
    scores = torch.tensor([0.9, 0.8, 0.7])
    assert kernels.nms(boxes, scores, 0.5).tolist() == [0, 1]
    one_label = torch.zeros(3, dtype=torch.long)
    assert kernels.batched_nms(boxes, scores, one_label, 0.5).tolist() == [0, 1]
    keep = kernels.nms_rows(boxes[None], torch.zeros(1, 3, dtype=torch.long),
                            torch.ones(1, 3, dtype=torch.bool), 0.5, 10)
    assert keep.tolist() == [[True, True, False]]
    assert kernels.box_iou(boxes, boxes)[1].tolist() == [0.0, 0.0, 0.0]


def nonfinite_boxes(n, seed, labels):
    """hard_boxes with NaN and infinite coordinates in some boxes and NaN / inf scores."""
    boxes, scores, lab = hard_boxes(n, seed, labels)
    g = torch.Generator().manual_seed(seed)
    bad = [math.nan, math.inf, -math.inf]
    for i, k in enumerate(torch.randint(0, n, (n // 8,), generator=g).tolist()):
        boxes[k, i % 4] = bad[i % 3]
    special = torch.randint(0, n, (n // 16,), generator=g)
    scores[special] = torch.tensor([math.nan, math.inf, -math.inf])[torch.arange(len(special)) % 3]
    return boxes, scores, lab


@pytest.mark.parametrize("n,num_labels", [(3, 1), (200, 1), (300, 5), (1000, 1)])
def test_nonfinite_inputs_match_reference(path, n, num_labels):
    boxes, scores, labels = nonfinite_boxes(n, seed=n, labels=num_labels)
    want = ref_nms(boxes, scores, labels, 0.5)
    assert kernels.batched_nms(boxes, scores, labels, 0.5).tolist() == want
    if num_labels == 1:
        assert kernels.nms(boxes, scores, 0.5).tolist() == want
    order = torch.tensor(ref_order(scores))  # torchvision's order: NaN first, then descending
    keep = kernels.nms_rows(boxes[order][None], labels[order][None],
                            torch.ones(1, n, dtype=torch.bool), 0.5, 10**6)
    assert order[keep[0]].tolist() == want


def test_float64_scores_keep_their_order(path):
    # equal in float32, different in float64: torchvision orders them by the float64 value
    boxes = torch.tensor([[0.0, 0, 10, 10], [0, 0, 10, 10], [20, 20, 30, 30], [20, 20, 30, 30]])
    scores = torch.tensor([0.5, 0.5 + 1e-12, 0.25, 0.25], dtype=torch.float64)
    assert kernels.nms(boxes, scores, 0.5).tolist() == [1, 2]
    assert kernels.batched_nms(boxes, scores, torch.tensor([0, 0, 1, 1]), 0.5).tolist() == [1, 2]
    labels = torch.tensor([0, 1, 2, 3])
    assert kernels.batched_nms(boxes, scores, labels, 0.5).tolist() == [1, 0, 2, 3]
