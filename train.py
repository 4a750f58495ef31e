"""Train SSD300 / SSD512 on VOC, COCO, any VOC-layout folder or the built-in synthetic shapes set.

    python train.py --data shapes                           # quick start: 4 minutes, 2 CPU cores
    python train.py --data voc --data-root ~/data --gpus 2  # VOC07+12 on 2 GPUs (DDP, NCCL)
    torchrun --nproc_per_node=8 train.py --data coco --data-root ~/coco --pretrained vgg16.pth
    python train.py --resume                                # continue the newest runs/*/last.pt

--out gets last.pt and best.pt (best validation mAP; last.pt's weights until one is measured) each
epoch, metrics.jsonl (a JSON object per log line and evaluation) and detections.jpg. --resume goes
on bit for bit. Exit codes: 0 done; 1 stopped on a non-finite loss; 2 bad usage, data or checkpoint.
"""
import argparse
import datetime
import functools
import inspect
import itertools
import json
import os
import random
import socket
import sys
import time
import warnings

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from PIL import Image

import data
import evaluate
import ssd
import weights
from data import UsageError

# Recipe (the SSD paper, Sec. 3; Caffe's ssd_pascal.py) unless a comment says otherwise.
MOMENTUM = 0.9  # every reference
WEIGHT_DECAY = 5e-4  # every reference; on all parameters, as mmdetection and torchvision do
BASE_LR, BASE_BATCH = 1e-3, 32  # Caffe, amdegroot, lufficc: 1e-3 at 32 images; linear scaling rule
WARMUP_FROM = 1 / 3  # mmdetection v1 and lufficc: linear warmup from lr / 3
DECAY_AT, DECAY = (2 / 3, 5 / 6), 0.1  # Caffe: x0.1 at 80k and 100k of 120k iterations
PIXEL_STD = 57.6  # ImageNet's per-channel pixel std on the 0-255 scale (58.4, 57.1, 57.4)
MAX_UNREADABLE = 10  # consecutive unreadable training images before giving up

# Run defaults per data set and case ("pretrained": --pretrained given), shown by --help. Schedules
# in iterations, as Caffe's: --epochs = iterations / (images // batch). lr None: BASE_LR x batch/32.
PAPER = dict(batch_size=32, lr=None, warmup=500, width=1.0, optimizer="sgd", norm="none")
# From scratch: AdamW (SGD without BatchNorm learned nothing in a few hundred iterations), 1/8 width
SCRATCH = dict(iterations=1800, batch_size=16, lr=3e-3, warmup=50, width=0.125,
               optimizer="adamw", norm="none")
RECIPES = {
    # Caffe, amdegroot, lufficc: 120k iterations x 32 images (232 passes over VOC07+12)
    ("voc", "pretrained"): dict(PAPER, iterations=120_000),
    # torchvision's reference (ssd300_vgg16): 120 passes over train2017 (Caffe's 400k: ~109)
    ("coco", "pretrained"): dict(PAPER, iterations=440_000),
    ("voc", "scratch"): SCRATCH, ("coco", "scratch"): SCRATCH,
    # quick start: 1/16 width; 625 / 1000 / 1250 iterations: shapes val mAP 0.82 / 1.00 / 1.00
    ("shapes", "scratch"): dict(SCRATCH, iterations=1000, width=0.0625),
}
DATASETS = sorted({d for d, _ in RECIPES})
COMMON = dict(size=300, seed=0)  # the same for every data set and case
RUN_KEYS = ("data", "data_root", "size", "width", "batch_size", "lr", "seed", "warmup", "optimizer",
            "norm", "val_split", "pretrained", "epochs")  # kept on --resume (--epochs may grow)


