"""Tests of weights.py: our checkpoints and foreign weights (save_checkpoint, load_model,
load_backbone).

None of the real files can be downloaded here, so each test writes a state_dict with its format's
key names and shapes. The layouts below are written from the layer list (SSD paper Fig. 2 and §3,
torchvision's vgg16 and ssd300_vgg16) and each format's naming (torchvision's ssd.py, mmdetection's
SSDVGG / SSDNeck / SSDHead, amdegroot's ssd.py), independently of weights.py's key maps; their
full-width parameter counts are checked against the published ones. A loaded model is compared with
a plain functional SSD forward that reads the file's own keys, so a swapped or misplaced weight
of the right shape is caught too. Where torchvision is importable, a real ssd300_vgg16 is compared.
"""
import os
import re

import pytest
import torch
import torch.nn.functional as F

import ssd
import weights
from weights import CheckpointError

# --- the SSD layout, written from the paper and the projects' public layer lists ---------------

VGG = [("conv1_1", 3, 64), ("conv1_2", 64, 64), ("conv2_1", 64, 128), ("conv2_2", 128, 128),
       ("conv3_1", 128, 256), ("conv3_2", 256, 256), ("conv3_3", 256, 256),
       ("conv4_1", 256, 512), ("conv4_2", 512, 512), ("conv4_3", 512, 512),
       ("conv5_1", 512, 512), ("conv5_2", 512, 512), ("conv5_3", 512, 512)]
# torchvision vgg16().features index of each conv (torchvision's vgg16); conv6 = 31, conv7 = 33
FEATURE_INDEX = dict(zip([n for n, _, _ in VGG], [0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28]))
FEATURE_INDEX.update(conv6=31, conv7=33)
# extra levels (Caffe ssd_pascal.py AddExtraLayers): (in, mid, out, kernel, stride, padding)
EXTRAS = {300: [(1024, 256, 512, 3, 2, 1), (512, 128, 256, 3, 2, 1), (256, 128, 256, 3, 1, 0),
                (256, 128, 256, 3, 1, 0)],
          512: [(1024, 256, 512, 3, 2, 1), (512, 128, 256, 3, 2, 1), (256, 128, 256, 3, 2, 1),
                (256, 128, 256, 3, 2, 1), (256, 128, 256, 4, 1, 1)]}
ANCHORS_PER_LOCATION = {300: [4, 6, 6, 6, 4, 4], 512: [4, 6, 6, 6, 6, 4, 4]}


def layer_shapes(size, outputs, width=1.0):
    """role -> (out, in, kernel) of every conv of SSD; `outputs` = classes + 1."""
    c = lambda ch: max(1, int(round(ch * width)))  # noqa: E731
    shapes = {name: (c(o), 3 if i == 3 else c(i), 3) for name, i, o in VGG}
    shapes.update(conv6=(c(1024), c(512), 3), conv7=(c(1024), c(1024), 1))
    for level, (cin, mid, cout, k, _, _) in enumerate(EXTRAS[size], 1):
        shapes[f"extra{level}_1"] = (c(mid), c(cin), 1)
        shapes[f"extra{level}_2"] = (c(cout), c(mid), k)
    sources = [c(512), c(1024)] + [c(e[2]) for e in EXTRAS[size]]
    for i, (ch, a) in enumerate(zip(sources, ANCHORS_PER_LOCATION[size])):
        shapes[f"cls{i}"], shapes[f"box{i}"] = (a * outputs, ch, 3), (a * 4, ch, 3)
    return shapes


def torchvision_name(role):
    """torchvision ssd300_vgg16's module tree: features = vgg[:23]; extra.0 = pool4, conv5_x
    (1, 3, 5), (pool5, fc6, fc7)."""
    if role in FEATURE_INDEX and FEATURE_INDEX[role] < 23:
        return f"backbone.features.{FEATURE_INDEX[role]}"
    fixed = {"conv5_1": "backbone.extra.0.1", "conv5_2": "backbone.extra.0.3",
             "conv5_3": "backbone.extra.0.5", "conv6": "backbone.extra.0.7.1",
             "conv7": "backbone.extra.0.7.3"}
    if role in fixed:
        return fixed[role]
    if m := re.fullmatch(r"extra(\d)_(\d)", role):
        return f"backbone.extra.{m[1]}.{2 * (int(m[2]) - 1)}"
    m = re.fullmatch(r"(cls|box)(\d)", role)
    head = "classification_head" if m[1] == "cls" else "regression_head"
    return f"head.{head}.module_list.{m[2]}"


