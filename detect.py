"""Run an SSD on images: draw the boxes on copies, print one line per image, optionally write JSON.

    python detect.py photo.jpg holiday/ 'scans/*.png' --weights runs/voc/best.pt --json dets.json
    python detect.py clip.mp4 anim.gif --out annotated/ --json frames.json --bf16

PATHs: image files, folders (not recursive), globs (quoted: Python expands them). --weights: ours,
or a torchvision, amdegroot or mmdetection SSD. Videos (.mp4, .mov, .avi, .mkv, .webm, ...; PyAV:
pip install av) and animated GIFs are written as they go to <out>/<stem>.mp4 (H.264, else MPEG-4
part 2) or .gif, keeping size, frame rate or durations and loop; frames/s and ETA go to stderr.
JSON: [{"image": path, "width": w, "height": h, "detections": [{"box": [x1, y1, x2, y2] (pixels of
the image as displayed, EXIF applied, no +1), "score": s, "label": i, "name": str}]}]; a video or
GIF: {"video": path, "width", "height", "fps", "frames": [{"frame": k, "time": seconds,
"detections": [...]}]}. Exit code 0: all done; 1: some inputs failed (named on stderr, not in the
JSON); 2: bad usage, no weights, or no input could be read.
"""
import argparse
import glob
import itertools
import json
import os
import sys
import time
from pathlib import Path

import torch
from PIL import Image, ImageSequence

import data
import ssd
import weights

VIDEO_EXTENSIONS = set(".mp4 .m4v .mov .avi .mkv .webm .mpg .mpeg .wmv".split())
_MEDIA = VIDEO_EXTENSIONS | set(".jpg .jpeg .png .bmp .gif .tif .tiff .webp .ppm .pgm".split())


def main(argv=None):
    args = parse_args(argv)
    t0 = time.perf_counter()
    files, failures = collect_inputs(args.paths)
    if not files:  # every path has had its error line
        return 2
    weights_path = args.weights or data.newest_run_file("best.pt")
    try:  # the model, then the output folders
        if args.device == "cuda" and not torch.cuda.is_available():
            raise data.UsageError("--device cuda: no CUDA device is available (use --device cpu)")
        if weights_path is None:
            raise data.UsageError("no weights: train a model (python train.py --data shapes, a "
                                  "few minutes on a CPU) or pass --weights FILE (ours, torchvision "
                                  "ssd300_vgg16, amdegroot ssd.pytorch or mmdetection SSD)")
        model = weights.load_model(weights_path, args.device)  # CheckpointError names the file
        try:
            os.makedirs(args.out, exist_ok=True)
        except OSError as e:
            raise data.UsageError(f"--out {args.out}: cannot create ({e.strerror or e})") from None
        if args.json and not os.path.isdir(os.path.dirname(os.path.abspath(args.json))):
            raise data.UsageError(f"{args.json}: its folder does not exist")
    except (data.UsageError, weights.CheckpointError) as e:
        print(e, file=sys.stderr)
        return 2
    taken, results = {os.path.realpath(f) for f in files}, []  # taken: never overwritten
    stream = {f: _is_stream(f) for f in files}  # one look at each file
    failures += _run_images(args, model, [f for f in files if not stream[f]], taken, results)
    for path in filter(stream.get, files):
        try:
            results.append(_run_stream(args, model, path, taken))
        except data.DataError as e:  # one line, the path first; the run goes on
            print(e, file=sys.stderr)
            failures += 1
    if args.json and results:
        try:
            weights.write_atomic(args.json, lambda f: json.dump(results, f, indent=1))
        except OSError as e:
            print(f"{args.json}: cannot write ({e.strerror or e})", file=sys.stderr)
            failures += 1
    objects = sum(len(d["detections"]) for r in results for d in r.get("frames", [r]))
    where = f"; drawn copies in {args.out}" + (f", detections in {args.json}" if args.json else "")
    print(f"{_plural(len(results), 'input')}, {_plural(objects, 'object')}, {failures} failed, "
          f"{time.perf_counter() - t0:.1f} s (weights {weights_path}){where if results else ''}")
    return 2 if not results else 1 if failures else 0


