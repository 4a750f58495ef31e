"""Tests of the detector core in ssd.py: presets and anchors against published check values,
network shapes and parameter counts, box coding, matching, the loss and post-processing against
slow per-anchor / per-class references, and one training step."""
import math

import pytest
import torch

import ssd
import weights


def xyxy_pixels(config):
    return ssd.cxcywh_to_xyxy(ssd.anchors(config)) * config["size"]


# --- presets and anchors (Caffe PriorBox sizes, torchvision DefaultBoxGenerator) -----------------

@pytest.mark.parametrize("size,dataset,mins,maxs", [
    (300, "voc", [30, 60, 111, 162, 213, 264], [60, 111, 162, 213, 264, 315]),
    (300, "coco", [21, 45, 99, 153, 207, 261], [45, 99, 153, 207, 261, 315]),
    (512, "voc", [35, 76, 153, 230, 307, 384, 460], [76, 153, 230, 307, 384, 460, 537]),
    (512, "coco", [20, 51, 133, 215, 296, 378, 460], [51, 133, 215, 296, 378, 460, 542]),
])
def test_anchor_sizes_match_the_caffe_rule_table(size, dataset, mins, maxs):
    assert ssd.anchor_sizes(size, dataset) == (mins, maxs)


def test_anchor_counts_per_level():
    for size, per_level in [(300, [5776, 2166, 600, 150, 36, 4]),
                            (512, [16384, 6144, 1536, 384, 96, 16, 4])]:
        geo = ssd.GEOMETRY[size]
        counts = [f * f * (2 + 2 * len(r)) for f, r in zip(geo["feature_maps"], geo["ratios"])]
        assert counts == per_level
        assert len(ssd.anchors(ssd.make_config(size, 20))) == sum(per_level)
    assert sum([5776, 2166, 600, 150, 36, 4]) == 8732


def test_anchor_check_values_ssd300_voc():
    a = xyxy_pixels(ssd.make_config(300, 20))
    expect_l0 = [[-11, -11, 19, 19], [-17.21, -17.21, 25.21, 25.21],
                 [-17.21, -6.61, 25.21, 14.61], [-6.61, -17.21, 14.61, 25.21]]
    expect_l1 = [[-22, -22, 38, 38], [-32.80, -32.80, 48.80, 48.80],
                 [-34.43, -13.21, 50.43, 29.21], [-13.21, -34.43, 29.21, 50.43],
                 [-43.96, -9.32, 59.96, 25.32], [-9.32, -43.96, 25.32, 59.96]]
    expect_l5 = [[18, 18, 282, 282], [5.81, 5.81, 294.19, 294.19],
                 [-36.68, 56.66, 336.68, 243.34], [56.66, -36.68, 243.34, 336.68]]
    torch.testing.assert_close(a[:4], torch.tensor(expect_l0), atol=0.006, rtol=0)
    torch.testing.assert_close(a[5776:5782], torch.tensor(expect_l1), atol=0.006, rtol=0)
    torch.testing.assert_close(a[-4:], torch.tensor(expect_l5), atol=0.006, rtol=0)


def test_anchor_check_values_clipping_and_coco():
    tv = ssd.make_config(300, 90, anchors="coco", clip="wh")
    a = xyxy_pixels(tv)
    torch.testing.assert_close(a[:4], torch.tensor(
        [[-6.5, -6.5, 14.5, 14.5], [-11.37, -11.37, 19.37, 19.37],
         [-10.85, -3.42, 18.85, 11.42], [-3.42, -10.85, 11.42, 18.85]]), atol=0.006, rtol=0)
    voc_wh = xyxy_pixels(ssd.make_config(300, 20, clip="wh"))
    torch.testing.assert_close(voc_wh[-2:], torch.tensor(
        [[0, 56.66, 300, 243.34], [56.66, 0, 243.34, 300]]), atol=0.006, rtol=0)
    # "all" (amdegroot) also clamps centres: level 2 has centres past 1 (9.5 * 32 / 300)
    raw = ssd.anchors(ssd.make_config(300, 20))
    amd = ssd.anchors(ssd.make_config(300, 20, clip="all"))
    assert raw[:, :2].max() > 1 and amd.max() <= 1 and amd.min() >= 0


def test_anchor_order_rows_then_columns():
    a = ssd.anchors(ssd.make_config(300, 20))
    step = 8 / 300
    # level 0: 4 anchors per cell, cell (row 0, col 1) comes right after cell (0, 0)
    torch.testing.assert_close(a[4, :2], torch.tensor([1.5 * step, 0.5 * step]))
    torch.testing.assert_close(a[4 * 38, :2], torch.tensor([0.5 * step, 1.5 * step]))


