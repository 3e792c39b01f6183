# sbt_keras: `make demo` and `make test` install what they need into .venv by themselves.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# The real CIFAR-10 subset that ships beside the repository (override: make demo CIFAR10_DIR=...).
CIFAR10_DIR ?= $(abspath ../shared/data/cifar10-subset)
export TF_CPP_MIN_LOG_LEVEL ?= 2

.PHONY: install test test-all demo figure bench clean

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

# A small real-data sweep (experiments/demo.flags), its figure and its table. Re-running
# resumes: finished trials are not trained again.
demo: $(STAMP)
	$(PY) -m sbt_keras.run --flagfile=experiments/demo.flags --cifar_dir=$(CIFAR10_DIR) \
	    --output_dir=runs/demo
	$(PY) -m tools.figures --kind=lr --results=runs/demo \
	    --title="Demo: ResNet-8 without BN, CIFAR-10 subset, 4 epochs"
	$(PY) -m tools.table --results=runs/demo

# Reproduce a paper figure end to end: make figure FIG=8 [DATA_FLAGS=--cifar_dir=DIR]
# (the paper's full grid: days of accelerator time for the 143-trial figures).
FIG ?= 8
FIG2 := $(shell printf %02d $(FIG))
DATA_FLAGS ?=
FIG_KIND := $(if $(filter 04,$(FIG2)),curves,$(if $(filter 13 14,$(FIG2)),bn,lr))
figure: $(STAMP)
	@test -f experiments/figures/fig$(FIG2).flags || \
	    { echo "no experiments/figures/fig$(FIG2).flags; see the README's table"; exit 2; }
	$(PY) -m sbt_keras.run --flagfile=experiments/figures/fig$(FIG2).flags $(DATA_FLAGS) \
	    --output_dir=runs/fig$(FIG2)
	$(if $(filter curves,$(FIG_KIND)), \
	    $(PY) -m tools.figures --kind=curves --runs=$$(ls -d runs/fig$(FIG2)/trials/* | paste -sd,) \
	        --out=runs/fig$(FIG2)/fig_curves, \
	    $(PY) -m tools.figures --kind=$(FIG_KIND) --results=runs/fig$(FIG2) --title="Fig. $(FIG)")
	$(PY) -m tools.table --results=runs/fig$(FIG2)

# Throughput against stock Keras fit, PyTorch (installed here as an optional extra) and the
# arithmetic limit: make bench [BENCH_FLAGS="--models=resnet8,resnet20 --norms=none,batch"]
BENCH_STAMP := $(VENV)/.installed-bench
BENCH_FLAGS ?=
$(BENCH_STAMP): requirements-bench.txt $(STAMP)
	$(VENV)/bin/pip install --quiet -r requirements-bench.txt
	touch $@

bench: $(BENCH_STAMP)
	$(PY) -m tools.bench --out=runs/bench $(BENCH_FLAGS)

clean:
	rm -rf runs