def amdegroot_name(role):
    """amdegroot ssd.py: vgg (ModuleList, torchvision indices), extras (convs only), loc, conf."""
    if role in FEATURE_INDEX:
        return f"vgg.{FEATURE_INDEX[role]}"
    if m := re.fullmatch(r"extra(\d)_(\d)", role):
        return f"extras.{2 * (int(m[1]) - 1) + int(m[2]) - 1}"
    m = re.fullmatch(r"(cls|box)(\d)", role)
    return f"{'conf' if m[1] == 'cls' else 'loc'}.{m[2]}"


def mmdetection_name(role):
    """mmdetection v2.14+ (tools/model_converters/upgrade_ssd_version.py): SSDVGG features,
    SSDNeck extra_layers.i.j.conv, SSDHead convs.i.0."""
    if role in FEATURE_INDEX:
        return f"backbone.features.{FEATURE_INDEX[role]}"
    if m := re.fullmatch(r"extra(\d)_(\d)", role):
        return f"neck.extra_layers.{int(m[1]) - 1}.{int(m[2]) - 1}.conv"
    m = re.fullmatch(r"(cls|box)(\d)", role)
    return f"bbox_head.{'cls' if m[1] == 'cls' else 'reg'}_convs.{m[2]}.0"


FORMATS = {"torchvision": (torchvision_name, "backbone.scale_weight"),
           "amdegroot": (amdegroot_name, "L2Norm.weight"),
           "mmdetection": (mmdetection_name, "neck.l2_norm.weight")}


def random_conv(o, i, k, g):
    """He-scaled weight [o, i, k, k] and a small bias [o]."""
    return (torch.randn(o, i, k, k, generator=g) * (2 / (i * k * k)) ** 0.5,
            torch.randn(o, generator=g) * 0.1)


def make_state_dict(fmt, size, outputs, width, seed=0, zeros=False):
    """A state_dict in format `fmt` with random (He-scaled) weights, or zeros."""
    name, l2_key = FORMATS[fmt]
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for role, (o, i, k) in layer_shapes(size, outputs, width).items():
        params = (torch.zeros(o, i, k, k), torch.zeros(o)) if zeros else random_conv(o, i, k, g)
        sd[f"{name(role)}.weight"], sd[f"{name(role)}.bias"] = params
    sd[l2_key] = 20 + torch.randn(max(1, int(round(512 * width))), generator=g)
    return sd


def reference_forward(sd, fmt, size, x):
    """SSD's forward as plain functional calls on the file's own keys -> (cls [B,A,K], box [B,A,4]),
    class channels in the file's order."""
    name, l2_key = FORMATS[fmt]

    def conv(x, role, stride=1, padding=None, dilation=1):
        w, b = sd[f"{name(role)}.weight"], sd[f"{name(role)}.bias"]
        return F.conv2d(x, w, b, stride, w.shape[-1] // 2 if padding is None else padding, dilation)

    sources = []
    for block in ("conv1", "conv2", "conv3", "conv4", "conv5"):
        for role in [n for n, _, _ in VGG if n.startswith(block)]:
            x = F.relu(conv(x, role))
        if block == "conv4":  # L2Norm with a learned scale per channel
            sources.append(x / x.pow(2).sum(1, keepdim=True).sqrt() * sd[l2_key].view(1, -1, 1, 1))
        if block != "conv5":
            x = F.max_pool2d(x, 2, 2, ceil_mode=block == "conv3")
    x = F.max_pool2d(x, 3, 1, 1)
    x = F.relu(conv(x, "conv6", padding=6, dilation=6))
    sources.append(F.relu(conv(x, "conv7")))
    x = sources[-1]
    for level, (_, _, _, _, stride, pad) in enumerate(EXTRAS[size], 1):
        x = F.relu(conv(x, f"extra{level}_1"))
        x = F.relu(conv(x, f"extra{level}_2", stride=stride, padding=pad))
        sources.append(x)
    k = sd[f"{name('cls0')}.weight"].shape[0] // 4
    # channel = anchor * K + k: NCHW -> NHWC -> [B, H*W*anchors, K]
    cls = [conv(f, f"cls{i}").permute(0, 2, 3, 1).reshape(len(f), -1, k)
           for i, f in enumerate(sources)]
    box = [conv(f, f"box{i}").permute(0, 2, 3, 1).reshape(len(f), -1, 4)
           for i, f in enumerate(sources)]
    return torch.cat(cls, 1), torch.cat(box, 1)


def assert_close(actual, expected):
    scale = expected.abs().max().item()
    assert scale > 0
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-4 * scale)


