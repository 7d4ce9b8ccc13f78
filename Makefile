# Everything a fresh Debian machine needs is installed from here: system packages with apt-get
# (non-interactively), Python packages into .venv. `make test` is what CI runs.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
SYSTEM_PKGS := tshark tcpdump tcpflow iproute2 nftables curl zstd lz4 nghttp2-client nghttp2-server
# Commands the packages above provide; apt-get runs only when one is missing.
SYSTEM_CMDS := tshark editcap tcpdump tcpflow ip nft curl zstd lz4 h2load nghttpd

.PHONY: all system-deps venv bytecode lint unit test demo bench soak fuzz clean

all: test

system-deps:
	@missing=""; for c in $(SYSTEM_CMDS); do command -v $$c >/dev/null || missing="$$missing $$c"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing system packages (missing:$$missing)"; \
	  echo "wireshark-common wireshark-common/install-setuid boolean false" | $(SUDO) debconf-set-selections; \
	  $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get update -qq && \
	  $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $(SYSTEM_PKGS) >/dev/null; \
	fi

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

venv: $(VENV)/.installed

# The package's bytecode, as an installed plugin has it (pip compiles a wheel; the krew binary carries it). Where
# PYTHONDONTWRITEBYTECODE is set (some CI images) every CLI run the tests and the bench start would compile the
# package again: measured on the bundled sample, a replay's CPU 0.48 s -> 0.42 s with it compiled.
bytecode: venv
	$(PY) -m compileall -q pkg

lint: venv
	$(VENV)/bin/ruff check pkg tests kubectl-mirror kubectl_complete-mirror
	$(VENV)/bin/mypy

unit: venv
	$(PY) -m pytest -q tests

# pytest exits 5 when it collected no test: that is a failure here, like any non-zero exit; its exit code is
# make's, whatever the coverage report does. The figure (pytest-cov) counts the package's lines the test process
# itself runs; the CLI the end-to-end tests start as a subprocess is not measured, so it is a floor. Measured on
# 2 cores shared with other work: tests/test_reassemble*.py + test_e2e_replay.py 44 s -> 54 s (+23%); alone,
# test_e2e_replay.py 45 s -> 42 s (noise). Coverage's `patch = subprocess` would count the CLI runs too (that file:
# 26% -> 42% of the package, 47 s) but is not yet tried across the whole suite (stderr, signals).
test: system-deps venv bytecode lint
	@rc=0; $(PY) -m pytest -q tests --cov=kubectl_mirror --cov-report= || rc=$$?; \
	total=$$($(PY) -m coverage report --format=total 2>/dev/null) && \
	  echo "coverage: $$total% of kubectl_mirror's lines, run in the test process (CLI subprocesses not counted)"; \
	exit $$rc

demo: system-deps venv
	$(PY) -m kubectl_mirror.demo

bench: system-deps venv bytecode
	$(PY) tests/bench/run.py

# 100,000 connections / 1 GB through the live path (test API server exec feeding a generated capture); needs root.
# Not part of `make test`. `$(PY) tests/soak/run.py --quick` is the few-seconds version.
soak: system-deps venv bytecode
	$(PY) tests/soak/run.py

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache .mypy_cache .ruff_cache .coverage .coverage.*

# Release packaging (krew/README.md). `dist`: the one-file binary for this machine, packed for krew into
# dist/kubectl-mirror_<version>_<os>_<arch>.tar.gz; a no-op when nothing that goes into it changed.
# `krew-manifest`: plugin.yaml from krew/mirror.yaml with each archive's sha256. The release job, which collects
# the other platforms' archives or .sha256 files into dist/ and must not rebuild this one, runs
# `make krew-manifest KREW_DIST_DEP= KREW_STRICT=1`.
KREW_BASE_URL ?=
KREW_SHA256 ?=
KREW_STRICT ?=
KREW_DIST_DEP ?= dist

.PHONY: dist krew-manifest

dist: venv
	$(PY) krew/build.py dist

krew-manifest: $(KREW_DIST_DEP)
	$(PY) krew/build.py manifest --out plugin.yaml $(if $(KREW_BASE_URL),--base-url $(KREW_BASE_URL)) \
	  $(foreach s,$(KREW_SHA256),--sha256 $(s)) $(if $(KREW_STRICT),--strict)

# Coverage-guided fuzzing (atheris), not part of `make test`: each harness in tests/fuzz/ runs FUZZ_SECONDS from
# seeds (samples/web.pcap, synthetic captures, frames, scripts) plus the corpus earlier runs grew in FUZZ_DIR.
# A crash stops that harness with a non-zero exit and its input in FUZZ_DIR/crashes/; the target then fails.
FUZZ_SECONDS ?= 60
FUZZ_HARNESSES ?= pcap sequencer tcp_payload
FUZZ_DIR ?= build/fuzz
FUZZ_FLAGS ?= -max_len=8192 -timeout=10 -rss_limit_mb=1024

fuzz: venv
	$(PY) -m pip install -q -e '.[fuzz]'
	$(PY) -m tests.fuzz.seeds $(FUZZ_DIR)
	@failed=""; for h in $(FUZZ_HARNESSES); do \
	  mkdir -p $(FUZZ_DIR)/corpus/$$h $(FUZZ_DIR)/crashes; \
	  echo "fuzz: $$h for $(FUZZ_SECONDS) s"; \
	  $(PY) -m tests.fuzz.fuzz_$$h $(FUZZ_DIR)/corpus/$$h $(FUZZ_DIR)/seeds/$$h -max_total_time=$(FUZZ_SECONDS) \
	    -artifact_prefix=$(FUZZ_DIR)/crashes/$$h- $(FUZZ_FLAGS) 2>$(FUZZ_DIR)/$$h.log \
	    || { failed="$$failed $$h"; tail -n 30 $(FUZZ_DIR)/$$h.log; }; \
	  grep -E '^#[0-9]+ +DONE' $(FUZZ_DIR)/$$h.log || true; \
	done; \
	if [ -n "$$failed" ]; then echo "fuzz: crashes in:$$failed (inputs in $(FUZZ_DIR)/crashes/)"; exit 1; fi