@pytest.mark.parametrize("kwargs,message", [
    (dict(size=400), "size must be 300 or 512, got 400"),
    (dict(anchors="kitti"), "anchors must be 'voc' or 'coco', got 'kitti'"),
    (dict(clip="xy"), "clip must be 'none', 'wh' or 'all', got 'xy'"),
    (dict(class_names=["a", "b"]), "need one class name per object class"),
])
def test_make_config_bad_argument_raises_value_error(kwargs, message):
    # a ValueError, not an assert: python -O must not let a bad config through
    args = dict(size=300, num_classes=3) | kwargs
    with pytest.raises(ValueError) as e:
        ssd.make_config(**args)
    assert str(e.value) == message


def test_load_backbone_bad_source_raises_value_error(tmp_path):
    model = ssd.ssd300(3, width=0.0625)  # the source is checked before the file or the width
    with pytest.raises(ValueError) as e:
        weights.load_backbone(model, tmp_path / "vgg16.pth", source="keras")
    assert str(e.value) == "source must be 'torchvision' or 'caffe'"


# --- network -----------------------------------------------------------------------------------

@pytest.mark.parametrize("num_classes,params", [(90, 35_641_826), (80, 34_305_206),
                                                (20, 26_285_486)])
def test_parameter_counts(num_classes, params):
    model = ssd.ssd300(num_classes, anchors="coco" if num_classes != 20 else "voc")
    assert sum(p.numel() for p in model.parameters()) == params


@pytest.mark.parametrize("builder,size,width,num_anchors", [
    (ssd.ssd300, 300, 0.125, 8732), (ssd.ssd300, 300, 0.25, 8732), (ssd.ssd512, 512, 0.125, 24564),
])
def test_output_shapes(builder, size, width, num_anchors):
    model = builder(3, width=width)
    cls, box = model(torch.randn(2, 3, size, size))
    assert cls.shape == (2, num_anchors, 4) and box.shape == (2, num_anchors, 4)
    assert model.anchors.shape == (num_anchors, 4)
    # the number of head outputs per level equals the number of anchors per level
    feats = model.features(torch.randn(1, 3, size, size))
    assert [f.shape[-1] for f in feats] == ssd.GEOMETRY[size]["feature_maps"]


def test_l2norm_scales_unit_vectors():
    norm = ssd.L2Norm(4, scale=20.0)
    x = torch.randn(2, 4, 3, 3) * 50
    y = norm(x)
    torch.testing.assert_close(y.pow(2).sum(1).sqrt(), torch.full((2, 3, 3), 20.0))


