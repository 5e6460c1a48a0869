#!/usr/bin/env bash
# Fashion-MNIST MTT vs random on one GPU: experts, distillation at IPC 1 and 10, evaluation
# with MTT's full protocol (1000 epochs, 5 networks). Reduced where stated: 5 experts of 12
# epochs, 500 distillation iterations, IPC 10 with max_start_epoch 10 (published config: 20).
#   bash benchmarks/gpu_fashion_mnist.sh OUT_DIR [DATA_DIR]
set -u
out=${1:-runs/gpu_fashion_mnist}; data=${2:-}; mkdir -p "$out"
work=${WORK:-/tmp/ddjax_gpu}
timeout ${EXPERTS_TIMEOUT:-170} python3 -m ddjax.cli experts \
  --config configs/experts/mtt.py:fashion_mnist --workdir "$work/experts" \
  --config.dataset.data_dir="$data" --config.num_experts=5 --config.epochs=12 \
  --config.experts_at_once=5 --config.test_every=12 >"$out/experts.log" 2>&1
for ipc in 1 10; do
  extra=""; [ $ipc = 10 ] && extra="max_start_epoch=10"
  timeout ${IPC_TIMEOUT:-200} python3 benchmarks/accuracy.py --methods random mtt --ipc $ipc \
    --epochs 1000 --num-models 5 --experts-dir "$work/experts" --iterations 500 \
    --eval-every 250 --data-dir "$data" --root "$work/acc" --out-suffix "_gpu_ipc$ipc" \
    --distill $extra >"$out/accuracy_ipc$ipc.log" 2>&1
  cp benchmarks/results/accuracy_fashion_mnist_gpu_ipc$ipc.json "$out/" 2>/dev/null
  cp "$work/acc/fashion_mnist_mtt_$ipc/synset_best.png" "$out/mtt_ipc${ipc}_best.png" 2>/dev/null
done
