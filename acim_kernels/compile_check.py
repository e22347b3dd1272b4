"""Compile every Triton kernel specialisation the dispatchers launch, for a GPU target, on a machine without one.

`capture(cc)` drives the public entry points (`paged_attention`, `policy_loss`, `policy_loss_from_logits`) over
the configuration space below, on CPU tensors that say they are on CUDA, with Triton's driver replaced by one that
reports sm_<cc>. Each `kernel[grid](...)` launch then goes through Triton's own binder (argument types, the
divisibility-by-16 and ==1 specialisation of ints and pointers, options such as num_warps) and reaches Triton's
`jit_cache_hook`, which records it and stops it before anything is compiled or launched. `compile_launch` compiles
one recorded specialisation with `triton.compile` for that target (ptxas included; no driver needed) and reads
ptxas' report: registers, spill stores and loads; Triton's metadata gives the shared memory. `violations` names
every limit a result breaks. `python -m acim_kernels.compile_check` does it all for sm_80 and sm_90 and prints the
table; run it in a process without TRITON_INTERPRET=1 (the interpreter replaces kernels at import time).

It imports only the standard library at import time, and no kernel module imports it. It does not run kernels,
time them or check their results (the tests compare the kernels with their references, in the interpreter); the
numbers are ptxas' static ones. Data pointers are the CPU allocator's: 64-byte aligned where CUDA's are 256-byte
aligned, the same to Triton's divisibility-by-16 specialisation.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import importlib
import io
import itertools
import json
import os
import re
import sys
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context

TARGETS = (80, 90)
# Largest dynamic shared memory one block may opt into: A100 (sm_80) 163 KB, H100/H200 (sm_90) 227 KB.
SHARED_LIMIT = {80: 163 * 1024, 90: 227 * 1024}
REGISTERS_PER_BLOCK = 65536

# The configuration space driven: the values of what the dispatchers read. What they launch for it is theirs.
FLOAT_DTYPES = ("float32", "bfloat16", "float16")
# Paged attention: head_dim 32 (the embedded default), 64 and 128 (most released models); GQA groups 1 (MHA, the
# embedded default) and 6 (Qwen2.5-Math-1.5B: 12 query heads over 2 KV heads); the engine's block size.
HEAD_DIMS = (32, 64, 128)
HEADS = ((4, 4), (12, 2))
BLOCK_SIZE = 16
# (cached tokens, new queries) per sequence: a decode step; a prompt next to a chunk appended to a sequence.
PHASES = {"decode": ((20, 1), (7, 1)), "prefill": ((0, 13), (21, 9))}
# Loss: the embedded default's vocabulary (100: one 128-wide block, rows not 16-aligned), Llama's, Qwen2.5's. Every
# (dtype, vocabulary) takes each objective's defaults; the points real runs use (bf16 with Qwen2.5's vocabulary,
# fp32 with the embedded default's) take every configuration of `_loss_configs`: the options only add scalar work
# to the epilogue, dtype and vocabulary change the loads and the block (the whole product would be ~600 kernels).
VOCABS = (100, 32000, 151936)
LOSS_EVERY_CONFIG = (("bfloat16", 151936), ("float32", 100))
LOSS_ROWS = 8
# The hidden size never reaches the kernel (the matmul is torch's): driven at both ends once, to show it.
HIDDEN = 64
HIDDEN_SWEEP = (64, 4096)


@dataclasses.dataclass
class Launch:
    """One specialisation as Triton's binder made it: `spec` is Triton's own serialisation (signature, constexprs,
    attributes, options, target), the key that makes launches unique."""

    module: str
    kernel: str
    target: int
    spec: str
    variants: list[str]


@dataclasses.dataclass
class Result:
    kernel: str
    variant: str  # the first driven configuration that launched it
    variants: list[str]  # every driven configuration that launched it
    target: int
    constexprs: dict  # constexpr parameters by name (dtypes as strings)
    signature: dict  # parameter types by name ("*bf16", "i32", "constexpr", ...)
    num_warps: int
    num_stages: int
    registers: int = 0
    spill_stores: int = 0
    spill_loads: int = 0
    stack: int = 0
    shared: int = 0
    error: str | None = None


# ---- CUDA-looking CPU tensors ----------------------------------------------------------------------------------

def _looks_cuda():
    """A TorchFunctionMode under which `device="cuda"` allocates on the CPU and every tensor result says it is on
    CUDA (`.device`, `.is_cuda`): the launch code takes its CUDA branches, the arithmetic runs for real on the CPU
    (data-dependent steps such as masks and value checks included), and Triton's binder sees real CPU tensors.
    Not FakeTensors: autograd on a fake CUDA tensor aborts a CPU-only torch, and the loss's masks need values."""
    import torch
    from torch.overrides import TorchFunctionMode
    from torch.utils._pytree import tree_map

    cuda = torch.device("cuda", 0)

    class OnCuda(torch.Tensor):
        __torch_function__ = torch._C._disabled_torch_function_impl  # the mode below does the wrapping

        @property
        def device(self):
            return cuda

        @property
        def is_cuda(self):
            return True

    def to_cpu(value):
        if isinstance(value, torch.device) and value.type == "cuda" or isinstance(value, str) and \
                value.startswith("cuda"):
            return torch.device("cpu")
        return value

    def wrap(value):
        return value.as_subclass(OnCuda) if type(value) is torch.Tensor else value

    class Mode(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            args = tuple(to_cpu(a) for a in args)
            kwargs = {k: to_cpu(v) for k, v in (kwargs or {}).items()}
            return tree_map(wrap, func(*args, **kwargs))

    return Mode()


# ---- capture -----------------------------------------------------------------------------------------------------

class _TargetDriver:
    """What Triton's launch path asks of its driver, answered for a GPU that is not there."""

    def __init__(self, cc: int):
        self.cc = cc

    def get_current_device(self):
        return f"compile_check:sm_{self.cc}"  # a key of its own in each kernel's per-device cache

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        from triton.backends.compiler import GPUTarget

        return GPUTarget("cuda", self.cc, 32)


def _paged_attention_calls():
    """(label, entry point, arguments, keywords): the public `paged_attention` (impl "auto", arguments validated)
    over dtypes, head dims, head layouts and phases, on a real, valid batch."""
    import torch

    from acim_kernels.paged_attention import paged_attention

    for dtype_name in FLOAT_DTYPES:
        dtype = getattr(torch, dtype_name)
        for head_dim in HEAD_DIMS:
            for num_q_heads, num_kv_heads in HEADS:
                for phase, specs in PHASES.items():
                    seq_lens = [context + queries for context, queries in specs]
                    per_seq = -(-max(seq_lens) // BLOCK_SIZE)
                    shape = (len(specs) * per_seq, BLOCK_SIZE, num_kv_heads, head_dim)
                    k_cache = torch.randn(shape, device="cuda").to(dtype)
                    v_cache = torch.randn(shape, device="cuda").to(dtype)
                    tables = torch.arange(shape[0], dtype=torch.int32, device="cuda").view(len(specs), per_seq)
                    q_lens = [queries for _, queries in specs]
                    q = torch.randn(sum(q_lens), num_q_heads, head_dim, device="cuda").to(dtype)
                    qsl = torch.tensor([0, *q_lens], device="cuda").cumsum(0).to(torch.int32)
                    lens = torch.tensor(seq_lens, dtype=torch.int32, device="cuda")
                    label = f"{dtype_name} D={head_dim} Hq/Hkv={num_q_heads}/{num_kv_heads} {phase}"
                    yield label, paged_attention, (q, k_cache, v_cache, tables, lens, qsl), {"scale": head_dim ** -0.5}


def _loss_configs(given=()):
    """(each objective's defaults, the other configurations), each a list of (label, LossConfig, side inputs it
    needs). The others: each objective with every option on (every constexpr flag of the epilogue set: the largest
    epilogue), the entropy returned without its gradient, and the configurations `given` (a trainer's own, as
    LossConfig field dicts)."""
    from acim_kernels.pg_loss_ref import OBJECTIVES, LossConfig

    defaults = [(objective, LossConfig(objective=objective), ()) for objective in OBJECTIVES]
    every = {"dual_clip": 3.0, "kl_coef": 0.1, "entropy_coef": 0.01, "sft_coef": 1.0}
    others = [(f"{objective}+all", LossConfig(objective=objective, **every),
               ("rollout_is_weight", "ref_logp", "sft_mask")) for objective in OBJECTIVES]
    others.append(("ppo+return_entropy", LossConfig(return_entropy=True), ()))
    for n, fields in enumerate(given):
        config = LossConfig(**fields)
        sides = ("ref_logp",) * (config.kl_coef > 0) + ("sft_mask",) * (config.sft_coef > 0)
        others.append((f"given{n}:{config.objective}", config, sides))
    return defaults, others


def _loss_calls(given=()):
    """(label, entry point, arguments, keywords): both public entry points (impl "auto"), training (gradients in
    the forward pass) and scoring, over dtypes, vocabularies and configurations (see LOSS_EVERY_CONFIG); then the
    hidden-size sweep."""
    import torch

    from acim_kernels import policy_loss, policy_loss_from_logits

    defaults, others = _loss_configs(given)
    rows = LOSS_ROWS
    side = {"rollout_is_weight": torch.ones(rows, device="cuda"), "ref_logp": torch.zeros(rows, device="cuda"),
            "sft_mask": torch.ones(rows, device="cuda")}

    def keywords(config, sides):
        return {"old_logp": torch.zeros(rows, device="cuda"), "advantages": torch.linspace(-1, 1, rows, device="cuda"),
                "loss_mask": torch.ones(rows, device="cuda"), "seq_ids": torch.arange(rows, device="cuda") // 4,
                "config": config} | {k: side[k] for k in sides}

    for dtype_name in FLOAT_DTYPES:
        dtype = getattr(torch, dtype_name)
        for vocab in VOCABS:
            targets = torch.arange(rows, device="cuda") * 7 % vocab
            every = (dtype_name, vocab) in LOSS_EVERY_CONFIG
            for label, config, sides in defaults + others if every else defaults:
                for trains in (True, False):
                    mode = "train" if trains else "score"
                    hidden = torch.zeros(rows, HIDDEN, dtype=dtype, device="cuda").requires_grad_(trains)
                    weight = torch.zeros(vocab, HIDDEN, dtype=dtype, device="cuda").requires_grad_(trains)
                    logits = torch.zeros(rows, vocab, dtype=dtype, device="cuda").requires_grad_(trains)
                    yield (f"{dtype_name} V={vocab} H={HIDDEN} {label} {mode}", policy_loss, (hidden, weight, targets),
                           keywords(config, sides))
                    yield (f"{dtype_name} V={vocab} logits {label} {mode}", policy_loss_from_logits,
                           (logits, targets), keywords(config, sides))
    for hidden_size in HIDDEN_SWEEP:
        vocab = VOCABS[1]
        hidden = torch.zeros(rows, hidden_size, device="cuda").requires_grad_()
        weight = torch.zeros(vocab, hidden_size, device="cuda")  # frozen: no [V, H] fp32 gradient to allocate
        targets = torch.arange(rows, device="cuda") % vocab
        yield (f"float32 V={vocab} H={hidden_size} ppo train", policy_loss, (hidden, weight, targets),
               keywords(defaults[0][1], ()))


def capture(cc: int, loss_configs=()) -> list[Launch]:
    """Every unique launch of the driven configurations, for target sm_<cc>, in first-seen order; `loss_configs`
    (LossConfig field dicts) are driven besides the built-in ones."""
    from triton import knobs
    from triton.runtime.driver import driver
    from triton.runtime.jit import JITFunction

    from acim_kernels import paged_attention, pg_loss

    for kernel in (paged_attention._paged_attention_kernel, pg_loss._policy_rows_kernel):
        if not isinstance(kernel, JITFunction):
            raise RuntimeError("the kernels were built for the Triton interpreter (TRITON_INTERPRET=1 when they were "
                               "imported); run the compile check in a process without it")
    launches: dict[str, Launch] = {}
    driving = ""  # the label of the call being driven

    def record(*, fn, compile, **_):
        spec = compile["specialization_data"]
        launch = launches.setdefault(spec, Launch(fn.module, fn.name, cc, spec, []))
        launch.variants.append(driving)
        return True  # handled: Triton neither compiles nor launches

    saved_hook = knobs.runtime.jit_cache_hook
    saved_driver = driver._active  # None without a GPU: `driver.active` would try (and fail) to make one
    driver.set_active(_TargetDriver(cc))
    knobs.runtime.jit_cache_hook = record
    try:
        with _looks_cuda():
            for driving, entry, args, kwargs in itertools.chain(_paged_attention_calls(), _loss_calls(loss_configs)):
                entry(*args, **kwargs)
    finally:
        knobs.runtime.jit_cache_hook = saved_hook
        driver.set_active(saved_driver)
    return list(launches.values())


# ---- compile -----------------------------------------------------------------------------------------------------

_SPILLS = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_REGISTERS = re.compile(r"Used (\d+) registers")


def parse_ptxas(log: str) -> dict:
    """Registers, stack frame and spill bytes from `ptxas -v` output (one entry function)."""
    spills, registers = _SPILLS.search(log), _REGISTERS.search(log)
    if spills is None or registers is None:
        raise ValueError(f"no resource report in the ptxas output:\n{log}")
    stack, stores, loads = map(int, spills.groups())
    return {"registers": int(registers.group(1)), "stack": stack, "spill_stores": stores, "spill_loads": loads}


def _decode(launch: Launch):
    """(JITFunction, signature, constexprs, attributes, options) back from Triton's serialisation, as
    `JITFunction.preload` decodes it."""
    import triton.language as tl

    fn = getattr(importlib.import_module(launch.module), launch.kernel)
    data = json.loads(launch.spec)
    signature = {k: tuple(v) if isinstance(v, list) else v for k, v in data["signature"].items()}
    constexprs = {tuple(k): tl.dtype(v) if isinstance(v, str) and tl.dtype.is_dtype(v) else v
                  for k, v in zip(data["constant_keys"], data["constant_vals"])}
    attrs = {tuple(k): v for k, v in zip(data["attrs_keys"], data["attrs_vals"])}
    options = {k: tuple(v) if isinstance(v, list) else v for k, v in data["options"].items()}
    return fn, signature, constexprs, attrs, options


def compile_launch(launch: Launch) -> Result:
    """Compile one launch for its target; a compile error is reported in `Result.error`, not raised."""
    import triton
    import triton.language as tl
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn, signature, constexprs, attrs, options = _decode(launch)
    names = fn.arg_names
    result = Result(kernel=launch.kernel, variant=launch.variants[0], variants=launch.variants,
                    target=launch.target, signature=signature,
                    constexprs={names[k[0]]: str(v) if isinstance(v, tl.dtype) else v
                                for k, v in constexprs.items()},
                    num_warps=options["num_warps"], num_stages=options["num_stages"])
    # Triton prints ptxas' -v report when asked, but only when it really runs ptxas: compile afresh, keep the print.
    printed = io.StringIO()
    try:
        with knobs.compilation.scope(), knobs.nvidia.scope(), contextlib.redirect_stdout(printed):
            knobs.compilation.always_compile = True
            knobs.nvidia.dump_ptxas_log = True
            kernel = triton.compile(ASTSource(fn, signature, constexprs, attrs),
                                    target=GPUTarget("cuda", launch.target, 32), options=options)
        result.shared = kernel.metadata.shared
        for name, value in parse_ptxas(printed.getvalue()).items():
            setattr(result, name, value)
    except Exception as e:  # noqa: BLE001 - every compile failure is a finding to report
        result.error = f"{type(e).__name__}: {e}"[:2000]
    return result


def violations(result: Result) -> list[str]:
    """The limits a compiled specialisation breaks on its target (empty: it fits and does not spill)."""
    if result.error:
        return [f"compile error: {result.error.splitlines()[0]}"]
    found = []
    if result.shared > SHARED_LIMIT[result.target]:
        found.append(f"shared memory {result.shared} B > {SHARED_LIMIT[result.target]} B")
    threads = result.num_warps * 32
    if result.registers * threads > REGISTERS_PER_BLOCK:
        found.append(f"{result.registers} registers x {threads} threads > {REGISTERS_PER_BLOCK}")
    if result.spill_stores or result.spill_loads:
        found.append(f"spills: {result.spill_stores} B stored, {result.spill_loads} B loaded")
    return found


def compile_all(targets=TARGETS, loss_configs=(), workers: int | None = None) -> list[Result]:
    """Capture and compile every launch for every target, in worker processes (one per core by default)."""
    workers = workers or os.cpu_count() or 1
    with ProcessPoolExecutor(workers, mp_context=get_context("spawn")) as pool:
        captured = pool.map(functools.partial(capture, loss_configs=loss_configs), targets)
        launches = [launch for per_target in captured for launch in per_target]
        # Heaviest first, so that no long compile is left for the end: paged attention takes ~4x the loss kernel.
        launches.sort(key=lambda launch: launch.kernel != "_paged_attention_kernel")
        return list(pool.map(compile_launch, launches))


def table(results: list[Result]) -> str:
    """One line per specialisation: kernel, variant, target, warps, registers, spills, stack, shared memory."""
    head = ("kernel", "variant (first of n)", "target", "warps", "regs", "spill st/ld B", "stack B", "shared B")
    rows = [head]
    for r in sorted(results, key=lambda r: (r.kernel, r.target, r.variant)):
        regs = "ERROR" if r.error else str(r.registers)
        rows.append((r.kernel.strip("_"), f"{r.variant} ({len(r.variants)})", f"sm_{r.target}", str(r.num_warps), regs,
                     f"{r.spill_stores}/{r.spill_loads}", str(r.stack), str(r.shared)))
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--targets", type=int, nargs="+", default=list(TARGETS), help="compute capabilities")
    parser.add_argument("--loss-config", action="append", default=[], type=json.loads,
                        help="a LossConfig as JSON fields, driven besides the built-in ones (repeatable)")
    parser.add_argument("--workers", type=int, default=None, help="processes (default: one per core)")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        parser.error("unset TRITON_INTERPRET: the interpreter replaces the kernels this compiles")
    results = compile_all(args.targets, args.loss_config, args.workers)
    print(table(results))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump([dataclasses.asdict(r) for r in results], f, indent=1)
    bad = [f"{r.kernel} {r.variant} sm_{r.target}: {v}" for r in results for v in violations(r)]
    print("\n".join(bad) if bad else f"{len(results)} specialisations: all compile, fit and do not spill")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
