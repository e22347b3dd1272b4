#!/usr/bin/env bash
# The README's experiment: AutoCode EM vs the GRPO baseline on the embedded task, same rollout budget, 3 seeds.
# Each seed warms up one tiny model (in the EM run) and both algorithms start from it, so the pair differs only in
# the algorithm. Writes runs/em_vs_grpo/{em,grpo}_s<seed>/ and prints the comparison table (compare.png beside).
set -euo pipefail
out=${1:-runs/em_vs_grpo}
for seed in 0 1 2; do
  python -m acim_fast.run --seed "$seed" --out_dir "$out/em_s$seed"
  python -m acim_fast.run --seed "$seed" --algo grpo --model "$out/em_s$seed/warmup" --out_dir "$out/grpo_s$seed"
done
python -m acim_fast.report "$out"/em_s* "$out"/grpo_s* --out "$out/compare.png"
