# certify: the two commands are `make demo` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# torch 2.13.0 is pinned first so that pip takes the CPU wheel instead of a CUDA build.
TORCH  ?= torch==2.13.0

.PHONY: demo test venv clean

$(BIN)/certify: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -e ".[test]"
	touch $(BIN)/certify

venv: $(BIN)/certify

demo: venv
	$(BIN)/certify demo

test: venv
	$(BIN)/python -m pytest tests

clean:
	rm -rf $(VENV) build *.egg-info
