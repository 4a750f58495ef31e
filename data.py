"""Data for SSD: image loading, the VOC / COCO / synthetic `shapes` sources, SSD's augmentation
(on the CPU, or batched on the device), Dataset + collate, and helpers the scripts share. A source:
len(src), class_names (label i -> class_names[i-1]), image_id(i), load_image(i) -> PIL RGB,
annotation(i) -> dict(boxes float32 [n, 4] xyxy in continuous pixels (pixel (i, j) covers
[i, i+1) x [j, j+1)), clipped to the image, none without area; labels int64 [n] in 1..C; difficult
bool [n]; width; height). Bad input raises DataError; a recoverable one (clipped box, unknown
class) is a warning per file. `python data.py FOLDER` writes shapes images (see --help)."""
import colorsys
import glob
import json
import logging
import math
import os
import warnings
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont, ImageOps, UnidentifiedImageError

from ssd import MEAN, VOC_CLASSES, preprocess

log = logging.getLogger(__name__)


class DataError(ValueError):
    """Bad input data. The message starts with the file's path, then the reason."""


def load_image(path):
    """Loaded PIL RGB image at `path`: EXIF orientation applied, alpha composited on white; 16-bit
    (and I in 0-65535) / 257, F in [0, 1] x 255, I or F in 0-255 as is, others stretched min-max.
    DataError naming the file if missing, empty, not an image, truncated, over MAX_IMAGE_PIXELS."""
    def rgb(img):
        img.load()  # a truncated file fails here, not deep inside a transform
        img, mode = ImageOps.exif_transpose(img), img.mode
        if mode.startswith("I;16") or mode in ("I", "F"):
            a = np.nan_to_num(np.asarray(img, np.float64), nan=0.0, posinf=0.0, neginf=0.0)
            lo, hi = (float(a.min()), float(a.max())) if a.size else (0.0, 0.0)
            if mode.startswith("I;16") or (mode == "I" and lo >= 0 and 255 < hi <= 65535):
                a = a / 257.0
            elif mode == "F" and lo >= 0 and hi <= 1:
                a = a * 255.0
            elif lo < 0 or hi > 255:
                a = (a - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(a)
            return Image.fromarray(np.rint(np.clip(a, 0, 255)).astype(np.uint8), "L").convert("RGB")
        if mode in ("RGBA", "RGBa", "LA", "La", "PA") or "transparency" in img.info:
            white = Image.new("RGBA", img.size, (255, 255, 255, 255))
            return Image.alpha_composite(white, img.convert("RGBA")).convert("RGB")
        return img if mode == "RGB" else img.convert("RGB")
    return _read_image(path, rgb)


def _image_size(path):
    """(width, height) after EXIF orientation, from the file header (no pixel decoding)."""
    return _read_image(path, lambda img: img.size[::-1]  # EXIF Orientation 5-8: quarter turns
                       if img.getexif().get(0x0112, 1) in (5, 6, 7, 8) else img.size)


def _read_image(path, use):
    """use(the PIL image at `path`), the file closed after; DataError naming the file."""
    if not os.path.isfile(path):
        raise DataError(f"{path}: {'not a file' if os.path.exists(path) else 'file not found'}")
    if os.path.getsize(path) == 0:
        raise DataError(f"{path}: not an image (empty file)")
    try:
        with warnings.catch_warnings():  # PIL only warns up to twice MAX_IMAGE_PIXELS: refuse both
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                return use(img)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise DataError(f"{path}: image too large (over PIL.Image.MAX_IMAGE_PIXELS = "
                        f"{Image.MAX_IMAGE_PIXELS} pixels)") from None
    except UnidentifiedImageError:
        raise DataError(f"{path}: not an image (unrecognised format)") from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise DataError(f"{path}: unreadable image ({e})") from None


def _clip_boxes(boxes, width, height):
    """xyxy pixel boxes [n, 4] -> (clipped to the image, float64; changed [n]; area > 0 [n])."""
    clipped = np.clip(boxes, 0, [width, height, width, height])
    return clipped, (clipped != boxes).any(1), (clipped[:, 2:] > clipped[:, :2]).all(1)


def _require_images(folder, names, present):
    missing = [name for name in names if name not in present]
    if missing:
        more = f" (and {len(missing) - 1} more of {len(names)})" if len(missing) > 1 else ""
        raise DataError(f"{folder / missing[0]}: image not found{more}")


def _warn_each(path, problems):
    for found, message in problems:
        if found:
            log.warning("%s: %s", path, message)


class FileSource:
    """A source parsed into memory: `ids`, `image_paths`, `_annotations` (one dict per image)."""

    def __len__(self):
        return len(self.ids)

    def image_id(self, i):
        return self.ids[i]

    def load_image(self, i):
        return load_image(self.image_paths[i])

    def annotation(self, i):
        return {k: (v.copy() if isinstance(v, np.ndarray) else v)
                for k, v in self._annotations[i].items()}


class VOCDetection(FileSource):
    """A VOC-layout folder: Annotations/<id>.xml, JPEGImages/<id>.jpg (or .png etc.),
    ImageSets/Main/<split>.txt (id first per line). VOC XML counts pixels from 1, xmax inclusive
    (VOC devkit): boxes load as [xmin - 1, ymin - 1, xmax, ymax]; without extent dropped, outside
    the image clipped, a warning per file; `difficult` kept, flagged. Classes: `class_names` (others
    reported, skipped), else VOC's 20 if the split's names are among them, else the sorted names in
    every XML there. Size: <size>, else the image's. images=False: annotations only."""

    def __init__(self, root, split="trainval", class_names=None, images=True):
        self.root, self.split = Path(root), split
        ann_dir, img_dir = self.root / "Annotations", self.root / "JPEGImages"
        split_file = self.root / "ImageSets" / "Main" / f"{split}.txt"
        for d in (ann_dir, img_dir) if images else (ann_dir,):
            if not d.is_dir():
                raise DataError(f"{d}: folder not found (not a VOC-layout folder)")
        if not split_file.is_file():  # a split, or a class file ("<id> 1"): the id first
            raise DataError(f"{split_file}: split file not found")
        self.ids = [line.split()[0] for line in split_file.read_text().splitlines() if line.strip()]
        if not self.ids:
            raise DataError(f"{split_file}: no image ids")
        files = {os.path.splitext(n)[0]: n for n in sorted(  # id -> file name; .jpg (last) wins
            os.listdir(img_dir) if images else (), key=lambda n: n.lower().endswith(".jpg"))}
        if images:
            _require_images(img_dir, [f"{i}.jpg" for i in self.ids], {f"{s}.jpg" for s in files})
        self.image_paths = [str(img_dir / files.get(i, f"{i}.jpg")) for i in self.ids]
        raws = [_voc_parse(ann_dir / f"{i}.xml") for i in self.ids]
        if class_names is None:
            in_split = {name for r in raws for name, _, _ in r["objects"]}
            class_names = VOC_CLASSES if in_split <= set(VOC_CLASSES) else _voc_names(ann_dir)
        self.class_names = list(class_names)
        label_of = {name: k + 1 for k, name in enumerate(self.class_names)}
        self._annotations = [_voc_annotation(raw, path, label_of)
                             for raw, path in zip(raws, self.image_paths)]


def _voc_parse(xml_path):
    """VOC XML -> dict(path, width, height (0: none), objects [(name, xyxy, difficult)], no_box)."""
    def number(node, tag, what):
        text = node.findtext(tag)
        try:
            return float(text)
        except (TypeError, ValueError):
            raise DataError(f"{xml_path}: {what}: <{tag}> is {text!r}, not a number") from None
    try:
        root = ET.parse(xml_path).getroot()
    except ET.ParseError as e:
        raise DataError(f"{xml_path}: malformed XML ({e})") from None
    except OSError as e:
        raise DataError(f"{xml_path}: cannot read ({e.strerror})") from None
    size = root.find("size")
    sized = size is not None and size.findtext("width") and size.findtext("height")
    width, height = (int(number(size, t, "size")) if sized else 0 for t in ("width", "height"))
    objects, no_box = [], []  # no_box: names of objects without <bndbox>
    for k, obj in enumerate(root.findall("object")):
        name, box = (obj.findtext("name") or "").strip(), obj.find("bndbox")
        if box is None:
            no_box.append(name or f"object {k}")
            continue
        xyxy = [number(box, t, f"object {k} ({name})") for t in ("xmin", "ymin", "xmax", "ymax")]
        objects.append((name, xyxy, obj.findtext("difficult", "").strip() in ("1", "true", "True")))
    return dict(path=str(xml_path), width=width, height=height, objects=objects, no_box=no_box)


def _voc_names(annotation_dir):
    """Sorted object names of every XML in a folder (a file failing to parse: left to its split)."""
    names = set()
    for path in Path(annotation_dir).glob("*.xml"):
        try:
            names.update(o.findtext("name", "").strip() for o in ET.parse(path).findall("object"))
        except (ET.ParseError, OSError):
            pass
    return sorted(names - {""})


def _voc_annotation(raw, image_path, label_of):
    """_voc_parse's dict -> the source's annotation, warning once per kind of problem."""
    width, height = raw["width"], raw["height"]
    if width <= 0 or height <= 0:
        width, height = _image_size(image_path)
    unknown = sorted({n for n, _, _ in raw["objects"] if n not in label_of})
    objects = [o for o in raw["objects"] if o[0] in label_of]
    written = [o for o in objects if o[1][2] > o[1][0] and o[1][3] > o[1][1]]  # with extent
    boxes = np.array([o[1] for o in written], np.float64).reshape(-1, 4) - [1, 1, 0, 0]  # 0-based
    boxes, changed, keep = _clip_boxes(boxes, width, height)
    clipped, empty = int(changed.sum()), len(objects) - len(written)
    _warn_each(raw["path"], [
        (raw["no_box"], f"object(s) without <bndbox> skipped: {', '.join(raw['no_box'])}"),
        (unknown, f"unknown class name(s) skipped: {', '.join(map(repr, unknown))}"),
        (empty, f"{empty} box(es) with no extent (xmax <= xmin or ymax <= ymin) dropped"),
        (clipped, f"{clipped} box(es) outside the {width}x{height} image clipped")])
    return dict(boxes=boxes[keep].astype(np.float32),
                labels=np.array([label_of[o[0]] for o in written], np.int64)[keep],
                difficult=np.array([o[2] for o in written], bool)[keep], width=width, height=height)


class COCODetection(FileSource):
    """COCO 2017 layout: root/annotations/instances_<split>.json, images in root/<split>/. Labels
    1..C over the categories by id (ssd.COCO_CLASSES order), COCO id category_ids[label - 1]. bbox
    [x, y, w, h] -> xyxy, clipped (a warning per json); w or h < 1 dropped (as mmdetection); crowd
    boxes in annotation(i)["crowd"]. skip_empty: images without boxes dropped (as torchvision)."""

    def __init__(self, root, split="train2017", skip_empty=False):
        self.root, self.split, img_dir = Path(root), split, Path(root) / split
        self.ann_file = ann = str(self.root / "annotations" / f"instances_{split}.json")
        if not os.path.isfile(ann):
            raise DataError(f"{ann}: annotation file not found")
        try:
            doc = json.loads(Path(ann).read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise DataError(f"{ann}: malformed JSON ({e})") from None
        if not isinstance(doc, dict) or not all(
                isinstance(doc.get(k), list) for k in ("images", "annotations", "categories")):
            raise DataError(f"{ann}: not a COCO instances file (needs lists 'images', "
                            "'annotations' and 'categories')")
        if not img_dir.is_dir():
            raise DataError(f"{img_dir}: image folder not found")
        try:
            categories = sorted(doc["categories"], key=lambda c: c["id"])
            self.category_ids = [int(c["id"]) for c in categories]
            self.class_names = [str(c["name"]) for c in categories]
            images = [(int(im["id"]), str(im["file_name"]), int(im.get("width") or 0),
                       int(im.get("height") or 0)) for im in doc["images"]]
        except (KeyError, TypeError, ValueError) as e:
            raise DataError(f"{ann}: bad category or image entry ({e!r})") from None
        label_of = {cid: k + 1 for k, cid in enumerate(self.category_ids)}
        objects = {image_id: ([], [], []) for image_id, *_ in images}  # boxes, labels, crowd
        unknown_cat, unknown_img = set(), 0
        for a in doc["annotations"]:
            try:
                found = objects.get(a["image_id"])
                x, y, w, h = (float(v) for v in a["bbox"])
                cat, is_crowd = a["category_id"], bool(a.get("iscrowd", 0))
            except (KeyError, TypeError, ValueError) as e:
                raise DataError(f"{ann}: bad annotation {a.get('id', '?')} ({e!r})") from None
            if found is None:
                unknown_img += 1
            elif is_crowd:
                found[2].append((x, y, x + w, y + h))
            elif cat not in label_of:
                unknown_cat.add(cat)
            elif w >= 1 and h >= 1:
                found[0].append((x, y, x + w, y + h))
                found[1].append(label_of[cat])
        _require_images(img_dir, [name for _, name, _, _ in images], set(os.listdir(img_dir)))
        rows, clipped = [], 0  # (id, path, annotation) per image kept
        for image_id, name, width, height in images:
            (boxes, labels, crowd), path = objects[image_id], str(img_dir / name)
            if width <= 0 or height <= 0:
                width, height = _image_size(path)
            boxes, changed, valid = _clip_boxes(np.reshape(boxes, (-1, 4)), width, height)
            clipped += int(changed.sum())
            if valid.any() or not skip_empty:
                rows.append((image_id, path, dict(
                    boxes=boxes[valid].astype(np.float32), labels=np.int64(labels)[valid],
                    difficult=np.zeros(int(valid.sum()), bool), width=width, height=height,
                    crowd=np.float32(crowd).reshape(-1, 4))))
        cats = ", ".join(map(str, sorted(unknown_cat)))
        _warn_each(ann, [
            (cats, f"annotations with unknown category id(s) skipped: {cats}"),
            (unknown_img, f"{unknown_img} annotation(s) of images not in 'images' skipped"),
            (clipped, f"{clipped} box(es) reaching outside their image clipped")])
        if not rows:
            raise DataError(f"{ann}: no images" + (" with boxes" if skip_empty else ""))
        self.ids, self.image_paths, self._annotations = map(list, zip(*rows))


class ConcatSource(FileSource):
    """File sources with the same class list, one after the other (VOC07+12 trainval)."""

    def __init__(self, sources):
        self.class_names = list(sources[0].class_names)
        for s in sources[1:]:
            if list(s.class_names) != self.class_names:
                raise DataError(f"{getattr(s, 'root', s)}: class list {s.class_names} differs "
                                f"from {self.class_names}")
        for key in ("ids", "image_paths", "_annotations"):
            setattr(self, key, [x for s in sources for x in getattr(s, key)])


class ShapesDetection:
    """1-4 filled circles, squares and triangles (equilateral, any rotation), any colour, on mildly
    textured size x size backgrounds, generated from (seed, split, index). Shapes span 15-60 % of
    the side and never touch; each box bounds its shape's pixels. 2,000 train, 200 val images."""

    SPLITS = {"train": (0, 2000), "val": (1, 200)}  # split -> (stream id, default length)

    def __init__(self, split="train", num_images=None, seed=0, size=300):
        if split not in self.SPLITS:
            raise DataError(f"shapes: unknown split {split!r} (use 'train' or 'val')")
        self.split, self.seed, self.size = split, int(seed), int(size)
        self._stream, default_len = self.SPLITS[split]
        self.num_images = default_len if num_images is None else int(num_images)
        self.class_names, self._last = ["circle", "square", "triangle"], None

    def __len__(self):
        return self.num_images

    def image_id(self, i):
        return int(i)

    def load_image(self, i):
        return self._render(i)[0].copy()

    def annotation(self, i):
        _, boxes, labels, _ = self._render(i)
        return dict(boxes=boxes.copy(), labels=labels.copy(), difficult=np.zeros(len(labels), bool),
                    width=self.size, height=self.size)

    def _render(self, i):
        """-> (PIL image, boxes float32 [n, 4], labels int64 [n], colours list of n RGB)."""
        if not 0 <= i < self.num_images:
            raise IndexError(f"shapes: index {i} out of range 0..{self.num_images - 1}")
        if self._last is not None and self._last[0] == i:
            return self._last[1]
        rng, s = np.random.default_rng([self.seed, self._stream, i]), self.size
        img, shapes = Image.fromarray(_textured_background(rng, s)), []  # (square, box, label, RGB)
        for _ in range(int(rng.integers(1, 5))):
            label = int(rng.integers(len(self.class_names))) + 1
            # any hue, saturated: chroma = s * v * 255 >= 0.65 * 0.55 * 255 = 91
            rgb = colorsys.hsv_to_rgb(rng.random(), rng.uniform(0.65, 1.0), rng.uniform(0.55, 1.0))
            colour = tuple(round(c * 255) for c in rgb)
            for _ in range(10):  # a few tries to find a spot clear of the shapes already drawn
                side = int(rng.uniform(0.15, 0.6) * s)
                x0, y0 = int(rng.integers(0, s - side + 1)), int(rng.integers(0, s - side + 1))
                square = (x0, y0, x0 + side, y0 + side)
                if all(square[0] > p[2] + 3 or p[0] > square[2] + 3 or
                       square[1] > p[3] + 3 or p[1] > square[3] + 3 for p, *_ in shapes):
                    break
            else:
                continue
            outline, r = square, side / 2
            if label == 3:  # triangle: equilateral, inscribed in the square's circle, any rotation
                outline = [(round(x0 + r + r * math.cos(t)), round(y0 + r + r * math.sin(t)))
                           for t in rng.uniform(0, 2 * math.pi) + np.arange(3) * 2 * math.pi / 3]
            mask = Image.new("L", (s, s), 0)  # the shape alone, for its tight box
            for canvas, fill in ((img, colour), (mask, 1)):
                draw = ImageDraw.Draw(canvas)
                getattr(draw, ("ellipse", "rectangle", "polygon")[label - 1])(outline, fill=fill)
            shapes.append((square, mask.getbbox(), label, colour))  # box: pixel edges
        _, boxes, labels, colours = zip(*shapes)  # the first shape always finds a spot
        self._last = (i, (img, np.float32(boxes), np.int64(labels), list(colours)))
        return self._last[1]


def _textured_background(rng, size):
    """uint8 [size, size, 3]: a greyish gradient, sometimes stripes, luminance noise; chroma (max -
    min channel) <= 30, far below every shape's (>= 91)."""
    greys, tints = rng.uniform(40, 215, size=2), rng.uniform(-15, 15, size=(2, 3))
    c0, c1 = (greys[:, None] + tints).astype(np.float32)[:, :, None, None]  # [3, 1, 1] each
    ramp, a = np.linspace(0.0, 1.0, size, dtype=np.float32), rng.uniform(0, 2 * math.pi)
    t = math.cos(a) * ramp[None, :] + math.sin(a) * ramp[:, None]  # [S, S]
    t = (t - t.min()) / max(float(t.max() - t.min()), 1e-6)
    lum = rng.standard_normal((size, size), dtype=np.float32) * np.float32(rng.uniform(2, 8))
    if rng.random() < 0.5:  # stripes
        b, period = rng.uniform(0, math.pi), rng.uniform(8, 60)
        pix = np.arange(size, dtype=np.float32)
        phase = (math.cos(b) * pix[None, :] + math.sin(b) * pix[:, None]) * (2 * math.pi / period)
        lum += np.float32(rng.uniform(5, 20)) * np.sin(phase)
    img = c0 + t * (c1 - c0) + lum  # [3, S, S]: planar, numpy is slow on a last axis of 3
    return np.clip(img, 0, 255).astype(np.uint8).transpose(1, 2, 0).copy()  # [S, S, 3]


def build_source(name, data_root=None, split=None, train=True, images=True):
    """The source for `train.py --data NAME` / `evaluate.py`; `split` overrides the defaults. voc: a
    VOC-layout folder (or a list): with a test split, trainval (training; train if only that exists)
    / test; without (BCCD), train (trainval if no train) / val. Else VOCdevkit years in
    data_root/VOCdevkit/ or data_root/: VOC2007 + VOC2012 trainval where present / VOC2007 test,
    else VOC2012 val. images=False: annotations only. coco: see coco_split. shapes: train / val."""
    if name == "shapes":
        return ShapesDetection(split or ("train" if train else "val"))
    if data_root is None:
        raise DataError(f"{name}: a data root is required (--data-root DIR)")
    listed = isinstance(data_root, (list, tuple))
    roots = list(data_root) if listed else [data_root]
    for root in roots:
        if not Path(root).is_dir():
            raise DataError(f"{root}: folder does not exist" if not os.path.exists(root)
                            else f"{root}: not a folder")
    if name == "voc":
        first = Path(roots[0])  # a VOC-layout folder itself, or one holding VOCdevkit years
        if listed or (first / "Annotations").is_dir() and (first / "ImageSets" / "Main").is_dir():
            found = [(Path(r), split or _voc_folder_split(Path(r), train)) for r in roots]
        else:
            found = _voc_years(data_root, split, train)
        sources = [VOCDetection(root, s, images=images) for root, s in found]
        return sources[0] if len(sources) == 1 else ConcatSource(sources)
    if name == "coco":
        return COCODetection(data_root, coco_split(data_root, split, train), skip_empty=train)
    raise DataError(f"{name}: unknown data set (use voc, coco or shapes)")


def coco_split(root, split=None, train=True):
    """`split`, else train2017 / val2017, else the only annotations/instances_*.json's split."""
    chosen = split or ("train2017" if train else "val2017")
    present = [p.stem.split("_", 1)[1] for p in Path(root, "annotations").glob("instances_*.json")]
    return present[0] if split is None and chosen not in present and len(present) == 1 else chosen


def _voc_folder_split(root, train):
    has = {p.stem for p in (root / "ImageSets" / "Main").glob("*.txt") if p.is_file()}
    # VOC2007-like: trainval is disjoint from test; else trainval holds val: train on train alone
    first, other = ("trainval", "train") if "test" in has else ("train", "trainval")
    if not train:
        return "test" if "test" in has else "val"
    return first if first in has or other not in has else other


def _voc_years(data_root, split, train):
    """[(year folder, split)] of the VOCdevkit years build_source takes, or DataError."""
    dirs = (Path(data_root) / "VOCdevkit", Path(data_root))
    wanted = [("VOC2007", "trainval"), ("VOC2012", "trainval")] if train else [
        ("VOC2007", "test"), ("VOC2012", "val")]
    for year_dir in dirs:
        found = [(year_dir / y, split or s) for y, s in wanted if (year_dir / y).is_dir()]
        if found:
            return found if train else found[:1]
    looked = ", ".join(str(d / y) for d in dirs for y, _ in wanted)
    raise DataError(f"{data_root}: no VOC data (looked for a VOC-layout folder there and {looked})")


class TrainTransform:
    """Training augmentation (the SSD paper, Liu et al. 2016, sections 2.2 and 3.6; mmdetection's
    and amdegroot/ssd.pytorch's order): photometric, expand, min-IoU crop, flip 0.5, warp to S x S,
    minus mean. __call__(PIL RGB image, boxes px [n, 4] xyxy, labels [n]) -> (float [3, S, S],
    on_device (uint8 pixels [H, W, 3], float64 _PARAMS [10 + 2S]) for augment_batch; boxes float32
    [n', 4] in [0, 1]; labels int64 [n']). Boxes: clipped to the image, none without area, kept if
    centred in the crop (one at least), clipped to it. Draws: Generator(torch.initial_seed())."""

    def __init__(self, size=300, mean=MEAN, on_device=False):
        self.size, self.mean = int(size), tuple(float(m) for m in mean)
        self.on_device, self._seed, self._rng = on_device, None, None

    def __call__(self, image, boxes, labels):
        if (seed := torch.initial_seed()) != self._seed:  # a new worker or epoch: its own stream
            self._seed, self._rng = seed, np.random.default_rng(seed)
        rng, img = self._rng, np.asarray(image)  # [H, W, 3] uint8
        h, w = img.shape[:2]
        boxes, labels = _as_arrays(boxes, labels)
        boxes, _, valid = _clip_boxes(boxes, w, h)
        boxes, labels = boxes[valid], labels[valid]
        colour = _photometric_params(rng)
        cw, ch, left, top = w, h, 0, 0
        if rng.random() < 0.5:  # expand (section 3.6): a mean-filled canvas U(1, 4) times as large
            r = rng.uniform(1, 4)
            cw, ch = int(w * r), int(h * r)
            left, top = int(rng.uniform(0, cw - w)), int(rng.uniform(0, ch - h))
        boxes = boxes + [left, top, left, top]  # canvas pixels
        patch, keep = min_iou_crop(boxes, cw, ch, rng)
        x0, y0, x1, y1 = patch
        boxes = np.clip(boxes[keep], [x0, y0, x0, y0], [x1, y1, x1, y1]) - [x0, y0, x0, y0]
        labels, flip, pw, ph = labels[keep], bool(rng.random() < 0.5), x1 - x0, y1 - y0
        if flip:
            boxes = np.stack([pw - boxes[:, 2], boxes[:, 1], pw - boxes[:, 0], boxes[:, 3]], 1)
        if self.on_device:
            channels = [0, 1, 2] if colour["channels"] is None else list(colour["channels"])
            params = np.concatenate([[h, w] + [float(colour[k]) for k in _PARAMS[2:7]] + channels,
                                     *_sample_positions((left, top), patch, flip, self.size)])
            out = (torch.from_numpy(np.array(img, np.uint8)), torch.from_numpy(params))
        else:
            out = warp(img, (left, top), patch, flip, self.size, self.mean, colour)
        boxes = np.clip(boxes / [pw, ph, pw, ph], 0, 1).astype(np.float32)
        valid = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
        return out, torch.from_numpy(boxes[valid]), torch.from_numpy(labels[valid])


# one image's draws for augment_batch (_photometric_params' keys at 2:7), then S x and S y positions
_PARAMS = ("height", "width", "brightness", "contrast_before", "saturation", "hue",
           "contrast_after", "red_from", "green_from", "blue_from")


def augment_batch(pixels, params, mean):
    """TrainTransform(on_device=True)'s draws applied to a batch on its device: pixels uint8
    [B, H, W, 3] (top-left aligned, zero padded), params float64 [B, 10 + 2S] -> float [B, 3, S, S]
    as warp gives (the padding, zeroed after the mean is subtracted, reads as its mean fill)."""
    _, h, w, _ = pixels.shape
    s, n = (params.shape[1] - len(_PARAMS)) // 2, len(_PARAMS)
    p = params[:, :n, None, None].float()  # [B, 10, 1, 1]
    x = _colour(pixels.permute(0, 3, 1, 2).float(), *(p[:, k:k + 1] for k in range(2, 7)))
    x = x.gather(1, p[:, 7:10].long().expand(-1, -1, h, w))  # [B, 3, H, W], channel shuffle
    x = x - torch.tensor(mean, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    inside = ((torch.arange(h, device=x.device).view(1, h, 1) < p[:, 0])
              & (torch.arange(w, device=x.device).view(1, 1, w) < p[:, 1]))  # [B, H, W]
    return _sample(x * inside[:, None], params[:, n:n + s], params[:, n + s:])


class TestTransform:
    """ssd.preprocess (as in detect()), boxes / (width, height); __call__ as TrainTransform's."""

    def __init__(self, size=300, mean=MEAN):
        self.size, self.mean = int(size), tuple(float(m) for m in mean)

    def __call__(self, image, boxes, labels):
        (w, h), (boxes, labels) = image.size, _as_arrays(boxes, labels)
        x = preprocess([to_tensor(image)], self.size, self.mean)[0]
        return x, torch.from_numpy((boxes / [w, h, w, h]).astype(np.float32)), torch.tensor(labels)


def photometric_distort(img, p):
    """`p` (_photometric_params) on float32 RGB [3, H, W] (0-255), clipped (unlike mmdetection)."""
    out, args = np.empty_like(img), [np.float32(p[k]) for k in _PARAMS[2:7]]
    order = [0, 1, 2] if p["channels"] is None else p["channels"]
    rows = max(1, 32768 // max(img.shape[2], 1))  # blocks that keep temporaries in cache: 3x faster
    for r in range(0, img.shape[1], rows):
        out[:, r:r + rows] = _colour(img[:, r:r + rows], *args)[order]
    return out


_CROP_MODES = (None, 0.1, 0.3, 0.5, 0.7, 0.9, 0.0)  # None: keep the whole image; 0.0: any patch


def min_iou_crop(boxes, width, height, rng, trials=50):
    """SSD's IoU-constrained random crop (the SSD paper, section 2.2) of a width x height image
    with xyxy boxes [n, 4] -> (patch (x0, y0, x1, y1) ints, keep bool [n]: centre strictly inside).
    Mode uniform over _CROP_MODES; of `trials` patches (sides U(0.3, 1) of the image's, h/w in
    [0.5, 2]) the first where a kept box has IoU >= the mode wins (Caffe's "any box" rule, as
    torchvision); no boxes: the first of valid shape; every trial failing: the whole image."""
    n, whole = len(boxes), (0, 0, width, height)
    mode = _CROP_MODES[rng.integers(len(_CROP_MODES))]
    if mode is None:
        return whole, np.ones(n, bool)
    w, h = rng.uniform(0.3 * width, width, trials), rng.uniform(0.3 * height, height, trials)
    x0, y0 = rng.uniform(0, 1, trials) * (width - w), rng.uniform(0, 1, trials) * (height - h)
    patches = np.stack([x0, y0, x0 + w, y0 + h], 1).astype(np.int64)  # [T, 4], int() rounding
    ok = (h / w >= 0.5) & (h / w <= 2) & (patches[:, 2:] > patches[:, :2]).all(1)  # [T]
    cx, cy = (boxes[:, 0] + boxes[:, 2]) / 2, (boxes[:, 1] + boxes[:, 3]) / 2
    p = patches[:, :, None]  # [T, 4, 1]
    inside = (cx > p[:, 0]) & (cx < p[:, 2]) & (cy > p[:, 1]) & (cy < p[:, 3])  # [T, n]
    if n:
        inter = np.clip(np.minimum(patches[:, None, 2:], boxes[None, :, 2:])
                        - np.maximum(patches[:, None, :2], boxes[None, :, :2]), 0, None).prod(2)
        area_p = (patches[:, 2] - patches[:, 0]) * (patches[:, 3] - patches[:, 1])  # [T]
        area_b = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])  # [n]
        iou = inter / np.maximum(area_p[:, None] + area_b[None] - inter, 1e-12)  # [T, n]
        ok &= (inside & (iou >= mode)).any(1)
    if not ok.any():
        return whole, np.ones(n, bool)
    t = int(ok.argmax())
    return tuple(int(v) for v in patches[t]), inside[t]


def warp(img, canvas_offset, patch, flip, size, mean, colour=None):
    """RGB pixels [H, W, 3] (0-255), `colour` applied, at canvas_offset (left, top) on a `mean`-
    filled canvas: its integer patch (x0, y0, x1, y1), mirrored when `flip`, resized to size x size
    as F.interpolate(bilinear, align_corners=False), minus the mean -> float [3, S, S]."""
    (h, w), (xs, ys) = img.shape[:2], _sample_positions(canvas_offset, patch, flip, size)
    # the rows / columns bilinear sampling can touch (floor and floor + 1)
    c0, c1 = max(int(math.floor(xs.min())), 0), min(int(math.floor(xs.max())) + 2, w)
    r0, r1 = max(int(math.floor(ys.min())), 0), min(int(math.floor(ys.max())) + 2, h)
    if c1 <= c0 or r1 <= r0:  # the patch shows only the fill
        return torch.zeros(3, size, size)
    window = np.ascontiguousarray(img[r0:r1, c0:c1].transpose(2, 0, 1), dtype=np.float32)
    if colour is not None:
        window = photometric_distort(window, colour)  # [3, h', w']
    src = torch.from_numpy(window) - torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
    return _sample(src[None], torch.from_numpy(xs - c0)[None], torch.from_numpy(ys - r0)[None])[0]


def _photometric_params(rng):
    """Photometric draws (the SSD paper, section 2.2; mmdetection's PhotoMetricDistortion) ->
    dict(brightness +U(-32, 32), contrast_before or (50/50) contrast_after xU(0.5, 1.5), saturation
    xU(0.5, 1.5), hue +U(-18, 18) degrees, channels permuted), each with p 0.5 (else 0, 1, None)."""
    def maybe(otherwise, draw, *args):
        return draw(*args) if rng.random() < 0.5 else otherwise
    brightness, first = maybe(0.0, rng.uniform, -32, 32), bool(rng.random() < 0.5)
    contrast = maybe(1.0, rng.uniform, 0.5, 1.5)
    return dict(brightness=brightness, contrast_before=contrast if first else 1.0,
                saturation=maybe(1.0, rng.uniform, 0.5, 1.5), hue=maybe(0.0, rng.uniform, -18, 18),
                contrast_after=1.0 if first else contrast, channels=maybe(None, rng.permutation, 3))


def _colour(x, brightness, contrast_before, saturation, hue, contrast_after):
    """The photometric steps on float RGB planes [..., 3, H, W] (0-255), clipped to [0, 255]:
    numpy with numbers (steps that change nothing skipped) or torch with [B, 1, 1, 1] tensors."""
    tensor = torch.is_tensor(x)  # tensors: every step (testing a value would sync the device)
    xp = torch if tensor else np
    x = x + brightness
    if tensor or contrast_before != 1:
        x *= contrast_before
    if tensor or saturation != 1:  # HSV saturation x f is a lerp of each channel towards the max
        v = xp.maximum(xp.maximum(x[..., 0:1, :, :], x[..., 1:2, :, :]), x[..., 2:3, :, :])
        x -= v
        x *= saturation
        x += v
    if tensor or hue != 0:  # rotate the HSV hue (each pixel's max and min channel kept)
        r, g, b = x[..., 0:1, :, :], x[..., 1:2, :, :], x[..., 2:3, :, :]  # [..., 1, H, W]
        mx, mn = xp.maximum(xp.maximum(r, g), b), xp.minimum(xp.minimum(r, g), b)
        chroma, is_r = mx - mn, mx == r
        is_g = (mx == g) & ~is_r
        is_b = ~(is_r | is_g)
        # hue in sextants [-1, 5) times chroma: g-b when r is the max, b-r+2c when g, r-g+4c when b
        h = is_r * (g - b) + is_g * (b - r + 2 * chroma) + is_b * (r - g + 4 * chroma)
        h /= chroma + (chroma == 0)  # a grey pixel (chroma 0) stays grey whatever its hue
        h += hue / 60.0
        h += 6 * (h < 0)
        h -= 6 * (h >= 6)  # now in [0, 6)
        x = xp.concatenate([xp.abs(h - 3) - 1, 2 - xp.abs(h - 2), 2 - xp.abs(h - 4)], -3)
        x = xp.clip(x, 0, 1) * chroma + mn
    if tensor or contrast_after != 1:
        x *= contrast_after
    return xp.clip(x, 0, 255, out=x)


def _sample_positions(canvas_offset, patch, flip, size):
    """Image-pixel (xs [S], ys [S]) where F.interpolate samples the canvas patch (flipped)."""
    (left, top), (x0, y0, x1, y1) = canvas_offset, patch
    centres = np.arange(size, dtype=np.float64) + 0.5
    xs, ys = (np.clip(centres * (n / size) - 0.5, 0, n - 1) for n in (x1 - x0, y1 - y0))
    return ((x1 - x0 - 1) - xs if flip else xs) + x0 - left, ys + y0 - top


def _sample(x, xs, ys):
    """x [B, 3, h, w] sampled bilinearly at columns xs [B, S] x rows ys [B, S], 0 past the edges."""
    h, w = x.shape[-2:]
    gx, gy = ((2 * xs + 1) / w - 1).float(), ((2 * ys + 1) / h - 1).float()  # [B, S]
    grid = torch.stack(torch.broadcast_tensors(gx[:, None, :], gy[:, :, None]), -1)  # [B, S, S, 2]
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def _as_arrays(boxes, labels):
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    labels = np.asarray(labels, dtype=np.int64).reshape(-1)
    if len(boxes) != len(labels):
        raise ValueError(f"{len(boxes)} boxes but {len(labels)} labels")
    return boxes, labels


class DetectionDataset(torch.utils.data.Dataset):
    """source + transform -> items (image [3, S, S], boxes [n, 4] in [0, 1], labels [n], index);
    `difficult` boxes dropped unless keep_difficult."""

    def __init__(self, source, transform, keep_difficult=False):
        self.source, self.transform, self.keep_difficult = source, transform, keep_difficult
        self._size_warned = set()

    def __len__(self):
        return len(self.source)

    def __getitem__(self, i):
        image, ann = self.source.load_image(i), self.source.annotation(i)
        keep = ~ann["difficult"] | self.keep_difficult
        ann_size = (ann["width"], ann["height"])
        if image.size != ann_size and i not in self._size_warned:
            self._size_warned.add(i)
            log.warning("image %s: image is %dx%d but its annotation says %dx%d; boxes kept as "
                        "written", self.source.image_id(i), *image.size, *ann_size)
        return (*self.transform(image, ann["boxes"][keep], ann["labels"][keep]), i)


def collate(batch):
    """[(image, boxes, labels, index)] -> (images [B, 3, S, S], list of B boxes [n_i, 4], list of
    B labels [n_i], indices int64 [B]). TrainTransform(on_device=True)'s (pixels, params) images
    become (uint8 [B, H, W, 3] zero padded to the largest, params [B, P]) for augment_batch."""
    images, boxes, labels, indices = zip(*batch)
    if isinstance(images[0], tuple):
        pixels, params = zip(*images)
        padded = torch.zeros(len(pixels), *map(max, zip(*(p.shape for p in pixels))),
                             dtype=torch.uint8)  # [B, H, W, 3]
        for k, p in enumerate(pixels):
            padded[k, :p.shape[0], :p.shape[1]] = p
        images = (padded, torch.stack(params))
    else:
        images = torch.stack(images)
    return images, list(boxes), list(labels), torch.tensor(indices, dtype=torch.int64)


# Shared by train.py, evaluate.py and detect.py: usage errors, durations, runs, drawing
class UsageError(Exception):
    """A mistake that stops a whole command (exit 2); the message is one line, printed as is."""


def duration(seconds):
    """'42s', '3m47s' or '2h05m'."""
    s = int(round(seconds))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else (
        f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s")


def newest_run_file(name, runs_dir="runs"):
    """The most recently written runs/*/<name> (best.pt, last.pt), or None."""
    found = glob.glob(os.path.join(glob.escape(runs_dir), "*", name))
    return max(filter(os.path.isfile, found), key=os.path.getmtime, default=None)


def to_tensor(image):
    """PIL RGB -> uint8 tensor [3, H, W]."""
    return torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1)  # [3, H, W]


def draw_detections(image, boxes, scores, labels, class_names):
    """Draw boxes [k, 4] xyxy pixels with "name 0.87" labels on `image` (PIL RGB, in place), best
    on top. A label sits above its box (inside its top edge where there is no room), moved down
    below any better one it would cover. Returns the label rectangles (x1, y1, x2, y2), per box."""
    w, h = image.size
    line = max(2, round(min(w, h) / 200))
    try:  # Pillow >= 10.1 scales its built-in font; older ones have the small bitmap font only
        font = ImageFont.load_default(size=max(12, round(min(w, h) / 32)))
    except (TypeError, OSError):
        font = ImageFont.load_default()
    draw, rects, origins = ImageDraw.Draw(image), [], []  # origins: where each text is drawn
    texts = [f"{class_names[int(c) - 1]} {float(s):.2f}" for s, c in zip(scores, labels)]
    for (x1, y1, _, _), text in zip(boxes.tolist(), texts):
        left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
        tw, th = right - left + 2 * line, bottom - top + 2 * line
        tx = min(max(0.0, x1), max(0.0, w - tw))
        ty = y1 - th if y1 - th >= 0 else min(max(0.0, y1), max(0.0, h - th))
        while hit := [r for r in rects if r[0] < tx + tw and tx < r[2] and r[1] < ty + th
                      and ty < r[3]]:
            ty = max(r[3] for r in hit)  # only ever down: ends after at most len(rects) moves
        rects.append((tx, ty, tx + tw, ty + th))
        origins.append((tx + line - left, ty + line - top))
    for i in reversed(range(len(scores))):
        colour = _class_colour(int(labels[i]))
        draw.rectangle(boxes[i].tolist(), outline=colour, width=line)
        draw.rectangle(rects[i], fill=colour)
        draw.text(origins[i], texts[i], fill=_text_colour(colour), font=font)
    return rects


def _class_colour(label):
    """A saturated colour per class; hues spaced by the golden ratio (neighbours differ)."""
    r, g, b = colorsys.hsv_to_rgb((label * 0.618033988749895) % 1.0, 0.85, 0.95)
    return int(r * 255), int(g * 255), int(b * 255)


def _text_colour(background):
    """Black on light backgrounds, white on dark ones (ITU-R BT.601 luma)."""
    r, g, b = background
    return (0, 0, 0) if 0.299 * r + 0.587 * g + 0.114 * b > 140 else (255, 255, 255)


if __name__ == "__main__":
    import argparse
    p = argparse.ArgumentParser(description="Write images of the synthetic shapes set.")
    p.add_argument("folder", help="where to write shapes_<split>_NNN.png")
    p.add_argument("--split", choices=["train", "val"], default="val", help="(default val)")
    p.add_argument("--num", type=int, default=8, help="how many images (default 8)")
    args = p.parse_args()
    os.makedirs(args.folder, exist_ok=True)
    source = ShapesDetection(args.split)
    indices = range(min(args.num, len(source)))
    for i in indices:
        source.load_image(i).save(os.path.join(args.folder, f"shapes_{args.split}_{i:03d}.png"))
    print(f"wrote {len(indices)} images to {args.folder}")
