# voicemesh: `make run` starts the mesh and lets you talk to it; `make test` runs the tests.
# Both set everything up on a fresh machine: venv, pinned wheels, generated stubs, models.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
PIP    := $(BIN)/pip install --disable-pip-version-check -q
PROTOS := $(wildcard protos/voicemesh/v1/*.proto)
STUBS  := protos/voicemesh/v1/.stubs
# One distribution per folder (pyproject.toml explains the layout); installed editable, each
# with the extras of its embedded default provider. Exact versions: requirements/constraints.txt.
DISTS  := protos services/runtime services/vad services/stt services/llm services/tts services/transport \
          orchestrator clients/python clients/cli clients/assistant
EDITABLE := protos services/runtime services/vad[silero] services/stt[whisper,models,riva,aws,deepgram] \
          services/llm[llamacpp,models,openai,azure-openai,bedrock] services/tts[hibari,riva,polly,elevenlabs,cartesia] \
          services/transport orchestrator clients/python clients/cli clients/assistant
# The Azure Speech SDK is proprietary (Microsoft's licence terms): never in `make install`; only
# `make test` adds it, to test the azure providers against their fake (docs/licences.md).
AZURE_SPEECH := $(VENV)/.azure-speech
PYPROJECTS := pyproject.toml $(addsuffix /pyproject.toml,$(DISTS))
REQS   := $(wildcard requirements/*.txt)
PYTEST_ARGS ?=

export HF_HUB_OFFLINE := 1

.DEFAULT_GOAL := help
include deploy/containers/images.mk
include clients/clients.mk

.PHONY: install run up test lint stubs models apt browser clean help bench wheels

help:
	@echo "make run    start the whole mesh locally and chat with it (Ctrl-C stops it)"
	@echo "make test   run the test suite"
	@echo "make lint   buf lint the protos, ruff the code"
	@echo "make test-busy      the suite 5 times with one core kept busy (RUNS=N); test-busy-e2e: e2e+tracing 20 times"
	@echo "make wheels one wheel per distribution in build/wheels; make images: one container image per service"
	@echo "make bench  benchmarks (15 min on 2 cores): bench/results/latest.{json,md}, plots"
	@echo "make soak   100 sessions x 10 min with fakes: errors, RSS drift, p99 over time"
	@echo "make fuzz   fuzz every RPC (10,000 cases; FUZZ_ARGS=--seed N repeats a run)"

install: $(VENV)/.installed $(STUBS) models apt

# Editable installs in compat mode: each folder goes on sys.path as it is (a .pth line), so
# imports, IDEs and type checkers all read the same files the wheels are built from.
$(VENV)/.installed: $(REQS) $(PYPROJECTS) protos/setup.py
	$(PYTHON) -m venv $(VENV)
	$(PIP) -c requirements/constraints.txt -r requirements/dev.txt
	$(PIP) --no-deps -r requirements/nodeps.txt
	$(PIP) -c requirements/constraints.txt --no-build-isolation --config-settings editable_mode=compat \
		$(addprefix -e ,$(EDITABLE))
	touch $@

$(AZURE_SPEECH): $(VENV)/.installed
	$(PIP) -c requirements/constraints.txt azure-cognitiveservices-speech
	touch $@

# The protos' build generates the stubs (wheel or editable install); this regenerates them in
# place when a .proto changes. Never committed or edited by hand.
$(STUBS): $(PROTOS) $(VENV)/.installed
	$(BIN)/python protos/setup.py stubs
	touch $@

stubs: $(STUBS)

# Join (or copy) and sha256-check every installed service's models into VOICEMESH_MODEL_DIR
# (default ~/.local/share/voicemesh/models); a second run only checks sizes (about a second).
models: $(VENV)/.installed
	$(BIN)/voicemesh models setup

# Every distribution's wheel, the stubs built in by the protos' own build (no `make stubs` needed).
wheels: $(VENV)/.installed
	rm -rf build/wheels $(addsuffix /build,$(DISTS)) && mkdir -p build/wheels
	$(BIN)/pip wheel --disable-pip-version-check -q --no-deps --no-build-isolation -w build/wheels . $(addprefix ./,$(DISTS))
	touch build/wheels/.ready

# Debian packages the tests and the espeak provider need (chromium, firefox-esr and pulseaudio,
# headless Firefox's audio output: the browser tests).
apt:
	@command -v espeak-ng >/dev/null && command -v chromium >/dev/null && command -v firefox-esr >/dev/null \
		&& command -v pulseaudio >/dev/null || { \
		SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
		$$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq espeak-ng chromium \
		firefox-esr pulseaudio; }

# playwright-core drives Debian's chromium, puppeteer-core its firefox-esr in the browser tests
# (both pinned in the lock file).
tests/browser/node_modules/.stamp: tests/browser/package.json tests/browser/package-lock.json
	cd tests/browser && npm ci --no-audit --no-fund
	touch $@

browser: tests/browser/node_modules/.stamp

run: install
	$(BIN)/voicemesh up --chat

up: install
	$(BIN)/voicemesh up

# The container images (deploy/containers/images.mk) and the Node and Go clients
# (clients/clients.mk) are built first: their tests run the six images and both clients' suites.
test: install $(AZURE_SPEECH) browser lint clients images
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

# The suite on a slow machine: RUNS pytest runs in a row (5 of the whole suite; 20 of the e2e and
# tracing tests) while a busy loop the runs do not own keeps one core busy (tests/busy_core.py).
.PHONY: test-busy test-busy-e2e
test-busy: install browser clients images
	$(BIN)/python tests/busy_core.py --runs $(or $(RUNS),5) -- -q $(PYTEST_ARGS)

test-busy-e2e: install browser
	$(BIN)/python tests/busy_core.py --runs $(or $(RUNS),20) -- -q tests/test_e2e.py tests/test_tracing.py $(PYTEST_ARGS)

# buf lint (STANDARD) on the contract; buf breaking (FILE rules) against the previous commit,
# so the contract never changes in place (additive changes only within v1); ruff on the Python.
lint: $(VENV)/.installed
	cd protos && ../$(BIN)/buf lint
	@if git rev-parse -q --verify HEAD~1 >/dev/null; then \
		echo "buf breaking against HEAD~1"; cd protos && ../$(BIN)/buf breaking --against "../.git#ref=HEAD~1,subdir=protos"; \
	else echo "buf breaking: no previous commit in this clone (shallow?), nothing to compare against"; fi
	$(BIN)/ruff check .

# The bench's own venv: Pipecat (the in-process anchor), matplotlib, py-spy. Never in .venv.
BENCH_VENV := bench/.venv-pipecat
$(BENCH_VENV)/.installed: bench/requirements.txt
	$(PYTHON) -m venv $(BENCH_VENV)
	$(BENCH_VENV)/bin/pip install --disable-pip-version-check -q -r bench/requirements.txt
	touch $@

bench: install $(BENCH_VENV)/.installed
	$(BIN)/voicemesh bench $(BENCH_ARGS)

# Fuzz every RPC: at least 10,000 cases (the suite runs a bounded 2,000); report in
# test-artifacts/fuzz-report.json; FUZZ_ARGS=--seed N repeats a run (docs/fuzzing.md).
.PHONY: fuzz
fuzz: install
	$(BIN)/python tests/fuzz/run.py $(FUZZ_ARGS)

# The soak: 100 sessions x 10 min with fakes; RSS of every process and p99 over time in
# bench/results/soak-latest.{json,md,png}; exits 1 when a rule fails. Not part of make test.
.PHONY: soak
soak: install $(BENCH_VENV)/.installed
	$(BIN)/python -m bench.soak $(SOAK_ARGS)

clean: clients-clean
	rm -rf build $(VENV) $(BENCH_VENV) $(STUBS) protos/voicemesh/v1/*_pb2*.py* $(addsuffix /build,$(DISTS))
