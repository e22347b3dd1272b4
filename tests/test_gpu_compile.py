"""Every Triton kernel specialisation the dispatchers launch compiles for sm_80 and sm_90, fits, and does not spill.

`acim_kernels.compile_check` drives the public entry points and compiles what Triton's binder would launch, for
both targets, without a GPU; it runs once per session in a subprocess without TRITON_INTERPRET (this session's
kernels are the interpreter's, see conftest.py), with the trainer's own loss configurations added. The tests then
check the results, and that the capture reached every path the dispatchers can take over the driven space.
"""

import dataclasses
import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch

from acim_fast.config import Config
from acim_kernels import compile_check
from acim_kernels.compile_check import Result, violations

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton not installed")

PA, LOSS = "_paged_attention_kernel", "_policy_rows_kernel"
TRAINER_LOSSES = [Config(algo=algo).effective_loss() for algo in ("em", "grpo")]


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> list[Result]:
    folder = tmp_path_factory.mktemp("compile_check")
    path = folder / "results.json"
    given = [arg for loss in TRAINER_LOSSES for arg in ("--loss-config", json.dumps(dataclasses.asdict(loss)))]
    # Every kernel is compiled afresh anyway (ptxas' report is read as it runs): keep them out of ~/.triton.
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"} | {"TRITON_CACHE_DIR": str(folder)}
    run = subprocess.run([sys.executable, "-m", "acim_kernels.compile_check", "--json", str(path), *given],
                         env=env, capture_output=True, text=True, timeout=900)
    assert path.is_file(), f"compile_check wrote no results (exit {run.returncode}):\n{run.stdout}\n{run.stderr}"
    return [Result(**r) for r in json.loads(path.read_text())]


def _of(results, kernel, target=None):
    return [r for r in results if r.kernel == kernel and target in (None, r.target)]


def test_every_specialisation_compiles_fits_and_does_not_spill(results, capsys):
    with capsys.disabled():
        print(f"\n{compile_check.table(results)}")
    bad = [f"{r.kernel} {r.variant} sm_{r.target}: {v}" for r in results for v in violations(r)]
    assert not bad, "\n".join(bad)
    assert {r.target for r in results} == set(compile_check.TARGETS)
    assert all(r.registers > 0 and r.shared > 0 for r in results)  # the report was read, not defaulted


def test_paged_attention_every_dtype_head_dim_and_phase_on_the_dispatchers_tiles(results):
    import triton

    from acim_kernels.paged_attention import _tiles

    for cc in compile_check.TARGETS:
        found = {}
        for r in _of(results, PA, cc):
            c = r.constexprs
            for variant in r.variants:
                found[r.signature["k_ptr"], c["HEAD_DIM"], c["GROUP"], variant.endswith("decode")] = \
                    (c["BLOCK_M"], c["BLOCK_N"], r.num_warps)
        expected = {}
        for dtype in compile_check.FLOAT_DTYPES:
            torch_dtype = getattr(torch, dtype)
            pointer = "*" + {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}[dtype]
            for head_dim in compile_check.HEAD_DIMS:
                for q_heads, kv_heads in compile_check.HEADS:
                    for decode in (True, False):
                        group = q_heads // kv_heads
                        block_d = max(16, triton.next_power_of_2(head_dim))
                        expected[pointer, head_dim, group, decode] = _tiles(torch_dtype, block_d, group, decode)
        assert found == expected


def test_loss_every_mode_objective_flag_dtype_and_block(results):
    for cc in compile_check.TARGETS:
        loss = _of(results, LOSS, cc)
        key = lambda r: (r.signature["logits_ptr"], r.constexprs["BLOCK_V"], r.constexprs["MODE"])  # noqa: E731
        # every dtype and both blocks (128 for the embedded default's 100 tokens, else 4096) in all three modes:
        # scores only (0), the loss epilogue in the kernel (1), gradients given (2, gspo)
        assert {key(r) for r in loss} == {(p, b, m) for p in ("*fp32", "*bf16", "*fp16") for b in (128, 4096)
                                           for m in (0, 1, 2)}
        epilogue = [r.constexprs for r in loss if r.constexprs["MODE"] == 1]
        assert {c["OBJECTIVE"] for c in epilogue} == {0, 1, 2}
        for flag in ("HAS_DUAL", "HAS_IS", "HAS_KL", "HAS_SFT", "NEED_ENTROPY", "ENTROPY_GRAD"):
            assert {c[flag] for c in epilogue} == {False, True}, flag
        # the trainer's own losses (em: clip + the decision NLL; grpo: ppo) at both of its dtypes
        for pointer in ("*fp32", "*bf16"):
            trained = {(c["OBJECTIVE"], c["HAS_SFT"]) for r in loss if r.signature["logits_ptr"] == pointer
                       for c in [r.constexprs] if c["MODE"] == 1 and not (c["HAS_DUAL"] or c["HAS_KL"])}
            assert {(1, True), (0, False)} <= trained


def test_the_hidden_size_never_changes_a_specialisation(results):
    low, *high = (f"H={h} " for h in compile_check.HIDDEN_SWEEP)
    swept = [r for r in _of(results, LOSS) if any(h in v for h in high for v in r.variants)]
    assert swept, "the hidden-size sweep launched nothing"
    assert all(any(low in v for v in r.variants) for r in swept), [r.variants for r in swept]


def _clean(**changes) -> Result:
    base = Result(kernel=PA, variant="v", variants=["v"], target=80, constexprs={}, signature={}, num_warps=8,
                  num_stages=3, registers=128, shared=100_000)
    return dataclasses.replace(base, **changes)


def test_violations_flag_each_limit():
    assert violations(_clean()) == []
    assert violations(_clean(registers=255)) == []  # 255 x 256 threads fits
    assert "registers" in violations(_clean(registers=130, num_warps=16))[0]  # 130 x 512 threads does not
    assert "shared" in violations(_clean(shared=163 * 1024 + 1))[0]
    assert violations(_clean(shared=200_000, target=90)) == []  # sm_90 has 227 KB
    assert "spills" in violations(_clean(spill_stores=4))[0]
    assert "spills" in violations(_clean(spill_loads=4))[0]
    assert violations(_clean(error="CompilationError: at 3:4\nmore"))[0] == "compile error: CompilationError: at 3:4"


def test_parse_ptxas():
    log = """ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function '_paged_attention_kernel' for 'sm_90a'
ptxas info    : Function properties for _paged_attention_kernel
    1072 bytes stack frame, 1844 bytes spill stores, 1704 bytes spill loads
ptxas info    : Used 255 registers, used 1 barriers, 1072 bytes cumulative stack size
"""
    assert compile_check.parse_ptxas(log) == {"registers": 255, "stack": 1072, "spill_stores": 1844,
                                              "spill_loads": 1704}
    with pytest.raises(ValueError, match="no resource report"):
        compile_check.parse_ptxas("ptxas info    : 0 bytes gmem\n")


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="the kernels here are compiled ones")
def test_capture_refuses_interpreted_kernels():
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        compile_check.capture(90)
