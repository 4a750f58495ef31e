"""SSD: Single Shot MultiBox Detector (Liu et al. 2016, arXiv 1512.02325): presets, network,
anchors, box coding, matching, loss, post-processing, inference (weights files: weights.py).
Boxes are xyxy: normalised to [0, 1] of the network input inside the model, pixels of the original
image at the edges (files, CLI, JSON). Label 0 is background, 1..C objects. Anchors are (cx, cy,
w, h), normalised."""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

import kernels

VOC_CLASSES = ("aeroplane bicycle bird boat bottle bus car cat chair cow diningtable dog horse "
               "motorbike person pottedplant sheep sofa train tvmonitor").split()
# The 80 COCO categories in ascending category id; label i (1..80) is COCO_CLASSES[i-1] and
# COCO_CATEGORY_IDS[i-1] (the instances json skips ids 12, 26, 29, 30, 45, 66, 68, 69, 71, 83).
COCO_CLASSES = (
    "person,bicycle,car,motorcycle,airplane,bus,train,truck,boat,traffic light,fire hydrant,"
    "stop sign,parking meter,bench,bird,cat,dog,horse,sheep,cow,elephant,bear,zebra,giraffe,"
    "backpack,umbrella,handbag,tie,suitcase,frisbee,skis,snowboard,sports ball,kite,baseball bat,"
    "baseball glove,skateboard,surfboard,tennis racket,bottle,wine glass,cup,fork,knife,spoon,bowl,"
    "banana,apple,sandwich,orange,broccoli,carrot,hot dog,pizza,donut,cake,chair,couch,"
    "potted plant,bed,dining table,toilet,tv,laptop,mouse,remote,keyboard,cell phone,microwave,"
    "oven,toaster,sink,refrigerator,book,clock,vase,scissors,teddy bear,hair drier,toothbrush"
).split(",")
COCO_CATEGORY_IDS = [i for i in range(1, 91) if i not in (12, 26, 29, 30, 45, 66, 68, 69, 71, 83)]

MEAN = (123.0, 117.0, 104.0)  # RGB, 0-255 scale: of the caffe-style VGG16 every SSD starts from

# -----------------------------------------------------------------------------------------------
# Presets (the paper, Sec. 2.2 and 3; Caffe examples/ssd/ssd_pascal.py and ssd_coco.py). Anchor
# sizes come from the Caffe/mmdetection integer-percentage rule.
# input size -> feature map sides, anchor steps (strides) and extra aspect ratios per level
GEOMETRY = {300: dict(feature_maps=[38, 19, 10, 5, 3, 1], steps=[8, 16, 32, 64, 100, 300],
                      ratios=[[2], [2, 3], [2, 3], [2, 3], [2], [2]]),
            512: dict(feature_maps=[64, 32, 16, 8, 4, 2, 1], steps=[8, 16, 32, 64, 128, 256, 512],
                      ratios=[[2], [2, 3], [2, 3], [2, 3], [2, 3], [2], [2]])}
# (size, dataset) -> (min_ratio %, first level min %, first level max %); max_ratio is 90 everywhere
SIZE_RULE = {(300, "voc"): (20, 10, 20), (300, "coco"): (15, 7, 15),
             (512, "voc"): (15, 7, 15), (512, "coco"): (10, 4, 10)}


