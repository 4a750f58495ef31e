"""Weights files: our checkpoints, other projects' SSDs (torchvision, amdegroot's ssd.pytorch,
mmdetection), ImageNet VGG16 backbones (train.py --pretrained). All are read with torch.load(
weights_only=True) and mapped key by key (nanoGPT's from_pretrained); write_atomic writes files."""
import os
import re
import warnings

import torch

import ssd


class CheckpointError(ValueError):
    """A weights file we cannot use. The message starts with the file's path, then the reason."""


def _strip_prefixes(sd):
    """Keys without `module.` (DDP) and `_orig_mod.` (torch.compile) prefixes; {} if not a dict."""
    return ({re.sub(r"^(module\.|_orig_mod\.)+", "", k): v for k, v in sd.items()}
            if isinstance(sd, dict) else {})


def write_atomic(path, write, mode="w"):
    """Call write(f) on a temporary file beside `path`, flush it to disk, then rename it over
    `path`: a crash leaves the old file or the new one, never half of one."""
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
        if refused := re.search(r"Unsupported global: GLOBAL (\S+)", str(e)):  # a whole nn.Module
            raise CheckpointError(
                f"{path}: holds Python objects other than tensors and plain containers ("
                f"{refused[1]}); not loaded, for safety (weights_only). Save the weights alone: "
                "torch.save(model.state_dict(), path) or weights.save_checkpoint") from e
        try:
            with open(path, "rb") as f:
                head = f.read(2)
        except OSError as err:  # permission denied, I/O error
            raise CheckpointError(f"{path}: cannot read ({err.strerror or err})") from e
        if head != b"PK" and head[:1] != b"\x80":  # torch.save's zip, the legacy format's pickle
            what = "an empty file" if not head else "not the zip or pickle torch.save writes"
            raise CheckpointError(f"{path}: not a checkpoint: not a PyTorch file ({what})") from e
        detail = str(e).split("WeightsUnpickler error:")[-1].strip()
        reason = type(e).__name__ + (f": {detail.splitlines()[0][:150]}" if detail else "")
        raise CheckpointError(f"{path}: not a checkpoint (a damaged PyTorch file: {reason})") from e


def _remap(path, sd, key_map, expected):
    """{our key: tensor} from a file's state_dict `sd` (key_map: {our key: file key} where they
    differ); each key of `expected` {our key: shape} must hold a tensor of that shape and each key
    of sd be used (bar weightless buffers). Errors name the first offender as the file spells it."""
    out = {}
    for ours, shape in expected.items():
        key = key_map.get(ours, ours)
        if key not in sd:
            raise CheckpointError(f"{path}: missing key {key!r}")
        t = out[ours] = sd[key]
        if not isinstance(t, torch.Tensor) or t.shape != shape:
            got = (f"has shape {list(t.shape)}" if isinstance(t, torch.Tensor)
                   else f"holds a {type(t).__name__}, not a tensor")
            raise CheckpointError(f"{path}: key {key!r} {got}, expected {list(shape)}")
    used = {key_map.get(k, k) for k in expected}
    buffers = ("num_batches_tracked", "anchors", "priors")  # no learned weights
    for key in sd:
        if key not in used and key.rsplit(".", 1)[-1] not in buffers:
            raise CheckpointError(f"{path}: unexpected key {key!r}")
    return out


_VGG_CONVS = [0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28]  # conv1_1 ... conv5_3 in model.vgg
_CONV6, _CONV7 = 31, 33  # fc6 and fc7 as convolutions
_MMDET_MEAN = (123.675, 116.28, 103.53)  # mmdetection configs/ssd/ssd300_coco.py: RGB, std 1
# input normalisation each VGG16 file was trained with: x (0-255 RGB) -> (x / scale - mean) / std
_VGG_NORMALISATION = {"amdegroot": (1.0, ssd.MEAN, (1.0, 1.0, 1.0)),  # (scale, mean, std)
                      "caffe": (1.0, _MMDET_MEAN, (1.0, 1.0, 1.0)),
                      "torchvision": (255.0, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))}