def _per_case(key):
    """Help text for a RECIPES default, e.g. 'coco 32 with --pretrained, 16 without; shapes 16'."""
    def show(name, case):
        v = RECIPES.get((name, case), RECIPES[name, "scratch"])[key]
        return (f"{BASE_LR:g} x batch / {BASE_BATCH}" if v is None else
                f"{v:g}" if isinstance(v, float) else str(v))
    return "; ".join(f"{n} {show(n, 'scratch')}" if show(n, "pretrained") == show(n, "scratch")
                     else f"{n} {show(n, 'pretrained')} with --pretrained, {show(n, 'scratch')} "
                     "without" for n in DATASETS)


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    add = p.add_argument
    add("--data", choices=DATASETS, help="data set (required unless --resume)")
    add("--data-root", metavar="DIR", help="voc: a VOC-layout folder or one holding VOCdevkit/"
        "VOC2007, VOC2012; coco: one with annotations/, train2017/ (required for voc and coco)")
    add("--size", type=int, choices=[300, 512], help=f"input size (default: {COMMON['size']})")
    add("--gpus", type=int, help="0: CPU, N > 1: N DDP processes (default: 1 with CUDA, else 0)")
    add("--epochs", type=int, help="passes over the training set (default: iterations / (images "
        f"// batch), iterations per --data: {_per_case('iterations')})")
    for key, kind, choices, what in (
            ("batch_size", int, None, "global batch, split over the processes "),
            ("lr", float, None, "peak lr "), ("warmup", int, None, "linear warmup iterations "),
            ("optimizer", str, ["sgd", "adamw"], ""),
            ("width", float, None, "channel width multiplier "),
            ("norm", str, ["none", "bn"], "BatchNorm after every VGG16 and extra conv, or none ")):
        add(f"--{key.replace('_', '-')}", type=kind, choices=choices,
            help=f"{what}(default per --data: {_per_case(key)})")
    add("--workers", type=int, help="data loading processes per rank (default: the process's "
        "share of the cores less one, at most 8; without CUDA a quarter of the share)")
    add("--augment-on", choices=("cpu", "device"), help="where augmentation runs: the workers, "
        "or batched on the training device (default: device with CUDA, else cpu)")
    add("--compile", action="store_true", help="torch.compile the model (default: off)")
    add("--amp", action=argparse.BooleanOptionalAction, help="mixed precision on CUDA: bf16 "
        "where supported, else fp16 (default: on with CUDA; the CPU trains in float32)")
    add("--out", metavar="DIR", help="run folder (default: runs/<data>-<time>; --resume: the same)")
    add("--resume", nargs="?", const="auto", metavar="PATH", help="continue PATH, <out>/last.pt "
        "or the newest runs/*/last.pt with the settings saved there (default: start a new run)")
    add("--pretrained", metavar="PATH", help="ImageNet VGG16 weights for the backbone, and the "
        "paper's recipe (default: none: from scratch, with the scratch recipe)")
    add("--eval-every", type=int, metavar="K",
        help="evaluate every K epochs and at the end (default: at the end; 0: never)")
    add("--val-split", help="evaluation split (default: voc: test, or val in a folder without a "
        "test split; coco: val2017; shapes: val)")
    add("--seed", type=int, help="seed of the weights, data order and augmentation (default: "
        f"{COMMON['seed']})")
    add("--log-every", type=int, default=20, help="steps between log lines (default: %(default)s)")
    add("--max-steps", type=int, help="stop at this step (checkpoint, evaluation, picture); the "
        "lr schedule still spans --epochs and --resume continues it (default: no limit)")
    args = p.parse_args(argv)
    for name, low in (("epochs", 1), ("batch_size", 1), ("log_every", 1), ("max_steps", 1),
                      ("workers", 0), ("warmup", 0), ("gpus", 0), ("eval_every", 0)):
        if getattr(args, name) is not None and getattr(args, name) < low:
            p.error(f"--{name.replace('_', '-')} must be at least {low}")
    for name in ("lr", "width"):
        if getattr(args, name) is not None and not getattr(args, name) > 0:
            p.error(f"--{name} must be positive")
    if args.resume is None and args.data is None:
        p.error("--data is required (or --resume to continue a run)")
    return args


def _read_checkpoint(path):
    """A train.py checkpoint (weights_only=True); CheckpointError / UsageError name the file."""
    ckpt = weights.read_weights(path)
    missing = [k for k in ("model", "config", "optimizer", "scheduler", "step", "rng", "train_args")
               if not isinstance(ckpt, dict) or k not in ckpt]
    if missing:
        raise UsageError(f"{path}: not a train.py checkpoint (no {missing[0]!r}); use it with "
                         "--pretrained or detect.py instead")
    return ckpt


