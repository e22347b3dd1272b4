"""python -m acim_fast.run: the reduced preset end to end (files, finite losses, changed weights), the data order,
the embedded warm-up path, and crash safety: a run killed with SIGKILL resumes to the same result."""

import concurrent.futures
import dataclasses
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from acim_fast import run
from acim_fast.config import smoke_preset
from acim_fast.execution.sandbox import CellStatus, Result, Sandbox, SandboxConfig, SandboxFailed
from acim_fast.run import iteration_problems, problems_of, train

FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "trainer/.metadata",
         "eval.json")


def _smoke(out_dir, model, **changes):
    return dataclasses.replace(smoke_preset(), out_dir=str(out_dir), model=None if model is None else str(model),
                               **changes)


def _weights(run_dir, iteration):
    return load_file(Path(run_dir) / "checkpoints" / f"iter_{iteration:04d}" / "model.safetensors")


def test_smoke_run_writes_every_report_file_and_trains(warm_model, tmp_path):
    out = tmp_path / "run"
    lines = []
    config = _smoke(out, warm_model, keep_trainer_states=2)
    records = train(config, log=lines.append)
    assert [r["iteration"] for r in records] == [0, 1, 2]
    for name in ("config.json", "metrics.jsonl", "report.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    assert (out / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for it in range(3):
        for name in FILES:
            # --keep_trainer_states 2: the oldest checkpoint keeps its model and report, not its trainer state.
            kept = it > 0 or not name.startswith("trainer/")
            assert (out / "checkpoints" / f"iter_{it:04d}" / name).is_file() == kept, (it, name)
    assert [json.loads(x)["iteration"] for x in (out / "metrics.jsonl").read_text().splitlines()] == [0, 1, 2]
    for r in records[1:]:
        assert r["estep/buffer"] > 0 and r["mstep/steps"] > 0 and r["mstep/skipped"] == 0
        assert math.isfinite(r["mstep/loss"]) and math.isfinite(r["mstep/grad_norm"])
        assert r["estep/cells_ok"] > 0 and r["estep/cells_failed"] == 0  # the tool channel worked, and says so
    for r in records:
        assert r["sandbox/isolation"].startswith("namespaces (network netns, processes pidns")
        assert r["eval/cells_ok"] > 0 and r["eval/cells_failed"] == 0
    assert f"sandbox isolation: {records[0]['sandbox/isolation']}" in lines  # printed at the start
    for r in records:  # pass@1 is the share of correct rows in the report saved with the iteration's checkpoint
        rows = json.loads((out / "checkpoints" / f"iter_{r['iteration']:04d}" / "eval.json").read_text())["problems"]
        assert len(rows) == config.eval_problems
        assert r["eval/pass_at_1"] == sum(row["correct"] for row in rows) / config.eval_problems
    start, end = _weights(out, 0), _weights(out, 2)
    assert any(not torch.equal(start[k], end[k]) for k in start), "training changed no parameter"
    assert any(line.startswith("iter 2 | pass@1 ") and f" cells ok {records[2]['estep/cells_ok']} error " in line
               for line in lines)
    # The checkpoint is a Hugging Face directory: transformers loads it.
    from transformers import AutoModelForCausalLM
    hf = AutoModelForCausalLM.from_pretrained(out / "checkpoints" / "iter_0002")
    hf_state = hf.state_dict()
    for k, v in end.items():
        torch.testing.assert_close(hf_state[k], v)
    with pytest.raises(ValueError, match="already holds checkpoints: continue it with --resume"):
        train(_smoke(out, warm_model), log=lambda _: None)


class _BrokenSandbox(Sandbox):
    """A sandbox whose every cell fails in the sandbox itself, as one whose server cannot set cells up."""

    def submit(self, code, history=()):
        future = concurrent.futures.Future()
        future.add_done_callback(self._count)
        future.set_result(Result(CellStatus.FAILED, "", "the sandbox could not set up the cell: test", 0.0))
        return future


def test_a_broken_sandbox_stops_the_run_before_it_trains_on_its_rollouts(warm_model, tmp_path, monkeypatch):
    monkeypatch.setattr(run, "Sandbox", _BrokenSandbox)
    with pytest.raises(SandboxFailed, match=r"eval: \d+ of \d+ cells failed in the sandbox itself, more than "
                                            r"--sandbox.max_failed_share 0.1"):
        train(_smoke(tmp_path / "run", warm_model), log=lambda _: None)
    assert not (tmp_path / "run" / "checkpoints").exists()  # iteration 0's evaluation was not saved as if sound
    config = _smoke(tmp_path / "tolerant", warm_model, iterations=1)
    config = dataclasses.replace(config, sandbox=SandboxConfig(max_failed_share=1.0))  # the threshold is the knob
    records = train(config, log=lambda _: None)
    assert records[1]["estep/cells_failed"] > 0 and records[1]["estep/cells_ok"] == 0


def test_data_order_is_a_function_of_seed_and_iteration():
    config = dataclasses.replace(smoke_preset(), problems_per_iter=5)
    train_set, held_out = problems_of(config)
    assert not {p.problem for p in train_set} & {p.problem for p in held_out}
    first = [iteration_problems(train_set, config, i) for i in (1, 2, 3)]
    assert first == [iteration_problems(train_set, config, i) for i in (1, 2, 3)]
    # Consecutive iterations walk through the shuffled set: no problem twice within an epoch.
    ids = [p.id for batch in first for p in batch]
    assert len(ids) == len(set(ids)) or len(ids) > len(train_set)
    other = dataclasses.replace(config, seed=1)
    assert iteration_problems(problems_of(other)[0], other, 1) != first[0]
    # The held-out set does not depend on the seed: every seed is scored on the same problems.
    assert problems_of(other)[1] == held_out


def test_data_files_and_their_errors(tmp_path):
    rows = [{"problem": f"What is {i}+1?", "answer": str(i + 1)} for i in range(10)]
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = dataclasses.replace(smoke_preset(), data=str(data), eval_problems=3)
    train_set, held_out = problems_of(config)
    assert len(train_set) == 7 and len(held_out) == 3
    with pytest.raises(ValueError, match="would hold out all 10 problems"):
        problems_of(dataclasses.replace(config, eval_problems=10))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"problem": "x"}\n')
    with pytest.raises(ValueError, match="bad.jsonl"):
        problems_of(dataclasses.replace(config, data=str(bad)))
    with pytest.raises(ValueError, match="no config.json"):
        train(dataclasses.replace(config, model=str(tmp_path), out_dir=str(tmp_path / "r")), log=lambda _: None)


