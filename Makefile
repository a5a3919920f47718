# Two entry points on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
TORCH_VERSION ?= 2.13.0

.PHONY: install install-test demo test bench

# torch is pinned first: an unpinned torch pulls the newest build with several GB of CUDA packages.
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
