#!/usr/bin/env bash
# The README's experiment: AutoCode EM vs the GRPO baseline on the embedded task, same rollout budget, 5 seeds, plus
# EM with the "value" reference strategy. Each seed warms up one tiny model (in the EM run) and every algorithm
# starts from it, so runs of a seed differ only in the algorithm. Writes runs/em_vs_grpo/{em,grpo,emvalue}_s<seed>/,
# prints the comparison tables and draws compare.png / value.png beside them (about an hour on 2 CPU cores).
# SEEDS="0 1 2" runs fewer.
set -euo pipefail
out=${1:-runs/em_vs_grpo}
for seed in ${SEEDS:-0 1 2 3 4}; do
  python -m acim_fast.run --seed "$seed" --out_dir "$out/em_s$seed"
  python -m acim_fast.run --seed "$seed" --algo grpo --model "$out/em_s$seed/warmup" --out_dir "$out/grpo_s$seed"
  python -m acim_fast.run --seed "$seed" --estep.s_star value --model "$out/em_s$seed/warmup" \
    --out_dir "$out/emvalue_s$seed"
done
python -m acim_fast.report "$out"/em_s* "$out"/grpo_s* --out "$out/compare.png"
python -m acim_fast.report "$out"/emvalue_s* --out "$out/value.png"  # its runs say algo "em": tabled apart
