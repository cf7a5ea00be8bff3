"""``python tests/micro_cli.py MODULE ARGS...``: run a crossvit_edge CLI module as ``__main__`` with
the tests' micro configs added to the model table, so CLI tests can use the micro model. Everything
after the registration is the real CLI (argument parsing, errors, exit codes)."""
import runpy
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from crossvit_edge.crossvit import CROSSVIT_CONFIGS  # noqa: E402
from tests.conftest import micro_configs  # noqa: E402

if __name__ == "__main__":
    CROSSVIT_CONFIGS.update(micro_configs())
    module = sys.argv[1]
    sys.argv = [module, *sys.argv[2:]]
    runpy.run_module(module, run_name="__main__", alter_sys=True)
