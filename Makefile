# sbt_keras: `make demo` and `make test` install what they need into .venv by themselves.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# The real CIFAR-10 subset that ships beside the repository (override: make demo CIFAR10_DIR=...).
CIFAR10_DIR ?= $(abspath ../shared/data/cifar10-subset)
export TF_CPP_MIN_LOG_LEVEL ?= 2

.PHONY: install test test-all demo demo-norms demo-noise demo-sharpness warm-start-study \
	norm-study figure bench figure-cost profile clean

install: $(STAMP)

$(STAMP): requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet -r requirements.txt
	touch $@

# The CI suite: everything except tests marked slow.
# Two pytest-xdist workers (a test keeps about one core busy); a file's tests stay together.
TEST_WORKERS ?= 2
test: $(STAMP)
	$(PY) -m pytest -q -m "not slow" -n $(TEST_WORKERS) --dist loadfile

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

# The normalization study (experiments/demo_norms.flags on the real subset, or the full
# ResNet-32 study experiments/figures/norms.flags): sweep, three figures, table.
NORM_FIGURES = norms alpha norm_lr
define norm_figures
	$(foreach kind,$(NORM_FIGURES),$(PY) -m tools.figures --kind=$(kind) --results=$(1)$(newline))
	$(PY) -m tools.table --results=$(1) --best_by=norm
	$(PY) -m tools.table --results=$(1)
endef

demo-norms: $(STAMP)
	$(PY) -m sbt_keras.run --flagfile=experiments/demo_norms.flags --cifar_dir=$(CIFAR10_DIR) \
	    --output_dir=runs/demo_norms
	$(call norm_figures,runs/demo_norms)

# The paper's Section 2 measured (experiments/demo_noise.flags): a sweep recording the
# gradient noise scale, its figure and table, then update variance and staleness of one trial.
demo-noise: $(STAMP)
	$(PY) -m sbt_keras.run --flagfile=experiments/demo_noise.flags --cifar_dir=$(CIFAR10_DIR) \
	    --output_dir=runs/demo_noise
	$(PY) -m tools.figures --kind=gns --results=runs/demo_noise
	$(PY) -m tools.table --results=runs/demo_noise
	$(PY) -m tools.noise --run=runs/demo_noise/trials/m64_lr-6 --epochs=0,2 --sample=512 \
	    --batch_sizes=2:256 --draws=400 --staleness_n=1,2,4 --staleness_m=16 \
	    --staleness_lrs=2^-8,2^-6 --out=runs/demo_noise/noise

# Keskar et al. 2017 on the real subset (experiments/demo_sharpness.flags): m = 16 vs 1024,
# sharpness every epoch, the generalization gap table, the sharpness-vs-loss figure and the
# 1-D interpolation between the two trials (docs/sharp_minima.md).
demo-sharpness: $(STAMP)
	$(PY) -m sbt_keras.run --flagfile=experiments/demo_sharpness.flags --cifar_dir=$(CIFAR10_DIR) \
	    --output_dir=runs/demo_sharpness
	$(PY) -m tools.gap_table --results=runs/demo_sharpness
	$(PY) -m tools.table --results=runs/demo_sharpness
	$(PY) -m tools.figures --kind=sharpness --results=runs/demo_sharpness \
	    --title="Demo: ResNet-8 + BN, CIFAR-10 subset, 5 epochs"
	$(PY) -m tools.interpolate --a=runs/demo_sharpness/trials/m16_lr-10 \
	    --b=runs/demo_sharpness/trials/m1024_lr-10 --alphas=-1:2:0.25 --sample=512 \
	    --out=runs/demo_sharpness/interp

# Keskar et al.'s warm starts (Sec. 4), as a sequence (a sweep's grid cannot vary
# --init_from): the small-batch run keeping every 10th epoch (experiments/warm_start_sb.flags),
# one large-batch run per kept epoch E started from it (experiments/warm_start_lb.flags,
# --init_from=runs/warm_start/sb:E, into runs/warm_start/lb_from_E), then the figure of test
# accuracy and sharpness vs E (the epoch is read from each run's config.yaml init_from).
# Each run resumes when re-run. WARM_EPOCHS must be multiples of the kept interval (10).
WARM_SB_LR ?= -10
WARM_LB_LR ?= -10
WARM_EPOCHS ?= 0 10 20 30 40 50
WARM_DIR ?= runs/warm_start
warm-start-study: $(STAMP)
	$(PY) -m sbt_keras.run --flagfile=experiments/warm_start_sb.flags $(DATA_FLAGS) \
	    --log2_base_lr=$(WARM_SB_LR) --output_dir=$(WARM_DIR)/sb
	$(foreach e,$(WARM_EPOCHS),$(PY) -m sbt_keras.run --flagfile=experiments/warm_start_lb.flags \
	    $(DATA_FLAGS) --log2_base_lr=$(WARM_LB_LR) --init_from=$(WARM_DIR)/sb:$(e) \
	    --output_dir=$(WARM_DIR)/lb_from_$(e)$(newline))
	$(PY) -m tools.figures --kind=warm_start \
	    --runs=$(subst $(space),$(comma),$(foreach e,$(WARM_EPOCHS),$(WARM_DIR)/lb_from_$(e))) \
	    --out=$(WARM_DIR)/fig_warm_start