def test_channels_last_gives_same_outputs():
    model = ssd.ssd300(3, width=0.125).eval()
    x = torch.randn(1, 3, 300, 300)
    ref = model(x)
    out = model.to(memory_format=torch.channels_last)(x.contiguous(
        memory_format=torch.channels_last))
    torch.testing.assert_close(out[0], ref[0], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(out[1], ref[1], atol=1e-4, rtol=1e-4)


# --- box coding (Caffe CENTER_SIZE, torchvision BoxCoder) -----------------------------------------

def test_encode_check_value_and_round_trip():
    anchor = ssd.xyxy_to_cxcywh(torch.tensor([[-11.0, -11.0, 19.0, 19.0]]))
    t = ssd.encode(torch.tensor([[0.0, 0.0, 40.0, 30.0]]), anchor)
    torch.testing.assert_close(t, torch.tensor([[5.3333, 3.6667, 1.4384, 0.0]]), atol=1e-4,
                               rtol=0)
    g = torch.rand(100, 2) * 0.5
    boxes = torch.cat([g, g + 0.05 + torch.rand(100, 2) * 0.5], 1)
    anchors = ssd.anchors(ssd.make_config(300, 20))[torch.randperm(8732)[:100]]
    torch.testing.assert_close(ssd.decode(ssd.encode(boxes, anchors), anchors), boxes,
                               atol=1e-5, rtol=0)


def test_decode_clamps_log_size():
    anchor = torch.tensor([[0.5, 0.5, 0.1, 0.1]])
    box = ssd.decode(torch.tensor([[0.0, 0.0, 1e4, 1e4]]), anchor)
    assert torch.isfinite(box).all()
    torch.testing.assert_close(box[0, 2] - box[0, 0], torch.tensor(0.1 * 1000 / 16))
    assert ssd.LOG_SIZE_CLAMP == pytest.approx(4.1352, abs=1e-4)


# --- matching (the paper, Sec. 2.2; torchvision SSDMatcher) --------------------------------------

def slow_match(anchors, boxes, labels, thr=0.5):
    """Per-anchor reference: best box if IoU >= thr; then each box, in order, takes its best
    anchor when that IoU is above zero."""
    a_xyxy = ssd.cxcywh_to_xyxy(anchors).tolist()
    b = boxes.tolist()

    def iou(p, q):
        iw = max(0.0, min(p[2], q[2]) - max(p[0], q[0]))
        ih = max(0.0, min(p[3], q[3]) - max(p[1], q[1]))
        inter = iw * ih
        union = (p[2] - p[0]) * (p[3] - p[1]) + (q[2] - q[0]) * (q[3] - q[1]) - inter
        return inter / union if union > 0 else 0.0

    table = [[iou(a, g) for g in b] for a in a_xyxy]
    assigned = []
    for row in table:
        best = max(range(len(b)), key=lambda j: row[j]) if b else None
        assigned.append(best if b and row[best] >= thr else -1)
    for j in range(len(b)):
        best_a = max(range(len(a_xyxy)), key=lambda i: table[i][j])
        if table[best_a][j] > 0:
            assigned[best_a] = j
    cls = torch.tensor([int(labels[j]) if j >= 0 else 0 for j in assigned])
    tgt = torch.zeros(len(anchors), 4)
    for i, j in enumerate(assigned):
        if j >= 0:
            tgt[i] = ssd.encode(boxes[j:j + 1], anchors[i:i + 1])[0]
    return cls, tgt


def test_match_forces_best_anchor_below_threshold():
    anchors = torch.tensor([[0.25, 0.25, 0.5, 0.5], [0.75, 0.75, 0.5, 0.5]])
    box = torch.tensor([[0.0, 0.0, 0.2, 0.2]])  # IoU 0.16 with anchor 0, 0 with anchor 1
    cls, tgt = ssd.match(anchors, [box], [torch.tensor([3])])
    assert cls.tolist() == [[3, 0]]
    torch.testing.assert_close(tgt[0, 0], ssd.encode(box, anchors[:1])[0])
    assert (tgt[0, 1] == 0).all()


def test_match_later_box_wins_shared_anchor():
    anchors = torch.tensor([[0.5, 0.5, 0.4, 0.4], [0.1, 0.9, 0.1, 0.1]])
    boxes = torch.tensor([[0.3, 0.3, 0.7, 0.68], [0.31, 0.3, 0.7, 0.7]])  # both prefer anchor 0
    cls, tgt = ssd.match(anchors, [boxes], [torch.tensor([1, 2])])
    assert cls.tolist() == [[2, 0]]
    torch.testing.assert_close(tgt[0, 0], ssd.encode(boxes[1:], anchors[:1])[0])


def test_match_no_boxes_all_background():
    anchors = ssd.anchors(ssd.make_config(300, 20))
    cls, tgt = ssd.match(anchors, [torch.zeros(0, 4), torch.zeros(0, 4)],
                         [torch.zeros(0, dtype=torch.int64)] * 2)
    assert cls.shape == (2, 8732) and (cls == 0).all() and (tgt == 0).all()


def test_match_equals_slow_reference_on_random_batch():
    gen = torch.Generator().manual_seed(0)
    anchors = torch.cat([torch.rand(300, 2, generator=gen),
                         0.05 + 0.5 * torch.rand(300, 2, generator=gen)], 1)
    boxes, labels = [], []
    for n in [0, 1, 5, 12]:
        xy = torch.rand(n, 2, generator=gen) * 0.7
        boxes.append(torch.cat([xy, xy + 0.02 + 0.3 * torch.rand(n, 2, generator=gen)], 1))
        labels.append(torch.randint(1, 6, (n,), generator=gen))
    cls, tgt = ssd.match(anchors, boxes, labels)
    for i in range(4):
        ref_cls, ref_tgt = slow_match(anchors, boxes[i], labels[i])
        assert torch.equal(cls[i], ref_cls)
        torch.testing.assert_close(tgt[i], ref_tgt, atol=1e-5, rtol=1e-5)


# --- loss (the paper, Sec. 2.2; Caffe MultiBoxLoss; torchvision SSD.compute_loss) -----------------

def slow_loss(cls_logits, box_deltas, anchors, boxes, labels):
    """Per-anchor reference: CE of positives plus the 3*npos highest-CE negatives of each image,
    smooth L1 over positives, both over max(1, total positives)."""
    total_cls, total_box, total_pos = 0.0, 0.0, 0
    for i in range(len(boxes)):
        cls_t, box_t = slow_match(anchors, boxes[i], labels[i])
        ces = []
        for a in range(len(anchors)):
            logits = cls_logits[i, a].double()
            ces.append(float(torch.logsumexp(logits, 0) - logits[cls_t[a]]))
        pos = [a for a in range(len(anchors)) if cls_t[a] > 0]
        neg = sorted((a for a in range(len(anchors)) if cls_t[a] == 0), key=lambda a: -ces[a])
        chosen = pos + neg[:3 * len(pos)]
        total_cls += sum(ces[a] for a in chosen)
        for a in pos:
            for d in range(4):
                x = abs(float(box_deltas[i, a, d]) - float(box_t[a, d]))
                total_box += 0.5 * x * x if x < 1 else x - 0.5
        total_pos += len(pos)
    n = max(1, total_pos)
    return total_cls / n, total_box / n


def test_loss_equals_slow_reference():
    gen = torch.Generator().manual_seed(1)
    anchors = torch.cat([torch.rand(120, 2, generator=gen),
                         0.05 + 0.4 * torch.rand(120, 2, generator=gen)], 1)
    boxes = [torch.tensor([[0.1, 0.1, 0.4, 0.5], [0.5, 0.2, 0.9, 0.6]]),
             torch.zeros(0, 4), torch.tensor([[0.3, 0.3, 0.35, 0.34]])]
    labels = [torch.tensor([1, 3]), torch.zeros(0, dtype=torch.int64), torch.tensor([2])]
    cls_logits = torch.randn(3, 120, 4, generator=gen) * 2
    box_deltas = torch.randn(3, 120, 4, generator=gen) * 2
    out = ssd.multibox_loss(cls_logits, box_deltas, anchors, boxes, labels)
    ref_cls, ref_box = slow_loss(cls_logits, box_deltas, anchors, boxes, labels)
    assert out["loss_cls"].item() == pytest.approx(ref_cls, rel=1e-5)
    assert out["loss_box"].item() == pytest.approx(ref_box, rel=1e-5)


@pytest.mark.parametrize("boxes", [
    [],  # no boxes at all
    [[0.2, 0.2, 0.6, 0.7]],  # one box
    [[0.0, 0.0, 1.0, 1.0], [0.0, 0.5, 0.1, 1.0], [0.9, 0.0, 1.0, 0.05]],  # at the border
    [[0.5, 0.5, 0.5005, 0.5004], [0.1, 0.1, 0.1, 0.3]],  # tiny and zero-width
])
def test_loss_finite_for_legal_inputs(boxes):
    model = ssd.ssd300(3, width=0.125)
    cls, box = model(torch.randn(2, 3, 300, 300))
    b = torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4)
    lab = torch.ones(len(b), dtype=torch.int64)
    out = ssd.multibox_loss(cls, box, model.anchors, [b, b], [lab, lab])
    total = out["loss_cls"] + out["loss_box"]
    assert torch.isfinite(total)
    total.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_loss_float32_under_autocast():
    model = ssd.ssd300(3, width=0.125)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        cls, box = model(torch.randn(1, 3, 300, 300))
        out = ssd.multibox_loss(cls, box, model.anchors, [torch.tensor([[0.1, 0.1, 0.5, 0.5]])],
                                [torch.tensor([2])])
    assert out["loss_cls"].dtype == torch.float32 and torch.isfinite(out["loss_cls"])


