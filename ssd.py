"""SSD: Single Shot MultiBox Detector (Liu et al. 2016, arXiv 1512.02325) in one file.

Read top to bottom: class lists and presets, the network (VGG16 backbone, L2Norm, extra layers,
heads), anchors, box coding, matching, the loss with hard-negative mining, post-processing,
inference on images, and loading checkpoints (ours and foreign formats).

Conventions (see ../shared/DESIGN.md): boxes are xyxy; inside the model they are normalised to
[0, 1] of the network input, at the edges (files, CLI, JSON) absolute pixels of the original image.
Label 0 is background, 1..C are objects. Anchors are (cx, cy, w, h), normalised.
"""
import math
import os
import re
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F

import kernels

VOC_CLASSES = [
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train",
    "tvmonitor",
]
# The 80 COCO categories in ascending category-id order; label i (1..80) is COCO_CLASSES[i-1]
# and COCO_CATEGORY_IDS[i-1] (facts §13.1: ids 12, 26, 29, 30, 45, 66, 68, 69, 71, 83 are unused).
COCO_CLASSES = [
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat",
    "traffic light", "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog",
    "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella",
    "handbag", "tie", "suitcase", "frisbee", "skis", "snowboard", "sports ball", "kite",
    "baseball bat", "baseball glove", "skateboard", "surfboard", "tennis racket", "bottle",
    "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple", "sandwich", "orange",
    "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch", "potted plant",
    "bed", "dining table", "toilet", "tv", "laptop", "mouse", "remote", "keyboard", "cell phone",
    "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock", "vase", "scissors",
    "teddy bear", "hair drier", "toothbrush",
]
COCO_CATEGORY_IDS = [i for i in range(1, 91) if i not in (12, 26, 29, 30, 45, 66, 68, 69, 71, 83)]

# RGB mean on the 0-255 scale; the caffe-style VGG16 every SSD starts from
MEAN = (123.0, 117.0, 104.0)

# -----------------------------------------------------------------------------------------------
# Presets (facts §1, §4). Anchor sizes come from the Caffe/mmdetection integer-percentage rule.

# input size -> feature map sides, anchor steps (strides) and extra aspect ratios per level
GEOMETRY = {
    300: dict(feature_maps=[38, 19, 10, 5, 3, 1], steps=[8, 16, 32, 64, 100, 300],
              ratios=[[2], [2, 3], [2, 3], [2, 3], [2], [2]]),
    512: dict(feature_maps=[64, 32, 16, 8, 4, 2, 1], steps=[8, 16, 32, 64, 128, 256, 512],
              ratios=[[2], [2, 3], [2, 3], [2, 3], [2, 3], [2], [2]]),
}
# (size, dataset) -> (min_ratio %, first level min %, first level max %); max_ratio is 90 everywhere
SIZE_RULE = {
    (300, "voc"): (20, 10, 20), (300, "coco"): (15, 7, 15),
    (512, "voc"): (15, 7, 15), (512, "coco"): (10, 4, 10),
}


