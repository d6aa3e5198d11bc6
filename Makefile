# The two set-up commands: `make demo` and `make test`. Both create .venv if missing.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
TINY := out/tiny-bagel
# The trained tiny checkpoint (examples/tiny_shapes): the demo draws what it is asked.
TRAINED := examples/tiny_shapes/checkpoint
# A CPU torch from local disk on the dev/CI machines; GPU users: see README.
TORCH_SPEC ?= torch==2.13.0

.PHONY: demo test test-all lint fmt venv clean mutation compose-test certs

venv: $(STAMP)

# constraints.txt pins every dependency but torch (TORCH_SPEC's) to the versions tested.
$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -c constraints.txt "$(TORCH_SPEC)"
	$(BIN)/pip install -q -c constraints.txt -e ".[dev]"
	touch $(STAMP)

$(TINY)/ema.safetensors: | $(STAMP)
	$(BIN)/python -m bagel.testing.tiny $(TINY)

demo: $(STAMP)
	PY=$(BIN)/python MODEL=$(TRAINED) SIZE=128 PROMPT="a red circle on a white background" \
		scripts/demo.sh

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

fmt: $(STAMP)
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

# `make test`: the quick set, every test but the `slow` ones; `make test-all`: every test, as CI
# runs it. Both spread the test files over PYTEST_WORKERS processes (pytest-xdist; `auto`: one per
# core): most tests wait on services, sockets and ranks rather than compute, and a file stays on one
# worker, so its module-scoped services start once.
PYTEST_WORKERS ?= auto
PYTEST_PARALLEL = -n $(PYTEST_WORKERS) --dist loadfile

test: lint
	$(BIN)/python -m pytest -q -x $(PYTEST_PARALLEL) -m "not slow"

test-all: lint
	$(BIN)/python -m pytest -q -x $(PYTEST_PARALLEL)

# Mutation run over the sampler, serving/, transport/, client/, step_cache/, the parallel package
# and the prefill routing ([tool.mutmut] in pyproject.toml); a fresh run each time, so the
# printed counts are the current score. MUTANTS='step_cache.*' runs one package's mutants only
# (a mutmut name glob; docs/testing.md lists one per package).
MUTATION_JOBS ?= 2
MUTANTS ?=
mutation: $(STAMP)
	test -x $(BIN)/mutmut || $(BIN)/pip install -q -c constraints.txt -e ".[mutation]"
	rm -rf mutants
	$(BIN)/mutmut run --max-children $(MUTATION_JOBS) $(MUTANTS)
	$(BIN)/mutmut results | { grep -v ": not checked$$" || true; }
	$(BIN)/mutmut export-cicd-stats
	cat mutants/mutmut-cicd-stats.json

# Both containers of docker-compose.yml built and started on a real Docker engine, one image drawn
# through them and checked against the in-process reference (docs/deploy.md). CI runs it after
# `make test`; it installs docker.io, debootstrap and Compose and starts dockerd where missing.
compose-test: $(STAMP)
	scripts/compose_test.sh

# A private CA with the certificates, keys and tokens docker-compose.secure.yml mounts, under
# out/certs (scripts/make_certs.py); run it again to rotate them. As root, CERTS_OWNER=10001:10001
# hands them to the containers' user.
CERTS_OWNER ?=
certs: $(STAMP)
	$(BIN)/python scripts/make_certs.py --out out/certs $(if $(CERTS_OWNER),--owner $(CERTS_OWNER))

clean:
	rm -rf out