def parse_args(argv):
    head, epilog = __doc__.split("\n\n", 1)
    p = argparse.ArgumentParser(description=head, epilog=epilog,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("paths", nargs="+", metavar="PATH", help="images, videos, GIFs, folders, globs")
    p.add_argument("--weights", help="checkpoint (default: the newest runs/*/best.pt)")

    def option(flag, kind, default, text, **kw):
        p.add_argument(flag, type=kind, default=default, help=f"{text} (default {default})", **kw)
    option("--score-thr", float, 0.5, "keep detections scoring above this")  # eval: 0.01, Caffe
    option("--nms-iou", float, 0.45, "IoU above which NMS suppresses a box")  # SSD paper, Caffe
    option("--nms", str, "hard", "hard NMS or Gaussian soft-NMS", choices=["hard", "soft"])
    option("--topk", int, 400, "candidates per class before NMS")  # Caffe top_k
    option("--max-det", int, 200, "detections per image")  # Caffe keep_top_k
    option("--out", str, "runs/detect", "folder for the drawn images")
    p.add_argument("--json", metavar="FILE", help="also write all detections to this JSON file")
    p.add_argument("--device", choices=["cpu", "cuda"], help="default cuda if available, else cpu",
                   default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--bf16", action="store_true",
                   help="run the model under bfloat16 autocast (CUDA or CPU; default float32)")
    option("--batch-size", int, 8, "images or frames per forward pass, any sizes mixed")
    args = p.parse_args(argv)
    rules = {"--score-thr must be in [0, 1)": 0.0 <= args.score_thr < 1.0,
             "--nms-iou must be in [0, 1]": 0.0 <= args.nms_iou <= 1.0,
             **{f"--{n} must be at least 1": getattr(args, n.replace("-", "_")) >= 1
                for n in ("topk", "max-det", "batch-size")}}
    for message in (m for m, ok in rules.items() if not ok):
        p.error(message)
    return args


def collect_inputs(paths):
    """PATHs -> (files in order, no repeats; how many paths gave none, each named on stderr).
    An existing path is no glob ('a[1].jpg'); a file is taken whatever its extension."""
    files, errors = {}, 0  # real path -> path as given
    for p in paths:
        literal = os.path.exists(p)  # else a glob (a missing plain path matches nothing)
        found = [p] if literal and not os.path.isdir(p) else _media_files(
            [p] if literal else sorted(glob.glob(p, recursive=True)))
        why = ("no image files in this folder" if literal else "no such file or folder"
               if not any(ch in p for ch in "*?[") else "no image files match this pattern")
        if not found:
            print(f"{p}: {why}", file=sys.stderr)
            errors += 1
        for f in found:
            files.setdefault(os.path.realpath(f), f)
    return list(files.values()), errors


def _media_files(paths):
    return [f for m in paths for f in (
        [os.path.join(m, n) for n in sorted(os.listdir(m))] if os.path.isdir(m) else [m])
        if Path(f).suffix.lower() in _MEDIA and os.path.isfile(f)]


def output_path(out_dir, image_path, taken, ext=".jpg"):
    """The first of <out_dir>/<stem><ext>, <stem>_1<ext>, ... whose real path is not in taken."""
    for n in itertools.count():
        candidate = os.path.join(out_dir, Path(image_path).stem + (f"_{n}" if n else "") + ext)
        if os.path.realpath(candidate) not in taken:
            taken.add(os.path.realpath(candidate))
            return candidate


def _run_images(args, model, files, taken, results):
    """Detect, draw, save and print a line for each image, add their JSON to results -> failures."""
    failed = []

    def read():
        for path in files:
            t0 = time.perf_counter()
            try:
                yield data.load_image(path), (path, time.perf_counter() - t0)
            except data.DataError as e:  # its message starts with the path
                print(e, file=sys.stderr)
                failed.append(path)
    for image, (path, read_s), found, scores, model_s in _detected(args, model, read()):
        target = output_path(args.out, path, taken)
        try:  # 4:4:4 chroma: subsampling would bleed the colour of 2-pixel lines
            image.save(target, "JPEG", quality=92, subsampling=0)
        except OSError as e:
            print(f"{target}: cannot write ({e.strerror or e})", file=sys.stderr)
            failed.append(target)
            continue
        listed = ", ".join(f"{d['name']} {float(v):.2f}" for d, v in zip(found, scores[:5]))
        listed = f" ({listed}{', ...' if len(found) > 5 else ''})" if found else ""
        print(f"{path}: {_plural(len(found), 'object')}{listed} {1000 * (read_s + model_s):.0f} ms")
        results.append({"image": path, "width": image.width, "height": image.height,
                        "detections": found})
    return len(failed)


def _run_stream(args, model, path, taken):
    """Detect on a video or animated GIF, writing the drawn copy as it goes -> its JSON entry."""
    gif = Path(path).suffix.lower() == ".gif"
    target = output_path(args.out, path, taken, ".gif" if gif else ".mp4")
    errors = (OSError, ValueError, EOFError, MemoryError)
    if not gif:
        try:
            import av
        except ImportError:
            raise data.DataError(f"{path}: a video needs PyAV (pip install av)") from None
        errors += (av.FFmpegError,)
    start = last = time.perf_counter()
    entry = {"video": path, "width": 0, "height": 0, "fps": 0.0, "frames": (frames := [])}

    def draw(reader, total, fps):  # (PIL, seconds) frames -> the images drawn; progress on stderr
        nonlocal last
        for image, t, found, _, _ in _detected(args, model, reader):
            entry.update(width=image.width, height=image.height, fps=round(fps, 3))
            frames.append({"frame": len(frames), "time": round(t, 4), "detections": found})
            if (now := time.perf_counter()) - last >= 2.0:  # a progress line every 2 s
                rate, last, done = len(frames) / (now - start), now, len(frames)
                eta = f" ETA {(total - done) / rate:.0f} s" if total > done else ""
                print(f"{path}: frame {done}/{total or '?'} {rate:.1f} frames/s{eta}",
                      file=sys.stderr, flush=True)
            yield image
        if not frames:
            raise ValueError("no frame")
    try:
        weights.write_atomic(target, lambda f: (_gif_io if gif else _video_io)(path, f, draw), "wb")
    except errors as e:
        raise data.DataError(f"{path}: failed at frame {len(frames)} ({e})") from None
    objects = sum(len(f["detections"]) for f in frames)
    print(f"{path}: {len(frames)} frames, {_plural(objects, 'object')}, "
          f"{len(frames) / (time.perf_counter() - start):.1f} frames/s -> {target}")
    return entry


def _detected(args, model, items):
    """(image, info) items -> (image drawn on, info, detections' JSON, scores, model s/image)."""
    names = model.config["class_names"]
    options = {k: getattr(args, k) for k in ("score_thr", "nms_iou", "topk", "max_det", "nms")}
    while batch := list(itertools.islice(items, args.batch_size)):
        t0 = time.perf_counter()
        out = ssd.detect(model, [data.to_tensor(im) for im, _ in batch], args.bf16, **options)
        model_s = (time.perf_counter() - t0) / len(batch)
        for (image, info), (boxes, scores, labels) in zip(batch, out):
            data.draw_detections(image, boxes, scores, labels, names)
            found = [{"box": [round(v, 2) for v in box], "score": round(float(s), 6),
                      "label": int(c), "name": names[int(c) - 1]}
                     for box, s, c in zip(boxes.tolist(), scores, labels)]
            yield image, info, found, scores, model_s


def _is_stream(path):
    if Path(path).suffix.lower() != ".gif":
        return Path(path).suffix.lower() in VIDEO_EXTENSIONS
    try:
        with Image.open(path) as im:
            return getattr(im, "n_frames", 1) > 1
    except (OSError, ValueError, Image.DecompressionBombError):
        return False  # the image path reports it


def _video_io(path, file, draw):
    """Decode path, write draw(frames: (PIL RGB, seconds) iterator, count or 0, fps) to file."""
    import av  # optional: only videos need it
    with av.open(path) as source, av.open(file, "w", format="mp4") as out:
        if not source.streams.video:
            raise ValueError("no video stream")
        stream = source.streams.video[0]
        stream.thread_type = "AUTO"
        rate = stream.average_rate or stream.guessed_rate or 25
        enc = out.add_stream("libx264" if "libx264" in av.codecs_available else "mpeg4", rate=rate)
        enc.width, enc.height = stream.codec_context.width, stream.codec_context.height
        enc.pix_fmt = "yuv420p" if enc.width % 2 == 0 == enc.height % 2 else "yuv444p"  # odd sizes
        frames = ((f.to_image(), float(f.time) if f.time is not None else k / rate)
                  for k, f in enumerate(source.decode(stream)))
        for image in draw(frames, stream.frames, float(rate)):
            out.mux(enc.encode(av.VideoFrame.from_image(image)))
        out.mux(enc.encode())  # flush the encoder


def _gif_io(path, file, draw):
    """As _video_io for an animated GIF (Pillow), durations and loop kept."""
    with Image.open(path) as gif:
        durations = [f.info.get("duration", 100) for f in ImageSequence.Iterator(gif)]
        frames = ((f.convert("RGB"), t / 1000) for f, t in zip(
            ImageSequence.Iterator(gif), itertools.accumulate(durations, initial=0)))
        images = list(draw(frames, len(durations), 1000 * len(durations) / max(1, sum(durations))))
        images[0].save(file, "GIF", save_all=True, append_images=images[1:],
                       duration=durations, loop=gif.info.get("loop", 0))


def _plural(n, word):
    return f"{n} {word}{'s' if n != 1 else ''}"


if __name__ == "__main__":
    sys.exit(main())