def test_a_float16_checkpoint_is_refused_with_the_fix(tmp_path):
    from acim_fast.embedded.tiny import create_tiny
    from acim_fast.engine.model import CausalLM

    path = create_tiny(tmp_path / "tiny")
    CausalLM.from_pretrained(path).to(torch.float16).save_pretrained(path)
    with pytest.raises(ValueError, match=r"is float16: .*pass --dtype bfloat16"):
        train(_smoke(tmp_path / "run", path), log=lambda _: None)
    assert not torch.distributed.is_initialized()


def test_a_jsonl_dataset_trains_with_the_same_code(warm_model, tmp_path):
    """--data / --eval_data: problems in the task's wording, as a user's jsonl files."""
    def write(name, problems):
        path = tmp_path / name
        path.write_text("".join(json.dumps({"problem": p.question, "answer": p.answer, "id": f"{name}-{i}"}) + "\n"
                                for i, p in enumerate(problems)))
        return str(path)

    from acim_fast.embedded.task import generate
    config = dataclasses.replace(_smoke(tmp_path / "run", warm_model, iterations=1),
                                 data=write("train.jsonl", generate(16, seed=3, split="train", families=("mul",))),
                                 eval_data=write("eval.jsonl", generate(4, seed=3, split="eval", families=("mul",))))
    records = train(config, log=lambda _: None)
    assert records[1]["estep/problems"] == config.problems_per_iter and records[1]["estep/rollouts"] > 0
    assert records[1]["mstep/steps"] > 0 and math.isfinite(records[1]["mstep/loss"])
    report = json.loads((tmp_path / "run" / "checkpoints" / "iter_0001" / "eval.json").read_text())
    assert [p["id"] for p in report["problems"]] == [f"eval.jsonl-{i}" for i in range(4)]