@functools.lru_cache(maxsize=None)
def _sources(name, root, val_split):
    return (data.build_source(name, root, None, train=True),
            data.build_source(name, root, val_split, train=False))


def settings(args):
    """-> dict (plain types) of what a rank needs: a resumed run's, or RECIPES' with the flags."""
    _sources.cache_clear()  # the data as it is now, not as an earlier run in this process read it
    if args.resume is not None:
        path = (args.resume if args.resume != "auto" else os.path.join(args.out, "last.pt")
                if args.out else data.newest_run_file("last.pt"))
        if path is None:
            raise UsageError("--resume: no runs/*/last.pt to continue (give a path)")
        s = {"norm": "none", **_read_checkpoint(path)["train_args"]}  # older runs: no norm
        for key in RUN_KEYS:
            if key != "epochs" and (given := getattr(args, key)) not in (None, s.get(key)):
                raise UsageError(f"--{key.replace('_', '-')} {given}: {path} was trained with "
                                 f"{s.get(key)}; a resumed run keeps its settings")
        s.update(resume=path, out=args.out or os.path.dirname(os.path.abspath(path)))
    else:
        s = {k: getattr(args, k) for k in RUN_KEYS} | dict(resume=None)
    case = "pretrained" if s["pretrained"] and (s["data"], "pretrained") in RECIPES else "scratch"
    row, s["case"] = RECIPES[s["data"], case], case
    if not s["resume"]:  # a new run: the flags given, else the recipe's
        s.update({k: v for k, v in (COMMON | row).items() if k in s and s[k] is None})
        s["lr"] = s["lr"] or BASE_LR * s["batch_size"] / BASE_BATCH
        if s["pretrained"] and s["norm"] == "bn":
            raise UsageError("--norm bn: the VGG16 files --pretrained reads have no BatchNorm")
        if s["pretrained"] and not os.path.isfile(s["pretrained"]):
            raise UsageError(f"{s['pretrained']}: no such file (--pretrained)")
        if args.out and os.path.isfile(os.path.join(args.out, "last.pt")):
            raise UsageError(f"{args.out}/last.pt exists: --resume it or choose another --out")
        base = os.path.join("runs", f"{args.data}-{time.strftime('%Y%m%d-%H%M%S')}")
        s["out"] = args.out or next(o for o in (f"{base}-{k}" if k > 1 else base for k in
                                                itertools.count(1)) if not os.path.exists(o))
    iters = max(1, len(_sources(s["data"], s["data_root"], s["val_split"])[0]) // s["batch_size"])
    s["epochs"] = args.epochs or s["epochs"] or max(1, round(row["iterations"] / iters))
    gpus = int(torch.cuda.is_available()) if args.gpus is None else args.gpus
    cuda = torch.cuda.is_available() and gpus > 0
    if cuda and gpus > torch.cuda.device_count():
        raise UsageError(f"--gpus {gpus}: only {torch.cuda.device_count()} CUDA devices")
    procs = int(os.environ.get("LOCAL_WORLD_SIZE", 0)) or max(gpus, 1)  # on this machine
    workers = default_workers(cuda, procs) if args.workers is None else args.workers
    s.update({k: getattr(args, k) for k in ("compile", "log_every", "max_steps", "eval_every")},
             amp=args.amp, threads=max(1, _cores() // procs - workers // 2), workers=workers,
             gpus=gpus, cuda=cuda, augment_on=args.augment_on or ("device" if cuda else "cpu"))
    return s


def _cores():
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def default_workers(cuda, procs):
    """--workers default: the cores per process less one (CPU: a quarter of them), 1 to 8."""
    share = _cores() // procs
    return max(1, min(8, share - 1 if cuda else share // 4))


def init_from_scratch(model):
    """He init (He et al. 2015, Sec. 2.2) of the VGG and extra convs; conv1_1's / PIXEL_STD."""
    convs = [m for m in [*model.vgg, *model.extras] if isinstance(m, torch.nn.Conv2d)]
    for conv in convs:
        torch.nn.init.kaiming_normal_(conv.weight, nonlinearity="relu")
        torch.nn.init.zeros_(conv.bias)
    with torch.no_grad():
        convs[0].weight /= PIXEL_STD


def param_groups(model, lr, scratch):
    """SGD parameter groups. From scratch, conv1_1's weight gets lr / PIXEL_STD^2 and weight decay
    x PIXEL_STD^2, so SGD moves it exactly as PIXEL_STD x the weight on input / PIXEL_STD."""
    first = model.vgg[0].weight
    if not scratch:
        return [dict(params=list(model.parameters()))]
    return [dict(params=[p for p in model.parameters() if p is not first]),
            dict(params=[first], lr=lr / PIXEL_STD**2, weight_decay=WEIGHT_DECAY * PIXEL_STD**2)]


def lr_factor(it, total, warmup):
    """lr multiplier at iteration `it` of `total`: warmup from WARMUP_FROM, x DECAY at DECAY_AT."""
    warm = WARMUP_FROM + (1 - WARMUP_FROM) * it / warmup if it < warmup else 1.0
    return warm * DECAY ** sum(it >= round(f * total) for f in DECAY_AT)


def rng_state():
    """Every global generator's state as tensors and plain lists (weights_only=True can load it)."""
    _, keys, pos, has_gauss, cached_gaussian = np.random.get_state()
    version, state, gauss = random.getstate()
    return dict(torch=torch.get_rng_state(), cuda=torch.cuda.get_rng_state_all(),  # [] on a CPU
                numpy=dict(keys=torch.from_numpy(keys.astype(np.int64)), pos=int(pos),
                           has_gauss=int(has_gauss), cached_gaussian=float(cached_gaussian)),
                python=dict(version=version, state=list(state), gauss=gauss))


def set_rng_state(state):
    torch.set_rng_state(state["torch"])
    torch.cuda.set_rng_state_all(state["cuda"][:torch.cuda.device_count()])  # none without CUDA
    n, p = state["numpy"], state["python"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    random.setstate((p["version"], tuple(p["state"]), p["gauss"]))


def seed_all(*key):
    seed = int(np.random.SeedSequence(list(key)).generate_state(1)[0])
    for manual_seed in (torch.manual_seed, np.random.seed, random.seed):
        manual_seed(seed)


class EpochSeeded(torch.utils.data.Dataset):
    """Items by key (epoch, index), every generator seeded from (seed, epoch, index) first."""
    def __init__(self, dataset, seed):
        self.dataset, self.seed = dataset, seed

    def __getitem__(self, key):
        epoch, i = key
        for k in range(MAX_UNREADABLE):  # a damaged image costs a warning, not the run
            seed_all(self.seed, epoch, (i + k) % len(self.dataset))
            try:
                return self.dataset[(i + k) % len(self.dataset)]
            except data.DataError as e:
                print(f"warning: {e}; training on the next image instead", file=sys.stderr)
        raise data.DataError(f"{MAX_UNREADABLE} unreadable images in a row from index {i}")


def run_batches(num_images, seed, rank, world, per_rank, iters_per_epoch, start, stop):
    """This rank's batches of EpochSeeded keys (epoch, index) from step `start` to `stop`; each
    epoch DistributedSampler's shuffle (seed + epoch), less the tail that fills no batch."""
    for epoch in range(start // iters_per_epoch, (stop - 1) // iters_per_epoch + 1):
        order = list(torch.utils.data.DistributedSampler(range(num_images), world, rank,
                                                         seed=seed + epoch, drop_last=True))
        first = epoch * iters_per_epoch
        for k in range(max(start - first, 0), min(stop - first, len(order) // per_rank)):
            yield [(epoch, i) for i in order[k * per_rank:(k + 1) * per_rank]]


def eta_rate(window, elapsed, rates):
    """Seconds per step for the ETA: the median window rate (appended to `rates`), bar the first."""
    rates.append(elapsed / window["steps"])
    return float(np.median(rates[1:] or rates))


def _setup(s, rank, local_rank, world, log):
    """-> the run: the settings as attributes, device, data, model, optimizer, schedule, step."""
    cuda, out = s["cuda"], s["out"]
    r = argparse.Namespace(**dict(
        s, rank=rank, world=world, log=log, step=0, best_map=None, rates=[],
        device=torch.device(f"cuda:{local_rank}" if cuda else "cpu"),
        device_ids=[local_rank] if cuda else None, amp=cuda and s["amp"] is not False,
        per_rank=s["batch_size"] // world, last=os.path.join(out, "last.pt"),
        best=os.path.join(out, "best.pt"), metrics=os.path.join(out, "metrics.jsonl")))
    if cuda:
        torch.cuda.set_device(r.device)
    else:  # the ranks and their DataLoader workers share the cores
        torch.set_num_threads(r.threads)
    r.amp_dtype = torch.bfloat16 if r.amp and torch.cuda.is_bf16_supported() else torch.float16
    if s["amp"] and not cuda:
        log("warning: --amp is for CUDA; training in float32 on the CPU")
    if r.batch_size % world:
        raise UsageError(f"--batch-size {r.batch_size} does not split over {world} processes")
    r.train_source, r.val_source = _sources(r.data, r.data_root, r.val_split)
    r.iters = len(r.train_source) // world // r.per_rank  # per epoch
    if r.iters == 0:
        raise UsageError(f"{r.data}: {len(r.train_source)} training images, fewer than the "
                         f"global batch {r.batch_size}")
    r.total = r.epochs * r.iters
    r.stop = min(r.total, r.max_steps or r.total)
    names = r.train_source.class_names
    try:  # the flags are checked by parse_args; a resumed checkpoint's settings are not
        config = ssd.make_config(r.size, len(names), width=r.width, class_names=names,
                                 anchors="coco" if r.data == "coco" else "voc", norm=r.norm)
    except ValueError as e:
        raise UsageError(f"{r.resume or 'settings'}: {e}") from None
    seed_all(r.seed)  # the same initial weights on every rank
    r.model = ssd.build_model(config)
    if hasattr(r.train_source, "category_ids"):  # COCO: labels map back to category ids
        r.model.config["category_ids"] = list(r.train_source.category_ids)
    if not r.pretrained:
        init_from_scratch(r.model)
    elif not r.resume:
        weights.load_backbone(r.model, r.pretrained)
    r.model.to(r.device, memory_format=torch.channels_last)  # faster: GPUs, CPUs (1.6x on 2 cores)
    r.opt = (torch.optim.AdamW(r.model.parameters(), lr=r.lr, weight_decay=WEIGHT_DECAY)
             if r.optimizer == "adamw" else torch.optim.SGD(
                 param_groups(r.model, r.lr, scratch=not r.pretrained), lr=r.lr,
                 momentum=MOMENTUM, weight_decay=WEIGHT_DECAY))
    r.sched = torch.optim.lr_scheduler.LambdaLR(r.opt, lambda it: lr_factor(it, r.total, r.warmup))
    r.scaler = torch.amp.GradScaler("cuda", enabled=r.amp and r.amp_dtype == torch.float16)
    if r.resume:  # weights, optimizer, schedule, step, RNG
        ckpt = _read_checkpoint(r.resume)
        try:
            r.model.load_state_dict(ckpt["model"])
        except RuntimeError as e:
            raise UsageError(f"{r.resume}: weights do not fit the model "
                             f"({str(e).splitlines()[1].strip()})") from None
        for obj, key in ((r.opt, "optimizer"), (r.sched, "scheduler"), (r.scaler, "scaler")):
            if ckpt.get(key):  # no scaler state in older checkpoints; a disabled scaler ignores it
                obj.load_state_dict(ckpt[key])
        r.step, r.best_map = int(ckpt["step"]), ckpt.get("best_map")
        set_rng_state(ckpt["rng"])
        log(f"resumed {r.resume} at step {r.step} (epoch {r.step // r.iters})")
    if rank == 0:
        os.makedirs(out, exist_ok=True)
        for stale in (f for f in os.listdir(out) if ".pt.tmp" in f):  # saves cut short
            os.remove(os.path.join(out, stale))
        if r.resume and os.path.isfile(r.metrics):  # drop the lines logged after the checkpoint
            with open(r.metrics) as f:  # and one cut short by a kill (no newline)
                keep = [ln for ln in f if ln.endswith("\n") and json.loads(ln)["step"] <= r.step]
            weights.write_atomic(r.metrics, lambda f: f.writelines(keep))
    r.ddp_model = wrap_ddp(r.model, r.device_ids, r.norm == "bn") if world > 1 else r.model
    if r.compile:
        r.ddp_model = torch.compile(r.ddp_model)
    return r


def _step(r, images, boxes, labels):
    """One step, and a log line and metrics.jsonl row when due; -> False on a non-finite loss."""
    w, device = r.window, r.device
    if isinstance(images, tuple):  # --augment-on device: decoded pixels and the draws
        images = data.augment_batch(*(t.to(device, non_blocking=True) for t in images),
                                    r.model.config["mean"])  # [B, 3, S, S]
    images = images.to(device, non_blocking=True, memory_format=torch.channels_last)  # [B, 3, S, S]
    boxes = [b.to(device, non_blocking=True) for b in boxes]  # [N_i, 4] each
    labels = [lab.to(device, non_blocking=True) for lab in labels]  # [N_i] each
    with torch.autocast(device.type, dtype=r.amp_dtype, enabled=r.amp):
        cls_logits, box_deltas = r.ddp_model(images)  # [B, A, C+1], [B, A, 4]
    losses = ssd.multibox_loss(cls_logits, box_deltas, r.model.anchors, boxes, labels)
    terms = torch.stack([losses["loss_cls"], losses["loss_box"]]).detach().double()
    if r.world > 1:
        dist.all_reduce(terms)
    terms = terms.cpu() / r.world  # [2]: cls, box, averaged over the ranks
    if not torch.isfinite(terms).all():
        r.log(f"error: non-finite loss at step {r.step + 1} (loss_cls={terms[0].item():.4g}, "
              f"loss_box={terms[1].item():.4g}); last good checkpoint: "
              f"{r.last if os.path.isfile(r.last) else 'none yet'}", file=sys.stderr)
        return False
    r.opt.zero_grad(set_to_none=True)
    r.scaler.scale(losses["loss_cls"] + losses["loss_box"]).backward()
    r.scaler.step(r.opt)
    r.scaler.update()
    r.sched.step()
    r.step += 1
    w["steps"] += 1
    w["terms"] += terms
    if r.step % r.log_every and r.step != r.stop:
        return True
    elapsed = (now := time.perf_counter()) - w["t"]
    cls_loss, box_loss = (w["terms"] / w["steps"]).tolist()
    row = dict(step=r.step, epoch=r.step / r.iters, lr=r.opt.param_groups[0]["lr"],
               loss=cls_loss + box_loss, loss_cls=cls_loss, loss_box=box_loss,
               images_per_s=w["steps"] * r.batch_size / elapsed, data_wait=w["wait"] / elapsed,
               eta_s=(r.stop - r.step) * eta_rate(w, elapsed, r.rates), time_s=now - r.start)
    if r.cuda:
        row["mem_gb"] = torch.cuda.max_memory_allocated(device) / 2**30
    r.log(f"step {r.step}/{r.total} ep {(r.step - 1) // r.iters + 1}/{r.epochs} lr "
          f"{row['lr']:.1e} loss {row['loss']:.3f} (cls {cls_loss:.3f} box {box_loss:.3f}) "
          f"{row['images_per_s']:.1f} img/s data {100 * row['data_wait']:.0f}% ETA "
          f"{data.duration(row['eta_s'])}" + (f" mem {row['mem_gb']:.1f}G" if r.cuda else ""))
    if r.rank == 0:
        with open(r.metrics, "a") as f:
            f.write(json.dumps({k: round(v, 6) if isinstance(v, float) else v
                                for k, v in row.items()}) + "\n")
    w.update(t=time.perf_counter(), wait=0.0, steps=0, terms=0)
    return True


def _end_of_epoch(r):
    """Check the replicas agree (at the end); rank 0: evaluate when due, save last.pt, best.pt."""
    epoch, finished = r.step // r.iters, r.step >= r.stop
    if r.world > 1 and finished:  # check it once, at the end: each tensor's sum and sum of squares
        mine = torch.stack([t for p in r.model.parameters() for t in (
            p.detach().double().sum(), p.detach().double().pow(2).sum())])  # [2 * params]
        prints = [torch.empty_like(mine) for _ in range(r.world)]
        dist.all_gather(prints, mine)
        same = all(torch.equal(prints[0], p) for p in prints[1:])
        r.log(f"weights {'identical' if same else 'DIFFERENT'} across {r.world} processes")
    if r.rank == 0:
        improved = False
        if r.eval_every != 0 and (finished or r.eval_every and epoch % r.eval_every == 0):
            t0 = time.perf_counter()
            mean_ap = evaluate.evaluate_model(r.model, r.val_source, batch_size=8, device=r.device,
                                              workers=min(2, r.workers), log=r.log)["map"]
            secs = time.perf_counter() - t0
            r.log(f"eval step {r.step} epoch {epoch}: mAP {mean_ap:.4f} ({data.duration(secs)})")
            with open(r.metrics, "a") as f:
                print(json.dumps(dict(step=r.step, epoch=epoch, map=mean_ap, eval_s=round(secs, 1),
                                      time_s=round(time.perf_counter() - r.start, 1))), file=f)
            improved = r.best_map is None or mean_ap > r.best_map
            r.best_map = max(mean_ap, r.best_map or 0.0)
        for path in (r.last, r.best) if improved or r.best_map is None else (r.last,):
            weights.save_checkpoint(
                path, model={k: v.detach().cpu() for k, v in r.model.state_dict().items()},
                config=r.model.config, optimizer=r.opt.state_dict(),
                scheduler=r.sched.state_dict(), scaler=r.scaler.state_dict(), epoch=epoch,
                step=r.step, best_map=r.best_map, rng=rng_state(),
                train_args={k: getattr(r, k) for k in RUN_KEYS})
        r.log(f"saved {r.last}" + (f" and {r.best}" if improved else ""))
    if r.world > 1:
        dist.barrier(device_ids=r.device_ids)


def _train(s, rank, local_rank, world, log):
    """Train on this rank; -> exit code. Rank 0 alone logs, evaluates and writes files."""
    log(f"recipe: {s['optimizer']} lr {s['lr']:.3g}, batch {s['batch_size']}, width "
        f"{s['width']:g}, norm {s['norm']}, warmup {s['warmup']}, {s['epochs']} epochs" + (
            " (the paper's, for --pretrained)" if s["case"] == "pretrained" else
            " (the quick start's, from scratch)" if s["data"] == "shapes" else
            " (from scratch: the default without --pretrained; the paper's recipe is --pretrained "
            "VGG16_FILE, or --optimizer sgd --lr 0.001 --batch-size 32 --warmup 500 --width 1 "
            "--norm none)"))
    r = _setup(s, rank, local_rank, world, log)
    log(f"data {r.data}: {len(r.train_source)} training images, {len(r.val_source)} "
        f"validation; {len(r.train_source.class_names)} classes")
    log(f"model SSD{r.size} width {r.width:g} norm {r.norm}: "
        f"{sum(p.numel() for p in r.model.parameters()):,} parameters; device {r.device.type}, "
        f"world size {world}{f' ({dist.get_backend()})' if world > 1 else ''}, {r.workers} "
        f"loader workers{'' if r.cuda else f', {torch.get_num_threads()} threads'}; amp "
        f"{str(r.amp_dtype).split('.')[-1] if r.amp else 'off'}")
    log(f"global batch {r.batch_size} ({r.per_rank} per process), {type(r.opt).__name__} "
        f"lr {r.lr:.3g}, {r.iters} iterations/epoch x {r.epochs} epochs = {r.total} iterations; "
        f"warmup {r.warmup} from lr/3, x{DECAY:g} at {round(DECAY_AT[0] * r.total)} and "
        f"{round(DECAY_AT[1] * r.total)}; run folder {r.out}")
    if r.stop < r.total:
        log(f"stopping at step {r.stop} (--max-steps)")
    if r.step >= r.stop:
        log(f"nothing to do: the run is at step {r.step} of {r.stop}")
        return 0
    warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step\\(\\)` before")
    r.start = t_wait = time.perf_counter()
    r.window = dict(t=r.start, wait=0.0, steps=0, terms=0)  # the steps since the last log line
    aug = data.TrainTransform(r.size, r.model.config["mean"], on_device=r.augment_on == "device")
    loader = torch.utils.data.DataLoader(  # the run's one loader: its workers live on
        EpochSeeded(data.DetectionDataset(r.train_source, aug), r.seed),
        batch_sampler=run_batches(len(r.train_source), r.seed, rank, world, r.per_rank, r.iters,
                                  r.step, r.stop), num_workers=r.workers, collate_fn=data.collate,
        pin_memory=r.cuda, prefetch_factor=4 if r.workers else None)
    for images, boxes, labels, _ in loader:  # the batches of steps r.step + 1 to r.stop
        r.window["wait"] += time.perf_counter() - t_wait
        if not _step(r, images, boxes, labels):
            return 1
        if r.step % r.iters == 0 or r.step == r.stop:
            _end_of_epoch(r)
        t_wait = time.perf_counter()
    if rank == 0:  # detections.jpg: the first 4 validation images, drawn as detect.py does
        pic, images = os.path.join(r.out, "detections.jpg"), [
            r.val_source.load_image(i) for i in range(min(4, len(r.val_source)))]
        dets = ssd.detect(r.model.eval(), [data.to_tensor(im) for im in images], score_thr=0.5)
        w, h = max(im.width for im in images), max(im.height for im in images)  # of a cell
        grid = Image.new("RGB", (min(2, len(images)) * w, (len(images) + 1) // 2 * h), "white")
        for k, (im, (boxes, scores, labels)) in enumerate(zip(images, dets)):  # a 2 x 2 grid
            data.draw_detections(im, boxes, scores, labels, r.model.config["class_names"])
            grid.paste(im, (k % 2 * w, k // 2 * h))
        weights.write_atomic(pic, lambda f: grid.save(f, format="JPEG", quality=92), mode="wb")
        best = f", best mAP {r.best_map:.4f}" if r.best_map is not None else ""
        log(f"done: {r.step} steps in {data.duration(time.perf_counter() - r.start)}{best}; "
            f"wrote {pic}")
    return 0


def wrap_ddp(model, device_ids, batchnorm=False):
    """DistributedDataParallel, syncing the buffers at each forward only with BatchNorm."""
    ddp = torch.nn.parallel.DistributedDataParallel  # torch 2.13 deprecated broadcast_buffers
    new = "forward_sync_buffers" in inspect.signature(ddp).parameters
    return ddp(model, device_ids=device_ids, **{
        "forward_sync_buffers" if new else "broadcast_buffers": batchnorm})


def run(s, rank, local_rank, world):
    """One rank: join the process group (world > 1), train, leave; -> exit code."""
    log = (lambda *a, **k: print(*a, **k, flush=True)) if rank == 0 else (lambda *a, **k: None)
    if world > 1:
        dist.init_process_group("nccl" if s["cuda"] else "gloo", rank=rank, world_size=world,
                                timeout=datetime.timedelta(hours=1))  # rank 0 evaluates alone
    try:
        return _train(s, rank, local_rank, world, log)
    except (UsageError, data.DataError, weights.CheckpointError) as e:
        log(f"error: {str(e).strip().splitlines()[-1]}", file=sys.stderr)  # one line, no traceback
        return 2
    except KeyboardInterrupt:
        log(f"interrupted; continue with --resume {s['out']}/last.pt", file=sys.stderr)
        return 130
    finally:
        if world > 1:
            dist.destroy_process_group()


def _spawned(local_rank, world, s):
    sys.exit(run(s, local_rank, local_rank, world))


def main(argv=None):
    args = parse_args(argv)
    try:
        s = settings(args)
    except (UsageError, data.DataError, weights.CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    env, gpus = os.environ, s["gpus"]
    if "RANK" in env and "WORLD_SIZE" in env:  # torchrun (one or several nodes)
        return run(s, int(env["RANK"]), int(env.get("LOCAL_RANK", 0)), int(env["WORLD_SIZE"]))
    if args.gpus and not s["cuda"]:
        print("warning: no CUDA: " + (f"--gpus {gpus} runs {gpus} gloo processes on the CPU"
                                      if gpus > 1 else "training on the CPU"), flush=True)
    if gpus <= 1:
        return run(s, 0, 0, 1)
    env.setdefault("MASTER_ADDR", "127.0.0.1")
    with socket.socket() as sock:  # a free port, unless one is given
        sock.bind(("127.0.0.1", 0))
        env.setdefault("MASTER_PORT", str(sock.getsockname()[1]))
    try:
        mp.spawn(_spawned, args=(gpus, s), nprocs=gpus)
    except mp.ProcessExitedException as e:
        return e.exit_code if e.exit_code and e.exit_code > 0 else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
