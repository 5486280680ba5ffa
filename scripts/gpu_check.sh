#!/usr/bin/env bash
# The GPU check (a CUDA machine; about 5 minutes; nothing else in the project needs a GPU):
#   1. scripts/gpu_check.py: the router under torch.cuda.set_sync_debug_mode("error"), its
#      answers against the CPU's, the layer's host syncs, a deterministic backward;
#   2. benchmarks/bench_layer.py on CUDA: route() of each policy against the top-2 layer step;
#   3. benchmarks/bench_step.py on CUDA: convmoe training steps, topk / des / jesa / none;
#   4. a one-epoch tiny train with router=jesa under bf16 autocast, then evaluate.py.
# Writes benchmarks/results/gpu.json (with the commit it measured) and the two benchmark JSONs.
#
#   bash scripts/gpu_check.sh [DATA_ROOT]     # DATA_ROOT: torchvision layout, default data
#
# A machine without Hydra gets it from GPU_SITE (pure-python packages on PYTHONPATH), e.g. a
# copy of .venv/lib/python3.11/site-packages/{hydra,omegaconf,antlr4}.
set -euo pipefail
cd "$(dirname "$0")/.."
data_root=${1:-data}
out=${OUT:-benchmarks/results}
py=${PYTHON:-python3}
export PYTHONPATH="$PWD${GPU_SITE:+:$GPU_SITE}${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
mkdir -p "$out"
work=$(mktemp -d)
commit=$(git rev-parse HEAD 2>/dev/null || echo "${GPU_CHECK_COMMIT:-unknown}")

$py -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.__version__, torch.cuda.get_device_name())"

start=$SECONDS
$py scripts/gpu_check.py --out "$work/router.json"
router_s=$((SECONDS - start))

start=$SECONDS
$py benchmarks/bench_layer.py --device cuda --reps 10 --no-numba --out "$out/layer_cuda.json"
layer_s=$((SECONDS - start))

start=$SECONDS
$py benchmarks/bench_step.py --device cuda --models convmoe --frames token --steps 10 --reps 2 --data-root "$data_root" \
    --out "$out/step_cuda.json"
step_s=$((SECONDS - start))

start=$SECONDS
$py train.py model=tiny_convmoe router=jesa router.gamma=0.5 router.k_max=2 train.precision=bf16 train.epochs=1 \
    data.root="$data_root" data.val_size=200 data.limit_train=2800 data.limit_test=1000 device=cuda progress=false \
    hydra.run.dir="$work/run"
$py evaluate.py ckpt="$work/run" 'eval.policies=[topk@2,des,jesa,greedy]' 'eval.gammas=[0.25,0.5]' eval.channel_draws=1 \
    data.root="$data_root" device=cuda progress=false hydra.run.dir="$work/run/eval"
train_s=$((SECONDS - start))

$py - "$work" "$out" "$commit" "$router_s" "$layer_s" "$step_s" "$train_s" <<'EOF'
import json, sys
work, out, commit, *seconds = sys.argv[1:]
metrics = json.load(open(f"{work}/run/metrics.json"))
result = {
    "commit": commit,
    "router": json.load(open(f"{work}/router.json")),
    "layer": json.load(open(f"{out}/layer_cuda.json"))["results"],
    "step": json.load(open(f"{out}/step_cuda.json"))["rows"],
    "tiny_train_bf16_jesa": {"test_accuracy": metrics["test"]["accuracy"], "test_energy_uj": metrics["test"]["energy_uj"]},
    "evaluation_table": open(f"{work}/run/eval/results.md").read(),
    "seconds": dict(zip(("router", "layer", "step", "train_evaluate"), map(int, seconds))),
}
json.dump(result, open(f"{out}/gpu.json", "w"), indent=1)
print(f"wrote {out}/gpu.json")
EOF