# format -> the file's names for our (vgg.i, extras.j, l2norm.weight, cls_heads.i, box_heads.i),
# extras.j being conv o = j % 2 of extra level h = j // 2 (h1 = h + 1, o2 = 2 * o); the l2norm key
# tells the format. torchvision's ssd300_vgg16: features = vgg[:23], extra.0 = pool4, conv5_x,
# (pool5, fc6, fc7); amdegroot's ssd.py: our names; mmdetection v2.14+ (tools/model_converters/
# upgrade_ssd_version.py): SSDVGG backbone, SSDNeck, SSDHead.
_FOREIGN = {"torchvision": ("backbone.features.{i}", "backbone.extra.{h1}.{o2}",
                            "backbone.scale_weight", "head.classification_head.module_list.{i}",
                            "head.regression_head.module_list.{i}"),
            "amdegroot": ("vgg.{i}", "extras.{j}", "L2Norm.weight", "conf.{i}", "loc.{i}"),
            "mmdetection": ("backbone.features.{i}", "neck.extra_layers.{h}.{o}.conv",
                            "neck.l2_norm.weight", "bbox_head.cls_convs.{i}.0",
                            "bbox_head.reg_convs.{i}.0")}
_TORCHVISION_EXTRA0 = {24: 1, 26: 3, 28: 5, _CONV6: "7.1", _CONV7: "7.3"}  # -> backbone.extra.0.N


