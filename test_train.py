"""Tests of train.py on the CPU: short runs on shapes, BCCD and tiny VOC-layout folders written
here; a 2-process gloo DDP run; kill-and-resume against an uninterrupted run; the NaN guard."""
import json
import math
import os
import random
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import ssd
import weights
import train

HERE = Path(__file__).resolve().parent
TINY = ["--width", "0.0625", "--workers", "0", "--log-every", "1"]


def write_voc(root, boxes_per_image, val=2, size=(96, 72), seed=0):
    """A VOC-layout folder: image k holds boxes_per_image[k] filled rectangles of classes 'a' /
    'b' on noise; trainval lists them all, val the first `val`."""
    rng = np.random.default_rng(seed)
    for d in ("Annotations", "JPEGImages", "ImageSets/Main"):
        (root / d).mkdir(parents=True, exist_ok=True)
    ids = []
    w, h = size
    for k, n in enumerate(boxes_per_image):
        pixels = rng.integers(0, 255, (h, w, 3), dtype=np.uint8)
        objects = []
        for j in range(n):
            x0, y0 = int(rng.integers(0, w // 2)), int(rng.integers(0, h // 2))
            x1, y1 = x0 + int(rng.integers(10, w // 2)), y0 + int(rng.integers(10, h // 2))
            pixels[y0:y1, x0:x1] = (255, 0, 0) if j % 2 == 0 else (0, 0, 255)
            objects.append(f"<object><name>{'ab'[j % 2]}</name><difficult>0</difficult><bndbox>"
                           f"<xmin>{x0 + 1}</xmin><ymin>{y0 + 1}</ymin><xmax>{x1}</xmax>"
                           f"<ymax>{y1}</ymax></bndbox></object>")
        image_id = f"img{k:03d}"
        Image.fromarray(pixels).save(root / "JPEGImages" / f"{image_id}.jpg")
        (root / "Annotations" / f"{image_id}.xml").write_text(
            f"<annotation><size><width>{w}</width><height>{h}</height><depth>3</depth></size>"
            + "".join(objects) + "</annotation>")
        ids.append(image_id)
    (root / "ImageSets/Main/trainval.txt").write_text("\n".join(ids) + "\n")
    (root / "ImageSets/Main/val.txt").write_text("\n".join(ids[:val]) + "\n")
    return root


def read_ckpt(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def metrics(run):
    with open(run / "metrics.jsonl") as f:
        return [json.loads(line) for line in f]


def same_weights(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# -----------------------------------------------------------------------------------------------
# Pure functions

def test_lr_schedule_follows_the_recipe():
    total, warmup = 1200, 500
    f = [train.lr_factor(i, total, warmup) for i in range(total)]
    assert f[0] == pytest.approx(1 / 3)
    assert f[250] == pytest.approx(1 / 3 + 2 / 3 * 0.5)
    assert all(a < b for a, b in zip(f[:500], f[1:500]))  # linear warmup rises
    assert f[500] == f[799] == 1.0
    assert f[800] == pytest.approx(0.1) and f[999] == pytest.approx(0.1)  # 2/3 of 1200
    assert f[1000] == pytest.approx(0.01) and f[-1] == pytest.approx(0.01)  # 5/6 of 1200


def test_defaults_per_case_and_linear_lr_rule(tmp_path):
    root = write_voc(tmp_path / "voc", [1] * 8, size=(32, 24))  # 8 training images
    (tmp_path / "vgg.pth").write_bytes(b"")  # only its existence is checked before training
    base = ["--data", "voc", "--data-root", str(root), "--out", str(tmp_path / "o")]
    s = train.settings(train.parse_args([*base, "--pretrained", str(tmp_path / "vgg.pth")]))
    # the paper's recipe: SGD, lr 1e-3 at 32 images, 500 warmup, full width; Caffe's 120k
    # iterations over 8 // 32 -> 1 iteration per epoch
    assert (s["case"], s["optimizer"], s["norm"], s["batch_size"], s["warmup"], s["width"]) == (
        "pretrained", "sgd", "none", 32, 500, 1.0)
    assert s["lr"] == pytest.approx(1e-3) and s["epochs"] == 120_000
    s = train.settings(train.parse_args([*base, "--pretrained", str(tmp_path / "vgg.pth"),
                                         "--batch-size", "64"]))
    assert s["lr"] == pytest.approx(2e-3)
    s = train.settings(train.parse_args(base))  # from scratch: the scratch row
    d = train.RECIPES[("voc", "scratch")]
    assert s["case"] == "scratch" and s["optimizer"] == d["optimizer"] == "adamw"
    assert (s["batch_size"], s["lr"], s["warmup"], s["width"], s["norm"]) == tuple(
        d[k] for k in ("batch_size", "lr", "warmup", "width", "norm"))
    assert s["epochs"] == round(d["iterations"] / (8 // d["batch_size"] or 1))
    s = train.settings(train.parse_args([*base, "--batch-size", "2", "--lr", "0.5", "--optimizer",
                                         "sgd", "--norm", "bn", "--epochs", "3"]))
    assert (s["batch_size"], s["lr"], s["optimizer"], s["norm"], s["epochs"]) == (
        2, 0.5, "sgd", "bn", 3)
    s = train.settings(train.parse_args([*base, "--batch-size", "2"]))
    assert s["epochs"] == round(d["iterations"] / 4)  # the schedule follows the images
    with pytest.raises(train.data.UsageError, match="--norm bn: the VGG16 files --pretrained"):
        train.settings(train.parse_args([*base, "--pretrained", str(tmp_path / "vgg.pth"),
                                         "--norm", "bn"]))  # no BatchNorm in ImageNet VGG16s


def test_a_resumed_run_keeps_its_recipe_case(tmp_path):
    # shapes has no pretrained row: with --pretrained it still runs the quick start's recipe, and
    # its checkpoint resumes as that case too (voc's has the paper's, resumed as the paper's)
    (tmp_path / "vgg.pth").write_bytes(b"")
    root = write_voc(tmp_path / "voc", [1] * 4, size=(32, 24))
    for data_args, case in ((["shapes"], "scratch"),
                            (["voc", "--data-root", str(root)], "pretrained")):
        out = tmp_path / data_args[0]
        s = train.settings(train.parse_args(["--data", *data_args, "--pretrained",
                                             str(tmp_path / "vgg.pth"), "--out", str(out)]))
        assert s["case"] == case
        path = tmp_path / f"{data_args[0]}.pt"
        torch.save(dict(model={}, config={}, optimizer={}, scheduler={}, step=0, rng={},
                        train_args={k: s[k] for k in train.RUN_KEYS}), path)
        resumed = train.settings(train.parse_args(["--resume", str(path)]))
        assert resumed["case"] == case and all(resumed[k] == s[k] for k in train.RUN_KEYS)


def test_eta_uses_the_median_rate_after_the_first_window():
    rates = []
    assert train.eta_rate(dict(steps=10), 50.0, rates) == 5.0  # only the slow first window
    assert train.eta_rate(dict(steps=10), 10.0, rates) == 1.0  # first window left out
    train.eta_rate(dict(steps=10), 12.0, rates)
    assert train.eta_rate(dict(steps=10), 40.0, rates) == pytest.approx(1.2)  # one slow window


def test_scratch_init_keeps_every_source_alive():
    x = torch.randn(2, 3, 300, 300) * train.PIXEL_STD  # the scale of 0-255 pixels minus the mean
    torch.manual_seed(0)
    model = ssd.ssd300(3, width=0.125)
    with torch.no_grad():
        xavier = [f.std().item() for f in model.features(x)[1:]]
        train.init_from_scratch(model)
        scratch = [f.std().item() for f in model.features(x)[1:]]  # conv7 and the extra levels
    assert min(xavier) < 0.05 * max(xavier)  # what He init is for: the deep sources fade
    assert all(0.2 < s < 5 for s in scratch), scratch


def test_first_layer_group_is_sgd_on_unit_scale_input():
    """One SGD step on conv1_1 with param_groups' lr and decay equals a plain SGD step of a model
    whose conv1_1 weight is PIXEL_STD times larger and whose input is PIXEL_STD times smaller."""
    s = train.PIXEL_STD
    torch.manual_seed(0)
    a = ssd.ssd300(2, width=0.0625)
    train.init_from_scratch(a)
    start = a.vgg[0].weight.detach().clone()
    b = ssd.ssd300(2, width=0.0625)
    b.load_state_dict(a.state_dict())
    with torch.no_grad():
        b.vgg[0].weight *= s
    x = torch.randn(1, 3, 300, 300) * s
    boxes, labels = [torch.tensor([[0.2, 0.2, 0.6, 0.7]])], [torch.tensor([1])]
    opt_a = torch.optim.SGD(train.param_groups(a, 0.01, scratch=True), lr=0.01, momentum=0.9,
                            weight_decay=5e-4)
    opt_b = torch.optim.SGD(b.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    for model, opt, inp in ((a, opt_a, x), (b, opt_b, x / s)):
        for _ in range(2):
            losses = ssd.multibox_loss(*model(inp), model.anchors, boxes, labels)
            opt.zero_grad()
            (losses["loss_cls"] + losses["loss_box"]).backward()
            opt.step()
    assert not torch.allclose(a.vgg[0].weight, start)  # it did move
    torch.testing.assert_close(a.vgg[0].weight * s, b.vgg[0].weight, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(a.cls_heads[0].weight, b.cls_heads[0].weight, rtol=1e-4, atol=1e-5)


def epoch_batches(num_images, epoch, seed, rank, world, per_rank):
    """One epoch of train.run_batches, as image indices."""
    iters = num_images // world // per_rank
    return [[i for e, i in batch if e == epoch] for batch in train.run_batches(
        num_images, seed, rank, world, per_rank, iters, epoch * iters, (epoch + 1) * iters)]


def test_data_order_depends_only_on_seed_and_epoch_and_splits_over_ranks():
    one = epoch_batches(50, 3, 7, 0, 1, 4)
    assert one == epoch_batches(50, 3, 7, 0, 1, 4)
    assert one != epoch_batches(50, 4, 7, 0, 1, 4)
    assert one != epoch_batches(50, 3, 8, 0, 1, 4)
    assert len(one) == 12 and all(len(b) == 4 for b in one)
    ranks = [epoch_batches(50, 3, 7, r, 2, 4) for r in range(2)]
    assert len(ranks[0]) == len(ranks[1]) == 6  # 25 images each -> 6 full batches
    seen = [i for r in ranks for b in r for i in b]
    assert len(seen) == len(set(seen))  # no image on two ranks in one epoch


def test_rng_state_survives_a_weights_only_checkpoint(tmp_path):
    train.seed_all(5)
    state = train.rng_state()
    torch.save(state, tmp_path / "rng.pt")
    first = (torch.rand(3), np.random.rand(3), random.random())
    train.seed_all(6)
    train.set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    again = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(first[0], again[0]) and np.array_equal(first[1], again[1])
    assert first[2] == again[2]


# -----------------------------------------------------------------------------------------------
# Short runs

def test_help_lists_the_flags(capsys):
    with pytest.raises(SystemExit) as e:
        train.main(["--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    for flag in ("--data", "--data-root", "--size", "--gpus", "--epochs", "--batch-size", "--lr",
                 "--workers", "--amp", "--no-amp", "--out", "--resume", "--pretrained",
                 "--width", "--eval-every", "--seed", "--optimizer", "--norm"):
        assert flag in text


def test_help_shows_the_defaults_per_data_set(capsys):
    with pytest.raises(SystemExit):
        train.main(["--help"])
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps to the terminal width
    for default in ("iterations per --data: coco 440000 with --pretrained, 1800 without; "
                    "shapes 1000; voc 120000 with --pretrained, 1800 without)",
                    "(default per --data: coco 32 with --pretrained, 16 without; shapes 16;",
                    "--data: coco 0.001 x batch / 32 with --pretrained, 0.003 without;",
                    "(default per --data: coco sgd with --pretrained, adamw without;",
                    "input size (default: 300)", "augmentation (default: 0)",
                    "per rank (default: the process's share of the cores",
                    "log lines (default: 20)"):
        assert default in text
    for key in ("iterations", "batch_size", "warmup", "width", "norm", "optimizer"):
        value = train.RECIPES[("voc", "scratch")][key]  # the help follows the table
        assert (f"{value:g}" if isinstance(value, float) else str(value)) in text


def test_few_steps_on_shapes(tmp_path, capsys):
    out = tmp_path / "run"
    code = train.main(["--data", "shapes", "--batch-size", "2", "--max-steps", "3",
                       "--eval-every", "0", "--out", str(out), *TINY])
    assert code == 0
    text = capsys.readouterr().out
    assert "global batch 2 (2 per process)" in text and "world size 1" in text
    assert "1000 iterations/epoch" in text  # 2,000 shapes images / 2
    rows = metrics(out)
    assert [r["step"] for r in rows] == [1, 2, 3]
    for r in rows:
        assert (math.isfinite(r["loss"])
                and r["loss"] == pytest.approx(r["loss_cls"] + r["loss_box"]))
        assert r["images_per_s"] > 0 and 0 <= r["data_wait"] <= 1 and r["lr"] > 0
    ckpt = read_ckpt(out / "last.pt")
    assert ckpt["step"] == 3 and ckpt["config"]["width"] == 0.0625
    assert ckpt["config"]["class_names"] == ["circle", "square", "triangle"]
    assert ckpt["train_args"]["data"] == "shapes"
    model = weights.load_model(out / "best.pt")  # best = last while nothing was evaluated
    assert same_weights(model.state_dict(), ckpt["model"])
    assert Image.open(out / "detections.jpg").size == (600, 600)  # 2 x 2 grid of 300 x 300


def test_from_scratch_default_is_chosen_logged_and_lowers_the_loss(tmp_path, capsys):
    root = write_voc(tmp_path / "voc", [2] * 4, val=2, size=(64, 48))
    out = tmp_path / "run"
    code = train.main(["--data", "voc", "--data-root", str(root), "--batch-size", "2",
                       "--max-steps", "8", "--warmup", "0", "--eval-every", "0", "--out", str(out),
                       *TINY])
    assert code == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("recipe: adamw lr 0.003") and "from scratch" in lines[0]
    assert "--pretrained" in lines[0] and "--optimizer sgd" in lines[0]
    assert "2 validation" in lines[1]  # no test split: val.txt
    loss = [r["loss"] for r in metrics(out)]
    assert len(loss) == 8 and sum(loss[-3:]) < 0.8 * sum(loss[:3]), loss
    args = read_ckpt(out / "last.pt")["train_args"]
    assert (args["optimizer"], args["norm"], args["pretrained"]) == ("adamw", "none", None)


def test_batchnorm_model_saves_loads_detects_and_evaluates(tmp_path, capsys):
    import evaluate
    root = write_voc(tmp_path / "voc", [1, 2, 1, 1], val=2)
    out = tmp_path / "run"
    code = train.main(["--data", "voc", "--data-root", str(root), "--batch-size", "2",
                       "--epochs", "1", "--eval-every", "1", "--norm", "bn", "--out", str(out),
                       *TINY])
    assert code == 0 and "norm bn" in capsys.readouterr().out
    ckpt = read_ckpt(out / "last.pt")
    assert ckpt["config"]["norm"] == "bn" and ckpt["train_args"]["norm"] == "bn"
    assert ckpt["model"]["vgg.0.bn.running_var"].ne(1).any()  # statistics were tracked
    model = weights.load_model(out / "last.pt")
    assert not model.training and isinstance(model.vgg[0].bn, torch.nn.BatchNorm2d)
    assert same_weights(model.state_dict(), ckpt["model"])
    image = torch.rand(3, 72, 96) * 255
    dets = ssd.detect(model, [image, image])
    torch.testing.assert_close(dets[0][0], dets[1][0])  # eval mode: no batch statistics
    source = train.data.build_source("voc", str(root), None, train=False)
    result = evaluate.evaluate_model(model, source, batch_size=2, workers=0, log=lambda *a: None)
    assert 0.0 <= result["map"] <= 1.0
    no_norm = ssd.make_config(300, 2)  # old configs without the key build the plain network
    del no_norm["norm"]
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in ssd.build_model(no_norm).modules())
    with pytest.raises(ValueError, match="norm must be 'none' or 'bn', got 'gn'"):
        ssd.make_config(300, 2, norm="gn")


def test_bad_data_is_reported_before_any_process_starts(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(train.mp, "spawn", lambda *a, **k: pytest.fail("spawned"))
    assert train.main(["--data", "voc", "--data-root", str(tmp_path / "none"), "--gpus", "2"]) == 2
    assert capsys.readouterr().err == f"error: {tmp_path / 'none'}: folder does not exist\n"
    root = write_voc(tmp_path / "voc", [1, 1], val=0)
    assert train.main(["--data", "voc", "--data-root", str(root), "--gpus", "2"]) == 2
    assert capsys.readouterr().err == f"error: {root}/ImageSets/Main/val.txt: no image ids\n"
    assert train.main(["--data", "voc", "--data-root", str(root), "--val-split", "nope"]) == 2
    assert "nope" in capsys.readouterr().err


def test_evaluation_every_epoch_and_best_checkpoint(tmp_path, capsys):
    root = write_voc(tmp_path / "voc", [1, 2, 1, 1], val=2)
    out = tmp_path / "run"
    code = train.main(["--data", "voc", "--data-root", str(root), "--batch-size", "2",
                       "--epochs", "2", "--eval-every", "1", "--out", str(out), *TINY])
    assert code == 0
    evals = [r for r in metrics(out) if "map" in r]
    assert [r["step"] for r in evals] == [2, 4]  # after each epoch of 2 steps
    assert all(0.0 <= r["map"] <= 1.0 for r in evals)
    assert "mAP 11-point" in capsys.readouterr().out  # evaluate.py's report
    best = read_ckpt(out / "best.pt")
    assert (read_ckpt(out / "last.pt")["best_map"] == best["best_map"]
            == max(r["map"] for r in evals))
    assert best["step"] == max(evals, key=lambda r: r["map"])["step"]  # first of equals


def test_images_without_boxes_train(tmp_path):
    root = write_voc(tmp_path / "voc", [0, 0, 0, 0])
    out = tmp_path / "run"
    code = train.main(["--data", "voc", "--data-root", str(root), "--batch-size", "2",
                       "--epochs", "2", "--eval-every", "0", "--out", str(out), *TINY])
    assert code == 0
    rows = metrics(out)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert all(r["loss"] == 0.0 for r in rows)  # no positives: nothing to classify or regress
    assert all(torch.isfinite(v).all() for v in read_ckpt(out / "last.pt")["model"].values())


def test_nan_guard_stops_with_the_step_and_terms(tmp_path, monkeypatch, capsys):
    root = write_voc(tmp_path / "voc", [1, 2, 1, 0, 1, 2])
    out = tmp_path / "run"
    real_loss, calls = ssd.multibox_loss, []

    def loss_with_a_nan_at_step_5(*args, **kwargs):
        calls.append(1)
        losses = real_loss(*args, **kwargs)
        if len(calls) == 5:
            losses["loss_cls"] = losses["loss_cls"] * float("nan")
        return losses

    monkeypatch.setattr(ssd, "multibox_loss", loss_with_a_nan_at_step_5)
    code = train.main(["--data", "voc", "--data-root", str(root), "--batch-size", "2",
                       "--epochs", "3", "--eval-every", "0", "--out", str(out), *TINY])
    assert code == 1
    err = capsys.readouterr().err
    assert "non-finite loss at step 5 (loss_cls=nan, loss_box=" in err
    assert f"last good checkpoint: {out / 'last.pt'}" in err
    ckpt = read_ckpt(out / "last.pt")  # written after epoch 1 (3 steps); nothing after the NaN
    assert ckpt["step"] == 3
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values())
    assert max(r["step"] for r in metrics(out)) == 4

    # the checkpoint is not overwritten by a fresh run, and a resumed run keeps its settings
    monkeypatch.setattr(ssd, "multibox_loss", real_loss)
    args = ["--data", "voc", "--data-root", str(root), "--out", str(out), *TINY]
    assert train.main(args) == 2
    assert "last.pt exists: --resume it or choose another --out" in capsys.readouterr().err
    assert train.main(["--resume", str(out / "last.pt"), "--width", "0.5"]) == 2
    assert "was trained with 0.0625" in capsys.readouterr().err
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    assert train.main(["--resume", str(tmp_path / "junk.pt")]) == 2
    assert "junk.pt: not a checkpoint" in capsys.readouterr().err
    # settings out of range in a checkpoint: one line, exit 2 (make_config's ValueError)
    ckpt = read_ckpt(out / "last.pt")
    ckpt["train_args"]["size"] = 400
    torch.save(ckpt, tmp_path / "edited.pt")
    assert train.main(["--resume", str(tmp_path / "edited.pt")]) == 2
    err = capsys.readouterr().err
    assert err == f"error: {tmp_path / 'edited.pt'}: size must be 300 or 512, got 400\n"


def run_cli(args, **kwargs):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(HERE)] + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else [])))
    return subprocess.Popen([sys.executable, str(HERE / "train.py"), *args], cwd=str(HERE),
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            **kwargs)


def test_kill_and_resume_matches_an_uninterrupted_run(tmp_path):
    root = write_voc(tmp_path / "voc", [1, 2, 0, 3])  # 2 steps per epoch at batch 2
    common = ["--data", "voc", "--data-root", str(root), "--batch-size", "2", "--epochs", "3",
              "--eval-every", "0", "--lr", "0.003", *TINY]
    assert train.main([*common, "--out", str(tmp_path / "straight")]) == 0
    straight = read_ckpt(tmp_path / "straight" / "last.pt")
    assert straight["step"] == 6

    # killed (SIGKILL: no clean-up) as soon as the first epoch's checkpoint exists
    killed = tmp_path / "killed"
    proc = run_cli([*common, "--out", str(killed)])
    deadline = time.time() + 120
    while not (killed / "last.pt").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    stopped_at = read_ckpt(killed / "last.pt")["step"]
    assert stopped_at in (2, 4)  # an epoch boundary (6 would mean the kill came too late)
    (killed / "last.pt.tmp99999").write_bytes(b"half a checkpoint")  # a save cut short
    with open(killed / "metrics.jsonl", "a") as f:
        f.write('{"step": 9, "epoch": 4.5, "lr"')  # a line cut short by the kill

    # a mid-epoch stop (--max-steps) resumed too: the augmentation of image i in epoch e is
    # drawn from (seed, e, i) only
    again = ["--eval-every", "0", *TINY]  # settings of this invocation only
    assert train.main(["--resume", str(killed / "last.pt"), "--max-steps", str(stopped_at + 1),
                       *again]) == 0
    assert read_ckpt(killed / "last.pt")["step"] == stopped_at + 1
    assert not (killed / "last.pt.tmp99999").exists()  # the half-written save is cleared away
    assert train.main(["--resume", "--out", str(killed), *again]) == 0
    resumed = read_ckpt(killed / "last.pt")
    assert resumed["step"] == 6
    assert same_weights(straight["model"], resumed["model"])
    for a, b in zip(straight["optimizer"]["state"].values(),
                    resumed["optimizer"]["state"].values()):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # AdamW's
    assert resumed["scheduler"] == straight["scheduler"]
    steps = [r["step"] for r in metrics(killed) if "loss" in r]
    assert steps == list(range(1, 7))  # each step logged once, the killed run's extras dropped


def test_ddp_wrapper_passes_no_deprecated_argument(tmp_path):
    # torch 2.13+ warns (FutureWarning) on DistributedDataParallel(broadcast_buffers=...)
    dist = torch.distributed
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0,
                            world_size=1)
    try:
        model = ssd.ssd300(3, width=0.0625)
        with warnings.catch_warnings():
            warnings.simplefilter("error", FutureWarning)
            warnings.simplefilter("error", DeprecationWarning)
            ddp = train.wrap_ddp(model, None)
        assert ddp.module is model and ddp.broadcast_buffers is False  # no sync in forward
        assert torch.equal(model.anchors, ssd.anchors(model.config))
    finally:
        dist.destroy_process_group()


def test_two_process_gloo_ddp_keeps_replicas_identical(tmp_path):
    out = tmp_path / "ddp"
    proc = run_cli(["--data", "shapes", "--gpus", "2", "--batch-size", "4", "--max-steps", "3",
                    "--eval-every", "0", "--out", str(out), *TINY])
    text, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, text
    assert "2 gloo processes on the CPU" in text
    assert "world size 2 (gloo)" in text and "global batch 4 (2 per process)" in text
    assert "500 iterations/epoch" in text  # 2,000 images / (2 ranks x 2)
    assert "weights identical across 2 processes" in text
    assert text.count("step 3/") == 1  # rank 0 alone logs
    assert read_ckpt(out / "last.pt")["step"] == 3


# -----------------------------------------------------------------------------------------------
# The run's one data loader

def test_run_batches_are_the_epoch_batches_back_to_back_from_any_step():
    every = [[(e, i) for i in b] for e in range(3) for b in epoch_batches(50, e, 7, 1, 2, 4)]
    assert len(every) == 3 * 6  # 25 images per rank, 6 batches of 4 per epoch
    assert list(train.run_batches(50, 7, 1, 2, 4, 6, 0, 18)) == every
    assert list(train.run_batches(50, 7, 1, 2, 4, 6, 5, 13)) == every[5:13]  # mid-epoch resume


def test_default_workers_share_the_cores(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)), raising=False)
    assert train.default_workers(True, 1) == 8  # capped
    assert train.default_workers(True, 4) == 3  # 4 cores each, one for the training process
    assert train.default_workers(False, 1) == 4  # the CPU trains with the other 12
    assert train.default_workers(False, 8) == 1


def test_one_loader_for_all_epochs_and_workers_change_nothing(tmp_path, monkeypatch):
    # 3 epochs, one DataLoader, its worker processes living through the epoch boundaries; the
    # weights equal a run without workers (--augment-on device: the batched path, here on the CPU)
    root = write_voc(tmp_path / "voc", [1, 2, 0, 3])
    common = ["--data", "voc", "--data-root", str(root), "--batch-size", "2", "--epochs", "3",
              "--eval-every", "0", "--augment-on", "device", *TINY]
    made = []
    real = torch.utils.data.DataLoader

    def counting(*args, **kwargs):
        made.append(kwargs.get("num_workers"))
        return real(*args, **kwargs)
    monkeypatch.setattr(torch.utils.data, "DataLoader", counting)
    # one core: both runs get one torch thread (train gives the cores the workers leave to torch,
    # and a different thread count changes float sums)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0}, raising=False)
    assert train.main([*common, "--out", str(tmp_path / "w0")]) == 0
    assert train.main([*common, "--workers", "2", "--out", str(tmp_path / "w2")]) == 0
    assert made == [0, 2]
    a, b = (read_ckpt(tmp_path / run / "last.pt") for run in ("w0", "w2"))
    assert a["step"] == b["step"] == 6 and same_weights(a["model"], b["model"])
