"""What the CLIs share: logging set-up, turning UserError into one line and exit code 2, SIGTERM,
SIGHUP and SIGQUIT handled like Ctrl-C, a full disk reported in one line, and the checks on output
paths that run before any heavy import.

Exit codes (docs/security.md): 0 success; 2 bad input, or an output that cannot be written (a full
disk); 130 Ctrl-C (SIGINT); 129 SIGHUP, 131 SIGQUIT, 143 SIGTERM (128 + the signal). On every one
of them the staging folder of a bundle being built is removed and nothing is left half-written."""
from __future__ import annotations

import errno
import logging
import math
import shutil
import signal
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable, Dict, Optional

from .errors import UserError, brief

# onnxruntime.transformers puts its own folder on sys.path, so its fusion logger may be "fusion_base"
NOISY_LOGGERS = ("torch", "onnxscript", "onnx_ir", "coremltools", "executorch", "torchao", "matplotlib", "PIL",
                 "onnxruntime", "fusion_base")


def setup_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s" if verbose else "%(message)s",
        stream=sys.stderr,
    )
    quiet_libraries(verbose)


def quiet_libraries(verbose: bool) -> None:
    """Quiet the libraries' loggers. torch configures its own loggers when it is imported,
    overriding levels set before, so the CLIs call this again once torch is in (torch is imported
    only after the input has been validated, which keeps bad input fast to refuse)."""
    # Python warnings (torch's, torchao's, coremltools' UserWarnings on import) go through logging as
    # "py.warnings", quiet unless -v: a refusal's one stderr line is never preceded by library noise
    logging.captureWarnings(True)
    for noisy in NOISY_LOGGERS + ("py.warnings",):
        logging.getLogger(noisy).setLevel(logging.ERROR if not verbose else logging.INFO)


class Terminated(BaseException):
    """SIGTERM, SIGHUP or SIGQUIT, raised in the main thread like KeyboardInterrupt so that
    ``finally`` blocks (the staging folder of a bundle) run. A BaseException: ``except Exception``
    must not swallow it. ``signum``: which signal."""

    def __init__(self, signum: int = signal.SIGTERM):
        super().__init__(signum)
        self.signum = signum


def _raise_terminated(signum, frame):
    raise Terminated(signum)


# Signals that end a CLI cleanly (the terminal closing, Ctrl-\, kill): 128 + the signal number.
# SIGQUIT would otherwise dump core and leave the staging folder; SIGHUP would leave it too.
TERMINATING_SIGNALS = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGHUP", "SIGQUIT") if hasattr(signal, name))
# A write that fails for want of space: a full disk, a quota, a file-size limit (RLIMIT_FSIZE)
NO_SPACE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}


# The modules of the pip extra "convert" (pyproject.toml), by import name -> distribution name.
CONVERT_MODULES = {"torch": "torch", "safetensors": "safetensors", "onnx": "onnx", "onnxruntime": "onnxruntime",
                   "onnxscript": "onnxscript", "yaml": "pyyaml", "matplotlib": "matplotlib", "sklearn": "scikit-learn"}


def require_convert_extra() -> None:
    """The conversion CLIs (convert, profile, demo) need the conversion stack, which the runtime
    install (``pip install crossvit-edge``) leaves out: say which extra to install, in one line."""
    import importlib.util

    missing = [dist for module, dist in CONVERT_MODULES.items() if importlib.util.find_spec(module) is None]
    if missing:
        raise UserError(f"this command needs the conversion extra: pip install 'crossvit-edge[convert]' (missing: {', '.join(missing)})")


