# Two commands on a fresh machine: `make run` and `make test`. Both create .venv and install by themselves.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp

export MARKETFS_HOME ?= $(CURDIR)/.marketfs
export DAGSTER_HOME ?= $(MARKETFS_HOME)/dagster_home
export PYTHONWARNINGS ?= ignore::DeprecationWarning

LOCK := requirements.lock

.PHONY: run recompute restate test ui dsn stop lint install lock clean-db bench docs image

# The locked set (tools/lockfile.py), hash-checked, then this project editable on top; one line per phase,
# pip's own output (warnings about this machine's pip configuration, the build backend's notes) in a log
# that is shown when a phase fails.
$(STAMP): pyproject.toml $(LOCK)
	@$(PYTHON) tools/lockfile.py check
	@began=$$(date +%s); \
	echo "install 1/3: virtual environment $(VENV) ($$($(PYTHON) --version))"; \
	$(PYTHON) -m venv $(VENV) && \
	$(BIN)/python -m pip install --quiet --upgrade pip >$(VENV)/install.log 2>&1 && \
	echo "install 2/3: $$(grep -c '^[A-Za-z0-9]' $(LOCK)) locked packages from $(LOCK), hash-checked (about 2 minutes on a fresh machine, seconds after)" && \
	$(BIN)/python -m pip install --quiet --require-hashes -r $(LOCK) >>$(VENV)/install.log 2>&1 && \
	echo "install 3/3: marketfs itself, editable" && \
	$(BIN)/python -m pip install --quiet --no-deps -e . >>$(VENV)/install.log 2>&1 && \
	touch $(STAMP) && echo "installed in $$(( $$(date +%s) - began )) s (pip's output: $(VENV)/install.log)" || \
	{ status=$$?; tail -40 $(VENV)/install.log; echo "install failed; the whole log is $(VENV)/install.log"; exit $$status; }

install: $(STAMP)

# Not on $(STAMP): the install refuses a lock older than pyproject.toml, which is what this target fixes.
lock:  ## re-resolve requirements.lock from pyproject.toml (keeps held versions; ARGS=--upgrade for newest)
	@test -x $(BIN)/uv || { $(PYTHON) -m venv $(VENV) && $(BIN)/python -m pip install --quiet uv; }
	$(BIN)/uv pip compile pyproject.toml --extra dev --universal --python-version 3.11 --generate-hashes \
		--custom-compile-command "make lock" --quiet -o $(LOCK) $(ARGS)
	$(PYTHON) tools/lockfile.py stamp

run: $(STAMP)  ## materialise the sample pipeline end to end on the embedded database
	$(BIN)/python -m pipelines run $(ARGS)

restate: $(STAMP)  ## recompute the instruments late corporate actions changed, from their ex-dates (run does it too)
	$(BIN)/python -m pipelines restate

recompute: $(STAMP)  ## re-materialise from a changed day on, in order: make recompute FROM=2024-01-05 [TO=2024-01-12]
	@test -n "$(FROM)" || { echo "usage: make recompute FROM=YYYY-MM-DD [TO=YYYY-MM-DD]"; exit 2; }
	$(BIN)/python -m pipelines recompute --from $(FROM) $(if $(TO),--to $(TO))

# Two pytest-xdist workers, each with its own throwaway PostgreSQL: alone the suite keeps 0.7 of a core busy (it
# mostly waits on Dagster's processes and the database), so two at once on 2 cores finish sooner.
# TEST_WORKERS=0 runs it in this one process.
TEST_WORKERS ?= 2
test: $(STAMP)  ## the test suite, on its own throwaway PostgreSQL
	$(BIN)/python -m pytest -n $(TEST_WORKERS) --dist worksteal $(ARGS)

ui: $(STAMP)  ## Dagster webserver + daemon on http://127.0.0.1:3000
	$(BIN)/python -m pipelines ui

dsn: $(STAMP)  ## print the feature store DSN (starts the embedded server if needed)
	@$(BIN)/marketfs dsn

stop: $(STAMP)  ## stop the embedded server; data stays in .marketfs/postgres
	@$(BIN)/marketfs stop

bench: $(STAMP)  ## benchmarks at the default size (a few minutes); ARGS="--days 252" for a year
	$(BIN)/python benchmarks/bench.py $(ARGS)
	$(BIN)/python benchmarks/retrieval.py

docs: $(STAMP)  ## regenerate docs/features.md and the feature suites from the declarations, the README's lineage from the definitions
	$(BIN)/python -m marketfs.catalog --write
	$(BIN)/python -m expectations.generate
	$(BIN)/python -m pipelines.lineage --write

# deploy/docker/build_image.sh: the locked wheels downloaded on this host, then `docker build` (offline inside).
# MARKETFS_IMAGE names the tag (marketfs:latest); MARKETFS_BASE_IMAGE=debootstrap builds the base from Debian
# packages where no registry image can be pulled (docs/docker.md).
image: $(STAMP)  ## the user-code image for Docker and Kubernetes deployments (Dockerfile)
	deploy/docker/build_image.sh

lint: $(STAMP)
	$(BIN)/ruff check .

clean-db: stop  ## delete the embedded database (all stored bars, vectors and run history)
	rm -rf $(MARKETFS_HOME)
