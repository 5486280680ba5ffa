# The two entry points of README.md. Both set everything up first and are idempotent.
PY := .venv/bin/python
# The model of `make run`: empty for the default of conf/train.yaml, or a conf/model name
# (cnn, vmoe, ...); each gets its own run directory.
MODEL ?=
RUN_DIR ?= outputs/$(if $(MODEL),$(MODEL),default)

.PHONY: setup run test bench

setup:
	bash scripts/setup.sh

# Train the default model, then evaluate accuracy vs energy on its checkpoint.
run: setup
	$(PY) train.py hydra.run.dir=$(RUN_DIR) $(if $(MODEL),model=$(MODEL))
	$(PY) evaluate.py ckpt=$(RUN_DIR)/checkpoint.pt hydra.run.dir=$(RUN_DIR)/eval

# Format and lint first (pyproject.toml [tool.ruff]), then the tests.
test: setup
	.venv/bin/ruff format --check .
	.venv/bin/ruff check .
	$(PY) -m pytest

bench: setup
	$(PY) benchmarks/bench_des.py
	$(PY) benchmarks/bench_jesa.py
	$(PY) benchmarks/bench_router.py
	$(PY) benchmarks/bench_enumerate.py
	$(PY) benchmarks/bench_layer.py
	$(PY) benchmarks/bench_step.py
	$(PY) benchmarks/bench_channel.py
	$(PY) benchmarks/bench_frame.py

# Evaluation sweeps of a trained checkpoint and their figures (README "Figures"):
#   make figures [QUICK=1] [CKPT=checkpoint.pt or run dir] [OUT=dir] [JOBS=parallel points]
#                [DOCS=docs/figures (small copies)] [ARGS="evaluate.py overrides, e.g. device=cpu"]
.PHONY: figures
CKPT ?= $(RUN_DIR)/checkpoint.pt
OUT ?= outputs/figures
JOBS ?= 1
figures: setup
	$(PY) scripts/figures.py --ckpt "$(CKPT)" --out "$(OUT)" --jobs $(JOBS) $(if $(filter 1 true yes,$(QUICK)),--quick) \
		$(if $(DOCS),--docs "$(DOCS)") $(ARGS)
