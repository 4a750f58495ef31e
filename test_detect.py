"""Tests of detect.py: inputs of every kind (image modes, EXIF orientation, broken and missing
files, folders, globs), exit codes and error lines, the JSON schema, the drawn copies, default
weights, and a torchvision-format checkpoint end to end.

Most tests use a "blob finder": a tiny SSD300 whose weights are set by hand so that it reports its
first class exactly where the image is bright. Its backbone passes the red channel through (every
conv up to conv4_3 is an identity on channel 0), L2Norm turns any positive value into 20, and the
level-0 head fires class 1 on the first anchor of every 8x8 cell (of the 300x300 input) that holds
a bright pixel; every other output scores 1/3 or less. So a white square on black is found where it
is, and a box in the wrong orientation or scale shows.
"""
import json
import os
import re
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
from PIL import Image, ImageOps, ImageSequence

import data
import detect
import ssd
import weights as weight_files  # the name `weights` is a fixture here

HERE = Path(__file__).resolve().parent
NAMES = ["blob", "other", "third"]
MARGIN_300 = 12  # px of the 300x300 input: a cell (8) plus the bilinear blur at the square's edge


# --- helpers ------------------------------------------------------------------------------------

def blob_finder(class_names=NAMES):
    model = ssd.ssd300(len(class_names), width=0.125, class_names=class_names)
    with torch.no_grad():
        for layer in model.vgg[:23]:
            if isinstance(layer, nn.Conv2d):
                layer.weight.zero_()
                layer.bias.zero_()
                layer.weight[0, 0, 1, 1] = 1.0
        for head in [*model.cls_heads, *model.box_heads]:
            head.weight.zero_()
            head.bias.zero_()
        # channel = anchor * (C + 1) + class: anchor 0, class 1; logit 20 - 10 where bright
        model.cls_heads[0].weight[1, 0, 1, 1] = 1.0
        model.cls_heads[0].bias[1] = -10.0
    return model.eval()


def save_model(path, model):
    weight_files.save_checkpoint(str(path), model=model.state_dict(), config=model.config)
    return str(path)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The blob finder's convolutions are tiny; on a busy 2-core machine two intra-op threads
    spin-wait on each other and make every one ~20x slower, so this file runs on one."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def cli(*argv, cwd):
    """detect.py as a user runs it (a fresh process, single-threaded like the rest of the file)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(HERE / "detect.py"), *map(str, argv)], env=env,
                          cwd=cwd, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    return save_model(tmp_path_factory.mktemp("w") / "blob.pt", blob_finder())


def square_image(size, square):
    """Black RGB image of `size` (w, h) with a white rectangle at `square` (x1, y1, x2, y2)."""
    im = Image.new("RGB", size)
    im.paste((255, 255, 255), square)
    return im


def inside(det, square, width, height):
    """Is the detection's centre on the square, give or take MARGIN_300 input pixels?"""
    x1, y1, x2, y2 = det["box"]
    mx, my = MARGIN_300 * width / 300, MARGIN_300 * height / 300
    cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
    return square[0] - mx <= cx <= square[2] + mx and square[1] - my <= cy <= square[3] + my


def run_main(capsys, *argv):
    code = detect.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def detect_json(capsys, tmp_path, weights, *paths, extra=()):
    out_json = tmp_path / "dets.json"
    code, out, err = run_main(capsys, *paths, "--weights", weights, "--out", tmp_path / "drawn",
                              "--json", out_json, *extra)
    results = json.loads(out_json.read_text()) if out_json.exists() else None
    return code, results, out, err


def by_name(results):
    return {Path(r["image"]).name: r for r in results}


def png_header_only(path, width, height):
    """A PNG that declares width x height RGB and holds no pixel data: enough to trip the
    decompression-bomb check without any memory spent."""
    def chunk(kind, payload):
        return (struct.pack(">I", len(payload)) + kind + payload
                + struct.pack(">I", zlib.crc32(kind + payload)))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b""))


# --- image modes and orientation --------------------------------------------------------------

SIZE, SQUARE = (160, 120), (40, 30, 100, 80)