def test_one_sgd_step_lowers_loss():
    torch.manual_seed(0)
    model = ssd.ssd300(3, width=0.125)
    x = torch.randn(2, 3, 300, 300) * 50
    boxes = [torch.tensor([[0.1, 0.1, 0.5, 0.6]]), torch.tensor([[0.4, 0.3, 0.9, 0.8]])]
    labels = [torch.tensor([1]), torch.tensor([2])]
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)

    def total():
        out = ssd.multibox_loss(*model(x), model.anchors, boxes, labels)
        return out["loss_cls"] + out["loss_box"]

    before = total()
    opt.zero_grad()
    before.backward()
    opt.step()
    with torch.no_grad():
        after = total()
    assert after.item() < before.item()


# --- post-processing (Caffe DetectionOutput; torchvision postprocess_detections) ------------------

def slow_postprocess(cls_logits, box_deltas, anchors, sizes, score_thr, nms_iou, topk, max_det):
    """Per image, per class loop with a plain greedy NMS (suppress IoU > thr)."""
    results = []
    for i, (w, h) in enumerate(sizes):
        # float32 softmax as postprocess computes it: which scores are exactly equal (ties) and
        # their order then agree; the rest of the reference is in float64
        probs = torch.softmax(cls_logits[i].float(), -1).double()
        boxes = ssd.decode(box_deltas[i].double(), anchors.double()).clamp(0, 1)
        dets = []
        for c in range(1, probs.shape[1]):
            s = probs[:, c]
            idx = [a for a in sorted(range(len(s)), key=lambda a: -float(s[a]))][:topk]
            idx = [a for a in idx if s[a] > score_thr]
            kept = []
            for a in idx:
                ok = True
                for k in kept:
                    p, q = boxes[a].tolist(), boxes[k].tolist()
                    iw = max(0.0, min(p[2], q[2]) - max(p[0], q[0]))
                    ih = max(0.0, min(p[3], q[3]) - max(p[1], q[1]))
                    inter = iw * ih
                    union = (p[2] - p[0]) * (p[3] - p[1]) + (q[2] - q[0]) * (q[3] - q[1]) - inter
                    if union > 0 and inter / union > nms_iou:
                        ok = False
                        break
                if ok:
                    kept.append(a)
            dets += [(float(s[a]), c, a) for a in kept]
        dets.sort(key=lambda d: (-d[0], d[2], d[1]))  # equal scores: lower anchor, then class
        dets = dets[:max_det]
        scale = torch.tensor([w, h, w, h], dtype=torch.float64)
        results.append((torch.stack([boxes[a] * scale for _, _, a in dets]).float()
                        if dets else torch.zeros(0, 4),
                        torch.tensor([d[0] for d in dets]), torch.tensor([d[1] for d in dets])))
    return results


