"""What both CLIs share: logging set-up and turning UserError into one line and exit code 2."""
from __future__ import annotations

import logging
import sys
from typing import Callable

from .errors import UserError


def setup_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s" if verbose else "%(message)s",
        stream=sys.stderr,
    )
    try:
        # torch configures its own loggers when it is imported, overriding levels set before;
        # import it first so the levels below stick (both CLIs need torch anyway).
        import torch  # noqa: F401
    except ImportError:
        pass
    for noisy in ("torch", "onnxscript", "onnx_ir", "coremltools", "executorch", "torchao", "matplotlib", "PIL"):
        logging.getLogger(noisy).setLevel(logging.ERROR if not verbose else logging.INFO)


def run_cli(prog: str, body: Callable[[], int]) -> int:
    """Run ``body``; a UserError (bad input) becomes ``prog: error: message`` and exit 2."""
    try:
        return body()
    except UserError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
