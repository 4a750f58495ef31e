"""Tests of data.py: the VOC / COCO / shapes sources on trees written into tmp_path (and on BCCD
where a copy is present), image loading in every mode and every failure, and the augmentation:
invariants on random boxes, parity of the one-pass warp with a slow canvas/crop/flip/resize
reference, photometric steps against colorsys, boxes that follow the pixels, and the batched
device path against the per-image one."""
import colorsys
import json
import logging
import re
import runpy
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import data
import ssd
from data import DataError

# --- helpers --------------------------------------------------------------------------------------


def write_voc(root, images, splits, size_in_xml=True):
    """A VOC-layout folder: images = {id: (width, height, [(name, xmin, ymin, xmax, ymax,
    difficult)])} with 1-based coordinates as VOC writes them; splits = {name: [ids]}."""
    for sub in ("Annotations", "JPEGImages", "ImageSets/Main"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    for image_id, (w, h, objects) in images.items():
        Image.new("RGB", (w, h), (90, 120, 150)).save(root / "JPEGImages" / f"{image_id}.jpg")
        size = f"<size><width>{w}</width><height>{h}</height><depth>3</depth></size>"
        objs = "".join(
            f"<object><name>{n}</name><difficult>{d}</difficult><bndbox><xmin>{x1}</xmin>"
            f"<ymin>{y1}</ymin><xmax>{x2}</xmax><ymax>{y2}</ymax></bndbox></object>"
            for n, x1, y1, x2, y2, d in objects)
        xml = (f"<annotation><filename>{image_id}.jpg</filename>{size if size_in_xml else ''}"
               f"{objs}</annotation>")
        (root / "Annotations" / f"{image_id}.xml").write_text(xml)
    for name, ids in splits.items():
        (root / "ImageSets" / "Main" / f"{name}.txt").write_text("".join(i + "\n" for i in ids))
    return root


def warnings_text(caplog):
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


# --- VOC ------------------------------------------------------------------------------------------

def test_voc_one_based_coordinates_and_difficult_flag(tmp_path):
    root = write_voc(tmp_path / "VOC2007", {
        "000001": (64, 48, [("dog", 1, 1, 10, 20, 0), ("person", 5, 6, 64, 48, 1)]),
        "000002": (64, 48, []),
    }, {"trainval": ["000001", "000002"]})
    src = data.VOCDetection(root, "trainval")
    assert src.class_names == ssd.VOC_CLASSES and len(src) == 2
    assert src.image_id(0) == "000001"
    a = src.annotation(0)
    # pixels 1..10 (1-based, inclusive) are the continuous span [0, 10]
    np.testing.assert_array_equal(a["boxes"], [[0, 0, 10, 20], [4, 5, 64, 48]])
    assert a["boxes"].dtype == np.float32 and a["labels"].dtype == np.int64
    assert a["labels"].tolist() == [ssd.VOC_CLASSES.index("dog") + 1,
                                    ssd.VOC_CLASSES.index("person") + 1]
    assert a["difficult"].tolist() == [False, True]
    assert (a["width"], a["height"]) == (64, 48)
    empty = src.annotation(1)
    assert empty["boxes"].shape == (0, 4) and empty["labels"].shape == (0,)
    assert src.load_image(0).mode == "RGB" and src.load_image(0).size == (64, 48)


def test_voc_image_found_by_id_whatever_its_extension(tmp_path):
    root = write_voc(tmp_path / "v", {"a": (20, 10, []), "b": (20, 10, [])},
                     {"trainval": ["a", "b"]})
    Image.new("RGB", (20, 10), (1, 2, 3)).save(root / "JPEGImages" / "a.png")  # .jpg wins
    (root / "JPEGImages" / "b.jpg").rename(root / "JPEGImages" / "b.png")
    src = data.VOCDetection(root)
    images = root / "JPEGImages"
    assert src.image_paths == [str(images / "a.jpg"), str(images / "b.png")]
    assert src.load_image(1).size == (20, 10)


def test_voc_explicit_class_list_reports_unknown_names(tmp_path, caplog):
    root = write_voc(tmp_path / "set", {
        "a": (50, 50, [("cat", 2, 2, 20, 20, 0), ("zebra", 3, 3, 30, 30, 0),
                       ("zebra", 4, 4, 31, 31, 0)]),
    }, {"train": ["a"]})
    with caplog.at_level(logging.WARNING, logger="data"):
        src = data.VOCDetection(root, "train", class_names=["cat", "dog"])
    assert src.annotation(0)["labels"].tolist() == [1]
    lines = warnings_text(caplog)
    assert len(lines) == 1 and str(root / "Annotations" / "a.xml") in lines[0]
    assert "zebra" in lines[0]


def test_voc_class_list_read_from_all_annotations_when_not_voc(tmp_path):
    root = write_voc(tmp_path / "cells", {
        "a": (40, 40, [("RBC", 1, 1, 10, 10, 0)]),
        "b": (40, 40, [("WBC", 1, 1, 10, 10, 0), ("Platelets", 2, 2, 5, 5, 0)]),
    }, {"train": ["a"], "val": ["b"]})
    train, val = data.VOCDetection(root, "train"), data.VOCDetection(root, "val")
    # names from every XML of the folder, sorted, so both splits share one label map
    assert train.class_names == val.class_names == ["Platelets", "RBC", "WBC"]
    assert train.annotation(0)["labels"].tolist() == [2]
    assert val.annotation(0)["labels"].tolist() == [3, 1]


def test_voc_box_outside_image_is_clipped_with_one_warning(tmp_path, caplog):
    root = write_voc(tmp_path / "v", {
        "a": (60, 40, [("cat", -4, 1, 70, 30, 0), ("dog", 10, 10, 80, 90, 0),
                       ("cow", 100, 100, 120, 120, 0)]),
    }, {"trainval": ["a"]})
    with caplog.at_level(logging.WARNING, logger="data"):
        src = data.VOCDetection(root)
    np.testing.assert_array_equal(src.annotation(0)["boxes"], [[0, 0, 60, 30], [9, 9, 60, 40]])
    lines = warnings_text(caplog)
    assert len(lines) == 1 and "a.xml" in lines[0] and "clipped" in lines[0]


def test_voc_degenerate_boxes_dropped(tmp_path, caplog):
    root = write_voc(tmp_path / "v", {
        "a": (60, 40, [("cat", 5, 5, 5, 5, 0), ("cat", 9, 9, 3, 20, 0), ("dog", 1, 1, 2, 2, 0)]),
    }, {"trainval": ["a"]})
    with caplog.at_level(logging.WARNING, logger="data"):
        src = data.VOCDetection(root)
    np.testing.assert_array_equal(src.annotation(0)["boxes"], [[0, 0, 2, 2]])
    assert any("a.xml" in line and "2 box" in line for line in warnings_text(caplog))


def test_voc_size_read_from_image_when_xml_has_none(tmp_path):
    root = write_voc(tmp_path / "v", {"a": (33, 21, [("cat", 1, 1, 40, 10, 0)])},
                     {"trainval": ["a"]}, size_in_xml=False)
    a = data.VOCDetection(root).annotation(0)
    assert (a["width"], a["height"]) == (33, 21)
    np.testing.assert_array_equal(a["boxes"], [[0, 0, 33, 10]])


def test_voc_malformed_xml_names_the_file(tmp_path):
    root = write_voc(tmp_path / "v", {"a": (20, 20, [])}, {"trainval": ["a"]})
    bad = root / "Annotations" / "a.xml"
    bad.write_text("<annotation><object><name>cat</name></annotation")
    with pytest.raises(DataError, match="malformed XML") as e:
        data.VOCDetection(root)
    assert str(e.value).startswith(str(bad))


def test_voc_bad_coordinate_names_the_file(tmp_path):
    root = write_voc(tmp_path / "v", {"a": (20, 20, [("cat", "x", 1, 5, 5, 0)])},
                     {"trainval": ["a"]})
    with pytest.raises(DataError, match="xmin") as e:
        data.VOCDetection(root)
    assert str(e.value).startswith(str(root / "Annotations" / "a.xml"))


def test_voc_missing_split_file_and_missing_image(tmp_path):
    root = write_voc(tmp_path / "v", {"a": (20, 20, [])}, {"train": ["a"]})
    with pytest.raises(DataError, match="split file not found") as e:
        data.VOCDetection(root, "test")
    assert str(e.value).startswith(str(root / "ImageSets" / "Main" / "test.txt"))
    (root / "ImageSets" / "Main" / "train.txt").write_text("a\nghost\n")
    with pytest.raises(DataError, match="image not found") as e:
        data.VOCDetection(root, "train")
    assert str(e.value).startswith(str(root / "JPEGImages" / "ghost.jpg"))


def test_build_source_voc_07_plus_12_and_07_test(tmp_path):
    devkit = tmp_path / "VOCdevkit"
    write_voc(devkit / "VOC2007", {"07a": (30, 30, [("cat", 1, 1, 9, 9, 0)]),
                                   "07b": (30, 30, [("dog", 1, 1, 9, 9, 1)])},
              {"trainval": ["07a"], "test": ["07b"]})
    write_voc(devkit / "VOC2012", {"12a": (30, 30, [("cow", 2, 2, 9, 9, 0)]),
                                   "12b": (30, 30, [("cow", 3, 3, 9, 9, 0)])},
              {"trainval": ["12a", "12b"]})
    for root in (tmp_path, devkit):
        train = data.build_source("voc", root, None, train=True)
        assert isinstance(train, data.ConcatSource) and len(train) == 3
        assert [train.image_id(i) for i in range(3)] == ["07a", "12a", "12b"]
        assert train.annotation(2)["boxes"].tolist() == [[2, 2, 9, 9]]
        test = data.build_source("voc", root, None, train=False)
        assert len(test) == 1 and test.image_id(0) == "07b"
        assert test.annotation(0)["difficult"].tolist() == [True]
    # a VOC-layout folder given directly; a list of folders becomes one source
    assert len(data.build_source("voc", devkit / "VOC2012", None, train=True)) == 2
    both = data.build_source("voc", [devkit / "VOC2007", devkit / "VOC2012"], "trainval", True)
    assert len(both) == 3 and both.class_names == ssd.VOC_CLASSES
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no VOC data") as e:
        data.build_source("voc", tmp_path / "empty", None, train=True)
    assert "VOC2007" in str(e.value)


@pytest.mark.parametrize("name", ["voc", "coco"])
def test_build_source_missing_data_root_says_so(tmp_path, name):
    missing = tmp_path / "nonexistent"
    with pytest.raises(DataError, match=f"^{re.escape(str(missing))}: folder does not exist$"):
        data.build_source(name, missing, None, train=True)
    with pytest.raises(DataError, match="folder does not exist"):
        data.build_source(name, [tmp_path, missing] if name == "voc" else missing, None, True)
    (tmp_path / "file").write_text("")
    with pytest.raises(DataError, match="file: not a folder$"):
        data.build_source(name, tmp_path / "file", None, train=False)


def test_bccd_class_list_and_counts(shared_data):
    root = shared_data / "bccd" / "BCCD"
    train, val = data.VOCDetection(root, "train"), data.VOCDetection(root, "val")
    assert train.class_names == val.class_names == ["Platelets", "RBC", "WBC"]
    assert (len(train), len(val)) == (205, 87)

    def counts(src):
        labels = np.concatenate([src.annotation(i)["labels"] for i in range(len(src))])
        return [int((labels == k).sum()) for k in (2, 3, 1)]  # RBC, WBC, Platelets

    # README counts less the two zero-area RBC boxes the loader drops: BloodImage_00343 is in
    # train.txt and BloodImage_00338 in val.txt
    assert counts(train) == [2382 - 1, 214, 209]
    assert counts(val) == [968 - 1, 87, 83]
    for i in range(len(train)):
        a = train.annotation(i)
        assert (a["width"], a["height"]) == (640, 480) and not a["difficult"].any()
        assert (a["boxes"][:, 2:] > a["boxes"][:, :2]).all()
        assert (a["boxes"] >= 0).all() and (a["boxes"][:, [0, 2]] <= 640).all()


def source_ids(src):
    return {src.image_id(i) for i in range(len(src))}


def test_build_source_voc_folder_default_splits(tmp_path):
    images = {i: (20, 20, [("cat", 2, 2, 9, 9, 0)]) for i in "abcd"}
    # no test split (BCCD's layout): train / val, never trainval, which holds the val images
    root = write_voc(tmp_path / "noTest", images,
                     {"train": ["a", "b"], "val": ["c"], "trainval": ["a", "b", "c"]})
    train = data.build_source("voc", root, None, train=True)
    val = data.build_source("voc", root, None, train=False)
    assert (train.split, source_ids(train)) == ("train", {"a", "b"})
    assert (val.split, source_ids(val)) == ("val", {"c"})
    # an explicit split still wins
    assert data.build_source("voc", root, "trainval", train=True).split == "trainval"
    assert data.build_source("voc", root, "train", train=False).split == "train"
    # only trainval and val: training has nothing else to take
    (root / "ImageSets" / "Main" / "train.txt").unlink()
    assert data.build_source("voc", root, None, train=True).split == "trainval"
    # with a test split (VOC2007's layout): trainval / test, as before
    root = write_voc(tmp_path / "withTest", images,
                     {"train": ["a"], "val": ["b"], "trainval": ["a", "b"], "test": ["c", "d"]})
    assert data.build_source("voc", root, None, train=True).split == "trainval"
    assert source_ids(data.build_source("voc", root, None, train=False)) == {"c", "d"}


# --- COCO -----------------------------------------------------------------------------------------

def write_coco(root, split="val2017"):
    (root / "annotations").mkdir(parents=True)
    (root / split).mkdir()
    for name, size in (("1.jpg", (50, 40)), ("2.jpg", (30, 30)), ("3.jpg", (20, 20))):
        Image.new("RGB", size, (10, 20, 30)).save(root / split / name)
    doc = {
        "images": [{"id": 11, "file_name": "1.jpg", "width": 50, "height": 40},
                   {"id": 7, "file_name": "2.jpg", "width": 30, "height": 30},
                   {"id": 5, "file_name": "3.jpg", "width": 20, "height": 20}],
        "categories": [{"id": 90, "name": "toothbrush"}, {"id": 1, "name": "person"},
                       {"id": 18, "name": "dog"}],
        "annotations": [
            {"id": 1, "image_id": 11, "category_id": 18, "bbox": [1.5, 2, 10, 20], "iscrowd": 0},
            {"id": 2, "image_id": 11, "category_id": 1, "bbox": [2, 3, 30, 20], "iscrowd": 1},
            {"id": 3, "image_id": 11, "category_id": 90, "bbox": [5, 5, 0.5, 10], "iscrowd": 0},
            {"id": 4, "image_id": 11, "category_id": 90, "bbox": [40, 30, 20, 20], "iscrowd": 0},
            {"id": 5, "image_id": 7, "category_id": 1, "bbox": [0, 0, 5, 5], "iscrowd": 1},
        ]}
    path = root / "annotations" / f"instances_{split}.json"
    path.write_text(json.dumps(doc))
    return path


def test_coco_crowd_degenerate_and_contiguous_labels(tmp_path, caplog):
    write_coco(tmp_path)
    with caplog.at_level(logging.WARNING, logger="data"):
        src = data.COCODetection(tmp_path, "val2017")
    assert src.class_names == ["person", "dog", "toothbrush"]  # ascending category id
    assert src.category_ids == [1, 18, 90]
    assert len(src) == 3 and [src.image_id(i) for i in range(3)] == [11, 7, 5]
    a = src.annotation(0)
    # crowd left out (kept aside), w < 1 dropped, xywh -> xyxy, the box past the edge clipped
    np.testing.assert_allclose(a["boxes"], [[1.5, 2, 11.5, 22], [40, 30, 50, 40]])
    assert a["labels"].tolist() == [2, 3]
    assert [src.category_ids[k - 1] for k in a["labels"]] == [18, 90]
    np.testing.assert_allclose(a["crowd"], [[2, 3, 32, 23]])
    assert not a["difficult"].any() and (a["width"], a["height"]) == (50, 40)
    assert src.annotation(1)["boxes"].shape == (0, 4) and len(src.annotation(1)["crowd"]) == 1
    assert any("clipped" in line for line in warnings_text(caplog))
    # training drops images left without boxes (2: crowd only, 3: none)
    assert len(data.COCODetection(tmp_path, "val2017", skip_empty=True)) == 1
    assert src.ann_file.endswith("instances_val2017.json")


def test_coco_errors_name_the_file(tmp_path):
    path = write_coco(tmp_path)
    with pytest.raises(DataError, match="annotation file not found"):
        data.COCODetection(tmp_path, "train2017")
    (tmp_path / "val2017" / "2.jpg").unlink()
    with pytest.raises(DataError, match="image not found") as e:
        data.COCODetection(tmp_path, "val2017")
    assert str(e.value).startswith(str(tmp_path / "val2017" / "2.jpg"))
    path.write_text('{"images": [')
    with pytest.raises(DataError, match="malformed JSON") as e:
        data.COCODetection(tmp_path, "val2017")
    assert str(e.value).startswith(str(path))
    path.write_text('{"images": []}')
    with pytest.raises(DataError, match="not a COCO instances file"):
        data.COCODetection(tmp_path, "val2017")


def test_coco_only_json_is_the_default_and_training_skips_empty_images(tmp_path):
    write_coco(tmp_path, "train2017")  # like tiny_coco: a train2017 json and nothing else
    val = data.build_source("coco", tmp_path, None, train=False)
    assert val.split == "train2017" and len(val) == 3
    train = data.build_source("coco", tmp_path, None, train=True)
    assert [train.image_id(i) for i in range(len(train))] == [11]  # 7: crowd only, 5: no box
    img = train.load_image(0)
    assert img.mode == "RGB" and img.size == (50, 40)


# --- shapes ---------------------------------------------------------------------------------------

def test_shapes_deterministic_and_boxes_tight():
    a, b = data.ShapesDetection("train", seed=3), data.ShapesDetection("train", seed=3)
    assert len(a) == 2000 and len(data.ShapesDetection("val")) == 200
    assert a.class_names == ["circle", "square", "triangle"]
    for i in (0, 17, 1999):
        assert np.array_equal(np.asarray(a.load_image(i)), np.asarray(b.load_image(i)))
        np.testing.assert_array_equal(a.annotation(i)["boxes"], b.annotation(i)["boxes"])
    assert not np.array_equal(np.asarray(a.load_image(0)), np.asarray(a.load_image(1)))
    other_seed = data.ShapesDetection("train", seed=4)
    assert not np.array_equal(np.asarray(a.load_image(0)), np.asarray(other_seed.load_image(0)))
    val = data.ShapesDetection("val", seed=3)
    assert not np.array_equal(np.asarray(a.load_image(0)), np.asarray(val.load_image(0)))

    src = data.ShapesDetection("train", num_images=60, seed=0)
    counts = np.zeros(4, int)
    for i in range(len(src)):
        img, boxes, labels, colours = src._render(i)
        pixels = np.asarray(img).astype(int)
        assert 1 <= len(boxes) <= 4 and img.size == (300, 300)
        np.add.at(counts, labels, 1)
        for box, colour in zip(boxes.astype(int), colours):
            x1, y1, x2, y2 = box
            assert 0 <= x1 < x2 <= 300 and 0 <= y1 < y2 <= 300
            assert 0.1 * 300 <= max(x2 - x1, y2 - y1) <= 0.6 * 300 + 1
            # the box is exactly the extent of the shape's colour (no background pixel has it)
            on = (pixels == colour).all(-1)
            ys, xs = np.nonzero(on[max(y1 - 3, 0):y2 + 3, max(x1 - 3, 0):x2 + 3])
            assert (xs.min() + max(x1 - 3, 0), ys.min() + max(y1 - 3, 0)) == (x1, y1)
            assert (xs.max() + max(x1 - 3, 0) + 1, ys.max() + max(y1 - 3, 0) + 1) == (x2, y2)
        # shapes never overlap
        for j in range(len(boxes)):
            for k in range(j + 1, len(boxes)):
                bj, bk = boxes[j], boxes[k]
                assert (bj[2] <= bk[0] or bk[2] <= bj[0] or bj[3] <= bk[1] or bk[3] <= bj[1])
    assert (counts[1:] > 0).all()
    with pytest.raises(IndexError):
        src.load_image(60)


# --- load_image -----------------------------------------------------------------------------------

def saved(tmp_path, img, name, **kw):
    path = tmp_path / name
    img.save(path, **kw)
    return path


def test_load_image_modes(tmp_path):
    rgba = Image.new("RGBA", (4, 4), (255, 0, 0, 0))
    rgba.putpixel((1, 1), (255, 0, 0, 255))
    rgba.putpixel((2, 2), (0, 0, 0, 128))
    out = data.load_image(saved(tmp_path, rgba, "rgba.png"))
    assert out.mode == "RGB"
    assert out.getpixel((0, 0)) == (255, 255, 255) and out.getpixel((1, 1)) == (255, 0, 0)
    assert abs(out.getpixel((2, 2))[0] - 127) <= 1  # half-transparent black on white

    la = Image.new("LA", (3, 3), (40, 255))
    la.putpixel((0, 0), (40, 0))
    out = data.load_image(saved(tmp_path, la, "la.png"))
    assert out.getpixel((0, 0)) == (255, 255, 255) and out.getpixel((1, 1)) == (40, 40, 40)

    pal = Image.new("P", (3, 3), 1)
    pal.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
    pal.putpixel((0, 0), 0)
    out = data.load_image(saved(tmp_path, pal, "p.png", transparency=0))
    assert out.getpixel((0, 0)) == (255, 255, 255) and out.getpixel((2, 2)) == (10, 200, 30)
    out = data.load_image(saved(tmp_path, pal, "p_opaque.png"))
    assert out.getpixel((0, 0)) == (0, 0, 0)

    assert data.load_image(saved(tmp_path, Image.new("L", (2, 2), 77), "l.png")).getpixel(
        (0, 0)) == (77, 77, 77)
    one = Image.new("1", (2, 2), 0)
    one.putpixel((1, 1), 1)
    out = data.load_image(saved(tmp_path, one, "one.png"))
    assert out.getpixel((0, 0)) == (0, 0, 0) and out.getpixel((1, 1)) == (255, 255, 255)

    # 16-bit: full scale 0..65535 -> 0..255, not clipped at 255
    i16 = Image.fromarray(np.array([[0, 257 * 100], [65535, 257 * 7]], np.uint16))
    assert i16.mode == "I;16"
    out = np.asarray(data.load_image(saved(tmp_path, i16, "i16.png")))
    assert out[..., 0].tolist() == [[0, 100], [255, 7]]
    i32 = Image.fromarray(np.array([[-1000, 0], [1000, 3000]], np.int32))
    out = np.asarray(data.load_image(saved(tmp_path, i32, "i32.tif")))
    assert out[..., 0].tolist() == [[0, 64], [128, 255]]  # stretched min..max
    f = Image.fromarray(np.array([[0.0, 0.5], [1.0, 0.25]], np.float32), "F")
    out = np.asarray(data.load_image(saved(tmp_path, f, "f.tif")))
    assert out[..., 0].tolist() == [[0, 128], [255, 64]]
    cmyk = Image.new("CMYK", (8, 8), (0, 255, 255, 0))  # no cyan/black: red
    out = data.load_image(saved(tmp_path, cmyk, "cmyk.tif"))
    assert out.getpixel((3, 3)) == (255, 0, 0)
    ycc = Image.new("RGB", (8, 8), (20, 200, 60)).convert("YCbCr")
    ycc_path = saved(tmp_path, ycc, "ycc.tif")
    try:  # some Pillow releases (10.0, 12.3) write a YCbCr TIFF that they cannot read back
        Image.open(ycc_path).load()
    except OSError:
        ycc_path = saved(tmp_path, ycc, "ycc.jpg")  # JPEG stores YCbCr natively
    out = np.asarray(data.load_image(ycc_path))
    assert np.abs(out[4, 4].astype(int) - [20, 200, 60]).max() <= 3


def test_load_image_exif_orientation(tmp_path):
    img = Image.new("RGB", (40, 20), (0, 0, 0))
    img.paste((255, 0, 0), (0, 0, 8, 8))  # stored top-left
    exif = img.getexif()
    exif[0x0112] = 6  # display = stored rotated 90 degrees clockwise
    path = saved(tmp_path, img, "rot.jpg", exif=exif.tobytes(), quality=95)
    out = data.load_image(path)
    assert out.size == (20, 40)
    assert out.getpixel((17, 2))[0] > 200 and out.getpixel((2, 2))[0] < 50  # now top-right
    assert data._image_size(path) == (20, 40)


def test_load_image_failures_name_the_file(tmp_path, monkeypatch):
    good = saved(tmp_path, Image.new("RGB", (200, 150), (1, 2, 3)), "good.jpg")
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes(good.read_bytes()[:300])
    text = tmp_path / "notes.jpg"
    text.write_text("this is not a JPEG\n")
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    cases = [(truncated, "unreadable|truncated"), (text, "not an image"),
             (empty, "not an image"), (tmp_path / "missing.jpg", "not found"),
             (tmp_path, "not a file")]
    for path, reason in cases:
        with pytest.raises(DataError, match=reason) as e:
            data.load_image(path)
        assert str(e.value).startswith(str(path) + ":")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100 * 100)
    for pixels in (150 * 150, 300 * 300):  # PIL warns above the limit and raises above twice it
        big = saved(tmp_path, Image.new("RGB", (pixels // 100, 100)), f"big{pixels}.png")
        with pytest.raises(DataError, match="too large") as e:
            data.load_image(big)
        assert str(e.value).startswith(str(big))


# --- augmentation ---------------------------------------------------------------------------------

def random_boxes(rng, w, h, n):
    """Boxes of every kind: inside, reaching outside the image, tiny, degenerate."""
    x1, y1 = rng.uniform(-0.2 * w, w, n), rng.uniform(-0.2 * h, h, n)
    bw, bh = rng.uniform(0, 0.8 * w, n), rng.uniform(0, 0.8 * h, n)
    boxes = np.stack([x1, y1, x1 + bw, y1 + bh], 1)
    degenerate = rng.random(n) < 0.1
    boxes[degenerate, 2] = boxes[degenerate, 0]
    return boxes


def valid_count(boxes, w, h):
    clipped = np.clip(boxes, 0, [w, h, w, h])
    return int(((clipped[:, 2] > clipped[:, 0]) & (clipped[:, 3] > clipped[:, 1])).sum())


def test_train_transform_invariants_on_random_boxes():
    transform = data.TrainTransform(size=48)
    rng = np.random.default_rng(0)
    for trial in range(400):
        torch.manual_seed(trial)
        w, h = int(rng.integers(8, 90)), int(rng.integers(8, 90))
        img = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        n = int(rng.integers(0, 6)) if trial % 5 else 0
        boxes = random_boxes(rng, w, h, n)
        labels = np.arange(1, n + 1)
        x, out_boxes, out_labels = transform(img, boxes, labels)
        assert x.shape == (3, 48, 48) and x.dtype == torch.float32
        mean = torch.tensor(ssd.MEAN).view(3, 1, 1)
        assert (x + mean).min() >= -1e-3 and (x + mean).max() <= 255 + 1e-3
        assert out_boxes.dtype == torch.float32 and out_labels.dtype == torch.int64
        assert out_boxes.shape == (len(out_labels), 4)
        assert (out_boxes >= 0).all() and (out_boxes <= 1).all()
        assert (out_boxes[:, 2:] > out_boxes[:, :2]).all()  # positive width and height
        assert len(set(out_labels.tolist())) == len(out_labels)  # no box duplicated
        assert set(out_labels.tolist()) <= set(labels.tolist())
        if valid_count(boxes, w, h) > 0:
            assert len(out_labels) >= 1  # a crop never takes every box away
        else:
            assert len(out_labels) == 0


def test_min_iou_crop_centre_rule_and_iou_constraint(monkeypatch):
    rng = np.random.default_rng(1)
    cropped = 0
    for min_iou in (0.0, 0.3, 0.7, 0.9):
        monkeypatch.setattr(data, "_CROP_MODES", (min_iou,))
        for _ in range(150):
            w, h = int(rng.integers(20, 400)), int(rng.integers(20, 400))
            n = int(rng.integers(1, 6))
            boxes = np.clip(random_boxes(rng, w, h, n), 0, [w, h, w, h])
            boxes = boxes[(boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])]
            if not len(boxes):
                continue
            patch, keep = data.min_iou_crop(boxes, w, h, rng)
            x0, y0, x1, y1 = patch
            assert 0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h
            if patch == (0, 0, w, h) and keep.all():
                continue  # every trial failed: the whole image, every box
            cropped += 1
            assert (x1 - x0) >= 0.3 * w - 1 and (y1 - y0) >= 0.3 * h - 1
            assert 0.5 * (x1 - x0) - 1 <= (y1 - y0) <= 2 * (x1 - x0) + 1
            cx, cy = (boxes[:, 0] + boxes[:, 2]) / 2, (boxes[:, 1] + boxes[:, 3]) / 2
            inside = (cx > x0) & (cx < x1) & (cy > y0) & (cy < y1)
            assert keep.any() and np.array_equal(keep, inside)
            # Caffe's rule over the kept boxes: one of them overlaps the patch by min_iou
            ious = [box_iou_slow(patch, b) for b in boxes[keep]]
            assert max(ious) >= min_iou - 1e-9
    assert cropped > 150  # about 200 of the 600 draws (seeds 1-3: 188-205)
    # no boxes: a patch of valid shape is taken at once
    monkeypatch.setattr(data, "_CROP_MODES", (0.9,))
    patch, keep = data.min_iou_crop(np.zeros((0, 4)), 100, 80, rng)
    assert keep.shape == (0,) and patch != (0, 0, 100, 80)


def box_iou_slow(a, b):
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - iw * ih
    return iw * ih / union


def warp_reference(img, canvas, offset, patch, flip, size, mean):
    """Build the mean-filled canvas, crop, mirror, F.interpolate, subtract the mean."""
    cw, ch = canvas
    left, top = offset
    h, w = img.shape[:2]
    full = np.empty((ch, cw, 3), np.float32)
    full[:] = mean
    full[top:top + h, left:left + w] = img
    x0, y0, x1, y1 = patch
    crop = full[y0:y1, x0:x1]
    if flip:
        crop = crop[:, ::-1]
    t = torch.from_numpy(crop.copy()).permute(2, 0, 1)[None]
    out = F.interpolate(t, size=(size, size), mode="bilinear", align_corners=False)[0]
    return out - torch.tensor(mean).view(3, 1, 1)


def test_warp_matches_canvas_crop_flip_resize_reference():
    rng = np.random.default_rng(2)
    for trial in range(60):
        w, h = int(rng.integers(5, 70)), int(rng.integers(5, 70))
        img = rng.integers(0, 256, (h, w, 3)).astype(np.float32)
        r = rng.uniform(1, 4) if trial % 3 else 1.0
        cw, ch = int(w * r), int(h * r)
        left, top = int(rng.uniform(0, cw - w)), int(rng.uniform(0, ch - h))
        x0, y0 = int(rng.integers(0, cw)), int(rng.integers(0, ch))
        patch = (x0, y0, int(rng.integers(x0 + 1, cw + 1)), int(rng.integers(y0 + 1, ch + 1)))
        if trial % 4 == 0:
            patch = (0, 0, cw, ch)
        flip, size = bool(trial % 2), int(rng.choice([16, 33, 64]))
        got = data.warp(img, (left, top), patch, flip, size, ssd.MEAN)
        want = warp_reference(img, (cw, ch), (left, top), patch, flip, size, ssd.MEAN)
        torch.testing.assert_close(got, want, atol=2e-3, rtol=0)


def test_warp_identity_is_preprocess_and_test_transform_maps_boxes_exactly():
    rng = np.random.default_rng(3)
    img = Image.fromarray(rng.integers(0, 256, (37, 53, 3), dtype=np.uint8))
    pixels = torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1)
    expected = ssd.preprocess([pixels], 300, ssd.MEAN)[0]
    got = data.warp(np.asarray(img), (0, 0), (0, 0, 53, 37), False, 300, ssd.MEAN)
    torch.testing.assert_close(got, expected, atol=2e-3, rtol=0)

    boxes = np.array([[0, 0, 53, 37], [5.5, 3, 20, 30.25]], np.float32)
    x, out_boxes, labels = data.TestTransform(300)(img, boxes, [4, 2])
    assert torch.equal(x, expected)
    np.testing.assert_array_equal(out_boxes.numpy(), boxes / np.float32([53, 37, 53, 37]))
    assert labels.tolist() == [4, 2] and labels.dtype == torch.int64
    x, out_boxes, labels = data.TestTransform(64)(img, np.zeros((0, 4)), [])
    assert x.shape == (3, 64, 64) and out_boxes.shape == (0, 4) and labels.shape == (0,)


def photometric_reference(pixel, p):
    """One pixel, step by step, with colorsys for HSV."""
    px = (np.array(pixel, np.float64) + p["brightness"]) * p["contrast_before"]
    h, s, v = colorsys.rgb_to_hsv(*px)
    s *= p["saturation"]
    h = (h + p["hue"] / 360.0) % 1.0
    px = np.array(colorsys.hsv_to_rgb(h, s, v)) * p["contrast_after"]
    if p["channels"] is not None:
        px = px[p["channels"]]
    return np.clip(px, 0, 255)


def test_photometric_distort_matches_per_pixel_colorsys():
    rng = np.random.default_rng(4)
    img = rng.uniform(0, 255, (3, 6, 7)).astype(np.float32)
    img[:, 0, :] = img[0, 0, :]  # grey pixels
    img[1, 1, :] = img[0, 1, :]  # ties for the max channel
    for trial in range(12):
        brightness, contrast, first = rng.uniform(-32, 32), rng.uniform(0.5, 1.5), trial % 2
        p = dict(brightness=brightness, contrast_before=contrast if first else 1.0,
                 saturation=rng.uniform(0.5, 1.5), hue=rng.uniform(-18, 18),
                 contrast_after=1.0 if first else contrast,
                 channels=rng.permutation(3) if trial % 3 else None)
        if trial == 0:
            p.update(brightness=0.0, contrast_before=1.0, contrast_after=1.0, saturation=1.0,
                     hue=0.0)
        out = data.photometric_distort(img, p)
        # values below 0 before the HSV steps are where colorsys and HSV libraries disagree
        for yy in range(img.shape[1]):
            for xx in range(img.shape[2]):
                px = img[:, yy, xx] + p["brightness"]
                if (px * p["contrast_before"] < 0).any():
                    continue
                want = photometric_reference(img[:, yy, xx], p)
                np.testing.assert_allclose(out[:, yy, xx], want, atol=2e-3)
        if trial == 0:
            np.testing.assert_allclose(out, img)
    big = rng.uniform(0, 255, (3, 130, 300)).astype(np.float32)  # several row blocks
    p["channels"] = np.array([2, 0, 1])
    whole = np.stack([data.photometric_distort(big[:, r:r + 1], p)[:, 0] for r in range(130)], 1)
    np.testing.assert_allclose(data.photometric_distort(big, p), whole, atol=1e-4)


def test_boxes_follow_the_pixels(monkeypatch):
    """With the colours left alone, the bright object in the output sits where its box says."""
    no_colour = dict(brightness=0.0, contrast_before=1.0, saturation=1.0, hue=0.0,
                     contrast_after=1.0, channels=None)
    monkeypatch.setattr(data, "_photometric_params", lambda rng: no_colour)
    img = np.zeros((90, 120, 3), np.uint8)
    img[20:60, 30:70] = 255
    box = np.array([[30, 20, 70, 60]], np.float32)
    transform = data.TrainTransform(size=100)
    mean = torch.tensor(ssd.MEAN).view(3, 1, 1)
    for seed in range(60):
        torch.manual_seed(seed)
        x, boxes, labels = transform(Image.fromarray(img), box, [1])
        assert labels.tolist() == [1]
        bright = ((x + mean)[0] > 200).numpy()  # red channel: mean fill is 123, object 255
        ys, xs = np.nonzero(bright)
        found = np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]) / 100
        np.testing.assert_allclose(found, boxes[0].numpy(), atol=0.025)
    # also check that the transform varies: different seeds give different geometry
    assert len({tuple(np.round(transform(Image.fromarray(img), box, [1])[1][0].numpy(), 3))
                for _ in range(10)}) > 1