def write_mode_images(folder):
    """One file per PIL mode (and per format), each showing a white square on black."""
    rgb = square_image(SIZE, SQUARE)
    gray = rgb.convert("L")
    mask = Image.new("L", SIZE, 255)
    mask.paste(0, SQUARE)  # transparent square...
    black = Image.new("RGB", SIZE)  # ...whose colour is black: only compositing on white shows it
    rgba = black.copy()
    rgba.putalpha(mask)
    la = black.convert("L")
    la.putalpha(mask)
    p_alpha = Image.new("P", SIZE, 0)
    p_alpha.putpalette([0, 0, 0] * 256)
    p_alpha.paste(1, SQUARE)
    p_alpha.info["transparency"] = 1
    i16 = Image.new("I;16", SIZE, 0)
    i16.paste(65535, SQUARE)
    i32 = Image.new("I", SIZE, 0)
    i32.paste(65535, SQUARE)
    f32 = Image.new("F", SIZE, 0.0)
    f32.paste(255.0, SQUARE)
    files = {
        "rgb.png": (rgb, {}), "rgb.bmp": (rgb, {}), "rgb.ppm": (rgb, {}), "rgb.tiff": (rgb, {}),
        "rgb.webp": (rgb, {"lossless": True}), "gray.png": (gray, {}), "gray.pgm": (gray, {}),
        "bilevel.png": (gray.convert("1"), {}), "palette.gif": (rgb.convert("P"), {}),
        "palette_alpha.png": (p_alpha, {}), "rgba.png": (rgba, {}), "la.png": (la, {}),
        "cmyk.jpg": (rgb.convert("CMYK"), {"quality": 95}),
        "ycbcr.jpg": (rgb.convert("YCbCr"), {"quality": 95}),
        "i16.png": (i16, {}), "i32.tif": (i32, {}), "float.tif": (f32, {}),
    }
    for name, (im, options) in files.items():
        im.save(folder / name, **options)
    return {name: im.mode for name, (im, _) in files.items()}


def test_every_image_mode_is_read_and_the_square_found(tmp_path, weights, capsys):
    folder = tmp_path / "modes"
    folder.mkdir()
    modes = write_mode_images(folder)
    assert {Image.open(folder / n).mode for n in modes} >= {
        "RGB", "L", "1", "P", "RGBA", "LA", "CMYK", "I", "F"}
    assert Image.open(folder / "i16.png").mode in ("I;16", "I")  # Pillow < 10.1 reads "I"
    code, results, out, err = detect_json(capsys, tmp_path, weights, folder)
    assert code == 0, err
    assert err == ""
    found = by_name(results)
    assert set(found) == set(modes)
    wrong = []
    for name, r in found.items():
        dets = r["detections"]
        if (r["width"], r["height"]) != SIZE or not dets or not all(
                d["name"] == "blob" and inside(d, SQUARE, *SIZE) for d in dets):
            wrong.append((name, modes[name], r["width"], r["height"], dets[:3]))
    assert not wrong, wrong
    drawn = sorted(p.name for p in (tmp_path / "drawn").iterdir())
    assert len(drawn) == len(modes)  # same stems in different formats got numeric suffixes
    for p in (tmp_path / "drawn").iterdir():
        assert Image.open(p).size == SIZE


# EXIF orientation -> the transpose that shows the stored pixels upright (the EXIF standard)
UPRIGHT = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180,
           4: Image.Transpose.FLIP_TOP_BOTTOM, 5: Image.Transpose.TRANSPOSE,
           6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
           8: Image.Transpose.ROTATE_90}
# ... and the transpose that undoes it (how a camera stores an upright scene)
STORED = {**UPRIGHT, 6: Image.Transpose.ROTATE_90, 8: Image.Transpose.ROTATE_270}


def test_exif_orientation_gives_boxes_in_displayed_pixels(tmp_path, weights, capsys):
    shown_size, square = (200, 400), (20, 40, 70, 100)  # tall, square near the top left
    shown = square_image(shown_size, square)
    folder = tmp_path / "exif"
    folder.mkdir()
    for o in UPRIGHT:
        exif = Image.Exif()
        exif[0x0112] = o
        path = folder / f"o{o}.jpg"
        shown.transpose(STORED[o]).save(path, exif=exif, quality=95)
        raw = Image.open(path)
        upright = ImageOps.exif_transpose(raw)
        assert upright.size == shown_size  # the test's own tables are right
        assert upright.convert("L").getextrema()[1] > 128
        # the same decoded pixels, turned upright here and stored losslessly without EXIF
        raw.convert("RGB").transpose(UPRIGHT[o]).save(folder / f"o{o}_reference.png")
    code, results, out, err = detect_json(capsys, tmp_path, weights, folder)
    assert code == 0, err
    found = by_name(results)
    for o in UPRIGHT:
        r, ref = found[f"o{o}.jpg"], found[f"o{o}_reference.png"]
        assert (r["width"], r["height"]) == shown_size, o
        assert r["detections"] == ref["detections"], o
        assert r["detections"] and all(inside(d, square, *shown_size) for d in r["detections"]), o


