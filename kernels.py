"""Box operations for SSD post-processing: IoU, greedy NMS, class-aware NMS and Soft-NMS.

The contract, on every engine and device (that of torchvision.ops.box_iou / nms / batched_nms):
- Boxes are [N, 4] (x1, y1, x2, y2); x2 <= x1 or y2 <= y1: zero area, IoU 0 with everything. A box
  with a NaN or infinite coordinate counts as empty: it never suppresses and is never suppressed.
- IoU: float32 (boxes cast to float32), rounded as torchvision: inter / ((area_a + area_b) - inter).
- Hard NMS: down the scores, a box is kept unless a kept box has float32 IoU > iou_threshold (the
  exact value) with it. Kept indices by decreasing score in the scores' own dtype (float64 scores
  equal in float32 stay apart; NaN first, as torch.sort), equal scores lower index first.
- labels [N] int (any values): boxes only suppress boxes of their own label; None = one class.
- Soft-NMS (Bodla et al. 2017) decays scores in float32; a NaN score is dropped.
- Empty input gives empty output. ValueError: a wrong shape, iou_threshold < 0, an unknown method
  or SSD_KERNELS value; RuntimeError: SSD_KERNELS=triton where Triton cannot run.
Engines: Triton for CUDA tensors; torch for CPU tensors, nms_rows, and where Triton does not import.
SSD_KERNELS=torch|triton forces one (triton on CPU: TRITON_INTERPRET=1 before Triton is imported).
"""
import functools
import math
import os

import torch

try:
    import triton
    import triton.language as tl
except Exception:  # no Triton (macOS, Windows) or a broken install: the torch code still works
    triton = None

_CHUNK = 64  # boxes resolved per step of the torch NMS; tuned with bench.py on CPU
_SMALL_BLOCK = 8 << 20  # elements of [g, n, n] per block of labels in _sweep_rows; tuned on CPU


def box_iou(a, b):
    """Pairwise IoU of a [N, 4] and b [M, 4] -> [N, M] float32: entry (i, j) is IoU(a[i], b[j])."""
    a, b = _check(a), _check(b)
    if _use_triton(a):  # an empty grid launches nothing
        return _box_iou_triton(a, b)
    return _iou(_coords(a), _coords(b)).nan_to_num_(0.0)  # 0/0 only where both are empty


def nms(boxes, scores, iou_threshold):
    """torchvision.ops.nms: boxes [N, 4], scores [N] -> int64 kept indices, by decreasing score."""
    return batched_nms(boxes, scores, None, iou_threshold)


def batched_nms(boxes, scores, labels, iou_threshold):
    """Class-aware greedy NMS (torchvision.ops.batched_nms): boxes [N, 4], scores [N], labels [N]
    or None -> int64 indices of the kept boxes over all labels, by decreasing score."""
    boxes = _check(boxes, scores, labels)
    if boxes.shape[0] == 0:
        return torch.empty(0, dtype=torch.long, device=boxes.device)
    thr = _f32_threshold(iou_threshold)
    return (_nms_triton if _use_triton(boxes) else _nms_torch)(boxes, scores, labels, thr)


def nms_rows(boxes, labels, valid, iou_threshold, max_kept):
    """Class-aware greedy NMS of rows (images) in priority order: boxes [B, n, 4], labels [B, n]
    int, valid [B, n] bool (invalid: never kept, suppress nothing) -> keep [B, n] bool: per row the
    first max_kept that batched_nms keeps, maybe more to the end of the _CHUNK where it fills."""
    c5 = _coords(boxes.reshape(-1, 4).float()).view(5, *labels.shape)  # [5, B, n]
    return _sweep_rows(c5, valid, _f32_threshold(iou_threshold), labels, max_kept)


