#!/usr/bin/env bash
# The GPU check: train-step throughput and MFU on one GPU, under 5 minutes on an H100.
#
#   here:        bash bench/fetch_gpu_wheels.sh            (once; wheels the GPU machine lacks -> .whl/)
#   device tool: run(command="bash bench/gpu_check.sh", carry=[".whl"], timeout_s=420)
#   any GPU box: bash bench/gpu_check.sh                    (with afm-jax installed, no .whl needed)
#
# Runs bench/train_step.py for MAE ViT-L/16 (bf16, batch 256, with the supervised JAX-vs-timm
# comparison) and DINO ViT-B/16 (bf16, batch 128, 2×224 + 8×96 crops) and prints their JSON lines;
# they are also collected in $OUT/gpu_check.jsonl (or /tmp). Where CUDA torch + timm import, both runs
# add --compare-torch (vs_torch against the PyTorch peers of bench/torch_peers.py, same batch, bf16 autocast). Aim (issue 4): MAE ViT-L/16 mfu >= 0.5
# (`mfu_vs_peak` against the H100's bf16 dense peak from afm_jax/train/throughput.py).
set -uo pipefail
cd "$(dirname "$0")/.."
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.92}
results=${OUT:-/tmp}/gpu_check.jsonl
: > "$results"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
python3 -c "import jax, flax, optax; print('jax', jax.__version__, 'flax', flax.__version__, jax.devices())"

run() {  # one benchmark, bounded in time; its last line (JSON) is kept
  local limit=$1; shift
  echo "== bench/train_step.py $*" >&2
  timeout "$limit" python3 bench/train_step.py "$@" --steps 8 --rounds 2 --warmup 2 > /tmp/bench.out
  local rc=$?
  tail -n 1 /tmp/bench.out | tee -a "$results"
  [[ $rc -eq 0 ]] || echo "{\"bench\": \"train_step\", \"args\": \"$*\", \"error\": \"exit $rc\"}" | tee -a "$results"
}

# The PyTorch peers (bench/torch_peers.py, vs_torch) only where CUDA torch and timm import.
torch_peer=()
if python3 -c "import torch, timm; assert torch.cuda.is_available()" 2>/dev/null; then torch_peer=(--compare-torch); fi
run 170 --config configs/mae_vitl.py --dtype bfloat16 --batch 256 --compare-timm "${torch_peer[@]}"
if [[ -f configs/dino_vitb16.py ]]; then
  run 110 --config configs/dino_vitb16.py --dtype bfloat16 --batch 128 "${torch_peer[@]}"
fi
echo "results: $results"
