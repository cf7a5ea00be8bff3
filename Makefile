# Two commands do everything on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test install bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first, from the wheels this workplace keeps on disk (torchvision is needed by timm).
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -q -e '.[dev]'
	# system packages of the C++ example (examples/executorch_cpp): apt-get as root, else a note
	bash scripts/install_cpp_deps.sh
	# the aarch64 checks (tests/test_arm.py): cross compiler, arm64 root, qemu-user, aarch64 wheels
	# into build/aarch64/ (as root; else a note); cached, so a rerun does nothing
	PYTHON=$(PY) bash scripts/install_arm_deps.sh
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) -m crossvit_edge.demo

test: $(STAMP)
	$(PY) -m pytest

bench: $(STAMP)
	$(PY) benchmarks/bench_onnx.py
	$(PY) benchmarks/bench_executorch.py

clean:
	rm -rf $(VENV) demo_data runs