def only_full_nms(monkeypatch):
    """Make postprocess skip its best-first shortcut (ssd._best_first) and run the NMS on every
    candidate, so both ways are tested on the same inputs."""
    monkeypatch.setattr(ssd, "_best_first", lambda *args: None)


def assert_same_detections(got, ref):
    for (b, s, lab), (rb, rs, rl) in zip(got, ref, strict=True):
        assert len(s) == len(rs)
        torch.testing.assert_close(s, rs.float(), atol=1e-6, rtol=1e-5)
        assert torch.equal(lab, rl)
        torch.testing.assert_close(b, rb, atol=1e-3, rtol=1e-5)


@pytest.mark.parametrize("shortcut", [True, False])
@pytest.mark.parametrize("score_thr,topk", [(0.05, 30), (0.3, 150)])  # top-k cut / threshold only
def test_postprocess_equals_slow_reference(score_thr, topk, shortcut, monkeypatch):
    if not shortcut:
        only_full_nms(monkeypatch)
    gen = torch.Generator().manual_seed(2)
    anchors = torch.cat([torch.rand(150, 2, generator=gen),
                         0.05 + 0.3 * torch.rand(150, 2, generator=gen)], 1)
    cls_logits = torch.randn(3, 150, 5, generator=gen) * 3
    cls_logits[2] = -10.0  # an image where nothing passes the threshold ...
    cls_logits[2, :, 0] = 10.0  # ... because background wins everywhere
    box_deltas = torch.randn(3, 150, 4, generator=gen)
    sizes = [(640, 480), (300, 300), (50, 80)]
    got = ssd.postprocess(cls_logits, box_deltas, anchors, sizes, score_thr=score_thr,
                          nms_iou=0.45, topk=topk, max_det=40)
    ref = slow_postprocess(cls_logits, box_deltas, anchors, sizes, score_thr, 0.45, topk, 40)
    for (b, s, l), (rb, rs, rl) in zip(got, ref):
        assert len(s) == len(rs)
        torch.testing.assert_close(s, rs.float(), atol=1e-6, rtol=1e-5)
        assert torch.equal(l, rl)
        torch.testing.assert_close(b, rb, atol=1e-3, rtol=1e-5)
    assert len(got[0][1]) == 40 and len(got[2][1]) == 0
    per_class = torch.bincount(got[0][2])
    assert per_class.max() <= topk


