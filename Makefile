# The two entry points of README.md. Both set everything up first and are idempotent.
PY := .venv/bin/python
RUN_DIR ?= outputs/default

.PHONY: setup run test bench

setup:
	bash scripts/setup.sh

# Train the default model, then evaluate accuracy vs energy on its checkpoint.
run: setup
	$(PY) train.py hydra.run.dir=$(RUN_DIR)
	$(PY) evaluate.py ckpt=$(RUN_DIR)/checkpoint.pt hydra.run.dir=$(RUN_DIR)/eval

test: setup
	$(PY) -m pytest

bench: setup
	$(PY) benchmarks/bench_des.py
	$(PY) benchmarks/bench_jesa.py
	$(PY) benchmarks/bench_router.py