def conv_count(shapes):
    return sum(o * i * k * k + o for o, i, k in shapes.values())


def test_layouts_have_the_published_parameter_counts():
    # the published parameter counts: the role tables above are the real layouts
    assert conv_count(layer_shapes(300, 91)) + 512 == 35_641_826  # torchvision COCO
    assert conv_count(layer_shapes(300, 81)) + 512 == 34_305_206
    assert conv_count(layer_shapes(300, 21)) + 512 == 26_285_486  # Caffe VOC


# --- foreign detectors ----------------------------------------------------------------------------

WIDTH = 0.125  # narrow files for the functional checks; the loader infers the width from conv1_1


def save_foreign(path, fmt, sd, meta=None):
    if fmt == "mmdetection":  # mmcv's checkpoint dict, saved in the legacy format as mmdet does
        torch.save({"state_dict": sd, "meta": meta or {}}, path,
                   _use_new_zipfile_serialization=False)
    else:
        torch.save(sd, path)


@pytest.mark.parametrize("fmt,size,outputs", [("torchvision", 300, 91), ("amdegroot", 300, 21),
                                              ("mmdetection", 300, 81), ("mmdetection", 512, 21)])
def test_foreign_detector_matches_reference_forward(tmp_path, fmt, size, outputs):
    sd = make_state_dict(fmt, size, outputs, WIDTH, seed=size + outputs)
    path = tmp_path / f"{fmt}.pth"
    save_foreign(path, fmt, sd)
    model = weights.load_model(path)
    cfg = model.config
    assert not model.training
    assert (cfg["size"], cfg["width"], cfg["num_classes"]) == (size, WIDTH, outputs - 1)
    x = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(1)) * 50
    with torch.no_grad():
        cls, box = model(x)
        ref_cls, ref_box = reference_forward(sd, fmt, size, x)
    if fmt == "mmdetection":  # background last there, first here
        ref_cls = torch.cat([ref_cls[..., -1:], ref_cls[..., :-1]], -1)
    assert cls.shape == (1, len(model.anchors), outputs)
    assert_close(cls, ref_cls)
    assert_close(box, ref_box)
    expected = {"torchvision": ("coco", "wh"), "amdegroot": ("voc", "all"),
                "mmdetection": ("coco" if outputs == 81 else "voc", "none")}[fmt]
    assert (cfg["anchors"], cfg["clip"]) == expected
    if fmt == "torchvision":
        # 91 outputs by raw category id: used ids named, the 10 unused "N/A" (COCO's instances json)
        assert cfg["category_ids"] == list(range(1, 91))
        assert cfg["class_names"][0] == "person" and cfg["class_names"][11] == "N/A"
        assert cfg["class_names"][89] == "toothbrush" and cfg["class_names"].count("N/A") == 10
        assert cfg["mean"] == pytest.approx([122.99925, 116.9991, 103.9992])
    elif fmt == "amdegroot":
        assert cfg["class_names"] == ssd.VOC_CLASSES and cfg["mean"] == list(ssd.MEAN)
    else:
        assert cfg["mean"] == [123.675, 116.28, 103.53]
        assert cfg["class_names"] == (ssd.COCO_CLASSES if outputs == 81 else ssd.VOC_CLASSES)


def test_full_width_foreign_files_load(tmp_path):
    # real shapes at width 1 (zeros: only keys and shapes matter here)
    cases = [("torchvision", 91, 35_641_826), ("amdegroot", 21, 26_285_486),
             ("mmdetection", 81, 34_305_206)]
    for fmt, outputs, params in cases:
        path = tmp_path / f"{fmt}.pth"
        save_foreign(path, fmt, make_state_dict(fmt, 300, outputs, 1.0, zeros=True))
        model = weights.load_model(path)
        assert model.config["width"] == 1.0 and model.config["num_classes"] == outputs - 1
        assert sum(p.numel() for p in model.parameters()) == params
        path.unlink()


