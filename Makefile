# Two commands: `make demo` (train + evaluate a small model on real data) and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test install clean

$(STAMP): pyproject.toml streaming/pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# torch pinned first so nothing pulls a CUDA build
	$(BIN)/pip install --quiet "torch==2.13.0"
	$(BIN)/pip install --quiet -e ".[onnx,test,peers]" "torch==2.13.0"
	$(BIN)/pip install --quiet -e streaming/
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/tsdb demo --out runs/demo

test: $(STAMP)
	$(BIN)/python -m pytest -n 2 --dist loadfile tests

clean:
	rm -rf $(VENV) runs