def soft_nms(boxes, scores, labels=None, sigma=0.5, score_threshold=0.001, method="gaussian",
             iou_threshold=0.3):
    """Soft-NMS (Bodla et al. 2017): keep a label's highest current score (ties: higher original
    score, then lower index), multiply its label's other boxes by exp(-IoU^2 / sigma) ("gaussian")
    or (1 - IoU) where IoU > iou_threshold ("linear"), drop those below score_threshold; repeat.
    -> (keep int64 [K], new_scores [K], scores' dtype) by decreasing new score, ties lower index."""
    boxes = _check(boxes, scores, labels)
    if method not in ("gaussian", "linear"):
        raise ValueError(f"soft_nms method must be 'gaussian' or 'linear', got {method!r}")
    out_dtype = scores.dtype if scores.is_floating_point() else torch.float32
    if boxes.shape[0] == 0:
        return scores.new_zeros(0, dtype=torch.long), scores.new_zeros(0, dtype=out_dtype)
    thr, scores = _f32_threshold(iou_threshold), scores.float()
    run = _soft_nms_triton if _use_triton(boxes) else _soft_nms_torch
    keep, new_scores = run(boxes, scores, labels, sigma, score_threshold, method == "linear", thr)
    order = keep.sort().indices  # unique indices: any sort is stable here
    order = order[_score_order(new_scores[order])]
    return keep[order], new_scores[order].to(out_dtype)


# ----------------------------------------------------------------------------- checks and dispatch
def _check(boxes, scores=None, labels=None):
    """Shapes checked (else ValueError) -> boxes as float32, contiguous."""
    if boxes.dim() != 2 or boxes.shape[1] != 4:
        raise ValueError(f"boxes must be [N, 4] xyxy, got shape {tuple(boxes.shape)}")
    for name, t in (("scores", scores), ("labels", labels)):
        if t is not None and tuple(t.shape) != (boxes.shape[0],):
            raise ValueError(f"{name} must be [{len(boxes)}] to match boxes, got {tuple(t.shape)}")
    return boxes.float().contiguous()


def _use_triton(t):
    mode = os.environ.get("SSD_KERNELS") or ("triton" if t.is_cuda and triton else "torch")
    if mode not in ("torch", "triton"):
        raise ValueError(f"SSD_KERNELS={mode!r}: expected 'torch' or 'triton'")
    if mode == "triton" and triton is None:
        raise RuntimeError("SSD_KERNELS=triton but Triton cannot be imported")
    if mode == "triton" and not t.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError("SSD_KERNELS=triton on CPU needs TRITON_INTERPRET=1 set before import")
    return mode == "triton"


@functools.lru_cache(maxsize=64)
def _f32_threshold(x):
    """Largest float32 <= x: a float32 IoU is > x (in double, as torchvision) iff it is > this."""
    if not x >= 0:
        raise ValueError(f"iou_threshold must be >= 0, got {x}")
    f = torch.tensor(float(x), dtype=torch.float32)
    return (f if f.item() <= x else torch.nextafter(f, torch.tensor(-math.inf))).item()


def _score_order(scores):
    return torch.sort(scores, descending=True, stable=True).indices


def _segments(order, labels):
    """order [N] by score -> (order[perm] by label then score, perm [N], start [S], count [S])."""
    if labels is None:
        return order, None, order.new_zeros(1), order.new_full((1,), len(order))
    perm = torch.sort(labels[order], stable=True).indices  # [N]
    order = order[perm]
    counts = torch.unique_consecutive(labels[order], return_counts=True)[1]  # [S]
    return order, perm, counts.cumsum(0) - counts, counts


# ----------------------------------------------------------------------------- torch engine
def _coords(b):
    """[N, 4] xyxy -> [5, N] float32 rows x1, y1, x2, y2, area; a non-finite box becomes 0,0,0,0."""
    if b.is_cuda or not math.isfinite(b.sum().item()):  # finite sum: all finite (1 us on CPU)
        b = torch.where(torch.isfinite(b).all(1, keepdim=True), b, 0.0)
    area = (b[:, 2] - b[:, 0]).clamp(min=0) * (b[:, 3] - b[:, 1]).clamp(min=0)
    return torch.cat([b.t(), area.unsqueeze(0)])


