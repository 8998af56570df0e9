# certify: the two commands are `make demo` and `make test` (`make check`: ruff and mypy).
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# torch 2.13.0 is pinned first so that pip takes the CPU wheel instead of a CUDA build.
TORCH  ?= torch==2.13.0

.PHONY: demo test check venv clean

$(BIN)/certify: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -e ".[test]"
	touch $(BIN)/certify

venv: $(BIN)/certify

demo: venv
	$(BIN)/certify demo

# one torch/BLAS thread per process: the models are small and the 2-core CI machine also runs
# subprocesses; --durations lists the slowest tests so the suite stays well inside CI's budget
test: venv
	OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 $(BIN)/python -m pytest tests --durations=15

# lint (ruff: pyflakes and syntax errors) and type checks (mypy); settings in pyproject.toml
check: venv
	$(BIN)/ruff check verify relax smoothing tests benchmarks
	$(BIN)/mypy verify relax smoothing

clean:
	rm -rf $(VENV) build *.egg-info .mypy_cache .ruff_cache