# --- broken inputs and exit codes ----------------------------------------------------------------

def write_bad_files(folder):
    jpg = folder / "truncated.jpg"
    square_image((320, 240), (10, 10, 200, 200)).save(jpg, quality=95)
    jpg.write_bytes(jpg.read_bytes()[:len(jpg.read_bytes()) // 2])
    (folder / "text.jpg").write_text("this is not a picture\n")
    (folder / "empty.png").write_bytes(b"")
    return ["truncated.jpg", "text.jpg", "empty.png"]


def test_folder_mixing_good_and_bad_files_cli(tmp_path, weights):
    """End to end through the command line: good images are drawn, each bad file and the missing
    path get one stderr line naming them, no traceback, exit 1."""
    folder = tmp_path / "mixed"
    folder.mkdir()
    square_image((320, 240), (100, 60, 180, 140)).save(folder / "good.png")
    square_image((240, 320), (60, 100, 140, 180)).save(folder / "good2.jpg")
    (folder / "notes.txt").write_text("not an image name: skipped silently in a folder\n")
    bad = write_bad_files(folder)
    missing = tmp_path / "no_such.jpg"
    out_dir = tmp_path / "drawn"
    proc = cli(folder, missing, "--weights", weights, "--out", out_dir, cwd=tmp_path)
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == len(bad) + 1, lines
    for name in bad:
        assert sum(line.startswith(str(folder / name) + ":") for line in lines) == 1, (name, lines)
    assert sum(line.startswith(str(missing) + ":") for line in lines) == 1
    assert sorted(p.name for p in out_dir.iterdir()) == ["good.jpg", "good2.jpg"]
    summary = proc.stdout.strip().splitlines()
    assert len(summary) == 3  # one per image and the totals
    assert summary[0].startswith(f"{folder / 'good.png'}: ") and "objects (blob 1.00" in summary[0]


def test_only_bad_inputs_exit_2(tmp_path, weights, capsys):
    bad = write_bad_files(tmp_path)
    paths = [str(tmp_path / n) for n in bad]
    code, out, err = run_main(capsys, *paths, "--weights", weights, "--out", tmp_path / "drawn",
                              "--json", tmp_path / "d.json")
    assert code == 2
    lines = err.strip().splitlines()
    assert [line.split(": ")[0] for line in lines] == paths
    assert not (tmp_path / "d.json").exists()
    assert not list((tmp_path / "drawn").glob("*"))


def test_decompression_bomb_is_refused_with_one_line(tmp_path, weights, capsys):
    bomb = tmp_path / "bomb.png"
    png_header_only(bomb, 40000, 40000)
    code, out, err = run_main(capsys, bomb, "--weights", weights, "--out", tmp_path / "o")
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"{bomb}: "), lines
    assert any(w in lines[0].lower() for w in ("pixel", "bomb", "large", "big")), lines


def test_missing_paths_and_empty_matches_exit_2(tmp_path, weights, capsys):
    (tmp_path / "empty_dir").mkdir()
    args = [tmp_path / "nope.jpg", tmp_path / "empty_dir", str(tmp_path / "*.png")]
    code, out, err = run_main(capsys, *args, "--weights", weights, "--out", tmp_path / "o")
    assert code == 2
    assert [line.split(": ")[0] for line in err.strip().splitlines()] == [str(a) for a in args]


def test_named_non_image_file_is_an_error_but_others_go_on(tmp_path, weights, capsys):
    good = tmp_path / "a.png"
    square_image((100, 100), (20, 20, 60, 60)).save(good)
    readme = tmp_path / "README"
    readme.write_text("hello\n")
    code, results, out, err = detect_json(capsys, tmp_path, weights, good, readme)
    assert code == 1
    assert err.strip().splitlines()[0].startswith(f"{readme}: ")
    assert [r["image"] for r in results] == [str(good)]


def test_bad_options_and_output_folders_exit_2(tmp_path, weights, capsys):
    img = tmp_path / "a.png"
    square_image(SIZE, SQUARE).save(img)
    for flag, value, rule in [("--score-thr", "1", "in [0, 1)"), ("--nms-iou", "1.5", "in [0, 1]"),
                              ("--topk", "0", "at least 1"), ("--max-det", "0", "at least 1"),
                              ("--batch-size", "0", "at least 1")]:
        with pytest.raises(SystemExit) as e:
            detect.parse_args([str(img), flag, value])
        assert e.value.code == 2 and f"{flag} must be {rule}" in capsys.readouterr().err
    (tmp_path / "file").write_text("")
    code, out, err = run_main(capsys, img, "--weights", weights, "--out", tmp_path / "file")
    assert code == 2 and err.startswith(f"--out {tmp_path / 'file'}: cannot create (")
    assert len(err.strip().splitlines()) == 1
    code, out, err = run_main(capsys, img, "--weights", weights, "--out", tmp_path / "o",
                              "--json", tmp_path / "no" / "d.json")
    assert code == 2 and err.strip() == f"{tmp_path / 'no' / 'd.json'}: its folder does not exist"


def test_gif_too_large_is_one_line(tmp_path, weights, capsys):
    gif = tmp_path / "bomb.gif"
    Image.new("P", (2, 2)).save(gif)
    header = bytearray(gif.read_bytes())
    header[6:10] = struct.pack("<HH", 40000, 40000)  # the logical screen size
    gif.write_bytes(bytes(header))
    code, out, err = run_main(capsys, gif, "--weights", weights, "--out", tmp_path / "o")
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith(f"{gif}: image too large")


# --- folders, globs, output names -----------------------------------------------------------------

def test_folder_and_glob_expansion(tmp_path, weights, capsys):
    g = tmp_path / "g"
    g.mkdir()
    for name in ["b.png", "a.png", "D.JPG", "c.Jpeg"]:
        square_image((64, 48), (10, 10, 30, 30)).save(g / name, format="PNG")
    (g / "skip.txt").write_text("x")
    (g / "sub").mkdir()
    square_image((64, 48), (10, 10, 30, 30)).save(g / "sub" / "deep.png")
    code, results, out, err = detect_json(capsys, tmp_path, weights, g)
    assert code == 0, err
    assert [Path(r["image"]).name for r in results] == ["D.JPG", "a.png", "b.png", "c.Jpeg"]
    # a quoted glob is expanded by detect.py; a file given twice is read once
    code, results, out, err = detect_json(capsys, tmp_path, weights, g / "*.png", g / "a.png",
                                          str(g / "**" / "*.png"))
    assert code == 0, err
    assert [Path(r["image"]).name for r in results] == ["a.png", "b.png", "deep.png"]


def test_output_names_never_collide_or_overwrite_inputs(tmp_path, weights, capsys):
    for d in ["one", "two"]:
        (tmp_path / d).mkdir()
        square_image((80, 60), (10, 10, 40, 40)).save(tmp_path / d / "img.png")
    original = tmp_path / "one" / "img.jpg"
    square_image((80, 60), (30, 20, 70, 50)).save(original)
    before = original.read_bytes()
    out_dir = tmp_path / "one"  # the drawn copies go next to the inputs
    code, _, _ = run_main(capsys, tmp_path / "one" / "img.jpg", tmp_path / "one" / "img.png",
                          tmp_path / "two" / "img.png", "--weights", weights, "--out", out_dir)
    assert code == 0
    assert original.read_bytes() == before
    assert sorted(p.name for p in out_dir.iterdir()) == ["img.jpg", "img.png", "img_1.jpg",
                                                         "img_2.jpg", "img_3.jpg"]


# --- JSON, drawing, batching ---------------------------------------------------------------------

def test_json_schema_and_drawn_copy(tmp_path, weights, capsys):
    size, square = (640, 480), (200, 150, 330, 260)
    path = tmp_path / "scene.png"
    square_image(size, square).save(path)
    code, results, out, err = detect_json(capsys, tmp_path, weights, path)
    assert code == 0, err
    assert isinstance(results, list) and len(results) == 1
    r = results[0]
    assert set(r) == {"image", "width", "height", "detections"}
    assert r["image"] == str(path) and (r["width"], r["height"]) == size
    dets = r["detections"]
    assert dets
    for d in dets:
        assert set(d) == {"box", "score", "label", "name"}
        assert len(d["box"]) == 4 and all(isinstance(v, float) for v in d["box"])
        assert all(round(v, 2) == v for v in d["box"])
        x1, y1, x2, y2 = d["box"]
        assert 0 <= x1 < x2 <= size[0] and 0 <= y1 < y2 <= size[1]
        assert 0.5 < d["score"] <= 1.0
        assert isinstance(d["label"], int) and d["name"] == NAMES[d["label"] - 1]
        assert inside(d, square, *size)
    assert [d["score"] for d in dets] == sorted((d["score"] for d in dets), reverse=True)
    # the drawn copy: original size, the input left alone away from the boxes, the best box's
    # left edge in its class colour
    drawn = Image.open(tmp_path / "drawn" / "scene.jpg").convert("RGB")
    assert drawn.size == size
    assert max(drawn.getpixel((600, 440))) < 30  # black corner, far from every box
    x1, y1, x2, y2 = dets[0]["box"]
    edge = drawn.getpixel((int(x1) + 1, int((y1 + y2) / 2)))
    assert max(abs(a - b) for a, b in zip(edge, data._class_colour(1))) < 40, edge
    line = f"{path}: {len(dets)} object"
    assert out.startswith(line) and "ms" in out.splitlines()[0]


def test_score_threshold_filters_what_is_kept(tmp_path, weights, capsys):
    path = tmp_path / "s.png"
    square_image((300, 300), (100, 100, 200, 200)).save(path)
    _, low, _, _ = detect_json(capsys, tmp_path, weights, path, extra=["--score-thr", "0.2"])
    _, high, _, _ = detect_json(capsys, tmp_path, weights, path, extra=["--score-thr", "0.5"])
    # where the blob finder does not fire, classes 2 and 3 score 1/3 or 1/4
    low, high = low[0]["detections"], high[0]["detections"]
    assert high and all(d["score"] > 0.5 for d in high)
    assert any(d["score"] < 0.5 for d in low) and all(d["score"] > 0.2 for d in low)
    assert low[:len(high)] == high and len(low) > len(high)
    _, capped, _, _ = detect_json(capsys, tmp_path, weights, path,
                                  extra=["--score-thr", "0.2", "--max-det", "7"])
    assert capped[0]["detections"] == low[:7]


def test_batches_mix_sizes_without_changing_results(tmp_path, weights, capsys):
    paths = []
    for i, (size, square) in enumerate([((300, 200), (20, 30, 90, 100)),
                                        ((123, 457), (60, 300, 110, 420)),
                                        ((640, 64), (500, 10, 600, 50))]):
        paths.append(tmp_path / f"im{i}.png")
        square_image(size, square).save(paths[-1])
    _, one, _, _ = detect_json(capsys, tmp_path, weights, *paths, extra=["--batch-size", "1"])
    _, three, _, _ = detect_json(capsys, tmp_path, weights, *paths, extra=["--batch-size", "3"])
    assert one == three and len(one) == 3


def test_drawing_colours_and_label(tmp_path):
    colours = [data._class_colour(i) for i in range(1, 21)]
    assert min(sum((a - b) ** 2 for a, b in zip(c, d)) ** 0.5
               for i, c in enumerate(colours) for d in colours[:i]) > 25
    assert data._text_colour((250, 240, 40)) == (0, 0, 0)
    assert data._text_colour((30, 40, 200)) == (255, 255, 255)
    im = Image.new("RGB", (400, 300))
    data.draw_detections(im, torch.tensor([[100.0, 120.0, 300.0, 260.0]]), torch.tensor([0.87]),
                           torch.tensor([2]), NAMES)
    colour = data._class_colour(2)
    line = max(2, round(300 / 200))
    assert im.getpixel((100, 200)) == colour and im.getpixel((100 + line - 1, 200)) == colour
    assert im.getpixel((100 + line + 2, 200)) == (0, 0, 0)  # inside: untouched
    assert im.getpixel((200, 200)) == (0, 0, 0)
    assert im.getpixel((101, 117)) == colour  # label background just above the box
    assert im.getpixel((380, 10)) == (0, 0, 0)


# --- weights --------------------------------------------------------------------------------------

def test_default_weights_are_the_newest_run(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    img = tmp_path / "x.png"
    square_image((100, 100), (30, 30, 70, 70)).save(img)
    code, out, err = run_main(capsys, img)
    assert code == 2 and "train.py --data shapes" in err and "--weights" in err
    assert len(err.strip().splitlines()) == 1
    for run, names, mtime in [("a", ["newer", "b", "c"], 2_000_000_000),
                              ("z", ["older", "b", "c"], 1_000_000_000)]:
        (tmp_path / "runs" / run).mkdir(parents=True)
        path = save_model(tmp_path / "runs" / run / "best.pt", blob_finder(names))
        os.utime(path, (mtime, mtime))
    code, out, err = run_main(capsys, img, "--json", "d.json")
    assert code == 0, err
    assert json.loads((tmp_path / "d.json").read_text())[0]["detections"][0]["name"] == "newer"
    assert (tmp_path / "runs" / "detect" / "x.jpg").is_file()


def test_bad_checkpoint_is_one_line_exit_2(tmp_path, capsys):
    img = tmp_path / "x.png"
    square_image((100, 100), (30, 30, 70, 70)).save(img)
    bad = tmp_path / "bad.pt"
    bad.write_text("not a checkpoint")
    for w in [bad, tmp_path / "missing.pt"]:
        code, out, err = run_main(capsys, img, "--weights", w, "--out", tmp_path / "o")
        assert code == 2
        lines = err.strip().splitlines()
        assert len(lines) == 1 and str(w) in lines[0], lines


@pytest.mark.skipif(torch.cuda.is_available(), reason="tests the message shown without CUDA")
def test_cuda_without_a_gpu_is_one_line_exit_2(tmp_path, weights, capsys):
    img = tmp_path / "x.png"
    square_image((100, 100), (30, 30, 70, 70)).save(img)
    code, out, err = run_main(capsys, img, "--weights", weights, "--device", "cuda")
    assert code == 2 and "cuda" in err.lower() and len(err.strip().splitlines()) == 1


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_gives_the_cpu_detections(tmp_path, weights, capsys):
    paths = []
    for i, size in enumerate([(300, 200), (97, 411)]):
        paths.append(tmp_path / f"c{i}.png")
        square_image(size, (10, 20, 60, 90)).save(paths[-1])
    _, cpu, _, _ = detect_json(capsys, tmp_path, weights, *paths)
    code, gpu, _, err = detect_json(capsys, tmp_path, weights, *paths, extra=["--device", "cuda"])
    assert code == 0, err
    assert [r["detections"] for r in gpu] == [r["detections"] for r in cpu]


# --- a torchvision ssd300_vgg16 checkpoint --------------------------------------------------------

def torchvision_state_dict(model):
    """Our SSD300 state_dict under the key names of torchvision.models.detection.ssd300_vgg16,
    written out here independently of weights.py's loader."""
    ours = model.state_dict()
    rename = {"l2norm.weight": "backbone.scale_weight"}
    for i in [0, 2, 5, 7, 10, 12, 14, 17, 19, 21]:  # conv1_1 .. conv4_3
        rename.update({f"vgg.{i}.{p}": f"backbone.features.{i}.{p}" for p in ("weight", "bias")})
    for i, tv in [(24, "0.1"), (26, "0.3"), (28, "0.5"), (31, "0.7.1"), (33, "0.7.3")]:
        rename.update({f"vgg.{i}.{p}": f"backbone.extra.{tv}.{p}" for p in ("weight", "bias")})
    for j in range(8):  # the four extra blocks, 1x1 then 3x3
        rename.update({f"extras.{j}.{p}": f"backbone.extra.{j // 2 + 1}.{2 * (j % 2)}.{p}"
                       for p in ("weight", "bias")})
    for i in range(6):
        for p in ("weight", "bias"):
            rename[f"cls_heads.{i}.{p}"] = f"head.classification_head.module_list.{i}.{p}"
            rename[f"box_heads.{i}.{p}"] = f"head.regression_head.module_list.{i}.{p}"
    assert set(rename) == set(ours)
    return {rename[k]: v.clone() for k, v in ours.items()}


@pytest.fixture(scope="session")
def torchvision_checkpoint(tmp_path_factory):
    """A full-size ssd300_vgg16 COCO state_dict (91 outputs; ~140 MB), built once per session from
    a seeded model with torchvision's preset (COCO anchor sizes, w and h clipped, its input mean),
    class heads sharpened so that a few hundred candidates score above 0.5."""
    torch.manual_seed(0)
    tv_mean = tuple(255 * m for m in (0.48235, 0.45882, 0.40784))  # torchvision's image_mean
    model = ssd.ssd300(90, anchors="coco", clip="wh", mean=tv_mean).eval()
    with torch.no_grad():
        for head in model.cls_heads:
            head.weight.mul_(2.0)
    sd = torchvision_state_dict(model)
    assert sum(v.numel() for v in sd.values()) == 35_641_826  # torchvision ssd300_vgg16's count
    assert sd["head.classification_head.module_list.0.weight"].shape == (364, 512, 3, 3)
    assert sd["head.regression_head.module_list.5.weight"].shape == (16, 256, 3, 3)
    path = tmp_path_factory.mktemp("tv") / "ssd300_vgg16_coco.pth"
    torch.save(sd, path)
    return str(path), model


def test_torchvision_checkpoint_loads_and_matches(tmp_path, torchvision_checkpoint, capsys):
    path, model = torchvision_checkpoint
    img_path = tmp_path / "noise.png"
    g = torch.Generator().manual_seed(1)
    noise = torch.rand(3, 30, 40, generator=g)
    img = torch.nn.functional.interpolate(noise[None], size=(240, 320), mode="bilinear")[0]
    img = (img * 255).round().to(torch.uint8)  # [3, 240, 320], smooth blobs of colour
    Image.fromarray(img.permute(1, 2, 0).numpy()).save(img_path)
    # torchvision's NMS settings; a score threshold of 0.5, not its 0.01, keeps the candidates
    # (and the NMS's memory) small on a randomly initialised network
    options = dict(score_thr=0.5, nms_iou=0.45, topk=400, max_det=200)
    code, results, out, err = detect_json(
        capsys, tmp_path, path, img_path,
        extra=["--score-thr", "0.5", "--nms-iou", "0.45", "--topk", "400", "--max-det", "200"])
    assert code == 0, err
    got = results[0]["detections"]
    boxes, scores, labels = ssd.detect(model, [img], **options)[0]
    assert len(scores) > 5
    # every clear reference detection (away from the threshold and the max_det cut) is reported
    # with the same class, box and score, and vice versa
    cut = max(0.501, float(scores[min(len(scores), 200) - 1]) + 1e-3)
    ref = [(b, float(s), int(c)) for b, s, c in zip(boxes.tolist(), scores, labels) if s > cut]
    assert ref

    def same(a, b):
        return (a[2] == b[2] and abs(a[1] - b[1]) < 1e-4
                and max(abs(x - y) for x, y in zip(a[0], b[0])) < 0.05)
    mine = [(d["box"], d["score"], d["label"]) for d in got]
    assert all(any(same(r, m) for m in mine) for r in ref)
    assert all(any(same(m, r) for r in ref) or m[1] < cut + 1e-3 for m in mine)


# --- videos and animated GIFs -----------------------------------------------------------------

FRAME_SIZE, EMPTY_FRAME = (96, 64), 3


def frame_square(k):
    """The white square of frame k (moving right), or None on EMPTY_FRAME (all black)."""
    return None if k == EMPTY_FRAME else (8 + 6 * k, 20, 32 + 6 * k, 44)


def moving_frames(n):
    return [square_image(FRAME_SIZE, sq) if sq else Image.new("RGB", FRAME_SIZE)
            for sq in map(frame_square, range(n))]


def drawn_on(image):
    """Does the frame hold saturated (box or label) pixels? The inputs are grey only."""
    a = torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.int16))  # [H, W, 3]
    return bool(((a.max(2).values - a.min(2).values) > 100).any())


