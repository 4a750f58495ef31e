"""Weights files: our checkpoints (written by save_checkpoint, read by load_model), whole SSD
detectors of other projects (torchvision, amdegroot's ssd.pytorch, mmdetection) and ImageNet VGG16
backbones for train.py --pretrained.

Every file is read with torch.load(weights_only=True) (read_weights) and mapped key by key, like
nanoGPT's from_pretrained: each weight the model needs must be in the file under the mapped name
with the same shape, and nothing in the file may be left over; otherwise CheckpointError names the
file and the first offending key. Files are written atomically (write_atomic), which the scripts
use for their JSON and text outputs too.
"""
import os
import re
import warnings

import torch

import ssd

# -----------------------------------------------------------------------------------------------
# Our checkpoints, and what every reader shares

class CheckpointError(ValueError):
    """A weights file we cannot use. The message starts with the file's path, then the reason."""


_NOT_LEARNED = ("num_batches_tracked", "anchors", "priors")  # buffers, no learned weights


def _strip_prefixes(state_dict):
    """Keys without the `module.` (DataParallel / DDP) and `_orig_mod.` (torch.compile) prefixes."""
    out = {}
    for key, value in state_dict.items():
        while key.startswith(("module.", "_orig_mod.")):
            key = key.split(".", 1)[1]
        out[key] = value
    return out