def test_train_transform_random_numbers_follow_torch_seed():
    img = Image.fromarray(np.random.default_rng(5).integers(0, 256, (50, 60, 3), dtype=np.uint8))
    box = np.array([[10, 10, 40, 30]])
    a, b = data.TrainTransform(64), data.TrainTransform(64)
    torch.manual_seed(7)
    first = a(img, box, [1])
    again = b(img, box, [1])  # a fresh transform under the same torch seed: same draw
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])
    second = a(img, box, [1])  # the stream moves on
    assert not torch.equal(first[0], second[0])
    torch.manual_seed(8)  # a new torch seed (a new worker / epoch) re-seeds the generator
    other = a(img, box, [1])
    torch.manual_seed(7)
    assert torch.equal(a(img, box, [1])[0], first[0])
    assert not torch.equal(other[0], first[0])


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="no CUDA device (run by .ci/gpu-check)"))])
def test_device_path_matches_the_cpu_path_on_the_same_draws(device):
    # images of several sizes (padded into one batch), boxes near the edges, many seeds: every
    # photometric step, expand, crop and flip occur; augment_batch runs on CPU tensors in CI
    rng = np.random.default_rng(0)
    sizes = [(64, 48), (50, 70), (80, 40), (33, 33), (71, 52), (40, 60)] * 4
    cpu, dev = data.TrainTransform(40), data.TrainTransform(40, on_device=True)
    want, got, first_pixels = [], [], None
    for k, (w, h) in enumerate(sizes):
        img = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        boxes = [[1, 2, w * 0.6, h * 0.7], [w * 0.3, h * 0.2, w, h - 1]]
        torch.manual_seed(k)
        want.append(cpu(img, boxes, [1, 2]))
        torch.manual_seed(k)
        got.append(dev(img, boxes, [1, 2]))
        first_pixels = first_pixels if first_pixels is not None else np.array(img)
    # the worker only decodes: the image itself goes to the device
    assert torch.equal(got[0][0][0], torch.from_numpy(first_pixels))
    for (_, b0, l0), (_, b1, l1) in zip(want, got):  # boxes come from the same draws
        assert torch.equal(b0, b1) and torch.equal(l0, l1)
    (pixels, params), *_ = data.collate([(x, b, lab, 0) for x, b, lab in got])
    assert pixels.shape == (len(sizes), 70, 80, 3) and pixels.dtype == torch.uint8
    p = dict(zip(data._PARAMS, params[:, :len(data._PARAMS)].T))
    assert (p["hue"] != 0).any() and (p["saturation"] != 1).any() and (p["brightness"] != 0).any()
    assert (p["red_from"] != 0).any()  # a channel shuffle
    out = data.augment_batch(pixels.to(device), params.to(device), cpu.mean).cpu()
    assert out.shape == (len(sizes), 3, 40, 40)
    reference = torch.stack([x for x, _, _ in want])  # [B, 3, S, S]
    assert (out - reference).abs().max() < 0.01  # 0-255 scale: float rounding only
    # expand shows the mean fill (0 after subtraction) somewhere, and flips happened
    assert (reference.abs().sum(1) == 0).any()
    assert len({float(params[k, len(data._PARAMS) + 1] - params[k, len(data._PARAMS)]) > 0
                for k in range(len(sizes))}) == 2  # x positions rising (no flip) and falling


