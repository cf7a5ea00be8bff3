"""Train the demo model: crossvit_tiny_240 on scikit-learn's digits, with this project's own model.

No weights can be downloaded here, so the toolchain's demos and tests use a real CrossViT trained on
real (if tiny) labelled data. The digits are written as PNG ImageFolders and read back through the
project's preprocessing, exactly as every converter and the harness read images.

Recipe: AdamW, weight decay 0.05, one-cycle schedule with 10% warm-up, gradient clipping at 1.0,
random shifts of up to 16 px, label smoothing 0.1. The learning rate matters most on so few images:
with timm's crossvit_9_240 on these digits, lr 1e-3 at batch 32 stayed at chance for 4 epochs, while
about 1.5e-4 (DeiT's 5e-4 per 512 images, scaled down) learned steadily (41% after 5 epochs, 69%
after 11); the images are preprocessed once and kept in memory, the transform being deterministic.
Two choices speed up learning on 1437 images: the position embeddings start as
2-D sin-cos tables (a spatial prior the trunc-normal init lacks) and batches of 16 (more updates per
epoch at the same cost). Training stops at the first epoch whose val top-1 reaches ``--stop-at``.

    python scripts/train_demo.py --out crossvit_edge/weights/crossvit_tiny_240_digits.safetensors
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from crossvit_edge.checkpoint import save_checkpoint  # noqa: E402
from crossvit_edge.crossvit import create_model  # noqa: E402
from crossvit_edge.data import open_image_set, write_digits_imagefolder  # noqa: E402
from crossvit_edge.preprocess import Preprocessing  # noqa: E402

log = logging.getLogger("train_demo")


def sincos_2d(grid: int, dim: int) -> torch.Tensor:
    """(grid*grid, dim) fixed 2-D sin-cos position table (MAE's), used as the initial value."""
    assert dim % 4 == 0
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim // 4))
    ys, xs = torch.meshgrid(torch.arange(grid, dtype=torch.float64), torch.arange(grid, dtype=torch.float64), indexing="ij")
    parts = []
    for coord in (ys.flatten(), xs.flatten()):
        angles = coord[:, None] * omega[None]
        parts += [angles.sin(), angles.cos()]
    return torch.cat(parts, dim=1).float()


def init_position_tables(model) -> None:
    with torch.no_grad():
        for i, pos in enumerate((model.pos_embed_0, model.pos_embed_1)):
            n = pos.shape[1] - 1
            pos[0, 1:] = sincos_2d(int(math.isqrt(n)), pos.shape[2])
            pos[0, 0] = 0


def random_shift(x: torch.Tensor, max_shift: int, background: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Translate each image by up to ``max_shift`` px, filling with the background colour."""
    b, _, h, w = x.shape
    pad = max_shift
    canvas = background.view(1, 3, 1, 1).expand(b, 3, h + 2 * pad, w + 2 * pad).clone()
    canvas[:, :, pad : pad + h, pad : pad + w] = x
    out = torch.empty_like(x)
    offsets = torch.randint(0, 2 * pad + 1, (b, 2), generator=gen)
    for i, (dy, dx) in enumerate(offsets.tolist()):
        out[i] = canvas[i, :, dy : dy + h, dx : dx + w]
    return out


@torch.no_grad()
def evaluate(model, x: torch.Tensor, y: torch.Tensor, batch: int = 60) -> float:
    model.eval()
    correct = 0
    for s in range(0, len(x), batch):
        correct += (model(x[s : s + batch]).argmax(1) == y[s : s + batch]).sum().item()
    return correct / len(x)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="demo_data/digits", help="where the digits ImageFolders are (written if absent)")
    ap.add_argument("--out", required=True, help="output .safetensors")
    ap.add_argument("--model", default="crossvit_tiny_240")
    ap.add_argument("--epochs", type=int, default=30, help="length of the one-cycle schedule")
    ap.add_argument("--stop-at", type=float, default=0.95, help="stop once val top-1 reaches this")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--init-from", help="continue from this checkpoint (a second, shorter schedule)")
    ap.add_argument("--finalize-only", action="store_true", help="only convert --out to the shipped fp16 form and re-measure")
    args = ap.parse_args(argv)
    if args.finalize_only:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
        finalize(args.out, write_digits_imagefolder(args.data)[1])
        return 0
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    start = time.time()

    train_dir, val_dir = write_digits_imagefolder(args.data)
    model = create_model(args.model, num_classes=10)
    pre = Preprocessing(input_size=model.config.img_size, crop_pct=model.config.crop_pct)
    train_set, val_set = open_image_set(train_dir), open_image_set(val_dir)
    log.info("preprocessing %d train / %d val images once", len(train_set), len(val_set))
    x_train = torch.from_numpy(train_set.load(pre))
    y_train = torch.tensor(train_set.labels)
    x_val = torch.from_numpy(val_set.load(pre))
    y_val = torch.tensor(val_set.labels)
    background = torch.from_numpy(pre.normalize(np.zeros((1, 1, 3), np.uint8)).reshape(3))

    if args.init_from:
        from crossvit_edge.checkpoint import load_checkpoint

        model.load_state_dict(load_checkpoint(args.init_from).model.state_dict())
        log.info("continuing from %s", args.init_from)
    else:
        init_position_tables(model)
    decay = [p for n, p in model.named_parameters() if p.ndim > 1 and "pos_embed" not in n and "cls_token" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim > 1 and "pos_embed" not in n and "cls_token" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.05}, {"params": no_decay, "weight_decay": 0.0}], lr=args.lr)
    steps_per_epoch = math.ceil(len(x_train) / args.batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=args.lr, total_steps=args.epochs * steps_per_epoch, pct_start=0.1, anneal_strategy="cos"
    )
    gen = torch.Generator().manual_seed(args.seed)
    history = []
    best = -1.0
    for epoch in range(1, args.epochs + 1):
        model.train()
        order = torch.randperm(len(x_train), generator=gen)
        total = 0.0
        for s in tqdm(range(0, len(order), args.batch_size), desc=f"epoch {epoch}", leave=False):
            idx = order[s : s + args.batch_size]
            xb = random_shift(x_train[idx], 16, background, gen)
            loss = F.cross_entropy(model(xb), y_train[idx], label_smoothing=0.1)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            total += loss.item() * len(idx)
        acc = evaluate(model, x_val, y_val)
        history.append({"epoch": epoch, "train_loss": total / len(x_train), "val_top1": acc, "seconds": time.time() - start})
        log.info("epoch %d loss %.4f val top-1 %.4f (%.0f s)", epoch, total / len(x_train), acc, time.time() - start)
        if acc > best:
            best = acc
            meta = {
                "model": args.model,
                "num_classes": "10",
                "labels": json.dumps([str(i) for i in range(10)]),
                "dataset": "scikit-learn digits, val split 20% stratified seed 0 (360 images)",
                "val_top1": f"{acc:.4f}",
                "epoch": str(epoch),
                "train_seconds": f"{time.time() - start:.0f}",
                "command": " ".join(["python", "scripts/train_demo.py"] + (argv if argv is not None else sys.argv[1:])),
            }
            save_checkpoint(model.state_dict(), args.out, metadata=meta)
        if acc >= args.stop_at:
            break
    record = {"best_val_top1_fp32_weights": best, "train_seconds": round(time.time() - start), "history": history}
    Path(args.out).with_suffix(".json").write_text(json.dumps(record, indent=1))
    log.info("best val top-1 %.4f, %.0f s in all", best, time.time() - start)
    finalize(args.out, val_dir)
    return 0


def finalize(out, val_dir) -> float:
    """Store the weights as fp16 (half the size; the loader widens them to fp32) and record the
    val top-1 of exactly what ships, evaluated from the PNG files through the project's
    preprocessing."""
    from crossvit_edge.checkpoint import load_checkpoint, read_state_dict

    sd, meta = read_state_dict(out)
    save_checkpoint({k: v.half() for k, v in sd.items()}, out, metadata={**meta, "stored_dtype": "float16"})
    shipped = load_checkpoint(out)
    val_set = open_image_set(val_dir)
    cfg = shipped.model.config
    x = torch.from_numpy(val_set.load(Preprocessing(input_size=cfg.img_size, crop_pct=cfg.crop_pct)))
    acc = evaluate(shipped.model, x, torch.tensor(val_set.labels))
    save_checkpoint({k: v.half() for k, v in sd.items()}, out, metadata={**meta, "stored_dtype": "float16", "val_top1": f"{acc:.4f}"})
    record_path = Path(out).with_suffix(".json")
    record = json.loads(record_path.read_text()) if record_path.exists() else {}
    record["shipped_val_top1"] = acc
    record_path.write_text(json.dumps(record, indent=1))
    log.info("shipped fp16 checkpoint: val top-1 %.4f (%d images)", acc, len(x))
    return acc


if __name__ == "__main__":
    sys.exit(main())
