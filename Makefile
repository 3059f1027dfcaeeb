# The two commands of a fresh machine: `make run` and `make test` (see README.md).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: install run test lint typecheck bench clean

NATIVE := $(VENV)/.native

# setup.py builds the optional C accelerators (parser, UDP sends) and compiles the modules in
# sipcore.COMPILED with mypyc: reinstall when the build changes, recompile when a module does
# (until then the edited module runs as Python; see sipcore/__init__.py).
$(STAMP): pyproject.toml setup.py sipcore/_fastparse.c sipcore/_udpsend.c
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $(STAMP) $(NATIVE)

$(NATIVE): $(STAMP) $(wildcard sipcore/*.py)
	$(BIN)/python setup.py -q build_ext --inplace
	touch $(NATIVE)

install: $(STAMP) $(NATIVE)

run: install
	$(BIN)/sipbill serve --config config/demo.toml

# The suite runs the compiled core where it is built; the sans-IO core's own tests run once
# more as pure Python (what a machine without a compiler runs). The tests of the native
# code itself, and the end-to-end ones, are left out of that second pass.
PURE_SKIP := --ignore-glob='tests/sipcore/test_e2e_*' --ignore=tests/sipcore/test_fastparse.py \
	--ignore=tests/sipcore/test_udpsend.py --ignore=tests/sipcore/test_native.py

test: install
	$(BIN)/ruff check .
	$(BIN)/mypy
	$(BIN)/pytest -q
	SIPBILL_PURE_PYTHON=1 $(BIN)/pytest -q $(PURE_SKIP) tests/sipcore

lint: $(STAMP)
	$(BIN)/ruff check .

typecheck: $(STAMP)
	$(BIN)/mypy

bench: $(STAMP)
	$(BIN)/python bench/parse.py

clean:
	rm -rf $(VENV) var .pytest_cache .mypy_cache .ruff_cache