@pytest.mark.slow
def test_embedded_default_creates_and_warms_up_its_model(tmp_path):
    config = _smoke(tmp_path / "run", None, warmup_steps=3, iterations=1, problems_per_iter=2, eval_problems=2)
    records = train(config, log=lambda _: None)
    assert (tmp_path / "run" / "warmup" / "model.safetensors").is_file()
    assert not (tmp_path / "run" / ".warmup.tmp").exists()
    assert [r["iteration"] for r in records] == [0, 1]


def _start(args, cwd):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "acim_fast.run", *args], cwd=cwd, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def _kill_when(proc, ready, timeout=300):
    deadline = time.monotonic() + timeout
    while not ready():
        assert proc.poll() is None, f"the run ended before it could be killed: {proc.stderr.read().decode()[-2000:]}"
        assert time.monotonic() < deadline, "the run made no progress"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def test_sigkill_at_any_moment_resumes_to_the_uninterrupted_result(warm_model, tmp_path):
    config = _smoke(tmp_path / "reference", warm_model)
    train(config, log=lambda _: None)
    run = tmp_path / "killed"
    args = ["--preset", "smoke", "--model", str(warm_model), "--out_dir", str(run)]
    ckpts = run / "checkpoints"
    # Kill 1: in the middle of iteration 1 (the checkpoint of iteration 0 exists, not yet that of 1).
    proc = _start(args, tmp_path)
    _kill_when(proc, lambda: (ckpts / "iter_0000").is_dir())
    # Kill 2: while a checkpoint is being written (its temporary directory exists), whichever comes first.
    proc = _start(["--resume", str(run)], tmp_path)
    _kill_when(proc, lambda: ckpts.is_dir() and any(p.name.startswith(".tmp-") for p in ckpts.iterdir())
               or (ckpts / "iter_0002").is_dir())
    # Resume to the end.
    done = subprocess.run([sys.executable, "-m", "acim_fast.run", "--resume", str(run)], cwd=tmp_path,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "resuming after" in done.stdout
    assert not [p for p in ckpts.iterdir() if p.name.startswith(".tmp-")]
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in lines] == [0, 1, 2]  # no iteration lost, none twice
    reference = [json.loads(x) for x in (tmp_path / "reference" / "metrics.jsonl").read_text().splitlines()]
    for mine, ref in zip(lines, reference):
        for key in ("estep/rollouts", "estep/buffer", "eval/pass_at_1", "eval/code_use_rate"):
            assert mine.get(key) == ref.get(key), (mine["iteration"], key)
    # Same data order, seeds and optimiser state: the same weights, up to float summation order in the sampler.
    final, expected = _weights(run, 2), _weights(tmp_path / "reference", 2)
    for k in expected:
        torch.testing.assert_close(final[k], expected[k], rtol=1e-4, atol=1e-5)