def test_amdegroot_data_parallel_prefix_and_201_class_bug(tmp_path):
    sd = make_state_dict("amdegroot", 300, 201, WIDTH)
    path = tmp_path / "ssd300_COCO.pth"
    torch.save({f"module.{k}": v for k, v in sd.items()}, path)
    with pytest.warns(UserWarning, match="201"):
        model = weights.load_model(path)
    assert model.config["num_classes"] == 200 and model.config["anchors"] == "coco"
    assert model.config["class_names"][0] == "class1"
    assert torch.equal(model.l2norm.weight, sd["L2Norm.weight"])


@pytest.mark.parametrize("meta_key", ["CLASSES", "dataset_meta"])
def test_mmdetection_background_moves_to_index_0(tmp_path, meta_key):
    names = ("rbc", "wbc", "platelets")
    sd = make_state_dict("mmdetection", 300, 4, WIDTH)
    for i in range(6):  # class logits = the file's class index, background (3) the largest
        sd[f"bbox_head.cls_convs.{i}.0.weight"].zero_()
        bias = sd[f"bbox_head.cls_convs.{i}.0.bias"]
        bias.copy_(torch.arange(4.0).repeat(len(bias) // 4))
    meta = {"CLASSES": names} if meta_key == "CLASSES" else {"dataset_meta": {"classes": names}}
    path = tmp_path / "mm.pth"
    save_foreign(path, "mmdetection", sd, meta)
    with pytest.warns(UserWarning, match="neither VOC"):
        model = weights.load_model(path)
    assert model.config["class_names"] == list(names)
    with torch.no_grad():
        cls, _ = model(torch.zeros(1, 3, 300, 300))
    assert torch.equal(cls[0], torch.tensor([3.0, 0.0, 1.0, 2.0]).expand(8732, 4))


def test_old_mmdetection_keys_ask_for_the_upgrade_script(tmp_path):
    sd = {"backbone.features.0.weight": torch.zeros(64, 3, 3, 3), "backbone.l2_norm.weight":
          torch.zeros(512), "bbox_head.cls_convs.0.weight": torch.zeros(84, 512, 3, 3)}
    path = tmp_path / "ssd300_coco_2020.pth"
    torch.save({"state_dict": sd, "meta": {}}, path)
    with pytest.raises(CheckpointError, match=r"ssd300_coco_2020.pth: .*upgrade_ssd_version.py"):
        weights.load_model(path)


def test_matches_real_torchvision_ssd300_vgg16(tmp_path):
    tv = pytest.importorskip("torchvision.models.detection")
    torch.manual_seed(0)
    model = tv.ssd300_vgg16(weights=None, weights_backbone=None).eval()
    with torch.no_grad():  # the builder zeroes biases; give them values so a bias mix-up shows
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.1)
    torch.save(model.state_dict(), tmp_path / "tv.pt")
    image = torch.randint(0, 256, (3, 240, 320), dtype=torch.uint8)
    with torch.no_grad():
        images, _ = model.transform([image.float() / 255])  # normalise, warp to 300x300
        features = list(model.backbone(images.tensors).values())
        head = model.head(features)
        tv_anchors = model.anchor_generator(images, features)[0]  # [A, 4] xyxy pixels
    name, l2_key = FORMATS["torchvision"]
    ours = {f"{name(r)}.{p}": [o, i, k, k] if p == "weight" else [o]
            for r, (o, i, k) in layer_shapes(300, 91).items() for p in ("weight", "bias")}
    keys = {k: list(v.shape) for k, v in model.state_dict().items()}
    assert keys == {**ours, l2_key: [512]}  # our test layout is torchvision's
    loaded = weights.load_model(tmp_path / "tv.pt")
    # preprocess (warp + mean) reproduces torchvision's transform on the same image
    x = ssd.preprocess([image], 300, loaded.config["mean"])
    torch.testing.assert_close(x, images.tensors, rtol=0, atol=2e-3)
    with torch.no_grad():
        cls, box = loaded(images.tensors)
    assert_close(cls, head["cls_logits"])
    assert_close(box, head["bbox_regression"])
    torch.testing.assert_close(ssd.cxcywh_to_xyxy(loaded.anchors) * 300, tv_anchors, rtol=0,
                               atol=1e-3)
    categories = tv.SSD300_VGG16_Weights.COCO_V1.meta["categories"]
    assert loaded.config["class_names"] == list(categories)[1:]


# --- our checkpoints ------------------------------------------------------------------------------

def test_checkpoint_round_trip(tmp_path):
    model = ssd.ssd300(3, width=WIDTH, class_names=["a", "b", "c"], mean=(1.0, 2.0, 3.0))
    # DDP- and compile-wrapped state_dict keys are stored without their prefixes
    wrapped = {f"module._orig_mod.{k}": v for k, v in model.state_dict().items()}
    path = tmp_path / "ckpt.pt"
    rng = torch.get_rng_state()
    weights.save_checkpoint(path, model=wrapped, config=model.config, epoch=7, step=1234,
                        best_map=0.5, rng=rng, optimizer={"state": {}, "param_groups": []})
    assert os.listdir(tmp_path) == ["ckpt.pt"]  # no temporary file left behind
    loaded = weights.load_model(path)
    assert loaded.config == model.config and not loaded.training
    x = torch.randn(1, 3, 300, 300)
    with torch.no_grad():
        a, b = model.eval()(x), loaded(x)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    raw = torch.load(path, weights_only=True)
    assert raw["epoch"] == 7 and raw["step"] == 1234 and torch.equal(raw["rng"], rng)
    assert all(k.startswith(("vgg.", "l2norm.", "extras.", "cls_heads.", "box_heads."))
               for k in raw["model"])
    # the module itself may be passed; its config goes along
    weights.save_checkpoint(path, model=model)
    assert weights.load_model(path).config == model.config


def test_save_checkpoint_is_atomic(tmp_path, monkeypatch):
    model = ssd.ssd300(2, width=WIDTH)
    path = tmp_path / "ckpt.pt"
    weights.save_checkpoint(path, model=model, epoch=1)
    before = path.read_bytes()

    def crash(obj, f):  # dies half way through writing
        f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(weights.torch, "save", crash)
    with pytest.raises(OSError, match="disk full"):
        weights.save_checkpoint(path, model=model, epoch=2)
    assert path.read_bytes() == before and os.listdir(tmp_path) == ["ckpt.pt"]


# --- bad files: one clear error naming the file and the key --------------------------------------

class NotWeights:
    pass


@pytest.fixture(scope="module")
def full_width_model():
    """A width-1 SSD300 for tests where load_backbone fails before it changes anything."""
    return ssd.ssd300(20)


def write_bad(path, kind):
    if kind == "truncated":
        torch.save(ssd.ssd300(2, width=WIDTH).state_dict(), path)
        path.write_bytes(path.read_bytes()[:5000])
    elif kind == "text":  # e.g. --weights notes.txt
        path.write_text("notes on the run\n")
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "object":
        torch.save({"model": NotWeights()}, path)
    elif kind == "module":  # a whole nn.Module, not its state_dict
        torch.save(ssd.ssd300(2, width=WIDTH), path)
    elif kind == "legacy-text":  # starts like the legacy (pickle) format, then text
        path.write_bytes(b"\x80\x02 notes")
    elif kind == "list":
        torch.save([torch.zeros(1)], path)


@pytest.mark.parametrize("kind,reason", [
    ("missing", "no such file"),
    ("truncated", r"not a checkpoint \(a damaged PyTorch file: "),
    ("legacy-text", r"not a checkpoint \(a damaged PyTorch file: "),
    ("text", r"not a checkpoint: not a PyTorch file \(not the zip or pickle torch.save writes\)$"),
    ("empty", r"not a checkpoint: not a PyTorch file \(an empty file\)$"),
    ("object", r"holds Python objects other than tensors and plain containers \("
               r"test_weights.NotWeights\); not loaded, for safety \(weights_only\). Save the "
               r"weights alone: torch.save\(model.state_dict\(\), path\)"),
    ("module", r"holds Python objects .*\(ssd.SSD\); not loaded, for safety .*state_dict"),
    ("list", "unrecognised (VGG16 )?format")])
def test_unreadable_files(tmp_path, full_width_model, kind, reason):
    path = tmp_path / "w.pt"
    write_bad(path, kind)
    for load in (weights.load_model, lambda p: weights.load_backbone(full_width_model, p)):
        with pytest.raises(CheckpointError, match=rf"^{re.escape(str(path))}: {reason}"):
            load(path)


def test_a_file_that_cannot_be_read(tmp_path, monkeypatch):
    path = tmp_path / "w.pt"  # simulated: root may read any file

    def denied(*args, **kwargs):
        raise PermissionError(13, "Permission denied")
    torch.save(ssd.ssd300(2, width=WIDTH).state_dict(), path)
    monkeypatch.setattr(torch, "load", denied)
    monkeypatch.setattr(weights, "open", denied, raising=False)
    with pytest.raises(CheckpointError, match=rf"^{re.escape(str(path))}: cannot read \(Perm"):
        weights.load_model(path)


def test_our_checkpoint_with_a_mismatch(tmp_path):
    model = ssd.ssd300(3, width=WIDTH)
    path = tmp_path / "w.pt"
    cfg = dict(model.config, num_classes=4, class_names=list("abcd"))  # config disagrees with heads
    weights.save_checkpoint(path, model=model.state_dict(), config=cfg)
    with pytest.raises(CheckpointError, match=r"w.pt: key 'cls_heads.0.weight' has shape "
                                              r"\[16, 64, 3, 3\], expected \[20, 64, 3, 3\]"):
        weights.load_model(path)
    weights.save_checkpoint(path, model=model.state_dict(), config={"size": 300})
    with pytest.raises(CheckpointError, match=r"w.pt: bad config"):
        weights.load_model(path)
    torch.save(model.state_dict(), path)
    with pytest.raises(CheckpointError, match=r"w.pt: a bare state_dict.*save_checkpoint"):
        weights.load_model(path)
    torch.save({"model": [torch.zeros(1)], "config": model.config}, path)  # model: no dict
    with pytest.raises(CheckpointError, match=r"w.pt: unrecognised format \(first keys: "
                                              r"\['model', 'config'\]\)"):
        weights.load_model(path)


@pytest.mark.parametrize("fmt", ["torchvision", "amdegroot", "mmdetection", "ours"])
def test_wrong_shape_missing_and_unexpected_keys(tmp_path, fmt):
    if fmt == "ours":
        model = ssd.ssd300(20, width=WIDTH)
        sd, key = model.state_dict(), "extras.3.weight"
        save = lambda p, d: weights.save_checkpoint(p, model=d, config=model.config)  # noqa: E731
    else:
        sd = make_state_dict(fmt, 300, 21, WIDTH)
        key = f"{FORMATS[fmt][0]('conv5_2')}.weight"  # same shape as its neighbours
        save = lambda p, d: save_foreign(p, fmt, d)  # noqa: E731
    path = tmp_path / "w.pt"
    shape = list(sd[key].shape)
    save(path, {**sd, key: torch.zeros(shape[0], shape[1] + 1, *shape[2:])})
    with pytest.raises(CheckpointError, match=rf"^{re.escape(str(path))}: key '{re.escape(key)}' "
                                              rf"has shape \[{shape[0]}, {shape[1] + 1}, "):
        weights.load_model(path)
    save(path, {k: v for k, v in sd.items() if k != key})
    with pytest.raises(CheckpointError, match=rf"w.pt: missing key '{re.escape(key)}'"):
        weights.load_model(path)
    save(path, {**sd, "extra_thing.weight": torch.zeros(1)})
    with pytest.raises(CheckpointError, match=r"w.pt: unexpected key 'extra_thing.weight'"):
        weights.load_model(path)
    save(path, {**sd, "bn.num_batches_tracked": torch.tensor(5)})  # harmless buffer
    assert weights.load_model(path).config["num_classes"] == 20


def test_wrong_number_of_heads(tmp_path):
    sd = make_state_dict("mmdetection", 300, 21, WIDTH)
    sd = {k: v for k, v in sd.items() if not k.startswith("bbox_head.cls_convs.5.")}
    path = tmp_path / "mm.pth"
    save_foreign(path, "mmdetection", sd)
    with pytest.raises(CheckpointError, match=r"mm.pth: 5 class heads \(bbox_head.cls_convs.N.0."
                                              r"weight\), expected 6 \(SSD300\) or 7"):
        weights.load_model(path)


def test_unrecognised_detector_format(tmp_path):
    path = tmp_path / "resnet.pth"
    torch.save({"conv1.weight": torch.zeros(64, 3, 7, 7), "fc.weight": torch.zeros(10, 64)}, path)
    with pytest.raises(CheckpointError, match=r"resnet.pth: unrecognised format \(first keys: "
                                              r"\['conv1.weight', 'fc.weight'\]\)"):
        weights.load_model(path)


# --- backbones ------------------------------------------------------------------------------------

def vgg_convs(prefix, g, with_fc_convs):
    """VGG16 conv weights under `prefix` + features index (He-scaled random)."""
    shapes = {name: (o, i, 3) for name, i, o in VGG}
    if with_fc_convs:
        shapes.update(conv6=(1024, 512, 3), conv7=(1024, 1024, 1))
    sd = {}
    for role, (o, i, k) in shapes.items():
        index = FEATURE_INDEX[role]
        sd[f"{prefix}{index}.weight"], sd[f"{prefix}{index}.bias"] = random_conv(o, i, k, g)
    return sd


def check_conv1_1(model, source_w, source_b, image_to_input):
    """Our conv1_1 on (image - config mean) equals the file's conv1_1 on the input it was trained
    with, away from the 1-pixel border (zero padding means different images there)."""
    image = torch.rand(1, 3, 12, 12, generator=torch.Generator().manual_seed(3)) * 255
    mean = torch.tensor(model.config["mean"]).view(1, 3, 1, 1)
    with torch.no_grad():
        ours = model.vgg[0](image - mean)
    theirs = F.conv2d(image_to_input(image), source_w, source_b, padding=1)
    assert_close(ours[..., 1:-1, 1:-1], theirs[..., 1:-1, 1:-1])
    assert not torch.allclose(ours, theirs, rtol=1e-4, atol=1e-3)  # the border differs


def test_backbone_amdegroot_reducedfc(tmp_path, capsys):
    sd = vgg_convs("", torch.Generator().manual_seed(0), with_fc_convs=True)
    path = tmp_path / "vgg16_reducedfc.pth"
    torch.save(sd, path, _use_new_zipfile_serialization=False)  # a 2017 file: legacy format
    model = ssd.ssd300(20)
    head_before = model.cls_heads[0].weight.clone()
    assert weights.load_backbone(model, path) == sorted(FEATURE_INDEX.values())
    assert "conv6/conv7 from the file" in capsys.readouterr().out
    for i in FEATURE_INDEX.values():  # same mean (123, 117, 104): nothing to refit
        torch.testing.assert_close(model.vgg[i].weight, sd[f"{i}.weight"], rtol=1e-6, atol=0)
        torch.testing.assert_close(model.vgg[i].bias, sd[f"{i}.bias"], rtol=1e-6, atol=1e-6)
    assert torch.equal(model.cls_heads[0].weight, head_before)


def test_backbone_torchvision_imagenet_vgg16(tmp_path, capsys):
    g = torch.Generator().manual_seed(1)
    sd = vgg_convs("features.", g, with_fc_convs=False)
    # fc6 non-zero only on the taps the decimation keeps (0, 3, 6), fc7 only on kept inputs, so
    # conv6/conv7 must reproduce the Linear layers' kept outputs exactly
    fc6 = torch.zeros(4096, 512, 7, 7)
    fc6[:, :, ::3, ::3] = torch.randn(4096, 512, 3, 3, generator=g) * 0.02
    fc7 = torch.zeros(4096, 4096)
    fc7[:, ::4] = torch.randn(4096, 1024, generator=g) * 0.03
    sd.update({"classifier.0.weight": fc6.view(4096, -1),
               "classifier.0.bias": torch.randn(4096, generator=g),
               "classifier.3.weight": fc7, "classifier.3.bias": torch.randn(4096, generator=g),
               "classifier.6.weight": torch.zeros(1000, 4096),  # fc8: ImageNet classes, unused
               "classifier.6.bias": torch.zeros(1000)})
    path = tmp_path / "vgg16-397923af.pth"
    torch.save(sd, path)
    model = ssd.ssd300(20)
    assert weights.load_backbone(model, path) == sorted(FEATURE_INDEX.values())
    assert "torchvision VGG16" in capsys.readouterr().out
    fc6_linear = torch.nn.Linear(25088, 4096)
    fc6_linear.weight.data = sd["classifier.0.weight"]
    fc6_linear.bias.data = sd["classifier.0.bias"]
    pool5 = torch.randn(1, 512, 15, 15, generator=g)  # stride-16 map
    with torch.no_grad():
        conv6 = model.vgg[31](pool5)  # [1, 1024, 15, 15]
        for i, j in [(6, 6), (7, 8), (8, 6)]:
            # fc6 saw a 7x7 pool5 window at stride 32 = every 2nd position at stride 16
            window = pool5[0, :, i - 6:i + 7:2, j - 6:j + 7:2]  # [512, 7, 7]
            assert_close(conv6[0, :, i, j], fc6_linear(window.reshape(-1))[::4])
        h = torch.randn(4096, generator=g)
        conv7 = model.vgg[33](h[::4].view(1, 1024, 1, 1)).flatten()
        assert_close(conv7, (sd["classifier.3.weight"] @ h + sd["classifier.3.bias"])[::4])
    for i in list(FEATURE_INDEX.values())[1:13]:
        assert torch.equal(model.vgg[i].weight, sd[f"features.{i}.weight"])
    # conv1_1 refitted: torchvision's VGG expects (x / 255 - mean) / std
    m = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    s = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    check_conv1_1(model, sd["features.0.weight"], sd["features.0.bias"],
                  lambda x: (x / 255 - m) / s)


def test_backbone_mmdetection_caffe_vgg16(tmp_path, capsys):
    sd = vgg_convs("features.", torch.Generator().manual_seed(2), with_fc_convs=False)
    path = tmp_path / "vgg16_caffe-292e1171.pth"
    torch.save({"state_dict": sd}, path)
    model = ssd.ssd300(20)
    conv6_before = model.vgg[31].weight.clone()
    assert weights.load_backbone(model, path) == sorted(FEATURE_INDEX.values())[:13]
    assert "conv6/conv7 left at their initial values" in capsys.readouterr().out
    assert torch.equal(model.vgg[31].weight, conv6_before)
    mm_mean = torch.tensor([123.675, 116.28, 103.53]).view(1, 3, 1, 1)
    check_conv1_1(model, sd["features.0.weight"], sd["features.0.bias"], lambda x: x - mm_mean)
    # a caffe file under another name: source= says what it is
    other = ssd.ssd300(20)
    torch.save(sd, tmp_path / "vgg16.pth")
    weights.load_backbone(other, tmp_path / "vgg16.pth", source="caffe")
    assert torch.equal(other.vgg[0].weight, model.vgg[0].weight)


def test_backbone_errors(tmp_path, full_width_model):
    sd = vgg_convs("", torch.Generator().manual_seed(0), with_fc_convs=True)
    path = tmp_path / "vgg.pth"
    torch.save(sd, path)
    with pytest.raises(CheckpointError, match=r"vgg.pth: ImageNet VGG16 weights fit width 1.0 and "
                                              r"no BatchNorm .*, not width 0.5, norm 'none'$"):
        weights.load_backbone(ssd.ssd300(20, width=0.5), path)
    with pytest.raises(CheckpointError, match=r"vgg.pth: ImageNet VGG16 weights fit width 1.0 and "
                                              r"no BatchNorm \(train.py --norm none\), not width "
                                              r"1.0, norm 'bn'$"):
        weights.load_backbone(ssd.ssd300(20, norm="bn"), path)
    torch.save({**sd, "7.weight": torch.zeros(128, 128, 1, 1)}, path)
    with pytest.raises(CheckpointError, match=r"vgg.pth: key '7.weight' has shape "
                                              r"\[128, 128, 1, 1\]"):
        weights.load_backbone(full_width_model, path)
    torch.save({k: v for k, v in sd.items() if k != "28.bias"}, path)
    with pytest.raises(CheckpointError, match=r"vgg.pth: missing key '28.bias'"):
        weights.load_backbone(full_width_model, path)
    torch.save({"layer1.weight": torch.zeros(1)}, path)
    with pytest.raises(CheckpointError, match=r"vgg.pth: unrecognised VGG16 format"):
        weights.load_backbone(full_width_model, path)