def test_postprocess_trained_like_outputs_equal_slow_reference():
    # background sure almost everywhere, a few anchors confident: the path that runs the softmax
    # only on anchors whose class logits come within ln(score_thr) of their top logit
    gen = torch.Generator().manual_seed(4)
    anchors = torch.cat([torch.rand(300, 2, generator=gen),
                         0.05 + 0.3 * torch.rand(300, 2, generator=gen)], 1)
    cls_logits = torch.randn(2, 300, 6, generator=gen)
    cls_logits[..., 0] += 7.0
    sure = torch.rand(2, 300, generator=gen) < 0.1  # [B, A]
    cls_logits[..., 1:][sure] += 9.0 * torch.rand(int(sure.sum()), 5, generator=gen)
    box_deltas = torch.randn(2, 300, 4, generator=gen)
    sizes = [(640, 480), (300, 300)]
    got = ssd.postprocess(cls_logits, box_deltas, anchors, sizes, score_thr=0.01, nms_iou=0.45,
                          topk=100, max_det=50)
    ref = slow_postprocess(cls_logits, box_deltas, anchors, sizes, 0.01, 0.45, 100, 50)
    for (b, s, lab), (rb, rs, rl) in zip(got, ref):
        assert len(s) == len(rs) > 0
        torch.testing.assert_close(s, rs.float(), atol=1e-6, rtol=1e-5)
        assert torch.equal(lab, rl)
        torch.testing.assert_close(b, rb, atol=1e-3, rtol=1e-5)


def count_best_first(monkeypatch):
    """Record what ssd._best_first returns (None: it could not finish) in the returned list."""
    calls, real = [], ssd._best_first
    monkeypatch.setattr(ssd, "_best_first", lambda *args: calls.append(real(*args)) or calls[-1])
    return calls


@pytest.mark.parametrize("shortcut", [True, False])
def test_postprocess_untrained_outputs_equal_slow_reference(shortcut, monkeypatch):
    # an untrained model's flat softmax: every class of every anchor passes the threshold and
    # fills its top-k, and far more boxes survive the NMS than max_det: the best-first shortcut
    calls = count_best_first(monkeypatch) if shortcut else only_full_nms(monkeypatch)
    gen = torch.Generator().manual_seed(6)
    anchors = torch.cat([torch.rand(400, 2, generator=gen),
                         0.02 + 0.2 * torch.rand(400, 2, generator=gen)], 1)
    cls_logits = 0.3 * torch.randn(2, 400, 13, generator=gen)
    cls_logits[..., 1] += 0.5  # class 1 would take more than its top-k of the best scores
    box_deltas = 0.3 * torch.randn(2, 400, 4, generator=gen)
    sizes = [(640, 480), (300, 300)]
    got = ssd.postprocess(cls_logits, box_deltas, anchors, sizes, topk=6, max_det=40)
    ref = slow_postprocess(cls_logits, box_deltas, anchors, sizes, 0.01, 0.45, 6, 40)
    assert_same_detections(got, ref)
    assert all(len(s) == 40 and torch.bincount(lab).max() == 6 for _, s, lab in got)
    assert not shortcut or (len(calls) == 1 and calls[0] is not None)


@pytest.mark.parametrize("max_det", [40, 1000])
@pytest.mark.parametrize("shortcut", [True, False])
def test_postprocess_exact_ties_and_heavy_suppression_equal_slow_reference(shortcut, max_det,
                                                                           monkeypatch):
    # integer logits: many exactly equal scores, across anchors (who makes a class's top-k, and
    # the order of the output) and across classes. Image 0: every decoded box is the same, so
    # each class keeps one box, and class 6 scores below the others: the best-first shortcut
    # cannot finish there and postprocess falls back to the full NMS. Image 1: spread boxes.
    calls = count_best_first(monkeypatch) if shortcut else only_full_nms(monkeypatch)
    gen = torch.Generator().manual_seed(8)
    anchors = torch.cat([torch.rand(300, 2, generator=gen),
                         0.05 + 0.2 * torch.rand(300, 2, generator=gen)], 1)
    cls_logits = torch.randint(0, 3, (2, 300, 7), generator=gen).float()
    cls_logits[0, :, 6] -= 3.0
    box_deltas = torch.randn(2, 300, 4, generator=gen)
    box_deltas[0] = ssd.encode(torch.tensor([[0.2, 0.2, 0.6, 0.7]]).expand(300, 4), anchors)
    sizes = [(640, 480), (300, 300)]
    for images in ([0, 1], [1]):
        got = ssd.postprocess(cls_logits[images], box_deltas[images], anchors,
                              [sizes[i] for i in images], topk=25, max_det=max_det)
        ref = slow_postprocess(cls_logits[images], box_deltas[images], anchors,
                               [sizes[i] for i in images], 0.01, 0.45, 25, max_det)
        assert_same_detections(got, ref)
        # image 1: most of each class's top 25 survive the NMS
        assert len(got[-1][1]) == 40 if max_det == 40 else 6 * 25 > len(got[-1][1]) > 120
        assert torch.bincount(got[-1][2]).max() <= 25
        if len(images) == 2:
            assert len(got[0][1]) == 6 and got[0][2][-1] == 6  # image 0: one box per class
    if shortcut and max_det == 40:
        assert calls[0] is None and calls[1] is not None  # fell back / finished


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("kind", ["trained", "untrained"])
def test_postprocess_on_cuda_matches_cpu(kind):
    # the same raw outputs post-processed on the GPU (Triton batched_nms, or nms_rows for the
    # best-first shortcut) and on the CPU give the same detections
    model = ssd.ssd300(20, width=0.25).eval()
    gen = torch.Generator().manual_seed(9)
    cls = torch.randn(3, len(model.anchors), 21, generator=gen)
    if kind == "trained":
        cls[..., 0] += 8.0
        sure = torch.rand(3, len(model.anchors), generator=gen) < 0.03
        cls[..., 1:][sure] += 12.0 * torch.rand(int(sure.sum()), 20, generator=gen)
    box = 0.5 * torch.randn(3, len(model.anchors), 4, generator=gen)
    sizes = [(640, 480), (300, 300), (100, 700)]
    cpu = ssd.postprocess(cls, box, model.anchors, sizes)
    gpu = ssd.postprocess(cls.cuda(), box.cuda(), model.anchors.cuda(), sizes)
    for (b, s, lab), (gb, gs, gl) in zip(cpu, gpu, strict=True):
        assert len(s) == len(gs) > 0
        torch.testing.assert_close(gs.cpu(), s, atol=1e-5, rtol=1e-4)
        assert torch.equal(gl.cpu(), lab)
        torch.testing.assert_close(gb.cpu(), b, atol=1e-2, rtol=1e-4)


