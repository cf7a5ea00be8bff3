"""The C++ example (examples/executorch_cpp) as the tests drive it: built by the project's own
script (for this machine, or cross-compiled with ``--arch aarch64``), run directly or through an
emulator, and its results file merged into a profile. Used by tests/test_cpp_example.py and
tests/test_arm.py."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

from crossvit_edge.data import open_image_set

from .conftest import REPO

BUILD_SCRIPT = REPO / "scripts" / "build_cpp_example.sh"


def build_app(build_dir: Path, arch: Optional[str] = None) -> Path:
    """Build with scripts/build_cpp_example.sh (``--arch aarch64`` to cross-compile) into
    ``build_dir`` (kept between runs: rebuilds are incremental); returns the program's path."""
    t = time.time()
    command = ["bash", str(BUILD_SCRIPT), *(["--arch", arch] if arch else []), str(build_dir)]
    done = subprocess.run(command, capture_output=True, text=True, cwd=REPO, timeout=1800,
                          env={**os.environ, "PYTHON": os.environ.get("PYTHON", sys.executable)})
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    print(f"built the C++ example{' for ' + arch if arch else ''} in {time.time() - t:.1f} s")
    path = Path(done.stdout.strip().splitlines()[-1])
    path = path if path.is_absolute() else REPO / path
    assert path.is_file() and os.access(path, os.X_OK)
    return path


def run_app(app: Path, *args, check: bool = True, launcher: Sequence[str] = (), timeout: int = 600) -> subprocess.CompletedProcess:
    """Run the program (through ``launcher``, e.g. qemu-aarch64 and its flags, when given)."""
    done = subprocess.run([*launcher, str(app), *map(str, args)], capture_output=True, text=True, timeout=timeout)
    if check:
        assert done.returncode == 0, done.stderr[-2000:]
    return done


def merged_agreement_matches(bundle: Path, results: Path, val_dir: Path, checkpoint, bench_runs: int = 5) -> dict:
    """The app's results file merged into a profile of the same images: its agreement with the fp32
    reference matches the executorch row's (the Python runtime on this machine) within one image.
    Returns the two agreements and the merged row."""
    from crossvit_edge.checkpoint import load_checkpoint
    from crossvit_edge.harness import ProfileSettings, profile_bundles
    from crossvit_edge.preprocess import Preprocessing

    images = open_image_set(val_dir)
    model = load_checkpoint(str(checkpoint)).model
    pre = Preprocessing(model.config.img_size, model.config.crop_pct)
    data = json.loads(results.read_text())
    report = profile_bundles([bundle], images, pre, model, ProfileSettings(runs=2, warmup=0, threads=2), merged=[data])
    rows = {r["runner"]: r for r in report["rows"]}
    python_row = next(r for r in report["rows"] if r["target"] == "executorch" and "crossvit_classify" not in r["runner"])
    cpp_row = next(r for r in report["rows"] if "crossvit_classify" in r["runner"])
    assert cpp_row["name"] == bundle.name and cpp_row["precision"] == json.loads((bundle / "manifest.json").read_text())["precision"], rows.keys()
    difference = abs(cpp_row["accuracy"]["top1_agreement"] - python_row["accuracy"]["top1_agreement"]) * len(images)
    assert difference <= 1.0 + 1e-9, (cpp_row["accuracy"], python_row["accuracy"])
    assert cpp_row["latency"]["runs"] == bench_runs and cpp_row["latency"]["p50_ms"] > 0
    out = {"cpp_agreement": cpp_row["accuracy"]["top1_agreement"], "python_agreement": python_row["accuracy"]["top1_agreement"],
           "cpp_row": cpp_row, "report": report}
    print({k: v for k, v in out.items() if k.endswith("agreement")})
    return out


def runpath_entries(program: Path) -> list:
    """The program's DT_RUNPATH (or DT_RPATH) entries, as the loader splits them (on ':')."""
    done = subprocess.run(["readelf", "-d", str(program)], capture_output=True, text=True, check=True)
    for line in done.stdout.splitlines():
        if "(RUNPATH)" in line or "(RPATH)" in line:
            return line.split("[", 1)[1].rsplit("]", 1)[0].split(":")
    return []