def _iou(a, b):
    """IoU of a [5, ..., n] with b [5, ..., m] (_coords) -> [..., n, m]; NaN: both are empty."""
    ax1, ay1, ax2, ay2, area_a = a.unsqueeze(-1).unbind(0)  # each [..., n, 1]
    bx1, by1, bx2, by2, area_b = b.unsqueeze(-2).unbind(0)  # each [..., 1, m]
    inter = torch.minimum(ax2, bx2).sub_(torch.maximum(ax1, bx1)).clamp_(min=0)  # [..., n, m]
    inter.mul_(torch.minimum(ay2, by2).sub_(torch.maximum(ay1, by1)).clamp_(min=0))
    return inter.div_((area_a + area_b).sub_(inter))


def _resolve(near, thr, may_keep=None, spread=lambda keep: keep.unsqueeze(-2)):
    """Greedy NMS of a short run: near [..., j, i] = IoU of box j with earlier box i (else 0; spread
    lays keep so), may_keep [..., j] or None; iterated from all kept to its fixed point: greedy."""
    allowed = (lambda keep: keep) if may_keep is None else may_keep.logical_and
    keep = allowed(~(near.amax(-1) > thr))
    while not torch.equal(nxt := allowed(~((near * spread(keep)).amax(-1) > thr)), keep):
        keep = nxt
    return keep


def _nms_torch(boxes, scores, labels, thr):
    """batched_nms on CPU: _greedy_nms, _greedy_nms_band or _sweep_rows, by shape (bench.py)."""
    pad = boxes.shape[0]
    c5 = _coords(torch.cat([boxes, boxes.new_zeros(1, 4)]))  # [5, N + 1], last = empty padding box
    if labels is None:
        return _greedy_nms(c5, _score_order(scores), thr)
    order, _, start, counts = _segments(_score_order(scores), labels)  # [N] by label, score
    width = max(int(counts.max()) - 1, 1)  # the most boxes one can be suppressed by
    if width <= 128 and pad * width <= _SMALL_BLOCK // 8:  # labels of <= 129 boxes: the band
        kept = _greedy_nms_band(c5, order, labels[order], width, thr)
    else:  # labels of <= 1024 boxes: _sweep_rows; a few big labels: one by one
        kept = torch.cat([rows[_sweep_rows(c5[:, rows], rows != pad, thr)] if rows.shape[1] <= 1024
                          else torch.cat([_greedy_nms(c5, r[r != pad], thr) for r in rows])
                          for rows in _label_rows(order, start, counts, pad)])
    kept = kept.sort().values
    return kept[_score_order(scores[kept])]


def _label_rows(order, start, counts, pad):
    """Segments (_segments) as [G, n] rows padded with pad, a matrix per power-of-two size class."""
    slot = torch.repeat_interleave(torch.arange(len(counts), device=order.device), counts)  # [N]
    rank = torch.arange(len(order), device=order.device) - start[slot]  # [N] place in its label
    size_class = torch.ceil(torch.log2(counts.clamp(min=8).double())).long()  # [S]
    for k in size_class.unique().tolist():
        members = size_class == k  # [S]
        pick = members[slot]  # [N] boxes in this size class
        rows = order.new_full((int(members.sum()), int(counts[members].max())), pad)  # [G, n]
        rows[(members.long().cumsum(0) - 1)[slot[pick]], rank[pick]] = order[pick]
        yield rows


def _greedy_nms(c5, order, thr):
    """Greedy NMS of order [n] (into c5, by score) -> kept, by score; kept chunks prune the rest."""
    kept = []
    while len(order):
        head, order = order[:_CHUNK], order[_CHUNK:]  # [c], [r]
        hc = c5[:, head]  # [5, c]
        kept.append(head[_resolve(_iou(hc, hc).tril_(-1), thr)])  # [k]
        if len(order):  # amax: a NaN (two empty boxes) is never > thr
            order = order[~(_iou(c5[:, kept[-1]], c5[:, order]).amax(0) > thr)]
    return torch.cat(kept)


