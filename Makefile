# The two commands of the README: `make demo` and `make test`.
# torch is pinned in every install command: an unpinned torch pulls GBs of CUDA wheels.
PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH := torch==2.13.0
OUT ?= demo_out

.PHONY: setup system-deps demo test lint clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -U pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q "$(TORCH)" -e ".[napari,test,spatialdata]"
	touch $@

setup: $(VENV)/.installed

system-deps:
	bash scripts/install-system-deps.sh

# Opens napari with the sample when there is a display; otherwise renders the same
# scene under Xvfb and writes screenshots and a summary into $(OUT)/.
demo: system-deps setup
	@if [ -n "$$DISPLAY" ]; then \
		$(PY) -m napari_hinge.demo --out $(OUT); \
	else \
		xvfb-run -a -s "-screen 0 1920x1080x24" $(PY) -m napari_hinge.demo --headless --out $(OUT); \
	fi

test: setup
	$(PY) -m pytest

lint: setup
	$(VENV)/bin/ruff check src tests benchmarks scripts

clean:
	rm -rf $(VENV) $(OUT) .pytest_cache .ruff_cache