def check_frames(entry, n, fps, frames_out):
    assert len(entry["frames"]) == n and entry["fps"] == pytest.approx(fps, rel=1e-3)
    assert (entry["width"], entry["height"]) == FRAME_SIZE
    for k, (f, image) in enumerate(zip(entry["frames"], frames_out)):
        assert f["frame"] == k and f["time"] == pytest.approx(k / fps, abs=1e-3)
        sq = frame_square(k)
        assert bool(f["detections"]) == (sq is not None) == drawn_on(image), k
        assert all(inside(d, sq, *FRAME_SIZE) for d in f["detections"])


def test_video_round_trip(tmp_path, weights, capsys):
    av = pytest.importorskip("av")
    clip = tmp_path / "clip.mp4"
    with av.open(str(clip), "w") as out:
        stream = out.add_stream("mpeg4", rate=12)
        stream.width, stream.height, stream.pix_fmt = *FRAME_SIZE, "yuv420p"
        for image in moving_frames(10):
            out.mux(stream.encode(av.VideoFrame.from_image(image)))
        out.mux(stream.encode())
    code, results, out, err = detect_json(capsys, tmp_path, weights, clip,
                                          extra=("--batch-size", "4"))
    assert code == 0 and re.search(r"clip.mp4: 10 frames, \d+ objects, [\d.]+ frames/s", out), out
    with av.open(str(tmp_path / "drawn" / "clip.mp4")) as written:
        s = written.streams.video[0]
        size = (s.codec_context.width, s.codec_context.height)
        assert s.average_rate == 12 and size == FRAME_SIZE
        frames = [f.to_image() for f in written.decode(s)]
    assert results[0]["video"] == str(clip)
    check_frames(results[0], 10, 12, frames)
    # a truncated copy and a file of garbage: one line each, the image after them is still done
    (tmp_path / "cut.mp4").write_bytes(clip.read_bytes()[:len(clip.read_bytes()) // 2])
    (tmp_path / "junk.mp4").write_bytes(os.urandom(3000))
    square_image(SIZE, SQUARE).save(tmp_path / "still.png")
    code, results, out, err = detect_json(capsys, tmp_path, weights, tmp_path / "cut.mp4",
                                          tmp_path / "junk.mp4", tmp_path / "still.png")
    lines = err.strip().splitlines()
    assert code == 1 and len(lines) == 2 and "cut.mp4: " in lines[0] + lines[1], err
    assert "junk.mp4: " in err
    assert [r.get("image") for r in results] == [str(tmp_path / "still.png")]
    assert sorted(p.name for p in (tmp_path / "drawn").iterdir()) == ["clip.mp4", "still.jpg"]


def test_animated_gif_round_trip_and_no_pyav(tmp_path, weights, capsys, monkeypatch):
    frames, durations = moving_frames(6), [40, 80, 120, 60, 100, 200]
    frames[0].save(tmp_path / "anim.gif", save_all=True, append_images=frames[1:],
                   duration=durations, loop=3)
    monkeypatch.setitem(sys.modules, "av", None)  # no PyAV: GIFs need only Pillow
    (tmp_path / "clip.mp4").write_bytes(b"\0" * 100)
    code, results, out, err = detect_json(capsys, tmp_path, weights, tmp_path / "clip.mp4",
                                          tmp_path / "anim.gif", extra=("--bf16",))
    assert code == 1
    assert err.strip() == f"{tmp_path / 'clip.mp4'}: a video needs PyAV (pip install av)"
    with Image.open(tmp_path / "drawn" / "anim.gif") as gif:
        assert gif.n_frames == 6 and gif.size == FRAME_SIZE and gif.info.get("loop") == 3
        written = [(f.info["duration"], f.convert("RGB")) for f in ImageSequence.Iterator(gif)]
    assert [d for d, _ in written] == durations
    entry = results[0]
    times = [sum(durations[:k]) / 1000 for k in range(6)]
    assert [f["time"] for f in entry["frames"]] == pytest.approx(times)
    for k, (f, (_, image)) in enumerate(zip(entry["frames"], written)):
        assert bool(f["detections"]) == (frame_square(k) is not None) == drawn_on(image), k


def test_neighbouring_labels_do_not_overlap():
    im = Image.new("RGB", (200, 150))
    boxes = torch.tensor([[20.0, 60.0, 70.0, 120.0], [40.0, 62.0, 90.0, 120.0],
                          [30.0, 61.0, 80.0, 110.0]])
    rects = data.draw_detections(im, boxes, torch.tensor([0.9, 0.8, 0.7]),
                                   torch.tensor([1, 2, 3]), NAMES)
    for i in range(3):
        for j in range(i):
            a, b = rects[i], rects[j]
            assert a[2] <= b[0] or b[2] <= a[0] or a[3] <= b[1] or b[3] <= a[1], (a, b)
    assert rects[0][3] == 60.0  # the best keeps its place just above its box


def test_summary_wording_and_default_device(tmp_path, weights, capsys):
    square_image(SIZE, (40, 30, 62, 52)).save(tmp_path / "one.png")
    code, out, _ = run_main(capsys, tmp_path / "one.png", "--weights", weights, "--out",
                            tmp_path / "d", "--max-det", "1")
    assert code == 0 and "1 input, 1 object, 0 failed" in out.splitlines()[-1]
    (tmp_path / "bad.png").write_bytes(b"nope")
    code, out, _ = run_main(capsys, tmp_path / "bad.png", "--weights", weights, "--out",
                            tmp_path / "d")
    assert code == 2 and "drawn" not in out
    assert detect.parse_args(["x"]).device == ("cuda" if torch.cuda.is_available() else "cpu")
