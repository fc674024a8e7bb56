#!/usr/bin/env bash
# The accelerator figures of issue 15 in one run, on the machine's default backend (a GPU or
# TPU; it runs on a CPU too, slowly). Prints each benchmark's table and command; nothing is
# written to the repository. Not yet run on a GPU or TPU (none has been lent to this project).
#
#   bash benchmarks/accelerator.sh              # everything below
#   ANCHOR_SRC=autodl bash benchmarks/accelerator.sh   # plus the official TAS release, if
#                                               # torch is importable (../shared/anchors)
#
# 1. TAS search iteration of ResNet-20/32/56 at batch 256, float32 and bfloat16, with the
#    projected 600-epoch CIFAR-10 search (the authors: 3.83 h for ResNet-32 on one V100).
# 2. The baseline train step with jaxprune's XLA:CPU-tuned layers and with the stock ones
#    (config.runtime.layers), float32 and bfloat16.
# 3. The official release's search iteration, alternated with jaxprune's, when torch is there.
set -euo pipefail
cd "$(dirname "$0")/.."

python benchmarks/tas_search.py --depths 20 32 56 --batch 256 --small_batches 128 \
    --dtypes float32 bfloat16 --repeats 5
for dtype in float32 bfloat16; do
  python benchmarks/train_step.py --depths 20 56 --batch 128 --dtype "$dtype"
  python benchmarks/train_step.py --depths 20 56 --batch 128 --dtype "$dtype" --stock_layers
done
if [[ -n "${ANCHOR_SRC:-}" ]] && python -c "import torch" 2>/dev/null; then
  anchor=../shared/anchors/tas_official_search.py
  for round in 1 2; do  # alternated, as the anchors README asks
    python "$anchor" --src "$ANCHOR_SRC" --depths 20 32 56
    python benchmarks/tas_search.py --depths 20 32 56 --batch 256 --small_batches 128 \
        --repeats 5
  done
fi
