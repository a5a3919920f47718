# Two entry points on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
TORCH_VERSION ?= 2.13.0

.PHONY: install install-test demo test bench

# torch is pinned first, to a version known to work. PyPI's Linux wheels carry CUDA packages: install the
# CPU build first where there is no NVIDIA GPU (README.md, "Installing").
install:
	$(PYTHON) -c "import torch" 2>/dev/null || $(PYTHON) -m pip install "torch==$(TORCH_VERSION)"
	$(PYTHON) -m pip install -q -e .

install-test:
	$(PYTHON) -c "import torch" 2>/dev/null || $(PYTHON) -m pip install "torch==$(TORCH_VERSION)"
	$(PYTHON) -m pip install -q -e ".[test]"

demo: install
	gcibsem sim-series --out demo

test: install-test
	QT_QPA_PLATFORM=offscreen $(PYTHON) -m pytest -q

bench: install-test
	$(PYTHON) -m pytest -q --benchmark-only --benchmark-enable