def _masters(run_dir, iteration, tmp_path):
    """The trainer's own weights saved in a checkpoint's trainer state (torch.distributed.checkpoint format)."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    out = tmp_path / f"masters-{Path(run_dir).name}-{iteration}.pt"
    dcp_to_torch_save(Path(run_dir) / "checkpoints" / f"iter_{iteration:04d}" / "trainer", out)
    return torch.load(out, weights_only=False)["model"]


def test_a_bf16_model_trains_fp32_master_weights_in_one_process_and_resumes_exactly(warm_model, tmp_path):
    """A bf16 sampler with the model trained in place would round AdamW's small updates away; one process trains an
    fp32 master copy instead (FSDP2's mixed precision in a world of one), exports its bf16 rounding, and saves the
    masters with the trainer state, so a killed run resumes to the same masters."""
    reference = tmp_path / "reference"
    train(_smoke(reference, warm_model, dtype="bfloat16"), log=lambda _: None)
    assert not torch.distributed.is_initialized(), "the world of one was not left"
    initial = load_file(Path(warm_model) / "model.safetensors")  # fp32: the masters start from it exactly
    masters, export = _masters(reference, 2, tmp_path), _weights(reference, 2)
    below_bf16 = 0
    for name, value in masters.items():
        assert value.dtype == torch.float32 and export[name].dtype == torch.bfloat16, name
        assert torch.equal(export[name], value.to(torch.bfloat16)), name  # the samplers run the masters, rounded
        # Updates that bf16 weights could not hold yet: the master moved, its bf16 rounding did not.
        below_bf16 += int(((value != initial[name]) & (export[name] == initial[name].to(torch.bfloat16))).sum())
    assert below_bf16 > 0

    run = tmp_path / "killed"
    proc = _start(["--preset", "smoke", "--model", str(warm_model), "--dtype", "bfloat16", "--out_dir", str(run)],
                  tmp_path)
    _kill_when(proc, lambda: (run / "checkpoints" / "iter_0001").is_dir())
    done = subprocess.run([sys.executable, "-m", "acim_fast.run", "--resume", str(run)], cwd=tmp_path,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    for name, value in _masters(run, 2, tmp_path).items():
        torch.testing.assert_close(value, masters[name], rtol=1e-4, atol=1e-5)




def test_the_kl_reference_is_the_starting_model_also_on_resume(tmp_path):
    """Without a warm model: with a checkpoint to resume from, the weights to start from are the checkpoint's but the
    KL's reference is still the run's starting model (and is neither found nor loaded when kl_coef is 0)."""
    from acim_fast.embedded.tiny import create_tiny
    from acim_fast.train.dist import Ranks

    model = create_tiny(tmp_path / "model")
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints" / "iter_0001").mkdir(parents=True)
    kl = _smoke(run_dir, model, loss=dataclasses.replace(smoke_preset().loss, kl_coef=0.05))
    last = run_dir / "checkpoints" / "iter_0001"
    assert run._starting_point(kl, run_dir, Ranks(None), print) == (last, last, model)
    assert run._starting_point(_smoke(run_dir, model), run_dir, Ranks(None), print) == (last, last, None)
    reference = run._reference(kl, model, Ranks(None), torch.float32)
    saved, state = load_file(model / "model.safetensors"), reference.state_dict()
    assert saved.keys() <= state.keys()
    for name, value in saved.items():
        assert torch.equal(state[name], value), name
    assert run._reference(_smoke(run_dir, model), None, Ranks(None), torch.float32) is None


class _Stop(Exception):
    pass


def test_a_kl_run_resumes_against_its_starting_model(warm_model, tmp_path, monkeypatch):
    """--loss.kl_coef: the reference is the run's starting model, also after --resume (not the checkpoint it resumes
    from): a run stopped after iteration 1 and resumed gives the uninterrupted run's metrics, mstep/kl included."""
    def config(name):
        return _smoke(tmp_path / name, warm_model, loss=dataclasses.replace(smoke_preset().loss, kl_coef=0.05))

    whole = train(config("whole"), log=lambda _: None)
    assert all(r["mstep/kl"] > 0 for r in whole[1:])  # the first step's KL is 0 (the policy is the reference)
    save = run.checkpoint.save

    def save_then_stop(run_dir, iteration, *args, **kwargs):
        path = save(run_dir, iteration, *args, **kwargs)
        if iteration == 1:
            raise _Stop
        return path

    monkeypatch.setattr(run.checkpoint, "save", save_then_stop)
    with pytest.raises(_Stop):
        train(config("stopped"), log=lambda _: None)
    monkeypatch.setattr(run.checkpoint, "save", save)
    resumed = train(config("stopped"), resume_dir=tmp_path / "stopped", log=lambda _: None)
    assert [r["iteration"] for r in resumed] == [0, 1, 2]
    for key in ("estep/buffer", "mstep/kl", "mstep/loss", "eval/pass_at_1"):
        assert resumed[2][key] == pytest.approx(whole[2][key], rel=1e-6, abs=1e-9), key
