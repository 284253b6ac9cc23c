# Two entry points for a fresh machine with Python 3.11: `make run` and `make test`.
# Both create .venv/ on first use and reuse it afterwards (the stamp file records the install).
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

# Stage commands in dvc.yaml call `python`: make it the venv's.
export PATH := $(CURDIR)/$(BIN):$(PATH)
export DVC_NO_ANALYTICS := 1

SCALE  ?=

.PHONY: setup run test test-all test-fast bench bench-gpu gpu-carry clean-venv

setup: $(STAMP)

$(STAMP): requirements.txt requirements.lock
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet $$(grep '^torch==' requirements.txt)
	$(BIN)/python -m pip install --quiet -r requirements.txt -c requirements.lock
	@touch $@

## run: with CUDA the whole pipeline (dvc repro); without, stable vs fixed at the cpu scale
## (pipeline/experiments/launch.py decides and says so first); SCALE=tiny|cpu|full runs that scale instead.
## Interrupted (status 130), make stops by SIGINT too, so that its status is 130 as well (not make's 2); it waits for that signal (make, signalled while its job still runs, ends by it)
## SIGTERM to make reaches this recipe's shell alone: the shell passes it on to the launcher and waits for it to stop
## (the launcher runs as the shell's job so that the trap runs at once; Ctrl-C reaches it from the terminal)
run: setup
	@trap '' INT; trap 'kill -TERM $$pid 2>/dev/null' TERM; \
	python -m pipeline.experiments.launch $(if $(SCALE),--scale $(SCALE)) & pid=$$!; \
	wait $$pid; status=$$?; while kill -0 $$pid 2>/dev/null; do wait $$pid; status=$$?; done; \
	if [ $$status -eq 130 ]; then kill -INT $$PPID; sleep 2; fi; exit $$status

## test: what CI runs: every test but the longest end-to-end scenarios (marker `long`), in 4 workers
## that take whole modules (the end-to-end tests mostly wait on DVC and subprocesses), then its duration
TEST_WORKERS ?= 4
test: setup
	@start=$$(date +%s); python -m pytest -q -n $(TEST_WORKERS) --dist loadfile -m "not long"; status=$$?; \
	took=$$(( $$(date +%s) - start )); echo "make test: $$(( took / 60 )) min $$(( took % 60 )) s"; exit $$status

## test-all: every test, the long end-to-end scenarios included
test-all: setup
	@start=$$(date +%s); python -m pytest -q -n $(TEST_WORKERS) --dist loadfile; status=$$?; \
	took=$$(( $$(date +%s) - start )); echo "make test-all: $$(( took / 60 )) min $$(( took % 60 )) s"; exit $$status

## test-fast: the unit tests only: no end-to-end runs of DVC, no long trainings
test-fast: setup
	python -m pytest -q -m "not e2e and not slow"

## bench: the speed and memory benchmarks (prints tables)
bench: setup
	python -m benchmarks.augment
	python -m benchmarks.train
	python -m benchmarks.evaluate

## bench-gpu: the GPU check, at most 8 min on one H100/H200 (speed, MFU, memory, compile, evaluation,
## a short stable training): gpu.json, gpu.log, epochs.tsv and learning_curve.png in $$OUT or gpu-check/
bench-gpu: setup
	dvc repro prepare
	python -m benchmarks.gpu --raw data/raw

## gpu-carry: what the GPU check takes to a bare CUDA machine (.gpu-carry/: wheels, tasks), and the command there
gpu-carry: setup
	python -m benchmarks.gpu_carry

clean-venv:
	rm -rf $(VENV)