def anchor_sizes(size, dataset):
    """Per-level (min_sizes, max_sizes) in pixels by the Caffe rule (ssd_pascal.py): percentage
    step floor((90 - min_ratio) / (levels - 2)), sizes truncated to int (PriorBox, mmdetection)."""
    min_ratio, first_min, first_max = SIZE_RULE[(size, dataset)]
    levels = len(GEOMETRY[size]["feature_maps"])
    step = (90 - min_ratio) // (levels - 2)
    ratios = range(min_ratio, 91, step)
    min_sizes = [size * first_min // 100] + [size * r // 100 for r in ratios]
    max_sizes = [size * first_max // 100] + [size * (r + step) // 100 for r in ratios]
    return min_sizes, max_sizes


def make_config(size, num_classes, anchors="voc", clip="none", width=1.0, class_names=None,
                mean=MEAN, norm="none"):
    """A model's plain-types config (checkpoints hold it); ValueError for a value out of range."""
    for name, value, allowed in (("size", size, (300, 512)), ("anchors", anchors, ("voc", "coco")),
                                 ("clip", clip, ("none", "wh", "all")),
                                 ("norm", norm, ("none", "bn"))):
        if value not in allowed:
            *most, last = map(repr, allowed)
            raise ValueError(f"{name} must be {', '.join(most)} or {last}, got {value!r}")
    if class_names is None:
        class_names = (VOC_CLASSES if num_classes == 20 else COCO_CLASSES if num_classes == 80
                       else [f"class{i}" for i in range(1, num_classes + 1)])
    if len(class_names) != num_classes:
        raise ValueError("need one class name per object class")
    return dict(size=size, width=float(width), num_classes=int(num_classes),
                class_names=list(class_names), anchors=anchors, clip=clip,
                mean=[float(m) for m in mean], norm=norm)


# -----------------------------------------------------------------------------------------------
# Network (the paper, Sec. 2.1 and Fig. 2; Caffe's ssd_pascal.py VGGNetBody and AddExtraLayers;
# torchvision's SSDFeatureExtractorVGG)

class L2Norm(nn.Module):
    """conv4_3's channel-wise L2 normalisation with a learned per-channel scale, init 20 (ParseNet;
    the paper, Sec. 3.1)."""

    def __init__(self, channels, scale=20.0, eps=1e-10):
        super().__init__()
        self.weight = nn.Parameter(torch.full((channels,), scale))
        self.eps = eps

    def forward(self, x):
        # in float32: under fp16 the sum of squares of 512 channels overflows
        norm = x.float().pow(2).sum(1, keepdim=True).sqrt() + self.eps  # [B, 1, H, W]
        return (x.float() / norm * self.weight.view(1, -1, 1, 1)).to(x.dtype)


class ConvBN(nn.Conv2d):
    """Conv then BatchNorm (norm "bn"; ScratchDet, DSOD); a Conv2d, keys gain `N.bn.*`."""

    def __init__(self, cin, cout, kernel_size, **kw):
        super().__init__(cin, cout, kernel_size, **kw)
        self.bn = nn.BatchNorm2d(cout)

    def forward(self, x):
        return self.bn(super().forward(x))


def vgg16_layers(c, conv=nn.Conv2d):
    """VGG16 cut for SSD, indexed as torchvision's vgg16().features (0-30), amdegroot's `vgg.N`,
    mmdetection's `features.N`: 22 conv4_3's ReLU (first source), 30 pool5 (3x3/s1), 31 conv6 (3x3,
    dilation 6), 33 conv7 (1x1), 34 its ReLU (second source). `c` scales channels to the width."""
    layers, cin = [], 3
    for v in [64, 64, "M", 128, 128, "M", 256, 256, 256, "C", 512, 512, 512, "M", 512, 512, 512]:
        if v in ("M", "C"):  # pool3 ("C") rounds up: 75 -> 38
            layers.append(nn.MaxPool2d(2, 2, ceil_mode=v == "C"))
        else:
            layers += [conv(cin, c(v), 3, padding=1), nn.ReLU(inplace=True)]
            cin = c(v)
    return layers + [nn.MaxPool2d(3, 1, padding=1),
                     conv(cin, c(1024), 3, padding=6, dilation=6), nn.ReLU(inplace=True),
                     conv(c(1024), c(1024), 1), nn.ReLU(inplace=True)]


def extra_layers(size, c, conv=nn.Conv2d):
    """Extra levels after conv7 (Caffe's AddExtraLayers): a 1x1 then a 3x3 conv each (ReLUs in
    SSD.features); SSD300 ends with two unpadded stride 1, SSD512 with a 4x4 pad-1 conv."""
    spec = [(1024, 256, 512, 3, 2, 1), (512, 128, 256, 3, 2, 1)]  # (in, mid, out, k, stride, pad)
    spec += [(256, 128, 256, 3, 1, 0)] * 2 if size == 300 else (
        [(256, 128, 256, 3, 2, 1)] * 2 + [(256, 128, 256, 4, 1, 1)])
    return [layer for cin, mid, cout, k, s, p in spec
            for layer in (conv(c(cin), c(mid), 1), conv(c(mid), c(cout), k, stride=s, padding=p))]


class SSD(nn.Module):
    """SSD300/SSD512 on VGG16. forward(x [B, 3, S, S] normalised) -> (cls_logits [B, A, C+1],
    box_deltas [B, A, 4]); anchor order: level, row, column, then the anchors of a location."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        size, nc = config["size"], config["num_classes"]
        c = lambda ch: max(1, int(round(ch * config["width"])))  # noqa: E731  (width multiplier)
        conv = ConvBN if config.get("norm", "none") == "bn" else nn.Conv2d  # none: older configs
        self.vgg = nn.ModuleList(vgg16_layers(c, conv))
        self.l2norm = L2Norm(c(512))
        self.extras = nn.ModuleList(extra_layers(size, c, conv))
        channels = [c(512), c(1024)] + [m.out_channels for m in self.extras[1::2]]
        per_location = [2 + 2 * len(r) for r in GEOMETRY[size]["ratios"]]  # 4 or 6
        self.cls_heads = nn.ModuleList(nn.Conv2d(ch, k * (nc + 1), 3, padding=1)
                                       for ch, k in zip(channels, per_location))
        self.box_heads = nn.ModuleList(nn.Conv2d(ch, k * 4, 3, padding=1)
                                       for ch, k in zip(channels, per_location))
        self.register_buffer("anchors", anchors(config), persistent=False)  # [A, 4] cx,cy,w,h
        for m in self.modules():
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
        cls, box, k1 = [], [], self.config["num_classes"] + 1
        for f, cls_head, box_head in zip(self.features(x), self.cls_heads, self.box_heads):
            # channel = anchor * K + k: NCHW -> NHWC -> [B, H*W*anchors, K] keeps the anchor order
            cls.append(cls_head(f).permute(0, 2, 3, 1).reshape(f.shape[0], -1, k1))
            box.append(box_head(f).permute(0, 2, 3, 1).reshape(f.shape[0], -1, 4))
        return torch.cat(cls, 1), torch.cat(box, 1)  # [B, A, C+1], [B, A, 4]


build_model = SSD  # config -> SSD


def ssd300(num_classes, **preset):
    """SSD300 (8,732 anchors). preset: make_config's keywords (anchors, clip, width, class_names,
    mean, norm); torchvision's ssd300_vgg16 is ssd300(90, anchors="coco", clip="wh")."""
    return SSD(make_config(300, num_classes, **preset))


def ssd512(num_classes, **preset):
    """SSD512 (24,564 anchors); same presets as ssd300."""
    return SSD(make_config(512, num_classes, **preset))


# -----------------------------------------------------------------------------------------------
# Anchors: Caffe's PriorBox layer, torchvision's DefaultBoxGenerator

def anchors(config):
    """Default boxes [A, 4] as (cx, cy, w, h) normalised to the input, ordered by level, row (y),
    column (x), then [s, sqrt(s*s'), 2:1, 1:2, 3:1, 1:3] per location (Caffe's and torchvision's);
    centres (i + 0.5) * step / size. clip: "wh" clamps w, h to 1 (torchvision), "all" clamps all to
    [0, 1] (amdegroot), "none" (Caffe, mmdetection)."""
    size, geo = config["size"], GEOMETRY[config["size"]]
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
# Box coding (Caffe CENTER_SIZE with variances; torchvision BoxCoder(weights=(10, 10, 5, 5))):
# centre offsets in units of 0.1 * anchor size, log sizes in units of 0.2
VARIANCES = (0.1, 0.2)
LOG_SIZE_CLAMP = math.log(1000.0 / 16)  # torchvision's bound on exp() when decoding


def encode(boxes, anchors):
    """xyxy boxes [..., 4] -> regression targets [..., 4] against (cx, cy, w, h) anchors."""
    g = xyxy_to_cxcywh(boxes)
    return torch.cat([(g[..., :2] - anchors[..., :2]) / (VARIANCES[0] * anchors[..., 2:]),
                      torch.log(g[..., 2:] / anchors[..., 2:]) / VARIANCES[1]], -1)


def decode(deltas, anchors):
    """Regression outputs [..., 4] -> xyxy boxes [..., 4]; log sizes clamped at ln(1000/16)."""
    cxcy = anchors[..., :2] + deltas[..., :2] * VARIANCES[0] * anchors[..., 2:]
    wh = anchors[..., 2:] * torch.exp((deltas[..., 2:] * VARIANCES[1]).clamp(max=LOG_SIZE_CLAMP))
    return torch.cat([cxcy - wh / 2, cxcy + wh / 2], -1)


# -----------------------------------------------------------------------------------------------
# Matching (the paper, Sec. 2.2 "Matching strategy"; torchvision's SSDMatcher)

def _batched_iou(a, b):
    """IoU of xyxy boxes a [A, 4] with each image's boxes b [B, G, 4] -> [B, A, G]."""
    lt = torch.maximum(a[None, :, None, :2], b[:, None, :, :2])
    rb = torch.minimum(a[None, :, None, 2:], b[:, None, :, 2:])
    inter = (rb - lt).clamp(min=0).prod(-1)  # [B, A, G]
    area_a = (a[:, 2:] - a[:, :2]).prod(-1)  # [A]
    area_b = (b[..., 2:] - b[..., :2]).clamp(min=0).prod(-1)  # [B, G]
    union = area_a[None, :, None] + area_b[:, None, :] - inter
    return inter / union.clamp(min=1e-12)


def match(anchors, gt_boxes, gt_labels, iou_threshold=0.5):
    """Each anchor's class (0 = background) and regression target, batched over images: anchors
    [A, 4] (cx,cy,w,h), gt_boxes a list of [n_i, 4] xyxy in [0, 1], gt_labels a list of int64 [n_i]
    in 1..C -> cls_targets int64 [B, A], box_targets [B, A, 4] (zeros where background). An anchor
    takes its best box if IoU >= 0.5; then every box takes its best anchor whatever the IoU, the
    later box winning a shared one (mmdetection, torchvision, amdegroot); a box with IoU 0 to every
    anchor (zero area) forces nothing, as in Caffe (the others give it anchor 0)."""
    device, g = anchors.device, max([len(b) for b in gt_boxes] + [1])
    boxes = torch.zeros(len(gt_boxes), g, 4, device=device)  # [B, G, 4] padded
    labels = torch.zeros(len(gt_boxes), g, dtype=torch.int64, device=device)  # [B, G] 0: padding
    for i, (b, lab) in enumerate(zip(gt_boxes, gt_labels)):
        boxes[i, :len(b)] = b.to(device, torch.float32)
        labels[i, :len(b)] = lab.to(device)
    valid = labels > 0  # [B, G]
    iou = _batched_iou(cxcywh_to_xyxy(anchors), boxes)  # [B, A, G]
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
# Loss (the paper, Sec. 2.2 "Training objective" and "Hard negative mining"; Caffe MultiBoxLoss)

def multibox_loss(cls_logits, box_deltas, anchors, gt_boxes, gt_labels, neg_pos_ratio=3):
    """{"loss_cls", "loss_box"}: softmax cross-entropy over the positives and the hardest negatives
    (by cross-entropy, at most 3 per positive in each image), smooth L1 (beta 1) on the positives'
    box deltas, both sums over max(1, positives in the batch); in float32 even under autocast."""
    with torch.autocast(cls_logits.device.type, enabled=False):
        cls_logits, box_deltas = cls_logits.float(), box_deltas.float()
        with torch.no_grad():
            cls_t, box_t = match(anchors.float(), gt_boxes, gt_labels)  # [B, A], [B, A, 4]
        pos = cls_t > 0  # [B, A]
        num_pos = pos.sum(1, keepdim=True)  # [B, 1]
        ce = F.cross_entropy(cls_logits.flatten(0, 1), cls_t.flatten(), reduction="none")
        ce = ce.view_as(cls_t)  # [B, A]
        with torch.no_grad():
            # rank negatives by loss, positives last; stable: equal losses keep the anchor order
            neg_ce = ce.detach().masked_fill(pos, -math.inf)
            rank = neg_ce.sort(dim=1, descending=True, stable=True)[1].argsort(1)  # [B, A]
            hard_neg = (rank < neg_pos_ratio * num_pos) & ~pos
        n = num_pos.sum().clamp(min=1).float()
        loss_cls = ce[pos | hard_neg].sum() / n
        loss_box = F.smooth_l1_loss(box_deltas[pos], box_t[pos], beta=1.0, reduction="sum") / n
    return {"loss_cls": loss_cls, "loss_box": loss_box}


# -----------------------------------------------------------------------------------------------
# Post-processing: Caffe DetectionOutput (confidence 0.01, top_k 400, NMS IoU 0.45, keep_top_k 200)

def postprocess(cls_logits, box_deltas, anchors, image_sizes, score_thr=0.01, nms_iou=0.45,
                topk=400, max_det=200, nms="hard"):
    """Detections per image from raw outputs (Caffe's DetectionOutput, torchvision's SSD.
    postprocess_detections), no Python loop over images or classes: softmax; scores > score_thr,
    at most `topk` per class and image; class-aware NMS (IoU > nms_iou suppresses; nms="soft":
    Gaussian soft-NMS, decayed scores); the best `max_det` per image; boxes clipped to the input,
    scaled to image_sizes [(width, height)]. Returns [(boxes [k, 4] xyxy pixels, scores [k], labels
    int64 [k] in 1..C)] by decreasing score; equal scores keep the lower anchor (then class) first,
    also for a class's top-k."""
    if nms not in ("hard", "soft"):
        raise ValueError(f"nms must be 'hard' or 'soft', got {nms!r}")
    if topk < 1 or max_det < 1:
        raise ValueError(f"topk and max_det must be at least 1, got {topk} and {max_det}")
    args = box_deltas, anchors, image_sizes, nms_iou, max_det, nms
    if (found := _postprocess_fast(cls_logits.float(), score_thr, topk, *args)) is not None:
        return found
    scores = F.softmax(cls_logits.float(), -1)[..., 1:]  # [B, A, C]
    img_idx, anchor_idx, cls_idx = _top_k_per_class(scores, score_thr, topk)  # each [N]
    return _nms_and_scale(scores[img_idx, anchor_idx, cls_idx], img_idx, anchor_idx, cls_idx,
                          scores.shape[2], *args)


def _top_k_per_class(scores, score_thr, topk):
    """(image, anchor, class) indices [N] each, in that order, of the scores [B, A, C] > score_thr
    among their (image, class)'s best `topk`; at a tie on the cut the lower anchors go in."""
    passed = scores > score_thr  # [B, A, C]
    if passed.sum(1, dtype=torch.int32).max() <= topk:  # int32: faster than int64 here
        return passed.nonzero(as_tuple=True)
    # e.g. an untrained model's flat softmax: the best `topk` anchors of each (image, class)
    cut = scores.topk(min(topk, scores.shape[1]), dim=1).values[:, -1:]  # [B, 1, C]
    above = scores > cut  # [B, A, C] surely in the top-k
    free = topk - above.sum(1, keepdim=True)  # [B, 1, C] places left for scores == cut
    chosen = above & passed
    tied = (scores == cut) & passed  # [B, A, C]
    if bool(tied.any()):
        chosen |= tied & (tied.cumsum(1) <= free)
    return chosen.nonzero(as_tuple=True)


def _nms_and_scale(cand_scores, img_idx, anchor_idx, cls_idx, num_classes, box_deltas, anchors,
                   image_sizes, nms_iou, max_det, nms):
    """postprocess's last steps (decode, NMS, best max_det, pixels) on candidates given as (score,
    image, anchor, 0-based class) [N] each, in (image, anchor, class) order."""
    cand_boxes = decode(box_deltas[img_idx, anchor_idx].float(),
                        anchors[anchor_idx].float()).clamp(0.0, 1.0)  # [N, 4]
    group = img_idx * num_classes + cls_idx  # NMS within one class of one image
    if nms == "soft":
        kept, kept_scores = kernels.soft_nms(cand_boxes, cand_scores, group, iou_threshold=nms_iou)
    else:
        kept = kernels.batched_nms(cand_boxes, cand_scores, group, nms_iou)
        kept_scores = cand_scores[kept]
    by_img = slice(0, max_det)  # one image (the usual call from detect.py): a plain cut, no sort
    if len(image_sizes) > 1:  # a stable sort by image keeps kept's score order in each
        by_img = img_idx[kept].sort(stable=True).indices
        by_img = by_img[_rank_in_group(img_idx[kept[by_img]], len(image_sizes)) < max_det]
    kept, kept_scores = kept[by_img], kept_scores[by_img]
    return _scale_to_pixels(cand_boxes[kept], kept_scores, cls_idx[kept] + 1, img_idx[kept],
                            image_sizes)


def _rank_in_group(sorted_keys, num_groups):
    """Each entry's rank among those of its key (0 first): sorted_keys [N] int64 ascending."""
    n = _counts(sorted_keys, num_groups)  # [num_groups]
    first = (n.cumsum(0) - n)[sorted_keys]  # [N] index of the key's first entry
    return torch.arange(len(sorted_keys), device=sorted_keys.device) - first


def _scale_to_pixels(boxes, scores, labels, img, image_sizes):
    """Detections [K] sorted by image -> (boxes in original pixels, scores, labels) per image."""
    scale = torch.tensor([[w, h, w, h] for w, h in image_sizes], dtype=torch.float32)  # [B, 4]
    scale = scale.to(boxes.device, non_blocking=True)  # a blocking copy would wait for the GPU
    if len(image_sizes) == 1:
        return [(boxes * scale, scores, labels)]
    sizes = _counts(img, len(image_sizes)).tolist()  # the one host sync of this step
    return list(zip((boxes * scale[img]).split(sizes), scores.split(sizes), labels.split(sizes)))


# -----------------------------------------------------------------------------------------------
# Post-processing, fast paths (bench.py postprocess): the same detections from fewer candidates

def _postprocess_fast(logits, score_thr, topk, box_deltas, anchors, image_sizes, nms_iou,
                      max_det, nms):
    """postprocess's answer from fewer candidates: those near score_thr (a trained model) or the
    best first (_best_first, an untrained one); None where neither shortcut applies."""
    b, a, c = logits[..., 1:].shape  # logits [B, A, C+1] float32
    args = box_deltas, anchors, image_sizes, nms_iou, max_det, nms
    if score_thr > 0:
        # A probability is exp(x - max) / sum with sum >= 1, so a class passes only if its logit
        # is within ln(score_thr) of the anchor's top logit; the 0.01 margin dwarfs exp's rounding.
        best_fg = _last_dim_max(logits[..., 1:])  # [B, A]
        near = best_fg - torch.maximum(best_fg, logits[..., 0]) > math.log(score_thr) - 0.01
        img_near, anchor_near = near.nonzero(as_tuple=True)  # each [R]
        if len(img_near) * 4 <= b * a:
            # a softmax row does not depend on the other rows: same values as the full softmax
            probs = F.softmax(logits[img_near, anchor_near], -1)[:, 1:]  # [R, C]
            row, cls_idx = (probs > score_thr).nonzero(as_tuple=True)  # each [N]
            img_idx, anchor_idx = img_near[row], anchor_near[row]  # (image, anchor, class) order
            if _counts(img_idx * c + cls_idx, b * c).max() <= topk:
                # no class needs its top-k cut: every candidate goes to the NMS
                return _nms_and_scale(probs[row, cls_idx], img_idx, anchor_idx, cls_idx, c, *args)
    if nms == "hard" and max_det < topk * c:
        return _best_first(F.softmax(logits, -1)[..., 1:], score_thr, topk, *args[:-1])
    return None


def _best_first(scores, score_thr, topk, box_deltas, anchors, image_sizes, nms_iou, max_det):
    """postprocess with hard NMS when many candidates pass (up to topk * C per image) but only
    max_det are wanted: each image's candidates above a score v (at least 4 * max_det anchors have
    a class above it) go best first through kernels.nms_rows, which stops at max_det kept. Exact
    when max_det are kept or v <= score_thr in every image, else None (the NMS on every one)."""
    b, a, c = scores.shape
    v = _last_dim_max(scores).topk(min(4 * max_det, a), dim=1).values[:, -1]  # [B]
    cut = v.clamp(min=score_thr).view(b, 1, 1)  # [B, 1, 1]
    img_idx, anchor_idx, cls_idx = (scores > cut).nonzero(as_tuple=True)  # [N]
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
    rank[by_group] = _rank_in_group(group[by_group], b * c)
    order = order[rank < topk]
    img_idx, anchor_idx, cls_idx = img_idx[order], anchor_idx[order], cls_idx[order]
    boxes = decode(box_deltas[img_idx, anchor_idx].float(), anchors[anchor_idx].float())
    boxes = boxes.clamp(0.0, 1.0)  # [N, 4]
    # one row per image, padded: at [B, n] holds the candidates' positions, -1 in the padding
    col = _rank_in_group(img_idx, b)  # [N]
    at = torch.full((b, int(col.max()) + 1 if len(order) else 0), -1, device=scores.device)
    at[img_idx, col] = torch.arange(len(order), device=scores.device)
    keep = kernels.nms_rows(boxes[at], cls_idx[at], at >= 0, nms_iou, max_det)  # [B, n]
    if not bool(((keep.sum(1) >= max_det) | (v <= score_thr)).all()):
        return None  # some image's first candidates were too few
    i = at[keep & (keep.cumsum(1) <= max_det)]  # image by image, by decreasing score
    return _scale_to_pixels(boxes[i], cand_scores[order[i]], cls_idx[i] + 1, img_idx[i],
                            image_sizes)


def _last_dim_max(x):
    """x.amax(-1), by halving: torch's reduction over short rows (21 or 91 classes) is 1.5-2x
    slower on CPU than these few elementwise maxima (bench.py postprocess)."""
    while x.shape[-1] > 1:
        half = (x.shape[-1] + 1) // 2
        x = torch.maximum(x[..., :half], x[..., -half:])  # the halves overlap when odd: harmless
    return x[..., 0]


def _counts(keys, num_groups):
    """torch.bincount(keys, minlength=num_groups) for keys [N] int64 in 0..num_groups-1, without
    its two host synchronisations on CUDA (it reads the keys' min and max); as fast on the CPU."""
    return keys.new_zeros(num_groups).scatter_add_(0, keys, torch.ones_like(keys))


# -----------------------------------------------------------------------------------------------
# Inference on images

def preprocess(images, size, mean=MEAN, device=None):
    """uint8 RGB images [3, H, W] of any sizes -> float [B, 3, S, S] on `device` (default: the
    first image's), warped bilinearly (as torchvision; aspect not kept, as in training) minus the
    mean. Images of one size go as uint8 in one copy and one interpolate, values as if alone."""
    device = torch.device(device or images[0].device)
    m = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1).to(device, non_blocking=True)
    groups = {}
    for i, im in enumerate(images):
        groups.setdefault(tuple(im.shape), []).append(i)

    def stacked(ims):  # [n, 3, H, W]; CPU -> GPU via page-locked memory: an asynchronous DMA copy
        pin = device.type == "cuda" and ims[0].device.type == "cpu"
        out = torch.empty((len(ims), *ims[0].shape), dtype=ims[0].dtype, device=ims[0].device,
                          pin_memory=pin)
        return torch.stack(ims, out=out).to(device, non_blocking=True)
    x = [F.interpolate(stacked([images[i] for i in idx]).float(), size=(size, size),
                       mode="bilinear", align_corners=False) - m
         for idx in groups.values()]  # [n, 3, S, S] per size
    if len(x) == 1:
        return x[0]
    order = torch.tensor([i for idx in groups.values() for i in idx]).argsort()
    return torch.cat(x)[order.to(device, non_blocking=True)]  # [B, 3, S, S] in the callers' order


