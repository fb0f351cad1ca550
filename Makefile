# credless — the README's two commands are `make demo` and `make test`; both set up first.
SHELL := /bin/bash
VENV  ?= .venv
PY    := $(VENV)/bin/python
PYTHON ?= python3
BCC_SRC := /usr/lib/python3/dist-packages/bcc

# Python may keep its compiled bytecode (__pycache__/, ignored by git) whatever the caller's
# environment says: with PYTHONDONTWRITEBYTECODE set, every agent, MCP server and client the
# suite starts compiled all of agent/ and tests/ again, about 0.3 s of CPU each.
unexport PYTHONDONTWRITEBYTECODE

.PHONY: setup host venv peers image test test-container lint types unit mutate demo bench bench-attest bench-identity bench-inject bench-restart bench-start bench-workload-api proto install clean

setup: host venv peers

host:
	@bash deploy/setup-host.sh

# The venv is rebuilt only when pyproject.toml changes (the stamp is older than it).
venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@$(PY) -m pip install -q --upgrade pip
	@$(PY) -m pip install -q -e '.[test]'
	@# BCC is not on PyPI: link Debian's pure-Python bindings (they load libbcc.so via ctypes)
	@# into the venv, rather than exposing all of dist-packages with a .pth file.
	@ln -sfn $(BCC_SRC) "$$($(PY) -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/bcc"
	@$(PY) -c 'import bcc, agent' 
	@touch $@

# npm peers for the tests (oidc-provider, the MCP TypeScript SDK), from the lock file; only
# when the lock file is newer than what is installed.
peers: tests/oidc/node_modules/.installed

tests/oidc/node_modules/.installed: tests/oidc/package-lock.json
	@npm ci --prefix tests/oidc --no-audit --no-fund --loglevel=error
	@touch $@

# 4 workers on 2 cores: the kernel tests wait on their peers as much as they compute. The
# integration files took 407 s on 3 workers and 324 s on 4 (2026-12-03, this machine, same
# half hour; it runs up to 1.6 times slower at other hours, so compare runs of one session).
# Files go to the workers in the order tests/conftest.py sorts them (files_in_dispatch_order).
test: setup lint types image
	$(PY) -m pytest -n 4 --dist loadfile --no-loadscope-reorder tests/unit tests/integration

# The DaemonSet's image (deploy/k8s/Containerfile) with podman: a debootstrapped base and a
# wheelhouse from the host's pip, both cached, so only the first build downloads (about 2
# min); tests/integration/test_container.py runs the agent from it (docs/container.md).
image: host
	@bash deploy/k8s/build-image.sh

# Only the container test (`make test` runs it with the rest)
test-container: setup image
	$(PY) -m pytest tests/integration/test_container.py

# ruff (rules and their reasons in pyproject.toml) over the code and the tests, then format
lint: venv
	$(VENV)/bin/ruff check agent tests
	$(VENV)/bin/ruff format --check agent tests

# mypy: strict for the sans-IO and data-model modules, the default elsewhere (pyproject.toml)
types: venv
	$(VENV)/bin/mypy

# Mutation testing of the security-critical modules against the unit suite (settings:
# setup.cfg [mutmut]; report and triage: docs/mutation.md). Re-runs test only what changed.
mutate: venv
	$(PY) -m tests.mutate.run

# The inner loop: the sans-IO and unit tests only (no root, no kernel, no peers; seconds). The
# few tests under tests/unit that need the kernel (marked `kernel`) run in `make test`.
unit: venv
	$(PY) -m pytest tests/unit -q -m "not kernel"

demo: setup
	$(PY) -m tests.demo

bench: setup bench-attest bench-identity bench-inject bench-restart bench-start bench-workload-api

bench-attest: setup
	$(PY) -m tests.bench.bench_attest

bench-identity: setup
	$(PY) -m tests.bench.bench_identity

bench-inject: setup
	$(PY) -m tests.bench.bench_inject

# requests/s and failed requests through a handover (credless restart), next to no restart
bench-restart: setup
	$(PY) -m tests.bench.bench_restart

# CPU of each kernel program's compile and of the BTF offsets, and an agent's time to ready,
# each next to its floor (BCC's own compile; the interpreter importing the agent)
bench-start: setup
	$(PY) -m tests.bench.bench_start

bench-workload-api: setup
	$(PY) -m tests.bench.bench_workload_api

clean:
	rm -rf $(VENV) .pytest_cache

# Regenerate agent/identity/proto/*_pb2*.py from the .proto files (generated code is
# committed, so neither setup nor CI needs protoc). grpcio-tools lives in its own venv so it
# cannot change the protobuf runtime the project runs with.
PROTO_VENV := .venv-proto
proto:
	@test -x $(PROTO_VENV)/bin/python || $(PYTHON) -m venv $(PROTO_VENV)
	@$(PROTO_VENV)/bin/pip install -q 'grpcio-tools==1.85.1'
	$(PROTO_VENV)/bin/python -m grpc_tools.protoc -I . --python_out=. --grpc_python_out=. --pyi_out=. agent/identity/proto/*.proto

# Install on this host for systemd: the CLI (a venv under /opt/credless), the unit, and the
# example configuration (never overwriting an existing config).
install: setup
	@test -x /opt/credless/bin/python || $(PYTHON) -m venv /opt/credless
	@/opt/credless/bin/pip install -q .
	@ln -sfn $(BCC_SRC) "$$(/opt/credless/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/bcc"
	@ln -sfn /opt/credless/bin/credless /usr/local/bin/credless
	@install -D -m 0644 deploy/systemd/credless.service /etc/systemd/system/credless.service
	@install -d -m 0755 /etc/credless
	@for f in credless entries policy; do install -m 0644 deploy/$$f.example.toml /etc/credless/$$f.example.toml; done
	@echo "installed; copy /etc/credless/credless.example.toml to credless.toml, then: systemctl enable --now credless"

# A long run of the data path's property-based differential test
# (tests/integration/test_differential.py): fresh randomness and shrinking instead of the
# bounded, derandomized set `make test` runs. CREDLESS_FUZZ_EXAMPLES=N sets the length.
.PHONY: fuzz
fuzz: setup
	CREDLESS_FUZZ_EXAMPLES=$${CREDLESS_FUZZ_EXAMPLES:-2000} $(PY) -m pytest tests/integration/test_differential.py -p no:cacheprovider --timeout=0 -q