def _foreign_keys(fmt, size, keys):
    """{our key: the file's} for `keys` of an SSD of this size in a foreign layout."""
    vgg, extra, l2norm, cls, box = _FOREIGN[fmt]
    levels = len(ssd.GEOMETRY[size]["feature_maps"])
    m = {f"vgg.{i}": vgg.format(i=i) for i in _VGG_CONVS + [_CONV6, _CONV7]}
    if fmt == "torchvision":
        m.update({f"vgg.{i}": f"backbone.extra.0.{n}" for i, n in _TORCHVISION_EXTRA0.items()})
    m.update({f"extras.{j}": extra.format(j=j, h=j // 2, o=j % 2, h1=j // 2 + 1, o2=2 * (j % 2))
              for j in range(2 * (levels - 2))})  # a 1x1 then a 3x3 conv per extra level
    for i in range(levels):
        m[f"cls_heads.{i}"], m[f"box_heads.{i}"] = cls.format(i=i), box.format(i=i)
    m["l2norm.weight"] = l2norm
    return {k: m.get(k) or f"{m[k.rsplit('.', 1)[0]]}.{k.rsplit('.', 1)[1]}" for k in keys}


def _foreign_config(path, sd, fmt, meta):
    """Our config for a foreign detector: SSD300 with 6 class heads, SSD512 with 7; width = conv1_1
    filters / 64; 4 anchors x (C+1) outputs in head 0; the format's anchors, clip, mean, names."""
    cls_key = _FOREIGN[fmt][3] + ".weight"
    levels = next((n for n in range(7) if cls_key.format(i=n) not in sd), 7)
    if levels not in (6, 7):
        raise CheckpointError(f"{path}: {levels} class heads ({cls_key.format(i='N')}), expected "
                              "6 (SSD300) or 7 (SSD512)")
    outputs = sd[cls_key.format(i=0)].shape[0]
    if outputs % 4 or outputs < 8:
        raise CheckpointError(f"{path}: key '{cls_key.format(i=0)}' has {outputs} outputs, not 4 "
                              "anchors x (classes + 1)")
    size, nc = {6: 300, 7: 512}[levels], outputs // 4 - 1
    names, extra = None, {}
    conv1 = _FOREIGN[fmt][0].format(i=0) + ".weight"
    width = sd[conv1].shape[0] / 64 if conv1 in sd else 1.0  # if missing, _remap says so
    if fmt == "torchvision":  # mean: its transform does (x/255 - m)*255
        if size != 300:
            raise CheckpointError(f"{path}: a torchvision SSD512 layout; only ssd300_vgg16 is read")
        anchors, clip, mean = "coco", "wh", tuple(255 * m for m in (0.48235, 0.45882, 0.40784))
        if nc == 90:  # 91 outputs indexed by raw COCO category id; the 10 unused ids are "N/A"
            by_id = dict(zip(ssd.COCO_CATEGORY_IDS, ssd.COCO_CLASSES))
            names = [by_id.get(i, "N/A") for i in range(1, 91)]
            extra = {"category_ids": list(range(1, 91))}  # label -> COCO category id
    elif fmt == "amdegroot":  # clamps cx, cy, w, h of its priors; COCO config says 201 classes
        if nc == 200:
            warnings.warn(f"{path}: 201 class outputs (amdegroot's COCO config bug, meant 81); "
                          "loaded with COCO anchors and generic class names")
        anchors, clip, mean = "coco" if nc in (80, 200) else "voc", "all", ssd.MEAN
    else:
        if nc not in (20, 80):
            warnings.warn(f"{path}: {nc} classes, neither VOC (20) nor COCO (80): VOC anchors used")
        names = meta.get("CLASSES") or meta.get("dataset_meta", {}).get("classes")
        names = list(names) if names is not None and len(names) == nc else None
        anchors, clip, mean = "coco" if nc == 80 else "voc", "none", _MMDET_MEAN
    return dict(ssd.make_config(size, nc, anchors, clip, width, names, mean), **extra)


def load_model(path, device="cpu"):
    """An SSD in eval mode from our checkpoint {"model", "config", ...} or a foreign detector file
    (torchvision ssd300_vgg16, amdegroot ssd.pytorch, mmdetection v2.14+ {"state_dict", "meta"}),
    told apart by the keys. Raises CheckpointError naming the file and the first bad key."""
    obj = read_weights(path)
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: unrecognised format (a {type(obj).__name__}, not a dict)")
    ours = isinstance(obj.get("model"), dict) and isinstance(obj.get("config"), dict)
    sd = _strip_prefixes(obj["model"] if ours else obj.get("state_dict", obj))  # mmcv: + "meta"
    fmt = "ours" if ours else next((f for f, names in _FOREIGN.items() if names[2] in sd), None)
    if fmt == "ours":
        try:
            model = ssd.build_model(obj["config"])
        except (AssertionError, KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"{path}: bad config ({type(e).__name__}: {e})") from e
    elif fmt:
        model = ssd.build_model(_foreign_config(path, sd, fmt, obj.get("meta") or {}))
    elif "backbone.l2_norm.weight" in sd or "bbox_head.cls_convs.0.weight" in sd:
        raise CheckpointError(f"{path}: mmdetection SSD checkpoint from before v2.14; convert it "
                              "with mmdetection's tools/model_converters/upgrade_ssd_version.py")
    elif "l2norm.weight" in sd:
        raise CheckpointError(f"{path}: a bare state_dict of this project's SSD without its "
                              "config; save it with save_checkpoint(path, model=, config=)")
    else:
        raise CheckpointError(f"{path}: unrecognised format (first keys: {list(sd or obj)[:5]})")
    expected = {k: v.shape for k, v in model.state_dict().items()}
    key_map = {} if fmt == "ours" else _foreign_keys(fmt, model.config["size"], expected)
    state = _remap(path, sd, key_map, expected)
    if fmt == "mmdetection":  # each anchor's C+1 class channels: background last there, first here
        k1 = model.config["num_classes"] + 1
        state.update({k: v.unflatten(0, (-1, k1)).roll(1, 1).flatten(0, 1)  # [A, C+1, ...]
                      for k, v in state.items() if k.startswith("cls_heads.")})
    model.load_state_dict(state)
    return model.to(device).eval()


def load_backbone(model, path, source=None):
    """ImageNet VGG16 weights into model.vgg (train.py --pretrained; width 1, norm "none" only):
    amdegroot's vgg16_reducedfc.pth (0.weight ... 33.bias, conv6/conv7 included), torchvision's
    vgg16 (features.N; fc6/fc7 = classifier.0/3, decimated into conv6/conv7) or mmdetection's
    vgg16_caffe-292e1171.pth (features.N, maybe classifier.*, maybe in "state_dict"); `source`
    ("torchvision" | "caffe") tells the last two apart, else "caffe" in the file name does. conv1_1
    is refitted to the config mean. Prints what it loaded; returns the model.vgg indices loaded."""
    if source not in (None, "torchvision", "caffe"):
        raise ValueError("source must be 'torchvision' or 'caffe'")
    width, norm = model.config["width"], model.config.get("norm", "none")
    if width != 1.0 or norm != "none":
        raise CheckpointError(f"{path}: ImageNet VGG16 weights fit width 1.0 and no BatchNorm "
                              f"(train.py --norm none), not width {width}, norm {norm!r}")
    obj = read_weights(path)
    sd = _strip_prefixes(obj.get("state_dict", obj) if isinstance(obj, dict) else None)  # mmcv
    if "0.weight" in sd:
        source, prefix = "amdegroot", ""
    elif "features.0.weight" in sd:
        prefix = "features."
        source = source or ("caffe" if "caffe" in os.path.basename(path).lower() else "torchvision")
    else:
        raise CheckpointError(f"{path}: unrecognised VGG16 format (first keys: {list(sd)[:5]})")
    has_conv6 = f"{prefix}{_CONV6}.weight" in sd
    expected = {k: v.shape for k, v in model.vgg.state_dict().items()  # "0.weight", ...
                if has_conv6 or int(k.split(".")[0]) < _CONV6}
    state = _remap(path, {k: v for k, v in sd.items() if not k.startswith("classifier.")},
                   {k: prefix + k for k in expected}, expected)  # classifier.*: fc6, fc7, fc8
    how = "from the file" if has_conv6 else "left at their initial values"
    if not has_conv6 and "classifier.0.weight" in sd:
        # The paper, Sec. 3 "Base network": fc6 is a 7x7 conv on pool5 at stride 32; every 4th
        # filter and taps 0, 3, 6 (96 px apart) make a 3x3 conv with dilation 6 on SSD's stride-16
        # pool5. fc7 is a 1x1 conv: every 4th filter and every 4th input channel.
        shapes = {"classifier.0.weight": (4096, 512 * 7 * 7), "classifier.0.bias": (4096,),
                  "classifier.3.weight": (4096, 4096), "classifier.3.bias": (4096,)}
        w6, b6, w7, b7 = _remap(path, {k: sd[k] for k in shapes if k in sd}, {}, shapes).values()
        conv6_w = w6.reshape(4096, 512, 7, 7)[::4, :, ::3, ::3]  # [1024, 512, 3, 3]
        conv7_w = w7.reshape(4096, 4096, 1, 1)[::4, ::4]  # [1024, 1024, 1, 1]
        state.update({f"{_CONV6}.weight": conv6_w, f"{_CONV6}.bias": b6[::4],
                      f"{_CONV7}.weight": conv7_w, f"{_CONV7}.bias": b7[::4]})
        how = "decimated from fc6/fc7"
    # conv1_1 trained on z = (x / scale - mean) / std (x: 0-255 RGB), refitted for x - m (config
    # mean): z = (x - m) k + shift, k = 1 / (scale std), shift = (m - scale mean) k, so W z + b =
    # (W k)(x - m) + b + sum W shift; exact but at the border (zero padding: x = m vs scale mean).
    scale, mean, std, m = (torch.tensor(v, dtype=torch.float64).view(1, -1, 1, 1)
                           for v in (*_VGG_NORMALISATION[source], model.config["mean"]))
    k, w = 1 / (scale * std), state["0.weight"].double()
    state["0.bias"] = state["0.bias"].double() + (w * (m - scale * mean) * k).sum((1, 2, 3))
    state["0.weight"] = w * k
    model.vgg.load_state_dict(state, strict=False)
    print(f"{path}: {source} VGG16 -> conv1_1..conv5_3 loaded, conv6/conv7 {how}")
    return sorted({int(k.split(".")[0]) for k in state})