class SameImageTwice(torch.utils.data.Dataset):
    """Every item is the same image through the same TrainTransform: what differs between items
    is only the random numbers."""

    def __init__(self, transform):
        self.transform = transform
        self.img = Image.fromarray(np.full((40, 50, 3), 90, np.uint8))

    def __len__(self):
        return 2

    def __getitem__(self, i):
        return self.transform(self.img, [[5, 5, 30, 30]], [1])


def test_workers_draw_different_augmentations():
    transform = data.TrainTransform(32)
    torch.manual_seed(0)
    transform(Image.new("RGB", (20, 20)), [], [])  # the generator now exists in this process
    loader = torch.utils.data.DataLoader(SameImageTwice(transform), batch_size=1, num_workers=2)
    (x0, _, _), (x1, _, _) = list(loader)  # item i comes from worker i
    assert not torch.equal(x0, x1)


# --- Dataset and collate --------------------------------------------------------------------------

def test_detection_dataset_and_collate(tmp_path):
    src = data.ShapesDetection("val", num_images=5, size=64)
    ds = data.DetectionDataset(src, data.TrainTransform(size=64))
    loader = torch.utils.data.DataLoader(ds, batch_size=3, collate_fn=data.collate)
    batches = list(loader)
    images, boxes, labels, indices = batches[0]
    assert images.shape == (3, 3, 64, 64) and images.dtype == torch.float32
    assert isinstance(boxes, list) and len(boxes) == 3 and boxes[0].shape[1] == 4
    assert isinstance(labels, list) and all(lb.dtype == torch.int64 for lb in labels)
    assert indices.dtype == torch.int64 and indices.tolist() == [0, 1, 2]
    assert batches[1][0].shape[0] == 2 and batches[1][3].tolist() == [3, 4]

    root = write_voc(tmp_path / "v", {"a": (40, 30, [("cat", 1, 1, 20, 20, 0),
                                                     ("dog", 5, 5, 30, 25, 1)])},
                     {"test": ["a"]})
    voc = data.VOCDetection(root, "test")
    train_items = data.DetectionDataset(voc, data.TestTransform(32))[0]
    eval_items = data.DetectionDataset(voc, data.TestTransform(32), keep_difficult=True)[0]
    assert train_items[2].tolist() == [ssd.VOC_CLASSES.index("cat") + 1]
    assert len(eval_items[2]) == 2 and eval_items[3] == 0
    np.testing.assert_allclose(eval_items[1][1].numpy(), [4 / 40, 4 / 30, 30 / 40, 25 / 30],
                               rtol=1e-6)


def test_main_writes_the_generated_shapes_images(tmp_path, monkeypatch, capsys):
    folder = tmp_path / "s"
    monkeypatch.setattr(sys, "argv", ["data.py", str(folder), "--split", "val", "--num", "3"])
    runpy.run_path(data.__file__, run_name="__main__")
    assert capsys.readouterr().out == f"wrote 3 images to {folder}\n"
    paths = sorted(folder.iterdir())
    assert [p.name for p in paths] == [f"shapes_val_{i:03d}.png" for i in range(3)]
    source = data.ShapesDetection("val")
    for i, p in enumerate(paths):
        saved = np.asarray(Image.open(p).convert("RGB"))
        assert np.array_equal(saved, np.asarray(source.load_image(i)))
