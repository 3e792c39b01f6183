# sbt_keras: `make demo` and `make test` install what they need into .venv by themselves.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# The real CIFAR-10 subset that ships beside the repository (override: make demo CIFAR10_DIR=...).
CIFAR10_DIR ?= $(abspath ../shared/data/cifar10-subset)
export TF_CPP_MIN_LOG_LEVEL ?= 2

.PHONY: install test test-all demo clean

install: $(STAMP)

$(STAMP): requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet -r requirements.txt
	touch $@

# The CI suite: everything except tests marked slow.
test: $(STAMP)
	$(PY) -m pytest -q -m "not slow"

test-all: $(STAMP)
	$(PY) -m pytest -q

demo: $(STAMP)
	$(PY) -m sbt_keras.run --flagfile=experiments/demo.flags --cifar_dir=$(CIFAR10_DIR) \
	    --output_dir=runs/demo
	@cat runs/demo/result.yaml

clean:
	rm -rf runs