def write_atomic(path, write, mode="w"):
    """Call write(f) on a temporary file beside `path`, flush it to disk, then rename it over
    `path`: a crash leaves the old file or the new one, never half of one."""
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"  # the permissions of a plain open(), unlike mkstemp's 0600
    try:
        with open(tmp, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def save_checkpoint(path, **fields):
    """torch.save({"model": state_dict, "config": ..., **rest}) atomically (write_atomic). `model`
    may be a state_dict or an SSD (then its config is used unless `config` is given)."""
    model = fields.get("model")
    if isinstance(model, torch.nn.Module):
        fields.setdefault("config", getattr(model, "config", None))
        model = model.state_dict()
    if not isinstance(model, dict) or not isinstance(fields.get("config"), dict):
        raise ValueError("save_checkpoint needs model= (state_dict or SSD) and config= (dict)")
    fields["model"] = _strip_prefixes(model)
    write_atomic(path, lambda f: torch.save(fields, f), mode="wb")


def read_weights(path):
    """torch.load(path, weights_only=True) onto the CPU; every failure becomes a CheckpointError."""
    path = str(path)
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: {'not a file' if os.path.exists(path) else 'no such file'}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # damaged files raise many types (zip, EOF, pickle, KeyError...)
        refused = re.search(r"Unsupported global: GLOBAL (\S+)", str(e))
        if refused:  # e.g. a whole nn.Module saved with torch.save(model, path)
            raise CheckpointError(
                f"{path}: holds Python objects other than tensors and plain containers ("
                f"{refused[1]}); not loaded, for safety (weights_only). Save the weights alone: "
                "torch.save(model.state_dict(), path) or weights.save_checkpoint") from e
        with open(path, "rb") as f:
            head = f.read(2)
        if head != b"PK" and head[:1] != b"\x80":  # torch.save's zip, the legacy format's pickle
            what = "an empty file" if not head else "not the zip or pickle torch.save writes"
            raise CheckpointError(f"{path}: not a checkpoint: not a PyTorch file ({what})") from e
        detail = str(e).split("WeightsUnpickler error:")[-1].strip()
        reason = type(e).__name__ + (f": {detail.splitlines()[0][:150]}" if detail else "")
        raise CheckpointError(f"{path}: not a checkpoint (a damaged PyTorch file: {reason})") from e


def _weight_of(path, sd, key, shape):
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


def _remap(path, sd, key_map, expected):
    """{our key: tensor} from a file's state_dict `sd`; key_map is {our key: file key}, expected
    {our key: shape}. Every expected key must be there with its shape and every key of sd must be
    used (bar buffers that hold no learned weights); errors name the first offender as the file
    spells it."""
    out = {ours: _weight_of(path, sd, key_map[ours], shape) for ours, shape in expected.items()}
    used = set(key_map.values())
    for key in sd:
        if key not in used and key.rsplit(".", 1)[-1] not in _NOT_LEARNED:
            raise CheckpointError(f"{path}: unexpected key {key!r}")
    return out


def _from_checkpoint(path, obj):
    """The SSD stored in `obj`, our checkpoint {"model": state_dict, "config": dict, ...} read
    from `path` (named in errors)."""
    if not (isinstance(obj, dict) and isinstance(obj.get("model"), dict)
            and isinstance(obj.get("config"), dict)):
        raise CheckpointError(f"{path}: not one of our checkpoints (no 'model' and 'config')")
    try:
        model = ssd.build_model(obj["config"])
    except (AssertionError, KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: bad config ({type(e).__name__}: {e})") from e
    expected = {k: v.shape for k, v in model.state_dict().items()}
    model.load_state_dict(_remap(path, _strip_prefixes(obj["model"]), {k: k for k in expected},
                                 expected))
    return model


# -----------------------------------------------------------------------------------------------
# Other projects' detectors and backbones

_VGG_CONVS = [0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28]  # conv1_1 ... conv5_3 in model.vgg
_CONV6, _CONV7 = 31, 33  # fc6 and fc7 as convolutions
_TORCHVISION_MEAN = tuple(255 * m for m in (0.48235, 0.45882, 0.40784))  # (x/255 - m)*255
# mmdetection configs/ssd/ssd300_coco.py: RGB input, this mean, std 1
_MMDET_MEAN = (123.675, 116.28, 103.53)


def _foreign_names(fmt, size):
    """{our module or key: the file's} for one foreign layout: torchvision's ssd300_vgg16 module
    tree, mmdetection's tools/model_converters/upgrade_ssd_version.py names (v2.14+), amdegroot's
    ssd.py (our own names). A parameter keeps its suffix unless its full key is listed."""
    levels = len(ssd.GEOMETRY[size]["feature_maps"])
    extras = range(2 * (levels - 2))  # a 1x1 then a 3x3 conv per extra level
    if fmt == "torchvision":  # features = vgg[:23]; extra.0 = pool4, conv5_x, (pool5, fc6, fc7)
        m = {f"vgg.{i}": f"backbone.features.{i}" for i in _VGG_CONVS[:10]}
        m.update({"vgg.24": "backbone.extra.0.1", "vgg.26": "backbone.extra.0.3",
                  "vgg.28": "backbone.extra.0.5", f"vgg.{_CONV6}": "backbone.extra.0.7.1",
                  f"vgg.{_CONV7}": "backbone.extra.0.7.3",
                  "l2norm.weight": "backbone.scale_weight"})
        m.update({f"extras.{j}": f"backbone.extra.{j // 2 + 1}.{2 * (j % 2)}" for j in extras})
        heads = "head.classification_head.module_list.{}", "head.regression_head.module_list.{}"
    elif fmt == "amdegroot":
        m = {f"vgg.{i}": f"vgg.{i}" for i in _VGG_CONVS + [_CONV6, _CONV7]}
        m.update({f"extras.{j}": f"extras.{j}" for j in extras})
        m["l2norm.weight"] = "L2Norm.weight"
        heads = "conf.{}", "loc.{}"
    else:  # mmdetection v2.14+: SSDVGG backbone, SSDNeck, SSDHead
        m = {f"vgg.{i}": f"backbone.features.{i}" for i in _VGG_CONVS + [_CONV6, _CONV7]}
        m.update({f"extras.{j}": f"neck.extra_layers.{j // 2}.{j % 2}.conv" for j in extras})
        m["l2norm.weight"] = "neck.l2_norm.weight"
        heads = "bbox_head.cls_convs.{}.0", "bbox_head.reg_convs.{}.0"
    for i in range(levels):
        m[f"cls_heads.{i}"], m[f"box_heads.{i}"] = heads[0].format(i), heads[1].format(i)
    return m


def _infer_layout(path, sd, fmt):
    """(size, width, num_classes) of a foreign detector: 6 class heads mean SSD300, 7 SSD512;
    width is conv1_1's filters / 64; the first head has 4 anchors x (C+1) outputs."""
    names = _foreign_names(fmt, 512)  # names every head either size can have
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


def _foreign_config(path, sd, fmt, meta):
    """Our config for a foreign detector: its anchors, clipping, input mean and class names."""
    size, width, nc = _infer_layout(path, sd, fmt)
    if fmt == "torchvision":
        if size != 300:
            raise CheckpointError(f"{path}: a torchvision SSD512 layout; only ssd300_vgg16 is read")
        if nc != 90:
            return ssd.make_config(300, nc, anchors="coco", clip="wh", width=width,
                                   mean=_TORCHVISION_MEAN)
        # 91 outputs indexed by raw COCO category id; the 10 unused ids are named "N/A"
        ids = ssd.COCO_CATEGORY_IDS
        names = [ssd.COCO_CLASSES[ids.index(i)] if i in ids else "N/A" for i in range(1, 91)]
        config = ssd.make_config(300, 90, anchors="coco", clip="wh", width=width,
                                 class_names=names, mean=_TORCHVISION_MEAN)
        config["category_ids"] = list(range(1, 91))  # label -> COCO category id
        return config
    if fmt == "amdegroot":  # clamps cx, cy, w, h of its priors; COCO config says 201 classes
        if nc == 200:
            warnings.warn(f"{path}: 201 class outputs (amdegroot's COCO config bug, meant 81); "
                          "loaded with COCO anchors and generic class names")
        return ssd.make_config(size, nc, anchors="coco" if nc in (80, 200) else "voc",
                               clip="all", width=width)
    if nc not in (20, 80):
        warnings.warn(f"{path}: {nc} classes, neither VOC (20) nor COCO (80): using VOC anchor "
                      "sizes")
    names = (meta or {}).get("CLASSES") or (meta or {}).get("dataset_meta", {}).get("classes")
    names = list(names) if names is not None and len(names) == nc else None
    return ssd.make_config(size, nc, anchors="coco" if nc == 80 else "voc", clip="none",
                           width=width, class_names=names, mean=_MMDET_MEAN)


def _background_first(t, num_classes):
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
        return _from_checkpoint(path, obj).to(device).eval()
    sd = obj.get("state_dict", obj)  # mmdetection wraps it with "meta"
    sd = _strip_prefixes(sd) if isinstance(sd, dict) else {}
    if "backbone.scale_weight" in sd:
        fmt = "torchvision"
    elif "L2Norm.weight" in sd:
        fmt = "amdegroot"
    elif "neck.l2_norm.weight" in sd:
        fmt = "mmdetection"
    elif "backbone.l2_norm.weight" in sd or "bbox_head.cls_convs.0.weight" in sd:
        raise CheckpointError(f"{path}: mmdetection SSD checkpoint from before v2.14; convert it "
                              "with mmdetection's tools/model_converters/upgrade_ssd_version.py")
    elif "l2norm.weight" in sd:
        raise CheckpointError(f"{path}: a bare state_dict of this project's SSD without its "
                              "config; save it with save_checkpoint(path, model=, config=)")
    else:
        raise CheckpointError(f"{path}: unrecognised format (first keys: {list(sd or obj)[:5]})")
    model = ssd.build_model(_foreign_config(path, sd, fmt, obj.get("meta")))
    expected = {k: v.shape for k, v in model.state_dict().items()}
    names = _foreign_names(fmt, model.config["size"])
    key_map = {k: names.get(k) or f"{names[k.rsplit('.', 1)[0]]}.{k.rsplit('.', 1)[1]}"
               for k in expected}
    state = _remap(path, sd, key_map, expected)
    if fmt == "mmdetection":
        for k in state:
            if k.startswith("cls_heads."):
                state[k] = _background_first(state[k], model.config["num_classes"])
    model.load_state_dict(state)
    return model.to(device).eval()


def _decimate_fc(fc6_weight, fc6_bias, fc7_weight, fc7_bias):
    """VGG16's fc6/fc7 as SSD's conv6/conv7 by subsampling (the paper, Sec. 3 "Base network").
    fc6 [4096, 512*7*7] is a 7x7 conv on pool5 at stride 32: keep every 4th filter (4096 -> 1024)
    and taps 0, 3, 6, which sit 96 px apart, the spacing of a 3x3 conv with dilation 6 on SSD's
    stride-16 pool5. fc7 [4096, 4096] is a 1x1 conv: every 4th filter and every 4th input
    channel."""
    conv6_w = fc6_weight.reshape(4096, 512, 7, 7)[::4, :, ::3, ::3]  # [1024, 512, 3, 3]
    conv7_w = fc7_weight.reshape(4096, 4096, 1, 1)[::4, ::4]  # [1024, 1024, 1, 1]
    return conv6_w, fc6_bias[::4], conv7_w, fc7_bias[::4]


def _fold_normalisation(weight, bias, scale, mean, std, new_mean):
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
_VGG_NORMALISATION = {
    "amdegroot": dict(scale=1.0, mean=ssd.MEAN, std=(1.0, 1.0, 1.0)),
    "caffe": dict(scale=1.0, mean=_MMDET_MEAN, std=(1.0, 1.0, 1.0)),
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
    if model.config.get("norm", "none") != "none":
        raise CheckpointError(f"{path}: ImageNet VGG16 files have no BatchNorm layers; build the "
                              "model with norm 'none' (train.py --norm none) to load them")
    if model.config["width"] != 1.0:
        raise CheckpointError(f"{path}: VGG16 weights fit width 1.0, the model has width "
                              f"{model.config['width']}")
    obj = read_weights(path)
    sd = obj.get("state_dict", obj) if isinstance(obj, dict) else None  # mmcv wraps its files
    sd = _strip_prefixes(sd) if isinstance(sd, dict) else {}
    if "0.weight" in sd:
        source, prefix = "amdegroot", ""
    elif "features.0.weight" in sd:
        prefix = "features."
        source = source or ("caffe" if "caffe" in os.path.basename(path).lower() else "torchvision")
    else:
        raise CheckpointError(f"{path}: unrecognised VGG16 format (first keys: {list(sd)[:5]})")
    expected = {k: v.shape for k, v in model.vgg.state_dict().items()}  # "0.weight", ...
    wanted = _VGG_CONVS + [_CONV6, _CONV7] if f"{prefix}{_CONV6}.weight" in sd else _VGG_CONVS
    expected = {k: s for k, s in expected.items() if int(k.split(".")[0]) in wanted}
    fc = {k: v for k, v in sd.items() if k.startswith("classifier.")}  # fc6, fc7, fc8 (unused)
    state = _remap(path, {k: v for k, v in sd.items() if k not in fc},
                  {k: prefix + k for k in expected}, expected)
    how = "from the file" if _CONV6 in wanted else "left at their initial values"
    if _CONV6 not in wanted and "classifier.0.weight" in fc:
        conv6_w, conv6_b, conv7_w, conv7_b = _decimate_fc(
            _weight_of(path, fc, "classifier.0.weight", (4096, 512 * 7 * 7)),
            _weight_of(path, fc, "classifier.0.bias", (4096,)),
            _weight_of(path, fc, "classifier.3.weight", (4096, 4096)),
            _weight_of(path, fc, "classifier.3.bias", (4096,)))
        state.update({f"{_CONV6}.weight": conv6_w, f"{_CONV6}.bias": conv6_b,
                      f"{_CONV7}.weight": conv7_w, f"{_CONV7}.bias": conv7_b})
        how = "decimated from fc6/fc7"
    norm = _VGG_NORMALISATION[source]
    state["0.weight"], state["0.bias"] = _fold_normalisation(
        state["0.weight"], state["0.bias"], norm["scale"], norm["mean"], norm["std"],
        model.config["mean"])
    model.vgg.load_state_dict(state, strict=False)
    print(f"{path}: {source} VGG16 -> conv1_1..conv5_3 loaded, conv6/conv7 {how}")
    return sorted({int(k.split(".")[0]) for k in state})
