# hwloop developer entry points. `make test` alone works on a fresh machine: it creates the
# virtual environment first.

PYTHON     ?= python3
VENV       ?= .venv
# torch first, on its own: the default pins the CPU build that lies on this machine's disk
# (pip's find-links); override e.g. `make TORCH_SPEC=torch install` for the newest release.
TORCH_SPEC ?= torch==2.13.0
PYTEST_ARGS ?=

VPY    := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: install demo test test-all bench clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(VPY) || $(PYTHON) -m venv $(VENV)
	$(VPY) -m pip install "$(TORCH_SPEC)"
	$(VPY) -m pip install -e ".[test]"
	touch $@

# Fine-tunes a pre-trained FC2 (Fashion-MNIST) on the harsh emulated chip, which loses about
# 8 points against the ideal SNN (the analog default loses 0.4, inside the evaluation noise):
# 300 steps of hardware-in-the-loop fine-tuning, the device evaluated 3 times before and after
# (mean +- SD over fresh jitter), plots and report in DEMO_OUT. Quiet when piped (one line per
# epoch); `hwloop report $(DEMO_OUT)` prints the summary again.
DEMO_OUT ?= runs/demo-$(shell date -u +%Y%m%d-%H%M%S)
demo: $(STAMP)
	$(VENV)/bin/hwloop finetune --device emulator-harsh --epochs 1 --max-steps-per-epoch 300 \
		--eval-repeats 3 --out $(DEMO_OUT)

test: $(STAMP)
	$(VPY) -m pytest -q $(PYTEST_ARGS)

# Everything, slow tests included (overrides the `-m "not slow"` of pyproject.toml).
test-all: $(STAMP)
	$(VPY) -m pytest -q -o addopts="" $(PYTEST_ARGS)

# Runs every bench/*.py; each prints one JSON document on stdout.
bench: $(STAMP)
	@set -e; found=0; for f in bench/*.py; do \
		[ -e "$$f" ] || continue; found=1; \
		echo "== $$f" >&2; \
		$(VPY) "$$f"; \
	done; \
	[ $$found = 1 ] || echo "no benchmarks in bench/" >&2

clean:
	rm -rf build dist *.egg-info hwloop.egg-info .pytest_cache runs
	find . -path ./$(VENV) -prune -o -name __pycache__ -type d -prune -exec rm -rf {} +
