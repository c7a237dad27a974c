# Two entry points on a fresh machine: `make demo` and `make test`. Each creates .venv itself.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
DATA_DIR ?= bonewatch-data
export BONEWATCH_DATA_DIR := $(DATA_DIR)

.PHONY: demo test lint clean demo-bundle

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

# .installed serves (no TensorFlow); .installed-train adds the [train] extra (TensorFlow, Keras,
# tf2onnx); the tests need both.
$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e .
	touch $@

$(VENV)/.installed-train: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e '.[train]'
	touch $@ $(VENV)/.installed

$(VENV)/.installed-test: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e '.[train,test]'
	touch $@ $(VENV)/.installed $(VENV)/.installed-train

demo: $(VENV)/.installed
	$(BIN)/bonewatch synth $(DATA_DIR)/inbox --studies 20 --format both --seed 2026
	$(BIN)/bonewatch process $(DATA_DIR)/inbox/train
	$(BIN)/bonewatch results
	$(BIN)/bonewatch results --level study

test: $(VENV)/.installed-test
	$(BIN)/python -m pytest -q --durations=30

# mypy cannot follow setuptools' package-dir mapping, so it checks the installed layout through
# a tree of links (build/typecheck/bonewatch/{ingest,models,...} -> the top-level folders).
PACKAGES := ingest models db worker bench deliver web
lint: $(VENV)/.installed-test
	$(BIN)/python -m ruff check bonewatch $(PACKAGES) tests
	$(BIN)/python -m ruff format --check bonewatch $(PACKAGES) tests
	rm -rf build/typecheck && mkdir -p build/typecheck/bonewatch
	cp bonewatch/*.py build/typecheck/bonewatch/
	for p in $(PACKAGES); do ln -s ../../../$$p build/typecheck/bonewatch/$$p; done
	cd build/typecheck && ../../$(BIN)/python -m mypy --config-file ../../pyproject.toml -p bonewatch

clean:
	rm -rf $(VENV) $(DATA_DIR) .pytest_cache

# Rebuild the shipped demo bundle from phantoms (seed 1; the tests evaluate on unseen seeds):
# train, then the ONNX models (with the fracture models' class activation outputs, the serving
# install's heatmaps), then the int8 models.
DEMO_BUNDLE := models/bundles/demo-phantom
demo-bundle: $(VENV)/.installed-train
	rm -rf build/demo-phantoms
	$(BIN)/bonewatch synth build/demo-phantoms --studies 1600 --format both --seed 1
	$(BIN)/bonewatch train build/demo-phantoms --out $(DEMO_BUNDLE) --name demo-phantom \
	  --version 1.0.0 --seed 1 \
	  --intended-use "Demonstration only: trained on synthetic phantoms from 'bonewatch synth'. Not for clinical use: it has never seen a real radiograph."
	$(BIN)/bonewatch bundle export-onnx $(DEMO_BUNDLE)
	$(BIN)/bonewatch bundle quantize $(DEMO_BUNDLE)
