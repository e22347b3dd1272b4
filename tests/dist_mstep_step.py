"""One M-step of a small model on fixed samples, run by tests/test_dist.py both as a plain process and under
`torchrun --nproc_per_node 2` (FSDP2 on gloo, the model loaded sharded from a checkpoint as run.py loads it); saves
the full parameters and metrics to argv[1] (rank 0). The loss has a KL term against a frozen reference (another
random model, so the KL and its gradient are not 0), placed as run.py places it: whole in one process, FSDP2-sharded
in the samplers' dtype under torchrun; the bytes of the reference each rank holds after the M-step are saved too.
Flags after the path: "mixed", the GPU's mixed precision for the shards (bf16 compute, fp32 reduction and master
shards); "checkpointed", activation checkpointing. The dtypes a decoder projection computed in are saved too."""

import dataclasses
import random
import shutil
import sys
import tempfile
from pathlib import Path

import torch
from torch.distributed.tensor import DTensor

from acim_fast.embedded.tiny import TinyConfig, build_model, build_tokenizer
from acim_fast.engine.model import CausalLM
from acim_fast.train import dist as D
from acim_fast.train.estep import Sample
from acim_fast.train.mstep import MStep, MStepConfig
from acim_kernels import LossConfig

CONFIG = TinyConfig(hidden_size=64, num_layers=2, num_heads=2, num_kv_heads=2, head_dim=32, intermediate_size=128,
                    seed=0)
REFERENCE = dataclasses.replace(CONFIG, seed=1)


def samples(n=12):
    rng = random.Random(0)
    out = []
    for i in range(n):
        prompt = [rng.randrange(3, 90) for _ in range(rng.randint(3, 8))]
        k = rng.randint(4, 14)
        mask = [1] * k
        mask[2:4] = [0, 0]
        out.append(Sample(problem=i, origin="free", decision="code", prompt_ids=prompt,
                          response_ids=[rng.randrange(3, 90) for _ in range(k)],
                          behaviour_logprobs=[rng.uniform(-5, -3) for _ in range(k)], loss_mask=mask,
                          decision_mask=[1] + [0] * (k - 1), reward=1.0, advantage=rng.choice([-1.0, 1.0]),
                          off_context=False))
    return out


d = D.from_env()
flags = set(sys.argv[2:])
model = build_model(CONFIG, build_tokenizer())
reference = build_model(REFERENCE, build_tokenizer())
if d is not None:  # loaded as run.py loads the trained copy: each rank keeps its shard of every checkpoint tensor
    saved = Path(tempfile.mkdtemp())
    model.save_pretrained(saved / "model")
    reference.save_pretrained(saved / "reference")
    compute = torch.bfloat16 if "mixed" in flags else None
    model = CausalLM.from_pretrained(saved / "model", dtype="float32",
                                     prepare=lambda m: D.shard(m, d, compute_dtype=compute))
    # As run.py's _reference: in the samplers' dtype, sharded without a mixed-precision policy.
    reference = CausalLM.from_pretrained(saved / "reference", dtype=compute or torch.float32,
                                         prepare=lambda m: D.shard(m, d))
    shutil.rmtree(saved)
seen = []  # per call of a decoder projection: its (input, weight) dtypes inside FSDP's forward (bf16 under mixed
# precision), and whether autograd recorded (training forwards, and their recomputation under checkpointing)
model.model.layers[0].self_attn.q_proj.register_forward_pre_hook(
    lambda module, args: seen.append((args[0].dtype, module.weight.dtype, torch.is_grad_enabled())))
trainer = MStep(model, MStepConfig(lr=1e-4, epochs=1, samples_per_step=12, micro_batch_tokens=48, warmup_steps=0,
                                   activation_checkpointing="checkpointed" in flags), total_steps=1, dist=d,
                 reference=reference)
metrics = trainer.train(samples(), LossConfig(objective="clip", sft_coef=0.5, kl_coef=0.1))
master_dtypes = {p.dtype for p in model.parameters()}
# The reference's bytes on this rank after the M-step (its shards alone, if its pass resharded it), and the whole's.
held = (sum(p.to_local().nbytes if isinstance(p, DTensor) else p.nbytes for p in reference.parameters()),
        sum(p.numel() * p.element_size() for p in reference.parameters()),
        all(isinstance(p, DTensor) for p in reference.parameters()))
reference_bytes = [held] if d is None else d.gather(held)
if d is not None:  # the trained weights, whole, as the samplers get them
    whole = build_model(CONFIG, build_tokenizer())
    D.copy_full_weights(model, whole)
    model = whole
if d is None or d.is_main:
    initial = build_model(CONFIG, build_tokenizer()).state_dict()
    torch.save({"state": {k: v.detach().clone() for k, v in model.state_dict().items()}, "initial": initial,
                "metrics": metrics, "compute_dtypes": {call[:2] for call in seen},
                "block_calls": [sum(call[2] == grad for call in seen) for grad in (False, True)],
                "master_dtypes": master_dtypes, "reference_bytes": reference_bytes}, sys.argv[1])
if d is not None:
    d.close()