def test_postprocess_bad_arguments_raise_value_error():
    cls, box, anchors = torch.zeros(1, 4, 3), torch.zeros(1, 4, 4), torch.full((4, 4), 0.5)
    for kwargs in (dict(nms="fast"), dict(topk=0), dict(max_det=0)):
        with pytest.raises(ValueError):
            ssd.postprocess(cls, box, anchors, [(10, 10)], **kwargs)


def test_postprocess_sorted_labels_in_range_and_clipped():
    model = ssd.ssd300(4, width=0.125).eval()
    with torch.no_grad():
        cls, box = model(torch.randn(2, 3, 300, 300))
    out = ssd.postprocess(cls, box, model.anchors, [(1000, 500), (20, 30)])
    for (b, s, l), (w, h) in zip(out, [(1000, 500), (20, 30)]):
        assert len(s) <= 200 and (s[:-1] >= s[1:]).all()
        assert ((l >= 1) & (l <= 4)).all()
        assert (b[:, 0] >= 0).all() and (b[:, 2] <= w + 1e-3).all() and (b[:, 3] <= h + 1e-3).all()


def test_postprocess_soft_nms_keeps_overlaps_with_lower_scores():
    anchors = torch.tensor([[0.5, 0.5, 0.4, 0.4], [0.52, 0.5, 0.4, 0.4]])
    logits = torch.tensor([[[0.0, 5.0], [0.0, 4.0]]])  # two overlapping boxes of class 1
    deltas = torch.zeros(1, 2, 4)
    hard = ssd.postprocess(logits, deltas, anchors, [(100, 100)], nms="hard")
    soft = ssd.postprocess(logits, deltas, anchors, [(100, 100)], nms="soft")
    assert len(hard[0][1]) == 1 and len(soft[0][1]) == 2
    probs = torch.softmax(logits[0], -1)[:, 1]
    assert soft[0][1][0] == pytest.approx(float(probs[0]))
    assert soft[0][1][1] < probs[1]


def test_detect_returns_original_pixels():
    model = ssd.ssd300(2, width=0.125).eval()
    images = [torch.randint(0, 256, (3, 120, 200), dtype=torch.uint8),
              torch.randint(0, 256, (3, 300, 90), dtype=torch.uint8)]
    out = ssd.detect(model, images, score_thr=0.0, max_det=50)
    for (b, s, lab), im in zip(out, images):
        assert b.shape[1] == 4 and len(b) == len(s) == len(lab) > 0
        assert b[:, 2].max() <= im.shape[2] + 1e-3 and b[:, 3].max() <= im.shape[1] + 1e-3


