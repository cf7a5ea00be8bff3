"""What every latency benchmark sets up: the same flags, a workspace with the digits images and a
random-weight checkpoint (latency does not depend on the weights' values; nothing is downloaded),
and the line that says which CPU a table came from."""
from __future__ import annotations

import argparse
import logging
import os
import platform
import tempfile
from pathlib import Path


def parse_args(description: str, calib_samples: int, calib_help: str = "calibration images") -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--model", default="crossvit_9_240")
    ap.add_argument("--runs", type=int, default=50)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--calib-samples", type=int, default=calib_samples, help=calib_help)
    return ap.parse_args()


def workspace(prefix: str, model_name: str, threads: int):
    """(work folder, digits train folder, random-weight model, its checkpoint path)."""
    import torch

    from crossvit_edge.checkpoint import save_checkpoint
    from crossvit_edge.crossvit import create_model
    from crossvit_edge.data import write_digits_imagefolder

    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(threads)
    work = Path(tempfile.mkdtemp(prefix=prefix))
    train_dir, _ = write_digits_imagefolder(work / "digits")
    torch.manual_seed(0)
    model = create_model(model_name, num_classes=10).eval()
    ckpt = work / "model.safetensors"
    save_checkpoint(model.state_dict(), ckpt, {"model": model_name})
    return work, train_dir, model, ckpt


# fp16: f16c (x86 conversions only), avx512_fp16 (x86 fp16 arithmetic), asimdhp (ARMv8.2-A fp16 arithmetic)
FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "f16c", "avx512_fp16", "amx_int8", "amx_bf16",
         "asimddp", "asimdhp", "i8mm", "sve")


def cpu_description() -> str:
    """The CPU model, usable cores and the SIMD / int8 flags that decide which kernels run."""
    model, flags = platform.processor() or platform.machine(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and model in ("", platform.machine(), platform.processor()):
                model = value.strip()
            elif key.strip() in ("flags", "Features"):
                flags |= set(value.split())
    except OSError:
        pass
    have = [f for f in FLAGS if f in flags]
    return f"{model}; {len(os.sched_getaffinity(0))} usable cores; flags: {', '.join(have) or 'none of ' + ', '.join(FLAGS)}"
