#!/usr/bin/env bash
# The one prepared GPU check (run on a lent GPU machine from the repository root, $OUT set by the tool), in order of
# what it proves: the GPU tests natively (no Triton interpreter); the FSDP2 path on the GPU (nccl, bf16 mixed
# precision: issue 7's GPU half); the loss, paged-attention, sampler and M-step benchmarks (JSON to $OUT); the vLLM
# backend where vLLM is installed. Each stage has its own time limit, so that one slow stage cannot use up the
# session's device time; the budgets sum to 8 minutes (480 s). Logs and results land in $OUT. Never run yet: no GPU has been lent to this project so far.
# The machine has torch and triton; what it lacks travels as wheels (see the device README).
set -uo pipefail
OUT=${OUT:-/tmp/gpu_check}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/gpu.txt" 2>&1
python -c "import torch, triton; print(torch.__version__, triton.__version__, torch.cuda.get_device_name())" | tee -a "$OUT/gpu.txt"
timeout 110 python -m pytest -q tests/test_policy_loss.py tests/test_paged_attention.py tests/test_model.py \
    tests/test_sampler.py 2>&1 | tee "$OUT/tests.log"
# The FSDP2 path on one GPU with bf16 mixed precision: the reduced run under torchrun (a world of 1 still shards),
# then as a plain process (a world of one of its own: nccl on a HashStore). A short warm-up: the path is what counts.
# Needs the package's other dependencies (math-verify, matplotlib) on the machine.
timeout 100 python -m torch.distributed.run --standalone --nproc_per_node 1 -m acim_fast.run --preset smoke \
    --dtype bfloat16 --warmup_steps 300 --out_dir "$OUT/fsdp_smoke" 2>&1 | tail -20 | tee "$OUT/fsdp_smoke.log"
timeout 60 python -m acim_fast.run --preset smoke --dtype bfloat16 --device cuda --model "$OUT/fsdp_smoke/warmup" \
    --out_dir "$OUT/bf16_one_process" 2>&1 | tail -20 | tee "$OUT/bf16_one_process.log"
BENCH_JSON="$OUT/policy_loss.json" timeout 150 python -m pytest -q bench/bench_policy_loss.py \
    bench/bench_paged_attention.py bench/bench_sampler.py bench/bench_mstep.py bench/bench_varlen.py --benchmark-only \
    --benchmark-json "$OUT/bench_raw.json" 2>&1 | tee "$OUT/bench.log"
# The vLLM backend on CUDA (sleep mode included), only where vLLM is installed on the machine (a CUDA vLLM wheel is
# too large to carry): the same tests as on CPU, then the E-step comparison.
if python -c "import vllm" 2>/dev/null; then
    timeout 40 python -m pytest -q tests/test_vllm.py 2>&1 | tail -20 | tee "$OUT/vllm_tests.log"
    timeout 20 python -m pytest -q bench/bench_estep.py --benchmark-only -k vllm 2>&1 | tail -20 | tee "$OUT/vllm_bench.log"
else
    echo "vllm not installed: vLLM GPU checks skipped" | tee "$OUT/vllm_tests.log"
fi