def test_preprocess_warps_and_subtracts_mean():
    im = torch.full((3, 40, 70), 200, dtype=torch.uint8)
    x = ssd.preprocess([im], 300, ssd.MEAN)
    assert x.shape == (1, 3, 300, 300)
    torch.testing.assert_close(x[0, :, 0, 0], torch.tensor([200 - m for m in ssd.MEAN]))
    assert math.isclose(float(x[0, 0].mean()), 77.0, abs_tol=1e-4)


def test_preprocess_mixed_sizes_equals_one_image_at_a_time():
    # images of one size are resized together; each must come out as if resized alone, in order
    g = torch.Generator().manual_seed(4)
    shapes = [(3, 40, 70), (3, 90, 30), (3, 40, 70), (3, 300, 300), (3, 90, 30)]
    images = [torch.randint(0, 256, s, dtype=torch.uint8, generator=g) for s in shapes]
    mean = torch.tensor(ssd.MEAN).view(3, 1, 1)
    expected = torch.stack([torch.nn.functional.interpolate(
        im[None].float(), size=(300, 300), mode="bilinear", align_corners=False)[0] - mean
        for im in images])  # [B, 3, 300, 300]
    assert torch.equal(ssd.preprocess(images, 300, ssd.MEAN), expected)


def photo_like(n, seed):
    """uint8 [3, 240, 320] images: smooth colour fields plus noise."""
    g = torch.Generator().manual_seed(seed)
    smooth = torch.nn.functional.interpolate(torch.rand(n, 3, 6, 8, generator=g) * 255,
                                             size=(240, 320), mode="bilinear")  # [n, 3, H, W]
    return list((smooth + 20 * torch.randn(smooth.shape, generator=g)).clamp(0, 255).byte())


def assert_twins(dets, others, px=2.0, score=0.02, top=20, need=18):
    """Both ways, at least `need` of each image's `top` detections have a twin in the other list:
    the same label, every coordinate within `px` and the score within `score`. Not all: a
    detection may swap with a near neighbour in the NMS or at the max_det cut."""
    for one, other in ((dets, others), (others, dets)):
        for (b, s, lab), (b2, s2, lab2) in zip(one, other, strict=True):
            twin = ((b[:top, None] - b2[None]).abs().amax(-1) < px) & (lab[:top, None] == lab2)
            twin &= (s[:top, None] - s2[None]).abs() < score  # [top, K]
            assert twin.any(1).sum() >= need


def test_detect_bf16_matches_float32(monkeypatch):
    # bf16 keeps ~3 significant digits: on a random model (width 0.25, logits of a few units) the
    # scores move by < 0.01 and the boxes by < 1 px, so confident detections have twins within
    # 2 px and 0.02 (19 or 20 of the top 20 here)
    torch.manual_seed(0)
    model = ssd.ssd300(20, width=0.25).eval()
    images = photo_like(2, seed=1)
    seen = []
    model.vgg[0].register_forward_hook(lambda m, i, out: seen.append(out.dtype))
    real = ssd.postprocess
    monkeypatch.setattr(ssd, "postprocess", lambda c, b, *a, **k: seen.append(c.dtype)
                        or real(c, b, *a, **k))
    fp32, bf16 = ssd.detect(model, images), ssd.detect(model, images, bf16=True)
    assert seen == [torch.float32, torch.float32, torch.bfloat16, torch.float32]
    assert_twins(fp32, bf16)
    assert not all(torch.equal(a[1], b[1]) for a, b in zip(fp32, bf16))  # bf16 did run


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_detect_on_cuda_matches_cpu():
    # preprocess on the GPU (one uint8 copy per size) equals the CPU's; detect returns CPU tensors
    # whose detections twin the CPU's in float32 and in bf16 (cuDNN's TF32 and bf16 round)
    torch.manual_seed(0)
    model = ssd.ssd300(20, width=0.25).eval()
    images = photo_like(3, seed=2)
    images.insert(1, torch.randint(0, 256, (3, 100, 90), dtype=torch.uint8))
    x = ssd.preprocess(images, 300, ssd.MEAN, "cuda")
    torch.testing.assert_close(x.cpu(), ssd.preprocess(images, 300, ssd.MEAN), atol=1e-3, rtol=0)
    cpu = ssd.detect(model, images)
    gpu_model = ssd.ssd300(20, width=0.25).eval()
    gpu_model.load_state_dict(model.state_dict())
    gpu_model.cuda()
    for bf16 in (False, True):
        gpu = ssd.detect(gpu_model, images, bf16=bf16)
        assert all(t.device.type == "cpu" for d in gpu for t in d)
        assert_twins(cpu, gpu, need=16 if bf16 else 18)  # bf16 rounds ~8x coarser than TF32