def run_cli(prog: str, body: Callable[[], int]) -> int:
    """Run ``body``; a UserError (bad input) becomes ``prog: error: message`` and exit 2, and so
    does a write that fails for want of space (wherever a library raised it); Ctrl-C exits 130,
    SIGTERM/SIGHUP/SIGQUIT 128 + the signal, all after cleaning up."""
    previous = {}
    for signum in TERMINATING_SIGNALS:
        try:
            previous[signum] = signal.signal(signum, _raise_terminated)
        except ValueError:  # not the main thread (an embedding app): leave signals alone
            break
    try:
        return body()
    except UserError as e:
        print(f"{prog}: error: {one_line(str(e))}", file=sys.stderr)
        return 2
    except OSError as e:
        if e.errno not in NO_SPACE_ERRNOS:
            raise
        where = f" {brief(str(e.filename), 200)}" if e.filename else ""
        print(f"{prog}: error: cannot write{where}: {e.strerror or errno.errorcode.get(e.errno, 'no space')} "
              f"(nothing was left half-written)", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except Terminated as e:
        print(f"{prog}: terminated ({signal.Signals(e.signum).name})", file=sys.stderr)
        return 128 + e.signum
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def one_line(text: str, limit: int = 2000) -> str:
    """An error message as one bounded line: control characters (newlines from a file name or a
    library's message) become spaces."""
    text = "".join(ch if ch.isprintable() else " " for ch in text)
    return text if len(text) <= limit else text[:limit] + "..."


# --------------------------------------------------------------------------------------------------
# Flag checks (before heavy imports)


def check_int(flag: str, value: Any, lo: int, hi: Optional[int] = None) -> None:
    """``value`` is a whole number in [lo, hi] (None: no value given, nothing to check)."""
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < lo or (hi is not None and value > hi):
        bound = f"in [{lo}, {hi}]" if hi is not None else f"at least {lo}"
        raise UserError(f"{flag} must be a whole number {bound}, got {brief(value)}")


def check_float(flag: str, value: Any, lo: float, hi: float, lo_open: bool = False, hi_open: bool = False) -> None:
    """``value`` is a finite number in the interval (NaN and infinities refused)."""
    if value is None:
        return
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if ok:
        ok = (value > lo if lo_open else value >= lo) and (value < hi if hi_open else value <= hi)
    if not ok:
        interval = f"{'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}"
        raise UserError(f"{flag} must be a finite number in {interval}, got {brief(value)}")


def check_output_outside(output: Path, inputs: Dict[str, Optional[Path]], replaces_output: bool = False) -> None:
    """Refuse an output inside an input folder (what is written there would be read back as images
    by the next run) and, when the output is replaced as a whole, an input inside the output."""
    out = Path(output).resolve()
    for flag, folder in inputs.items():
        if folder is None:
            continue
        src = Path(folder).resolve()
        if out == src or src in out.parents:
            raise UserError(f"--output {brief(str(output), 200)} is inside {flag} {brief(str(folder), 200)}: what is written there "
                            f"would be read as images next time; choose an output outside it")
        if replaces_output and out in src.parents:
            raise UserError(f"{flag} {brief(str(folder), 200)} is inside --output {brief(str(output), 200)}, which would be replaced")


def check_output_writable(output: Path) -> None:
    """Probe, before any work, that ``output`` can be created: its nearest existing ancestor must
    be a folder we can create entries in (tried for real: permission bits say nothing for root, and
    nothing at all for /proc). The probe folder is removed at once."""
    path = Path(output).absolute()
    if path.exists() and not path.is_dir():
        return  # an existing file: the overwrite rules decide
    ancestor = path if path.exists() else path.parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise UserError(f"--output {brief(str(output), 200)}: {brief(str(ancestor), 200)} is a file, not a folder")
    try:
        probe = tempfile.mkdtemp(dir=ancestor, prefix=".crossvit_edge-probe-")
    except OSError as e:
        raise UserError(f"--output {brief(str(output), 200)}: cannot write in {brief(str(ancestor), 200)} ({e.strerror or type(e).__name__})") from None
    shutil.rmtree(probe, ignore_errors=True)


def make_output_dir(output: Path) -> Path:
    """Create the output folder (and its parents); OSError becomes a one-line UserError."""
    path = Path(output)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise UserError(f"--output {brief(str(output), 200)} exists and is not a folder") from None
    except OSError as e:
        raise UserError(f"--output {brief(str(output), 200)}: cannot create it ({e.strerror or type(e).__name__})") from None
    return path