@torch.no_grad()
def detect(model, images, bf16=False, **postprocess_options):
    """Detections for uint8 RGB images [3, H, W] (any sizes) in their original pixels: a list of
    (boxes [k, 4] xyxy, scores [k], labels [k]) on the CPU. Runs on the model's device and makes
    the model channels_last; bf16=True: the forward under torch.autocast in bfloat16 (CUDA or CPU),
    the postprocess in float32."""
    device = next(model.parameters()).device
    # channels_last is faster on CPU (1.1-1.3x, bench.py) and GPU; convert the weights once
    if not model.vgg[0].weight.is_contiguous(memory_format=torch.channels_last):
        model.to(memory_format=torch.channels_last)
    x = preprocess(images, model.config["size"], model.config["mean"], device)
    with torch.autocast(device.type, torch.bfloat16, enabled=bf16):
        cls_logits, box_deltas = model(x.contiguous(memory_format=torch.channels_last))
    sizes = [(im.shape[2], im.shape[1]) for im in images]
    dets = postprocess(cls_logits.float(), box_deltas.float(), model.anchors, sizes,
                       **postprocess_options)
    # to the host as one copy per field, not one per image and field (each copy waits for the GPU)
    n = [len(d[1]) for d in dets]
    return list(zip(*(torch.cat(field).cpu().split(n) for field in zip(*dets))))