norm-study: $(STAMP)
	$(PY) -m sbt_keras.run --flagfile=experiments/figures/norms.flags $(DATA_FLAGS) \
	    --output_dir=runs/norms
	$(call norm_figures,runs/norms)

# Reproduce a paper figure end to end: make figure FIG=8 [DATA_FLAGS=--cifar_dir=DIR]
# (the paper's full grid: days of accelerator time for the 143-trial figures). A figure may be
# several sweeps (experiments/figures/<part>.flags -> runs/<part>): Fig. 13 has a CIFAR-10 and
# a CIFAR-100 panel, drawn apart; Fig. 14 is one panel from three sweeps, drawn together.
# Fig. 13 and 14 take each m's eta_tilde from Fig. 8/9 and 12, so those sweeps run (or resume,
# or, when finished, just return their results) first.
FIG ?= 8
FIG2 := $(shell printf %02d $(FIG))
DATA_FLAGS ?=
FIG_KIND := $(if $(filter 04,$(FIG2)),curves,$(if $(filter 13 14,$(FIG2)),bn,lr))
FIG_PARTS_13 := fig13 fig13_cifar100
FIG_PARTS_14 := fig14 fig14_large fig14_2048
FIG_PARTS := $(or $(FIG_PARTS_$(FIG2)),fig$(FIG2))
FIG_NEEDS_13 := fig08 fig09
FIG_NEEDS_14 := fig12
# Each panel: the comma-joined result directories drawn (and tabled) as one.
comma := ,
empty :=
space := $(empty) $(empty)
FIG_PANELS_13 := runs/fig13 runs/fig13_cifar100
FIG_PANELS := $(or $(FIG_PANELS_$(FIG2)),$(subst $(space),$(comma),$(FIG_PARTS:%=runs/%)))
FIG_TITLE_runs/fig13 := Fig. 13, CIFAR-10
FIG_TITLE_runs/fig13_cifar100 := Fig. 13, CIFAR-100
define newline


endef
figure: $(STAMP)
	@$(foreach part,$(FIG_NEEDS_$(FIG2)) $(FIG_PARTS),test -f experiments/figures/$(part).flags || \
	    { echo "no experiments/figures/$(part).flags; see the README's table"; exit 2; };)
	$(foreach part,$(FIG_NEEDS_$(FIG2)) $(FIG_PARTS),$(PY) -m sbt_keras.run \
	    --flagfile=experiments/figures/$(part).flags $(DATA_FLAGS) --output_dir=runs/$(part)$(newline))
	$(foreach panel,$(FIG_PANELS),$(if $(filter curves,$(FIG_KIND)), \
	    $(PY) -m tools.figures --kind=curves --runs=$$(ls -d $(panel)/trials/* | paste -sd,) \
	        --out=$(panel)/fig_curves, \
	    $(PY) -m tools.figures --kind=$(FIG_KIND) --results=$(panel) \
	        --title="$(or $(FIG_TITLE_$(panel)),Fig. $(FIG))")$(newline))
	$(foreach panel,$(FIG_PANELS),$(PY) -m tools.table --results=$(panel)$(newline))

# Throughput against stock Keras fit, PyTorch (installed here as an optional extra) and the
# arithmetic limit: make bench [BENCH_FLAGS="--models=resnet8,resnet20 --norms=none,batch"];
# then trials/hour of a packed grid column vs one at a time vs --sweep_workers
# (tools/bench_pack.py), and where the time of a step goes at m = 8 (--breakdown)
# [BENCH_PACK_FLAGS="--pack=8 --workers=2 --batch_sizes=2,8,32 --breakdown=8"]
BENCH_STAMP := $(VENV)/.installed-bench
BENCH_FLAGS ?=
BENCH_PACK_FLAGS ?=
$(BENCH_STAMP): requirements-bench.txt $(STAMP)
	$(VENV)/bin/pip install --quiet -r requirements-bench.txt
	touch $@

bench: $(BENCH_STAMP)
	$(PY) -m tools.bench --out=runs/bench $(BENCH_FLAGS)
	$(PY) -m tools.bench_pack --out=runs/bench $(BENCH_PACK_FLAGS)

# The README's figure-cost table on this machine: step times of one trial and of a pack of K,
# per model and m, then each figure's hours from its grid (tools/figure_cost.py)
# [FIGURE_COST_FLAGS="--pack=13 --batch_sizes=2,8,32,128,512 --steps=10 --repeats=3"]
FIGURE_COST_FLAGS ?=
figure-cost: $(STAMP)
	$(PY) -m tools.figure_cost --measure --out=runs/bench $(FIGURE_COST_FLAGS)

# The ResNet-20 m = 32 step op class by op class, TF vs PyTorch, then TF's settings tried
# (tools/profile_step.py; docs/profile_vs_pytorch.md) [PROFILE_FLAGS="--m=8 --repeats=5"]
PROFILE_FLAGS ?=
profile: $(BENCH_STAMP)
	$(PY) -m tools.profile_step --out=runs/profile $(PROFILE_FLAGS)
	$(PY) -m tools.profile_step --out=runs/profile --knobs=all \
	    --knob_batch_sizes=2,32,128 $(PROFILE_FLAGS)

clean:
	rm -rf runs