def anchor_sizes(size, dataset):
    """Per-level (min_sizes, max_sizes) in pixels by the Caffe rule (facts §4.1): the integer
    percentage step floor((90 - min_ratio) / (levels - 2)); sizes truncated to int as Caffe's
    PriorBox layer and mmdetection do. SSD300-VOC: 30, 60, 111, 162, 213, 264 / 60 ... 315."""
    min_ratio, first_min, first_max = SIZE_RULE[(size, dataset)]
    levels = len(GEOMETRY[size]["feature_maps"])
    step = (90 - min_ratio) // (levels - 2)
    ratios = range(min_ratio, 91, step)
    min_sizes = [size * first_min // 100] + [size * r // 100 for r in ratios]
    max_sizes = [size * first_max // 100] + [size * (r + step) // 100 for r in ratios]
    return min_sizes, max_sizes


def make_config(size, num_classes, anchors="voc", clip="none", width=1.0, class_names=None,
                mean=MEAN, norm="none"):
    """The plain-types dict that fully describes a model; it travels in every checkpoint."""
    # ValueError, not assert: the checks must hold under python -O too
    if size not in GEOMETRY:
        raise ValueError(f"size must be 300 or 512, got {size}")
    if anchors not in ("voc", "coco"):
        raise ValueError(f"anchors must be 'voc' or 'coco', got {anchors!r}")
    if clip not in ("none", "wh", "all"):
        raise ValueError(f"clip must be 'none', 'wh' or 'all', got {clip!r}")
    if norm not in ("none", "bn"):
        raise ValueError(f"norm must be 'none' or 'bn', got {norm!r}")
    if class_names is None:
        class_names = (VOC_CLASSES if num_classes == 20 else COCO_CLASSES if num_classes == 80
                       else [f"class{i}" for i in range(1, num_classes + 1)])
    if len(class_names) != num_classes:
        raise ValueError("need one class name per object class")
    return dict(size=size, width=float(width), num_classes=int(num_classes),
                class_names=list(class_names), anchors=anchors, clip=clip,
                mean=[float(m) for m in mean], norm=norm)


# -----------------------------------------------------------------------------------------------
# Network (SSD paper §2.1 and §3; Caffe's ssd_pascal.py VGG16 net)

class L2Norm(nn.Module):
    """Channel-wise L2 normalisation of conv4_3 with a learned per-channel scale (init 20):
    conv4_3 activations are much larger than the deeper ones, this evens the heads' inputs."""

    def __init__(self, channels, scale=20.0, eps=1e-10):
        super().__init__()
        self.weight = nn.Parameter(torch.full((channels,), scale))
        self.eps = eps

    def forward(self, x):
        # the norm in float32: under fp16 the sum of squares of 512 channels overflows
        norm = x.float().pow(2).sum(1, keepdim=True).sqrt() + self.eps  # [B, 1, H, W]
        return (x.float() / norm * self.weight.view(1, -1, 1, 1)).to(x.dtype)


class ConvBN(nn.Conv2d):
    """A conv followed by BatchNorm (config norm "bn"): ScratchDet (Zhu et al. 2019) and DSOD (Shen
    et al. 2017) train SSD from scratch with BN after every backbone conv. A Conv2d subclass, so
    the VGG indices, `.weight` and the conv init loops stay as without BN; keys gain `N.bn.*`."""

    def __init__(self, cin, cout, kernel_size, **kw):
        super().__init__(cin, cout, kernel_size, **kw)
        self.bn = nn.BatchNorm2d(cout)

    def forward(self, x):
        return self.bn(super().forward(x))


def vgg16_layers(c, conv=nn.Conv2d):
    """VGG16 cut for SSD as a flat list; indices match torchvision's vgg16().features (0-30),
    amdegroot's `vgg.N` and mmdetection's `features.N`: 22 is conv4_3's ReLU (first source),
    30 the 3x3/s1 pool5, 31 conv6 (3x3, dilation 6, from fc6), 33 conv7 (1x1, from fc7), 34 its
    ReLU (second source). `c` maps a paper channel count to this model's width; `conv` is
    nn.Conv2d or ConvBN."""
    layers, cin = [], 3
    for i, v in enumerate([64, 64, "M", 128, 128, "M", 256, 256, 256, "C", 512, 512, 512, "M",
                           512, 512, 512]):
        if v == "M":
            layers.append(nn.MaxPool2d(2, 2))
        elif v == "C":  # pool3 rounds up so 75 -> 38 (floor would give 37)
            layers.append(nn.MaxPool2d(2, 2, ceil_mode=True))
        else:
            layers += [conv(cin, c(v), 3, padding=1), nn.ReLU(inplace=True)]
            cin = c(v)
    layers += [nn.MaxPool2d(3, 1, padding=1),
               conv(cin, c(1024), 3, padding=6, dilation=6), nn.ReLU(inplace=True),
               conv(c(1024), c(1024), 1), nn.ReLU(inplace=True)]
    return layers


def extra_layers(size, c, conv=nn.Conv2d):
    """Extra feature layers after conv7 (paper Fig. 2; Caffe's AddExtraLayers), ReLU after each
    conv. Each level is a 1x1 reduction then a 3x3 conv; SSD300's last two levels are unpadded
    stride 1 (5 -> 3 -> 1), SSD512 strides all of them and ends with a 4x4 pad-1 conv (2 -> 1)."""
    # (in, mid, out, kernel, stride, padding) per level
    spec = [(1024, 256, 512, 3, 2, 1), (512, 128, 256, 3, 2, 1)]
    if size == 300:
        spec += [(256, 128, 256, 3, 1, 0), (256, 128, 256, 3, 1, 0)]
    else:
        spec += [(256, 128, 256, 3, 2, 1), (256, 128, 256, 3, 2, 1), (256, 128, 256, 4, 1, 1)]
    layers = []
    for cin, mid, cout, k, s, p in spec:
        layers += [conv(c(cin), c(mid), 1), conv(c(mid), c(cout), k, stride=s, padding=p)]
    return layers


class SSD(nn.Module):
    """SSD300/SSD512 on VGG16. forward(x [B,3,S,S] normalised) -> (cls_logits [B,A,C+1],
    box_deltas [B,A,4]); anchor order = level, row, column, then the anchors of a location."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        size, width, nc = config["size"], config["width"], config["num_classes"]
        c = lambda ch: max(1, int(round(ch * width)))  # noqa: E731  (channel width multiplier)
        conv = ConvBN if config.get("norm", "none") == "bn" else nn.Conv2d  # none: older configs
        self.vgg = nn.ModuleList(vgg16_layers(c, conv))
        self.l2norm = L2Norm(c(512))
        self.extras = nn.ModuleList(extra_layers(size, c, conv))
        source_channels = [c(512), c(1024)] + [m.out_channels for m in self.extras[1::2]]
        per_location = [2 + 2 * len(r) for r in GEOMETRY[size]["ratios"]]  # 4 or 6
        self.cls_heads = nn.ModuleList(nn.Conv2d(ch, k * (nc + 1), 3, padding=1)
                                       for ch, k in zip(source_channels, per_location))
        self.box_heads = nn.ModuleList(nn.Conv2d(ch, k * 4, 3, padding=1)
                                       for ch, k in zip(source_channels, per_location))
        self.register_buffer("anchors", anchors(config), persistent=False)  # [A, 4] cx,cy,w,h
        for m in [*self.vgg, *self.extras, *self.cls_heads, *self.box_heads]:
            if isinstance(m, nn.Conv2d):  # Xavier-uniform, bias 0 (mmdetection, torchvision)
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)

    def features(self, x):
        """The 6 (SSD300) or 7 (SSD512) source feature maps, largest first."""
        for layer in self.vgg[:23]:
            x = layer(x)
        sources = [self.l2norm(x)]  # conv4_3: [B, 512, 38, 38] for SSD300
        for layer in self.vgg[23:]:
            x = layer(x)
        sources.append(x)  # conv7: [B, 1024, 19, 19]
        for i, layer in enumerate(self.extras):
            x = F.relu(layer(x))
            if i % 2 == 1:
                sources.append(x)
        return sources

    def forward(self, x):
        cls, box = [], []
        k1 = self.config["num_classes"] + 1
        for f, cls_head, box_head in zip(self.features(x), self.cls_heads, self.box_heads):
            b = f.shape[0]
            # channel = anchor * K + k: NCHW -> NHWC -> [B, H*W*anchors, K] keeps the anchor order
            cls.append(cls_head(f).permute(0, 2, 3, 1).reshape(b, -1, k1))
            box.append(box_head(f).permute(0, 2, 3, 1).reshape(b, -1, 4))
        return torch.cat(cls, 1), torch.cat(box, 1)  # [B, A, C+1], [B, A, 4]


def build_model(config):
    return SSD(config)


def ssd300(num_classes, **preset):
    """SSD300 (8,732 anchors). preset: anchors="voc"|"coco", clip="none"|"wh"|"all", width=1.0,
    class_names, mean, norm="none"|"bn". torchvision's ssd300_vgg16 is ssd300(90, anchors="coco",
    clip="wh")."""
    return SSD(make_config(300, num_classes, **preset))


def ssd512(num_classes, **preset):
    """SSD512 (24,564 anchors); same preset keywords as ssd300."""
    return SSD(make_config(512, num_classes, **preset))


# -----------------------------------------------------------------------------------------------
# Anchors (facts §4)

def anchors(config):
    """Default boxes [A, 4] as (cx, cy, w, h) normalised to the input. Order: level, row (y),
    column (x), then per location [s, sqrt(s*s'), 2:1, 1:2, 3:1, 1:3] (Caffe/torchvision order,
    which the heads' channel layout must follow). Centres at (i + 0.5) * step / size. clip: "wh"
    clamps w, h to 1 (torchvision), "all" clamps cx, cy, w, h to [0, 1] (amdegroot), "none" keeps
    them (Caffe, mmdetection)."""
    size = config["size"]
    geo = GEOMETRY[size]
    min_sizes, max_sizes = anchor_sizes(size, config["anchors"])
    out = []
    for f, step, ratios, s, s2 in zip(geo["feature_maps"], geo["steps"], geo["ratios"],
                                      min_sizes, max_sizes):
        wh = [(s, s), (math.sqrt(s * s2),) * 2]
        for r in ratios:
            wh += [(s * math.sqrt(r), s / math.sqrt(r)), (s / math.sqrt(r), s * math.sqrt(r))]
        wh = torch.tensor(wh, dtype=torch.float64) / size  # [k, 2]
        centres = (torch.arange(f, dtype=torch.float64) + 0.5) * step / size  # [f]
        cy, cx = torch.meshgrid(centres, centres, indexing="ij")
        cxcy = torch.stack([cx, cy], -1).reshape(-1, 1, 2).expand(-1, len(wh), 2)  # [f*f, k, 2]
        out.append(torch.cat([cxcy, wh.expand_as(cxcy)], -1).reshape(-1, 4))
    a = torch.cat(out)  # [A, 4]
    if config["clip"] == "wh":
        a[:, 2:] = a[:, 2:].clamp(max=1.0)
    elif config["clip"] == "all":
        a = a.clamp(0.0, 1.0)
    return a.float()


def cxcywh_to_xyxy(b):
    return torch.cat([b[..., :2] - b[..., 2:] / 2, b[..., :2] + b[..., 2:] / 2], -1)


def xyxy_to_cxcywh(b):
    return torch.cat([(b[..., :2] + b[..., 2:]) / 2, b[..., 2:] - b[..., :2]], -1)


# -----------------------------------------------------------------------------------------------
# Box coding (facts §6): centre offsets in units of 0.1 * anchor size, log sizes in units of 0.2

VARIANCES = (0.1, 0.2)
LOG_SIZE_CLAMP = math.log(1000.0 / 16)  # torchvision's bound on exp() when decoding


def encode(boxes, anchors):
    """xyxy boxes [..., 4] -> regression targets [..., 4] against (cx, cy, w, h) anchors."""
    g = xyxy_to_cxcywh(boxes)
    return torch.cat([(g[..., :2] - anchors[..., :2]) / (VARIANCES[0] * anchors[..., 2:]),
                      torch.log(g[..., 2:] / anchors[..., 2:]) / VARIANCES[1]], -1)


def decode(deltas, anchors):
    """Regression outputs [..., 4] -> xyxy boxes [..., 4]; log-size deltas clamped at
    ln(1000/16) so an untrained model cannot overflow exp()."""
    cxcy = anchors[..., :2] + deltas[..., :2] * VARIANCES[0] * anchors[..., 2:]
    wh = anchors[..., 2:] * torch.exp((deltas[..., 2:] * VARIANCES[1]).clamp(max=LOG_SIZE_CLAMP))
    return torch.cat([cxcy - wh / 2, cxcy + wh / 2], -1)


# -----------------------------------------------------------------------------------------------
# Matching (facts §5)

def pad_boxes(gt_boxes, gt_labels, device):
    """Ragged per-image lists -> padded [B, G, 4] boxes, [B, G] labels (0 where padded)."""
    g = max([len(b) for b in gt_boxes] + [1])
    boxes = torch.zeros(len(gt_boxes), g, 4, device=device)
    labels = torch.zeros(len(gt_boxes), g, dtype=torch.int64, device=device)
    for i, (b, lab) in enumerate(zip(gt_boxes, gt_labels)):
        boxes[i, :len(b)] = b.to(device, torch.float32)
        labels[i, :len(b)] = lab.to(device)
    return boxes, labels


def batched_iou(a, b):
    """IoU of xyxy boxes a [A, 4] with each image's boxes b [B, G, 4] -> [B, A, G]."""
    lt = torch.maximum(a[None, :, None, :2], b[:, None, :, :2])
    rb = torch.minimum(a[None, :, None, 2:], b[:, None, :, 2:])
    inter = (rb - lt).clamp(min=0).prod(-1)  # [B, A, G]
    area_a = (a[:, 2:] - a[:, :2]).prod(-1)  # [A]
    area_b = (b[..., 2:] - b[..., :2]).clamp(min=0).prod(-1)  # [B, G]
    union = area_a[None, :, None] + area_b[:, None, :] - inter
    return inter / union.clamp(min=1e-12)


def match(anchors, gt_boxes, gt_labels, iou_threshold=0.5):
    """Assign every anchor a class (0 = background) and a regression target.

    An anchor whose best IoU with a ground-truth box is >= 0.5 takes that box; then every
    ground-truth box takes its best anchor whatever the IoU (so no object goes unmatched); when two
    boxes share a best anchor the later box wins (mmdetection, torchvision, amdegroot). Departure:
    a box with IoU 0 to every anchor (zero area) forces nothing, as in Caffe, instead of grabbing
    anchor 0. Batched over images: anchors [A, 4] (cx,cy,w,h); gt_boxes a list of [n_i, 4] xyxy in
    [0, 1]; gt_labels a list of int64 [n_i] in 1..C. Returns cls_targets int64 [B, A] and
    box_targets [B, A, 4] (zeros where background)."""
    device = anchors.device
    boxes, labels = pad_boxes(gt_boxes, gt_labels, device)  # [B, G, 4], [B, G]
    valid = labels > 0  # [B, G]
    iou = batched_iou(cxcywh_to_xyxy(anchors), boxes)  # [B, A, G]
    iou = iou.masked_fill(~valid[:, None, :], -1.0)
    best_iou, best_gt = iou.max(2)  # [B, A]
    # every valid box forces its argmax anchor; amax over gt index makes the later box win
    gt_best_iou, gt_best_anchor = iou.max(1)  # [B, G]
    forcing = valid & (gt_best_iou > 0)
    gt_index = torch.arange(boxes.shape[1], device=device).expand_as(gt_best_anchor)
    forced = torch.full_like(best_gt, -1).scatter_reduce(
        1, gt_best_anchor, torch.where(forcing, gt_index, -1), reduce="amax")  # [B, A]
    best_gt = torch.where(forced >= 0, forced, best_gt)
    positive = (best_iou >= iou_threshold) | (forced >= 0)  # [B, A]
    cls_targets = torch.where(positive, labels.gather(1, best_gt), 0)  # [B, A]
    matched = boxes.gather(1, best_gt[..., None].expand(-1, -1, 4))  # [B, A, 4]
    box_targets = torch.where(positive[..., None], encode(matched, anchors[None]), 0.0)
    return cls_targets, box_targets


# -----------------------------------------------------------------------------------------------
# Loss (facts §7)

def multibox_loss(cls_logits, box_deltas, anchors, gt_boxes, gt_labels, neg_pos_ratio=3):
    """SSD loss: softmax cross-entropy over the positives and the hardest negatives (at most 3 per
    positive, per image, ranked by their cross-entropy), plus smooth L1 (beta 1) on the positives'
    box deltas; both sums divided by max(1, positives in the batch). Computed in float32 even under
    autocast. Returns {"loss_cls", "loss_box"}."""
    with torch.autocast(cls_logits.device.type, enabled=False):
        cls_logits, box_deltas = cls_logits.float(), box_deltas.float()
        with torch.no_grad():
            cls_t, box_t = match(anchors.float(), gt_boxes, gt_labels)  # [B, A], [B, A, 4]
        pos = cls_t > 0  # [B, A]
        num_pos = pos.sum(1, keepdim=True)  # [B, 1]
        ce = F.cross_entropy(cls_logits.flatten(0, 1), cls_t.flatten(), reduction="none")
        ce = ce.view_as(cls_t)  # [B, A]
        with torch.no_grad():
            # rank negatives by loss; positives go last. Stable sort: equal losses keep the
            # anchor order.
            neg_ce = ce.detach().masked_fill(pos, -math.inf)
            order = neg_ce.sort(dim=1, descending=True, stable=True)[1]
            rank = order.argsort(1)  # [B, A]
            hard_neg = (rank < neg_pos_ratio * num_pos) & ~pos
        n = num_pos.sum().clamp(min=1).float()
        loss_cls = ce[pos | hard_neg].sum() / n
        loss_box = F.smooth_l1_loss(box_deltas[pos], box_t[pos], beta=1.0, reduction="sum") / n
    return {"loss_cls": loss_cls, "loss_box": loss_box}


# -----------------------------------------------------------------------------------------------
# Post-processing (facts §10)

def last_dim_max(x):
    """x.amax(-1), by halving: torch's reduction over short rows (21 or 91 classes) is 1.5-2x
    slower on CPU than these few elementwise maxima (bench.py postprocess)."""
    while x.shape[-1] > 1:
        half = (x.shape[-1] + 1) // 2
        x = torch.maximum(x[..., :half], x[..., -half:])  # the halves overlap when odd: harmless
    return x[..., 0]


def postprocess(cls_logits, box_deltas, anchors, image_sizes, score_thr=0.01, nms_iou=0.45,
                topk=400, max_det=200, nms="hard"):
    """Detections per image from raw outputs, with no Python loop over images or classes.

    Softmax; per class keep scores > score_thr, at most `topk` per class and image; class-aware
    NMS (IoU > nms_iou suppresses; nms="soft" uses Gaussian soft-NMS and its decayed scores);
    the best `max_det` per image. Boxes are clipped to the input and scaled to each image's
    original pixels. image_sizes: list of (width, height). Returns a list of (boxes [k, 4] xyxy
    pixels, scores [k], labels int64 [k] in 1..C), each sorted by decreasing score; equal scores
    keep the lower anchor index (then the lower class) first, also for which candidates make a
    class's top-k."""
    if nms not in ("hard", "soft"):
        raise ValueError(f"nms must be 'hard' or 'soft', got {nms!r}")
    if topk < 1 or max_det < 1:
        raise ValueError(f"topk and max_det must be at least 1, got {topk} and {max_det}")
    b, a, k1 = cls_logits.shape
    c = k1 - 1
    logits = cls_logits.float()  # [B, A, C+1]
    if score_thr > 0:
        # A trained model: few anchors can pass, so softmax and decode only those. A probability
        # is exp(x - max) / sum with sum >= 1, so a class passes only if its logit is within
        # ln(score_thr) of the anchor's top logit; the 0.01 margin dwarfs exp's rounding.
        best_fg = last_dim_max(logits[..., 1:])  # [B, A]
        near = best_fg - torch.maximum(best_fg, logits[..., 0]) > math.log(score_thr) - 0.01
        img_near, anchor_near = near.nonzero(as_tuple=True)  # each [R]
        if len(img_near) * 4 <= b * a:
            # a softmax row does not depend on the other rows: same values as the full softmax
            probs = F.softmax(logits[img_near, anchor_near], -1)[:, 1:]  # [R, C]
            row, cls_idx = (probs > score_thr).nonzero(as_tuple=True)  # each [N]
            img_idx, anchor_idx = img_near[row], anchor_near[row]  # (image, anchor, class) order
            if len(row) == 0 or torch.bincount(img_idx * c + cls_idx).max() <= topk:
                # no class needs its top-k cut: every candidate goes to the NMS
                return nms_and_scale(probs[row, cls_idx], img_idx, anchor_idx, cls_idx, c,
                                     box_deltas, anchors, image_sizes, nms_iou, max_det, nms)
    scores = F.softmax(logits, -1)[..., 1:]  # [B, A, C]
    if nms == "hard" and max_det < topk * c:
        found = best_first(scores, box_deltas, anchors, image_sizes, score_thr, nms_iou, topk,
                           max_det)
        if found is not None:
            return found
    passed = scores > score_thr  # [B, A, C]
    if passed.sum(1, dtype=torch.int32).max() <= topk:  # int32: faster than int64 here
        img_idx, anchor_idx, cls_idx = passed.nonzero(as_tuple=True)  # each [N]
    else:
        # e.g. an untrained model's flat softmax: the best `topk` anchors of each (image, class)
        cut = scores.transpose(1, 2).topk(min(topk, a), dim=2).values[..., -1:]  # [B, C, 1]
        # scores equal to the cut: the lowest anchors take the places left
        above = scores > cut.transpose(1, 2)  # [B, A, C] surely in the top-k
        free = topk - above.sum(1, keepdim=True)  # [B, 1, C] places left for scores == cut
        chosen = above & passed
        tied = (scores == cut.transpose(1, 2)) & passed  # [B, A, C]
        if bool(tied.any()):
            chosen |= tied & (tied.cumsum(1) <= free)
        img_idx, anchor_idx, cls_idx = chosen.nonzero(as_tuple=True)  # each [N]
    return nms_and_scale(scores[img_idx, anchor_idx, cls_idx], img_idx, anchor_idx, cls_idx, c,
                         box_deltas, anchors, image_sizes, nms_iou, max_det, nms)


def nms_and_scale(cand_scores, img_idx, anchor_idx, cls_idx, num_classes, box_deltas, anchors,
                  image_sizes, nms_iou, max_det, nms):
    """postprocess's last steps on candidates given as (score, image, anchor, 0-based class)
    [N] each, in (image, anchor, class) order: decode, class-aware NMS within each image, the
    best max_det per image, scaling to pixels."""
    cand_boxes = decode(box_deltas[img_idx, anchor_idx].float(),
                        anchors[anchor_idx].float()).clamp(0.0, 1.0)  # [N, 4]
    group = img_idx * num_classes + cls_idx  # NMS within one class of one image
    if nms == "soft":
        kept, kept_scores = kernels.soft_nms(cand_boxes, cand_scores, group, iou_threshold=nms_iou)
    else:
        kept = kernels.batched_nms(cand_boxes, cand_scores, group, nms_iou)
        kept_scores = None
    # kept is sorted by decreasing score; a stable sort by image keeps that order inside each image
    img_of_kept = img_idx[kept]
    if len(image_sizes) > 1:
        by_img = img_of_kept.sort(stable=True).indices
        by_img = by_img[rank_in_group(img_of_kept[by_img], len(image_sizes)) < max_det]
    else:  # one image (the usual call from detect.py): a plain cut, no sort
        by_img = slice(0, max_det)
    kept, img_of_kept = kept[by_img], img_of_kept[by_img]
    kept_scores = cand_scores[kept] if kept_scores is None else kept_scores[by_img]
    return scale_to_pixels(cand_boxes[kept], kept_scores, cls_idx[kept] + 1, img_of_kept,
                           image_sizes)


def best_first(scores, box_deltas, anchors, image_sizes, score_thr, nms_iou, topk, max_det):
    """postprocess with hard NMS when many candidates pass (an untrained or poor model: up to
    topk * C per image) and only max_det are wanted. Each image's candidates go through the NMS
    best first (kernels.nms_rows), which stops once max_det are kept, so only the few hundred
    best candidates are looked at: those above a cut-off score v, set so that at least 4 *
    max_det anchors have a class above it. Exact: the candidates above v are the top of the
    score order, and an image's answer is final once max_det are kept or v <= score_thr; else
    returns None (postprocess then runs the NMS on every candidate)."""
    b, a, c = scores.shape
    device = scores.device
    best = last_dim_max(scores)  # [B, A] each anchor's top class score
    v = best.topk(min(4 * max_det, a), dim=1).values[:, -1]  # [B]
    cut = v.clamp(min=score_thr)  # [B]
    img_idx, anchor_idx, cls_idx = (scores > cut.view(b, 1, 1)).nonzero(as_tuple=True)  # [N]
    cand_scores = scores[img_idx, anchor_idx, cls_idx]  # [N] in (image, anchor, class) order
    # image by image, by decreasing score; the stable sorts keep the lower anchor, then the lower
    # class, first among equal scores
    order = cand_scores.sort(descending=True, stable=True).indices
    order = order[img_idx[order].sort(stable=True).indices]  # [N]
    # a class's top-k: its first `topk` candidates in this order (all are above v, so the ones
    # below v cannot come before them)
    group = (img_idx * c + cls_idx)[order]  # [N]
    by_group = group.sort(stable=True).indices  # [N]
    rank = torch.empty_like(group)
    rank[by_group] = rank_in_group(group[by_group], b * c)
    order = order[rank < topk]
    img_idx, anchor_idx, cls_idx = img_idx[order], anchor_idx[order], cls_idx[order]
    # one row per image, padded
    col = rank_in_group(img_idx, b)  # [N]
    n = int(col.max()) + 1 if len(order) else 0
    row_boxes = scores.new_zeros(b, n, 4)  # [B, n, 4]
    row_boxes[img_idx, col] = decode(box_deltas[img_idx, anchor_idx].float(),
                                     anchors[anchor_idx].float()).clamp(0.0, 1.0)
    row_labels = torch.zeros(b, n, dtype=torch.long, device=device)
    row_labels[img_idx, col] = cls_idx
    valid = torch.zeros(b, n, dtype=torch.bool, device=device)
    valid[img_idx, col] = True
    keep = kernels.nms_rows(row_boxes, row_labels, valid, nms_iou, max_det)  # [B, n]
    if not bool(((keep.sum(1) >= max_det) | (v <= score_thr)).all()):
        return None  # some image's first candidates were too few
    keep &= keep.cumsum(1) <= max_det
    ri, ci = keep.nonzero(as_tuple=True)  # image by image, by decreasing score
    row_scores = scores.new_zeros(b, n)
    row_scores[img_idx, col] = cand_scores[order]
    return scale_to_pixels(row_boxes[ri, ci], row_scores[ri, ci], row_labels[ri, ci] + 1, ri,
                           image_sizes)


def rank_in_group(sorted_keys, num_groups):
    """Each entry's position among the entries with its key: sorted_keys [N] int64 in
    0..num_groups-1, ascending -> [N] (0 for the first of each key)."""
    counts = torch.bincount(sorted_keys, minlength=num_groups)
    return (torch.arange(len(sorted_keys), device=sorted_keys.device)
            - (counts.cumsum(0) - counts)[sorted_keys])


def scale_to_pixels(boxes, scores, labels, img, image_sizes):
    """Detections [K] sorted by image (then by decreasing score) -> one (boxes in pixels of the
    image's original size, scores, labels) per image."""
    scale = torch.tensor([[w, h, w, h] for w, h in image_sizes], dtype=torch.float32,
                         device=boxes.device)  # [B, 4]
    if len(image_sizes) == 1:
        return [(boxes * scale, scores, labels)]
    sizes = torch.bincount(img, minlength=len(image_sizes)).tolist()
    return list(zip((boxes * scale[img]).split(sizes), scores.split(sizes), labels.split(sizes)))


# -----------------------------------------------------------------------------------------------
# Inference on images

def preprocess(images, size, mean=MEAN):
    """uint8 RGB images [3, H, W] of any sizes -> float [B, 3, S, S]: warped (aspect ratio not
    kept, as in training) with bilinear interpolation as torchvision does, minus the mean."""
    m = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
    out = [F.interpolate(im[None].float(), size=(size, size), mode="bilinear",
                         align_corners=False) for im in images]
    return torch.cat(out) - m.to(out[0].device)  # [B, 3, S, S]


@torch.no_grad()
def detect(model, images, **postprocess_options):
    """Detections for uint8 RGB images [3, H, W] (any sizes) in their original pixels: a list of
    (boxes [k, 4] xyxy, scores [k], labels [k]) on the CPU. Runs on the model's device; the model
    is switched to channels_last memory format (same weights, faster convolutions)."""
    device = next(model.parameters()).device
    cfg = model.config
    # channels_last is faster on CPU (1.1-1.3x, bench.py) and GPU; convert the weights once
    if not model.vgg[0].weight.is_contiguous(memory_format=torch.channels_last):
        model.to(memory_format=torch.channels_last)
    x = preprocess([im.to(device) for im in images], cfg["size"], cfg["mean"])
    x = x.contiguous(memory_format=torch.channels_last)
    cls_logits, box_deltas = model(x)
    sizes = [(im.shape[2], im.shape[1]) for im in images]
    dets = postprocess(cls_logits, box_deltas, model.anchors, sizes, **postprocess_options)
    return [tuple(t.cpu() for t in d) for d in dets]


# -----------------------------------------------------------------------------------------------
# Checkpoints and foreign weights
#
# Every file is read with torch.load(weights_only=True): tensors and plain containers only, never
# arbitrary pickled objects. A foreign file is mapped key by key (nanoGPT's from_pretrained): each
# weight our model needs must be in the file under the mapped name with the same shape, and nothing
# in the file may be left over; otherwise CheckpointError names the first offending key.


class CheckpointError(ValueError):
    """A weights file we cannot use. The message starts with the file's path, then the reason."""


VGG_CONVS = [0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28]  # conv1_1 ... conv5_3 in model.vgg
CONV6, CONV7 = 31, 33  # fc6 and fc7 as convolutions
HARMLESS = ("num_batches_tracked", "anchors", "priors")  # buffers that hold no learned weights
TORCHVISION_MEAN = tuple(255 * m for m in (0.48235, 0.45882, 0.40784))  # (x/255 - m)*255
MMDET_MEAN = (123.675, 116.28, 103.53)  # mmdetection SSD configs: RGB, std 1 (facts §2.4)


def strip_prefixes(state_dict):
    """Keys without the `module.` (DataParallel / DDP) and `_orig_mod.` (torch.compile) prefixes."""
    out = {}
    for key, value in state_dict.items():
        while key.startswith(("module.", "_orig_mod.")):
            key = key.split(".", 1)[1]
        out[key] = value
    return out


def save_checkpoint(path, **fields):
    """torch.save({"model": state_dict, "config": ..., **rest}) atomically: written to a temporary
    file in the same folder, flushed to disk, then renamed over `path`, so a crash leaves the old
    file or the new one, never half of one. `model` may be a state_dict or an SSD (then its config
    is used unless `config` is given)."""
    model = fields.get("model")
    if isinstance(model, nn.Module):
        fields.setdefault("config", getattr(model, "config", None))
        model = model.state_dict()
    if not isinstance(model, dict) or not isinstance(fields.get("config"), dict):
        raise ValueError("save_checkpoint needs model= (state_dict or SSD) and config= (dict)")
    fields["model"] = strip_prefixes(model)
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            torch.save(fields, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def read_weights(path):
    """torch.load(path, weights_only=True) onto the CPU; every failure becomes a CheckpointError."""
    path = str(path)
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: {'not a file' if os.path.exists(path) else 'no such file'}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # damaged files raise many types (zip, EOF, pickle, KeyError...)
        refused = re.search(r"Unsupported global: GLOBAL (\S+)", str(e))
        if refused:
            raise CheckpointError(f"{path}: refused: it holds a {refused[1]} object, not only "
                                  "tensors and plain containers (weights_only=True)") from e
        detail = str(e).split("WeightsUnpickler error:")[-1].strip()
        reason = type(e).__name__ + (f": {detail.splitlines()[0][:150]}" if detail else "")
        raise CheckpointError(f"{path}: not a checkpoint (unpickling failed: {reason})") from e


def tensor(path, sd, key, shape):
    """sd[key], checked to be a tensor of `shape`."""
    if key not in sd:
        raise CheckpointError(f"{path}: missing key {key!r}")
    t = sd[key]
    if not isinstance(t, torch.Tensor):
        raise CheckpointError(f"{path}: key {key!r} holds a {type(t).__name__}, not a tensor")
    if t.shape != shape:
        raise CheckpointError(f"{path}: key {key!r} has shape {list(t.shape)}, expected "
                              f"{list(shape)}")
    return t


def remap(path, sd, key_map, expected):
    """{our key: tensor} from a file's state_dict `sd`; key_map is {our key: file key}, expected
    {our key: shape}. Every expected key must be there with its shape and every key of sd must be
    used (bar HARMLESS buffers); errors name the first offender as the file spells it."""
    out = {ours: tensor(path, sd, key_map[ours], shape) for ours, shape in expected.items()}
    used = set(key_map.values())
    for key in sd:
        if key not in used and key.rsplit(".", 1)[-1] not in HARMLESS:
            raise CheckpointError(f"{path}: unexpected key {key!r}")
    return out


def foreign_names(fmt, size):
    """{our module or key: the file's} for one foreign layout (facts §2.6, §2.7; amdegroot's
    ssd.py uses our own names). A parameter keeps its suffix unless its full key is listed."""
    levels = len(GEOMETRY[size]["feature_maps"])
    extras = range(2 * (levels - 2))  # a 1x1 then a 3x3 conv per extra level
    if fmt == "torchvision":  # features = vgg[:23]; extra.0 = pool4, conv5_x, (pool5, fc6, fc7)
        m = {f"vgg.{i}": f"backbone.features.{i}" for i in VGG_CONVS[:10]}
        m.update({"vgg.24": "backbone.extra.0.1", "vgg.26": "backbone.extra.0.3",
                  "vgg.28": "backbone.extra.0.5", f"vgg.{CONV6}": "backbone.extra.0.7.1",
                  f"vgg.{CONV7}": "backbone.extra.0.7.3", "l2norm.weight": "backbone.scale_weight"})
        m.update({f"extras.{j}": f"backbone.extra.{j // 2 + 1}.{2 * (j % 2)}" for j in extras})
        heads = "head.classification_head.module_list.{}", "head.regression_head.module_list.{}"
    elif fmt == "amdegroot":
        m = {f"vgg.{i}": f"vgg.{i}" for i in VGG_CONVS + [CONV6, CONV7]}
        m.update({f"extras.{j}": f"extras.{j}" for j in extras})
        m["l2norm.weight"] = "L2Norm.weight"
        heads = "conf.{}", "loc.{}"
    else:  # mmdetection v2.14+: SSDVGG backbone, SSDNeck, SSDHead
        m = {f"vgg.{i}": f"backbone.features.{i}" for i in VGG_CONVS + [CONV6, CONV7]}
        m.update({f"extras.{j}": f"neck.extra_layers.{j // 2}.{j % 2}.conv" for j in extras})
        m["l2norm.weight"] = "neck.l2_norm.weight"
        heads = "bbox_head.cls_convs.{}.0", "bbox_head.reg_convs.{}.0"
    for i in range(levels):
        m[f"cls_heads.{i}"], m[f"box_heads.{i}"] = heads[0].format(i), heads[1].format(i)
    return m


def infer_layout(path, sd, fmt):
    """(size, width, num_classes) of a foreign detector: 6 class heads mean SSD300, 7 SSD512;
    width is conv1_1's filters / 64; the first head has 4 anchors x (C+1) outputs."""
    names = foreign_names(fmt, 512)  # names every head either size can have
    head_key = lambda i: f"{names[f'cls_heads.{i}']}.weight"  # noqa: E731
    levels = 0
    while levels < 7 and head_key(levels) in sd:
        levels += 1
    if levels not in (6, 7):
        pattern = head_key(0).replace(".0.", ".N.", 1)
        raise CheckpointError(f"{path}: {levels} class heads ({pattern}), expected 6 (SSD300) or "
                              "7 (SSD512)")
    conv1_key = names["vgg.0"] + ".weight"
    if conv1_key not in sd:
        raise CheckpointError(f"{path}: missing key {conv1_key!r}")
    outputs = sd[head_key(0)].shape[0]
    if outputs % 4 or outputs < 8:
        raise CheckpointError(f"{path}: key {head_key(0)!r} has {outputs} outputs, not 4 anchors x "
                              "(classes + 1)")
    return {6: 300, 7: 512}[levels], sd[conv1_key].shape[0] / 64, outputs // 4 - 1


def foreign_config(path, sd, fmt, meta):
    """Our config for a foreign detector: its anchors, clipping, input mean and class names."""
    size, width, nc = infer_layout(path, sd, fmt)
    if fmt == "torchvision":
        if size != 300:
            raise CheckpointError(f"{path}: a torchvision SSD512 layout; only ssd300_vgg16 is read")
        if nc != 90:
            return make_config(300, nc, anchors="coco", clip="wh", width=width,
                               mean=TORCHVISION_MEAN)
        # 91 outputs indexed by raw COCO category id; the 10 unused ids are named "N/A"
        names = [COCO_CLASSES[COCO_CATEGORY_IDS.index(i)] if i in COCO_CATEGORY_IDS else "N/A"
                 for i in range(1, 91)]
        config = make_config(300, 90, anchors="coco", clip="wh", width=width, class_names=names,
                             mean=TORCHVISION_MEAN)
        config["category_ids"] = list(range(1, 91))  # label -> COCO category id
        return config
    if fmt == "amdegroot":  # clamps cx, cy, w, h of its priors; COCO config says 201 classes
        if nc == 200:
            warnings.warn(f"{path}: 201 class outputs (amdegroot's COCO config bug, meant 81); "
                          "loaded with COCO anchors and generic class names")
        return make_config(size, nc, anchors="coco" if nc in (80, 200) else "voc", clip="all",
                           width=width)
    if nc not in (20, 80):
        warnings.warn(f"{path}: {nc} classes, neither VOC (20) nor COCO (80): using VOC anchor "
                      "sizes")
    names = (meta or {}).get("CLASSES") or (meta or {}).get("dataset_meta", {}).get("classes")
    names = list(names) if names is not None and len(names) == nc else None
    return make_config(size, nc, anchors="coco" if nc == 80 else "voc", clip="none", width=width,
                       class_names=names, mean=MMDET_MEAN)


def background_first(t, num_classes):
    """A class head's weight or bias with each anchor's C+1 channels rotated so background, last in
    mmdetection v2+ (channel a*(C+1) + C), comes first as ours (channel a*(C+1))."""
    per_anchor = t.reshape(-1, num_classes + 1, *t.shape[1:])  # [A, C+1, ...]
    return per_anchor.roll(1, dims=1).reshape(t.shape)


def load_model(path, device="cpu"):
    """An SSD in eval mode from our checkpoint or a foreign detector file, the format told by the
    keys: ours {"model", "config", ...}; torchvision ssd300_vgg16 (backbone.features.N, ...);
    amdegroot ssd.pytorch (vgg.N, L2Norm.weight, extras.N, loc.N, conf.N); mmdetection v2.14+
    {"state_dict", "meta"}. Raises CheckpointError naming the file and the first bad key."""
    path = str(path)
    obj = read_weights(path)
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: unrecognised format (a {type(obj).__name__}, not a dict)")
    if "model" in obj and "config" in obj:
        try:
            model = build_model(obj["config"])
        except (AssertionError, KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"{path}: bad config ({type(e).__name__}: {e})") from e
        sd = strip_prefixes(obj["model"]) if isinstance(obj["model"], dict) else {}
        fmt = "ours"
    else:
        sd = obj.get("state_dict", obj)  # mmdetection wraps it with "meta"
        sd = strip_prefixes(sd) if isinstance(sd, dict) else {}
        if "backbone.scale_weight" in sd:
            fmt = "torchvision"
        elif "L2Norm.weight" in sd:
            fmt = "amdegroot"
        elif "neck.l2_norm.weight" in sd:
            fmt = "mmdetection"
        elif "backbone.l2_norm.weight" in sd or "bbox_head.cls_convs.0.weight" in sd:
            raise CheckpointError(f"{path}: mmdetection SSD checkpoint from before v2.14; "
                                  "convert it with mmdetection's "
                                  "tools/model_converters/upgrade_ssd_version.py")
        elif "l2norm.weight" in sd:
            raise CheckpointError(f"{path}: a bare state_dict of this project's SSD without its "
                                  "config; save it with save_checkpoint(path, model=, config=)")
        else:
            first = list(sd or obj)[:5]
            raise CheckpointError(f"{path}: unrecognised format (first keys: {first})")
        model = build_model(foreign_config(path, sd, fmt, obj.get("meta")))
    expected = {k: v.shape for k, v in model.state_dict().items()}
    if fmt == "ours":
        key_map = {k: k for k in expected}
    else:
        names = foreign_names(fmt, model.config["size"])
        key_map = {k: names.get(k) or f"{names[k.rsplit('.', 1)[0]]}.{k.rsplit('.', 1)[1]}"
                   for k in expected}
    state = remap(path, sd, key_map, expected)
    if fmt == "mmdetection":
        for k in state:
            if k.startswith("cls_heads."):
                state[k] = background_first(state[k], model.config["num_classes"])
    model.load_state_dict(state)
    return model.to(device).eval()


def decimate_fc(fc6_weight, fc6_bias, fc7_weight, fc7_bias):
    """VGG16's fc6/fc7 as SSD's conv6/conv7 by subsampling (paper §3, facts §2.1). fc6 [4096,
    512*7*7] is a 7x7 conv on pool5 at stride 32: keep every 4th filter (4096 -> 1024) and taps 0,
    3, 6, which sit 96 px apart, the spacing of a 3x3 conv with dilation 6 on SSD's stride-16 pool5.
    fc7 [4096, 4096] is a 1x1 conv: every 4th filter and every 4th input channel."""
    conv6_w = fc6_weight.reshape(4096, 512, 7, 7)[::4, :, ::3, ::3]  # [1024, 512, 3, 3]
    conv7_w = fc7_weight.reshape(4096, 4096, 1, 1)[::4, ::4]  # [1024, 1024, 1, 1]
    return conv6_w, fc6_bias[::4], conv7_w, fc7_bias[::4]


def fold_normalisation(weight, bias, scale, mean, std, new_mean):
    """conv1_1 trained on (x / scale - mean) / std (x the 0-255 RGB image) rewritten for input
    x - new_mean: z = (x - new_mean) * k + shift with k = 1 / (scale * std), shift = (new_mean -
    scale * mean) * k, so W z + b = (W k) (x - new_mean) + (b + sum W shift). Exact away from the
    image border only: zero padding stands for x = new_mean here, for x = scale * mean there."""
    as64 = lambda v: torch.tensor(v, dtype=torch.float64).view(1, 3, 1, 1)  # noqa: E731
    k = 1 / (scale * as64(std))
    shift = (as64(new_mean) - scale * as64(mean)) * k
    w = weight.double()
    return (w * k).to(weight.dtype), (bias.double() + (w * shift).sum((1, 2, 3))).to(bias.dtype)


# input normalisation each VGG16 file was trained with: x (0-255 RGB) -> (x / scale - mean) / std
VGG_NORMALISATION = {
    "amdegroot": dict(scale=1.0, mean=MEAN, std=(1.0, 1.0, 1.0)),
    "caffe": dict(scale=1.0, mean=MMDET_MEAN, std=(1.0, 1.0, 1.0)),
    "torchvision": dict(scale=255.0, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)),
}


def load_backbone(model, path, source=None):
    """ImageNet VGG16 weights into model.vgg (train.py --pretrained); width 1.0 only. Reads
    amdegroot's vgg16_reducedfc.pth (keys 0.weight ... 33.bias, conv6/conv7 included), torchvision's
    vgg16 (features.N + classifier.0/3 = fc6/fc7, decimated into conv6/conv7) and mmdetection's
    vgg16_caffe-292e1171.pth (features.N like torchvision's, maybe classifier.*, maybe wrapped in
    {"state_dict"}). torchvision's and the caffe file share key names, so `source` ("torchvision" |
    "caffe") says which, else the file name does ("caffe" in it). conv1_1 is refitted to this
    model's input normalisation (config mean). Prints what it loaded and what kept its initial
    values; returns the model.vgg indices it loaded."""
    path = str(path)
    if source not in (None, "torchvision", "caffe"):
        raise ValueError("source must be 'torchvision' or 'caffe'")
    if model.config["width"] != 1.0:
        raise CheckpointError(f"{path}: VGG16 weights fit width 1.0, the model has width "
                              f"{model.config['width']}")
    obj = read_weights(path)
    sd = obj.get("state_dict", obj) if isinstance(obj, dict) else None  # mmcv wraps its files
    sd = strip_prefixes(sd) if isinstance(sd, dict) else {}
    if "0.weight" in sd:
        source, prefix = "amdegroot", ""
    elif "features.0.weight" in sd:
        prefix = "features."
        source = source or ("caffe" if "caffe" in os.path.basename(path).lower() else "torchvision")
    else:
        raise CheckpointError(f"{path}: unrecognised VGG16 format (first keys: {list(sd)[:5]})")
    expected = {k: v.shape for k, v in model.vgg.state_dict().items()}  # "0.weight", ...
    wanted = VGG_CONVS + [CONV6, CONV7] if f"{prefix}{CONV6}.weight" in sd else VGG_CONVS
    expected = {k: s for k, s in expected.items() if int(k.split(".")[0]) in wanted}
    fc = {k: v for k, v in sd.items() if k.startswith("classifier.")}  # fc6, fc7, fc8 (unused)
    state = remap(path, {k: v for k, v in sd.items() if k not in fc},
                  {k: prefix + k for k in expected}, expected)
    how = "from the file" if CONV6 in wanted else "left at their initial values"
    if CONV6 not in wanted and "classifier.0.weight" in fc:
        conv6_w, conv6_b, conv7_w, conv7_b = decimate_fc(
            tensor(path, fc, "classifier.0.weight", (4096, 512 * 7 * 7)),
            tensor(path, fc, "classifier.0.bias", (4096,)),
            tensor(path, fc, "classifier.3.weight", (4096, 4096)),
            tensor(path, fc, "classifier.3.bias", (4096,)))
        state.update({f"{CONV6}.weight": conv6_w, f"{CONV6}.bias": conv6_b,
                      f"{CONV7}.weight": conv7_w, f"{CONV7}.bias": conv7_b})
        how = "decimated from fc6/fc7"
    norm = VGG_NORMALISATION[source]
    state["0.weight"], state["0.bias"] = fold_normalisation(
        state["0.weight"], state["0.bias"], norm["scale"], norm["mean"], norm["std"],
        model.config["mean"])
    model.vgg.load_state_dict(state, strict=False)
    print(f"{path}: {source} VGG16 -> conv1_1..conv5_3 loaded, conv6/conv7 {how}")
    return sorted({int(k.split(".")[0]) for k in state})
