# Two entry points for a fresh machine with Python 3.11: `make run` and `make test`.
# Both create .venv/ on first use and reuse it afterwards (the stamp file records the install).
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

# Stage commands in dvc.yaml call `python`: make it the venv's.
export PATH := $(CURDIR)/$(BIN):$(PATH)
export DVC_NO_ANALYTICS := 1

.PHONY: setup run test bench clean-venv

setup: $(STAMP)

$(STAMP): requirements.txt requirements.lock
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet $$(grep '^torch==' requirements.txt)
	$(BIN)/python -m pip install --quiet -r requirements.txt -c requirements.lock
	@touch $@

## run: dvc repro of the whole pipeline
run: setup
	dvc repro

## test: the test suite (what CI runs)
test: setup
	python -m pytest -q

## bench: the speed and memory benchmarks (prints tables)
bench: setup
	python -m benchmarks.augment
	python -m benchmarks.train
	python -m benchmarks.evaluate

clean-venv:
	rm -rf $(VENV)