def _greedy_nms_band(c5, order, sorted_labels, width, thr):
    """NMS of order [N] (by label, score), labels of <= width + 1 boxes: IoUs in a band [N, W]."""
    def windows(x, pad):  # [..., N] -> [..., N, W]: entry (j, d) is x at position j - W + d
        x = torch.cat([x.new_full(x.shape[:-1] + (width,), pad), x], -1)
        return x.unfold(-1, width, 1)[..., :-1, :]
    c = c5[:, order]  # [5, N]
    same = windows(sorted_labels, 0) == sorted_labels.unsqueeze(1)  # [N, W]; padding is empty
    near = _iou(c.unsqueeze(2), windows(c, 0.0)).squeeze(1) * same  # [N, W]
    return order[_resolve(near, thr, spread=lambda keep: windows(keep, False))]


def _sweep_rows(rc, valid, thr, labels=None, max_kept=None):
    """Greedy NMS along each row of rc [5, G, n] -> keep [G, n] bool (as nms_rows): _CHUNK columns
    at a time, checked against the row's kept boxes (front-packed buffer), then among themselves."""
    g_all, n = valid.shape
    keep = torch.zeros_like(valid)
    cap = n if max_kept is None else min(n, max_kept + _CHUNK)  # buffer slots a row can need
    block = max(1, _SMALL_BLOCK // max(n * cap, 1))  # rows per block: [g, c, cap] stays in cache
    for g0 in range(0, g_all, block):
        bc, v = rc[:, g0:g0 + block], valid[g0:g0 + block]  # [5, g, n], [g, n]
        lab = None if labels is None else labels[g0:g0 + block]  # [g, n]
        buf = torch.zeros_like(bc[:, :, :cap])  # [5, g, cap] kept boxes of each row, front-packed
        buf_label = None if lab is None else torch.zeros_like(lab[:, :cap])  # [g, cap]
        count = kept_count = v.new_zeros(len(v), dtype=torch.long)  # [g] buffer, kept
        for c0 in range(0, n, _CHUNK):
            cols = slice(c0, c0 + _CHUNK)
            may_keep, cc = v[:, cols], bc[:, :, cols]  # [g, c], [5, g, c]
            if max_kept is not None:
                is_open = kept_count < max_kept  # [g]
                if c0 and not bool(is_open.any()):
                    break
                may_keep = may_keep & is_open.unsqueeze(1)
            near = _iou(cc, cc).tril_(-1)  # [g, c, c]: IoU of j with the earlier i
            if lab is not None:
                near *= lab[:, cols].unsqueeze(2) == lab[:, cols].unsqueeze(1)
            width = int(count.max())
            if width:
                hit = _iou(cc, buf[:, :, :width])  # [g, c, w]
                if lab is not None:
                    hit *= lab[:, cols].unsqueeze(2) == buf_label[:, :width].unsqueeze(1)
                may_keep = may_keep & ~(hit.amax(2) > thr)  # no kept box of an earlier chunk hits
            k = keep[g0:g0 + block, cols] = _resolve(near, thr, may_keep)  # [g, c]
            if c0 + _CHUNK < n:
                kept_count = kept_count + k.sum(1)
                add = k & (cc[4] > 0)  # [g, c] kept boxes that can suppress
                slot = count.unsqueeze(1) + add.cumsum(1) - 1  # [g, c]
                gi, ci = add.nonzero(as_tuple=True)
                buf[:, gi, slot[gi, ci]] = cc[:, gi, ci]
                if lab is not None:
                    buf_label[gi, slot[gi, ci]] = lab[:, cols][gi, ci]
                count = slot[:, -1] + 1
    return keep


def _soft_nms_torch(boxes, scores, labels, sigma, score_threshold, linear, thr):
    """soft_nms, the labels of a size class stepping together -> picked (idx, scores)."""
    pad = boxes.shape[0]  # index of an empty box with score 0 that pads the rows
    c5 = _coords(torch.cat([boxes, boxes.new_zeros(1, 4)]))  # [5, N + 1]
    scores = torch.cat([scores, scores.new_zeros(1)])  # [N + 1]
    order, _, start, counts = _segments(_score_order(scores[:pad]), labels)
    new = torch.full_like(scores, math.nan)  # [N + 1] new scores of the picked boxes
    for rows in _label_rows(order, start, counts, pad):  # [G, n]
        rc, cur = c5[:, rows], scores[rows]  # [5, G, n], [G, n] current scores
        alive = (rows != pad) & (cur >= score_threshold)  # [G, n]
        for step in range(rows.shape[1]):
            if step % 16 == 0 and not alive.any():  # a host sync, so only now and then
                break
            best = cur.masked_fill(~alive, -math.inf).argmax(1, keepdim=True)  # [G, 1] first max
            idx = rows.gather(1, best).squeeze(1)  # [G]; rows without a candidate left keep theirs
            new[idx] = torch.where(alive.gather(1, best), cur.gather(1, best), new[idx, None])[:, 0]
            alive.scatter_(1, best, False)
            iou = _iou(rc.gather(2, best.expand(5, -1, -1)), rc).squeeze(1).nan_to_num_(0.0)
            cur = (torch.where(iou > thr, cur * (1.0 - iou), cur) if linear  # [G, n]
                   else cur * torch.exp(-(iou * iou) / sigma))
            alive &= cur >= score_threshold
    keep = new[:pad].isnan().logical_not_().nonzero().squeeze(1)  # [K]
    return keep, new[keep]


# ----------------------------------------------------------------------------- Triton engine
def _box_iou_triton(a, b):
    out, block = a.new_empty(len(a), len(b)), 64 if a.is_cuda else 256  # [N, M]
    _iou_kernel[(triton.cdiv(len(a), block), triton.cdiv(len(b), block))](
        a, b, out, len(a), len(b), BLOCK=block, enable_fp_fusion=False)
    return out


def _nms_triton(boxes, scores, labels, thr):
    """batched_nms: a bitmask kernel (bit j of row i: i would suppress j), then a greedy sweep, a
    program per label; very uneven label sizes make one segment whose kernel compares labels."""
    n, rows_per_prog = boxes.shape[0], 64 if boxes.is_cuda else 512  # the interpreter likes big
    score_order = _score_order(scores)  # [N]
    order, perm, start, counts = _segments(score_order, labels)
    segmented = labels is not None
    if segmented:
        words = (counts + 63) // 64  # [S] 64-bit mask words per row of each segment
        sizes = counts * words  # [S] mask words per segment
        useful = (counts + rows_per_prog - 1) // rows_per_prog * words  # [S] busy mask programs
        nmax, useful, total_words, total_size = torch.stack(
            [counts.max(), useful.sum(), words.sum(), sizes.sum()]).tolist()  # one host sync
        grid_programs = len(counts) * triton.cdiv(nmax, rows_per_prog) * triton.cdiv(nmax, 64)
        segmented = grid_programs <= 4 * useful + 4096
    if segmented:
        meta = torch.stack([start, counts, sizes.cumsum(0) - sizes, words.cumsum(0) - words])
    else:  # one segment: everything is known on the host
        nmax, meta, total_words, total_size = n, boxes, triton.cdiv(n, 64), n * triton.cdiv(n, 64)
    mask = boxes.new_empty(total_size, dtype=torch.long)
    scratch = boxes.new_zeros(total_words * 8 + n, dtype=torch.uint8)  # one memset
    removed, flags = scratch.split([total_words * 8, n])  # [8 W] suppressed, 64 a word; [N] kept
    compare = labels is not None and not segmented
    sorted_labels = labels[order].contiguous() if compare else boxes  # unread without `compare`
    segments = meta.shape[1] if segmented else 1
    _nms_mask_kernel[(segments, triton.cdiv(nmax, rows_per_prog), triton.cdiv(nmax, 64))](
        boxes[order].contiguous(), sorted_labels, meta, segments, n, mask, thr,
        COMPARE_LABELS=compare, SEGMENTED=segmented, ROWS=rows_per_prog, enable_fp_fusion=False)
    # CHUNK: later words updated per sweep step (a word per thread of 4 warps; 32 took 5x the steps)
    _nms_sweep_kernel[(segments,)](mask, meta, segments, n, removed.view(torch.long),
                                   flags if perm is None else perm, flags, SEGMENTED=segmented,
                                   PERMUTED=perm is not None, CHUNK=128 if boxes.is_cuda else 512)
    return score_order[flags.view(torch.bool)]


def _soft_nms_triton(boxes, scores, labels, sigma, score_threshold, linear, thr):
    """soft_nms, a Triton program per label running its whole decay loop -> picked (idx, scores)."""
    n = boxes.shape[0]
    order, _, start, counts = _segments(_score_order(scores), labels)
    cur = scores[order].contiguous()  # [N] current scores, decayed in place by the kernel
    pos, new = torch.empty_like(order), torch.empty_like(cur)  # [N] picks of each segment
    picks = torch.empty_like(counts)  # [S]
    _soft_nms_kernel[(len(counts),)](boxes[order].contiguous(), cur, start, counts, pos, new,
                                     picks, float(sigma), float(score_threshold), thr,
                                     LINEAR=linear, enable_fp_fusion=False,
                                     BLOCK=min(1024, triton.next_power_of_2(int(counts.max()))))
    segment = torch.repeat_interleave(torch.arange(len(counts), device=boxes.device), counts,
                                      output_size=n)  # [N]
    used = (torch.arange(n, device=boxes.device) - start[segment] < picks[segment]).nonzero()[:, 0]
    return order[start[segment[used]] + pos[used]], new[used]


if triton is not None:

    @triton.jit
    def _load_box(ptr, idx, n):
        """Boxes idx of an [n, 4] array as 4 blocks; non-finite or past n: the empty box 0,0,0,0."""
        x1 = tl.load(ptr + idx * 4 + 0, mask=idx < n, other=0.0)
        y1 = tl.load(ptr + idx * 4 + 1, mask=idx < n, other=0.0)
        x2 = tl.load(ptr + idx * 4 + 2, mask=idx < n, other=0.0)
        y2 = tl.load(ptr + idx * 4 + 3, mask=idx < n, other=0.0)
        inf = float("inf")
        ok = (tl.abs(x1) < inf) & (tl.abs(y1) < inf) & (tl.abs(x2) < inf) & (tl.abs(y2) < inf)
        return (tl.where(ok, x1, 0.0), tl.where(ok, y1, 0.0), tl.where(ok, x2, 0.0),
                tl.where(ok, y2, 0.0))

    @triton.jit
    def _iou_tile(a_ptr, b_ptr, rows, cols, n, m):
        """IoU of a[rows] with b[cols] -> [len(rows), len(cols)] float32, 0 where both are empty."""
        ax1, ay1, ax2, ay2 = _load_box(a_ptr, rows, n)
        bx1, by1, bx2, by2 = _load_box(b_ptr, cols, m)
        w = tl.minimum(ax2[:, None], bx2[None, :]) - tl.maximum(ax1[:, None], bx1[None, :])
        h = tl.minimum(ay2[:, None], by2[None, :]) - tl.maximum(ay1[:, None], by1[None, :])
        inter = tl.maximum(w, 0.0) * tl.maximum(h, 0.0)  # [len(rows), len(cols)]
        area_a = tl.maximum(ax2 - ax1, 0.0) * tl.maximum(ay2 - ay1, 0.0)
        area_b = tl.maximum(bx2 - bx1, 0.0) * tl.maximum(by2 - by1, 0.0)
        union = (area_a[:, None] + area_b[None, :]) - inter
        # div_rn: IEEE division, so the GPU rounds exactly as the torch code does
        return tl.where(union > 0, tl.math.div_rn(inter, tl.where(union > 0, union, 1.0)), 0.0)

    @triton.jit
    def _iou_kernel(a_ptr, b_ptr, out_ptr, n, m, BLOCK: tl.constexpr):
        rows = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        cols = tl.program_id(1).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        iou = _iou_tile(a_ptr, b_ptr, rows, cols, n, m)  # [BLOCK, BLOCK]
        tl.store(out_ptr + rows[:, None] * m + cols[None, :], iou,
                 mask=(rows < n)[:, None] & (cols < m)[None, :])

    @triton.jit
    def _segment(meta_ptr, seg, segments, n, SEGMENTED: tl.constexpr):
        """start, count, mask offset and word offset of segment seg (see _nms_triton)."""
        if SEGMENTED:
            return (tl.load(meta_ptr + seg), tl.load(meta_ptr + segments + seg),
                    tl.load(meta_ptr + 2 * segments + seg), tl.load(meta_ptr + 3 * segments + seg))
        else:
            return 0, n, 0, 0

    @triton.jit(do_not_specialize=["segments", "n"])
    def _nms_mask_kernel(boxes_ptr, labels_ptr, meta_ptr, segments, n, mask_ptr, thr,
                         COMPARE_LABELS: tl.constexpr, SEGMENTED: tl.constexpr, ROWS: tl.constexpr):
        """Program (segment, rows block, word w): bit b of mask[row, w]: row suppresses 64 w + b."""
        start, count, mask_off, _ = _segment(meta_ptr, tl.program_id(0), segments, n, SEGMENTED)
        n_words = (count + 63) // 64
        rows = tl.program_id(1).to(tl.int64) * ROWS + tl.arange(0, ROWS)
        word = tl.program_id(2).to(tl.int64)
        bit = tl.arange(0, 64).to(tl.int64)
        # words left of the diagonal (all columns before all rows) are never read: skipped
        if word * 64 + 63 >= tl.program_id(1) * ROWS:
            cols, box = word * 64 + bit, boxes_ptr + start * 4
            iou = _iou_tile(box, box, rows, cols, count, count)  # [ROWS, 64]
            hit = (iou > thr) & (cols[None, :] > rows[:, None])  # [ROWS, 64]
            if COMPARE_LABELS:
                la = tl.load(labels_ptr + start + rows, mask=rows < count, other=0)
                lb = tl.load(labels_ptr + start + cols, mask=cols < count, other=0)
                hit = hit & (la[:, None] == lb[None, :])
            # one bit per column; the bits are distinct, so their sum is their OR
            one = tl.full([64], 1, tl.int64)
            bits = tl.sum(tl.where(hit, one[None, :] << bit[None, :], 0), axis=1)  # [ROWS]
            out = mask_ptr + mask_off + rows * n_words + word
            # no `block & scalar` bool: Triton 3.9's interpreter turns it into int64 (not a mask)
            tl.store(out, bits, mask=rows < tl.where(word < n_words, count, 0))

    @triton.jit(do_not_specialize=["segments", "n"])
    def _nms_sweep_kernel(mask_ptr, meta_ptr, segments, n, removed_ptr, perm_ptr, flags_ptr,
                          SEGMENTED: tl.constexpr, PERMUTED: tl.constexpr, CHUNK: tl.constexpr):
        """Greedy pass over a segment's mask, 64 boxes a step; flags[perm[start + i]] = kept i."""
        seg = tl.program_id(0)
        start, count, mask_off, word_off = _segment(meta_ptr, seg, segments, n, SEGMENTED)
        mask_base = mask_ptr + mask_off
        n_words = (count + 63) // 64
        bit = tl.arange(0, 64)
        # while, not range(tensor): Triton 3.6's interpreter cannot index with a tensor on NumPy 2
        w = 0
        while w < n_words:
            cur = tl.load(removed_ptr + word_off + w)  # boxes of word w already suppressed
            for k in tl.static_range(64):
                row = w * 64 + k
                diag = tl.load(mask_base + row * n_words + w, mask=row < count, other=0)
                cur = cur | tl.where(((cur >> k) & 1) == 0, diag, 0)  # box k kept -> apply its row
            pos = start + w * 64 + bit  # [64]
            kept = ((cur >> bit) & 1) == 0  # [64]
            mine = pos < start + tl.where(kept, count, 0)  # kept and in the segment
            if PERMUTED:
                pos = tl.load(perm_ptr + pos, mask=mine, other=0)
            tl.store(flags_ptr + pos, tl.full([64], 1, tl.uint8), mask=mine)
            left = tl.minimum(count - w * 64, 63)
            valid = tl.where(count - w * 64 >= 64, -1, (tl.full([], 1, tl.int64) << left) - 1)
            kept = ~cur & valid
            end = tl.where(kept != 0, n_words, w + 1)  # nothing to push when no box was kept
            c0 = w + 1
            while c0 < end:
                cols = c0 + tl.arange(0, CHUNK)
                inside = cols < n_words
                hit = tl.load(removed_ptr + word_off + cols, mask=inside, other=0)  # [CHUNK]
                for k in tl.static_range(64):  # OR in the rows of the kept boxes
                    take = cols < tl.where(((kept >> k) & 1) != 0, n_words, 0)  # inside & kept
                    hit = hit | tl.load(mask_base + (w * 64 + k) * n_words + cols, mask=take,
                                        other=0)
                tl.store(removed_ptr + word_off + cols, hit, mask=inside)
                c0 += CHUNK
            tl.debug_barrier()  # the next word's load of `removed` must see these stores
            w += 1

    @triton.jit
    def _soft_nms_kernel(boxes_ptr, cur_ptr, start_ptr, count_ptr, pos_ptr, new_ptr, picks_ptr,
                         sigma, score_thr, iou_thr, LINEAR: tl.constexpr, BLOCK: tl.constexpr):
        """Soft-NMS of a segment: pick the best live score (first among equals), decay the rest."""
        seg = tl.program_id(0)
        start, count = tl.load(start_ptr + seg), tl.load(count_ptr + seg)
        box, cur = boxes_ptr + start * 4, cur_ptr + start
        lane = tl.arange(0, BLOCK)
        picks, go = count * 0, count > 0
        while go:
            best, best_val = count * 0 - 1, tl.full([], -float("inf"), tl.float32)
            c0 = 0
            while c0 < count:  # best live score of the segment
                col = c0 + lane
                s = tl.load(cur + col, mask=col < count, other=float("nan"))  # [BLOCK]
                s = tl.where(s >= score_thr, s, -float("inf"))
                m = tl.max(s, axis=0)
                better = tl.where(m >= score_thr, m > best_val, False)  # strict: earlier wins ties
                best = tl.where(better, c0 + tl.argmax(s, axis=0), best)
                best_val = tl.where(better, m, best_val)
                c0 += BLOCK
            go = best >= 0
            tl.store(pos_ptr + start + picks, best, mask=go)
            tl.store(new_ptr + start + picks, best_val, mask=go)
            picks += go.to(picks.dtype)
            end = tl.where(go, count, 0)
            row = tl.where(go, best, 0) + tl.arange(0, 1)  # [1]
            c0 = 0
            while c0 < end:  # decay the segment by its overlap with the pick
                col = c0 + lane
                iou = tl.sum(_iou_tile(box, box, row, col, count, count), axis=0)  # [BLOCK]
                s = tl.load(cur + col, mask=col < count, other=0.0)
                if LINEAR:
                    s = tl.where(iou > iou_thr, s * (1.0 - iou), s)
                else:
                    s = s * tl.exp(-tl.math.div_rn(iou * iou, sigma))
                s = tl.where(col == best, float("nan"), s)
                tl.store(cur + col, s, mask=col < count)
                c0 += BLOCK
            tl.debug_barrier()  # the next pick must see the decayed scores
        tl.store(picks_ptr + seg, picks)
