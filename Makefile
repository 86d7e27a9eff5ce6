# synth: the two commands a fresh machine needs.
#   make demo   create .venv, install synth, run the closed loop on the built-in default
#   make test   create .venv, install synth + test tools, run the test suite
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
# torch/torchvision pinned to the builds this project is tested with (pip takes them from
# a local wheel cache where one is configured, else downloads them).
TORCH  := torch==2.14.1 torchvision==0.29.1

.PHONY: demo test test-slow test-gpu bench install clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(TORCH)
	$(BIN)/python -m pip install -q -e '.[test,bench]'
	# torch-lucent (only for `synth bench synthesis`) pins kornia<=0.4.1, which does not
	# work with current torch; install it without its pins next to current kornia.
	$(BIN)/python -m pip install -q --no-deps torch-lucent==0.1.8
	touch $@

install: $(VENV)/.installed

demo: $(VENV)/.installed
	$(BIN)/synth run configs/demo.yaml

test: $(VENV)/.installed
	$(BIN)/python -m pytest -q

test-slow: $(VENV)/.installed
	$(BIN)/python -m pytest -q -m slow

test-gpu: $(VENV)/.installed
	$(BIN)/python -m pytest -q -m gpu

bench: $(VENV)/.installed
	$(BIN)/synth bench synthesis --device cpu

clean:
	rm -rf $(VENV) .pytest_cache
