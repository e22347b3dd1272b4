"""acim_fast.loggers: metrics.jsonl and the --log backends. TensorBoard's events read back equal the jsonl lines,
once per step across a resume; wandb writes an offline run under the run directory and resumes its id; the mode
rule; a missing package's error names the pip extra; the flag is validated at parse time."""

import dataclasses
import json
import sys

import numpy as np
import pytest

from acim_fast.config import Config, parse_args, smoke_preset
from acim_fast.loggers import WANDB_ID_FILE, MetricsLog, require, wandb_mode
from acim_fast.report import read_metrics


def _record(it, loss):
    return {"iteration": it, "algo": "em", "sandbox/isolation": "weak", "eval/pass_at_1": 0.25 * it,
            "mstep/loss": loss, "estep/buffer": 10 + it, "eval/code_success": float("nan")}


def test_tensorboard_events_equal_the_jsonl_lines_once_per_step_across_a_resume(tmp_path, tensorboard_scalars):
    log = MetricsLog(tmp_path, ["tensorboard"], first=0)
    for it in range(3):
        log.write(_record(it, 1.0 / (it + 1)))
    log.close()  # the process dies after iteration 2's line, before its checkpoint: iteration 2 is redone
    kept = [r for r in read_metrics(tmp_path) if r["iteration"] < 2]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in kept))  # as run.resume does
    log = MetricsLog(tmp_path, ["tensorboard"], first=2)
    for it in (2, 3):
        log.write(_record(it, -1.0 - it))
    log.close()

    lines = read_metrics(tmp_path)
    assert [r["iteration"] for r in lines] == [0, 1, 2, 3]
    scalars = tensorboard_scalars(tmp_path)
    assert set(scalars) == {"eval/pass_at_1", "mstep/loss", "estep/buffer"}  # no strings, no NaN-only tag
    for tag, points in scalars.items():
        assert [step for step, _ in points] == [0, 1, 2, 3], tag  # the interrupted iteration 2 is read once
        for (step, value), line in zip(points, lines):
            assert value == np.float32(line[tag]), (tag, step)  # event values are float32
    assert scalars["mstep/loss"][2][1] == -3.0  # the redone attempt's value, not the interrupted one's
    assert lines[0]["eval/code_success"] is None


def test_without_backends_only_the_jsonl_is_written(tmp_path):
    log = MetricsLog(tmp_path)
    log.write(_record(0, float("inf")))
    log.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl"]
    assert read_metrics(tmp_path)[0]["mstep/loss"] is None


def test_wandb_writes_an_offline_run_under_the_run_dir_and_resumes_its_id(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    for name in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_DIR", "WANDB_RUN_ID", "WANDB_RESUME"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # no netrc login
    monkeypatch.setenv("WANDB_SILENT", "true")
    config = smoke_preset().to_dict()
    (tmp_path / "run").mkdir()
    for first in (0, 2):  # a run, then its resume
        log = MetricsLog(tmp_path / "run", ["wandb"], first=first, config=config)
        log.write(_record(first, 0.5))
        log.close()
    run_id = (tmp_path / "run" / WANDB_ID_FILE).read_text()
    runs = sorted((tmp_path / "run" / "wandb").glob("offline-run-*"))
    assert len(runs) == 2 and all(r.name.endswith(f"-{run_id}") for r in runs)  # one id: one wandb run
    data = (runs[0] / f"run-{run_id}.wandb").read_bytes()
    assert b"eval/pass_at_1" in data and b"mstep/loss" in data and b"problems_per_iter" in data  # metrics, config


def test_wandb_mode_rule(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert wandb_mode() is None  # wandb reads WANDB_MODE itself
    monkeypatch.delenv("WANDB_MODE")
    assert wandb_mode() == "offline"  # no API key
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    monkeypatch.setenv("WANDB_BASE_URL", "https://127.0.0.1")  # nothing listens on 443: no network
    assert wandb_mode(timeout_s=1.0) == "offline"


def test_a_missing_package_names_the_pip_extra(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb raises ImportError
    with pytest.raises(ImportError, match=r"--log wandb needs the wandb package: pip install 'acim-fast\[wandb\]'"):
        require(["tensorboard", "wandb"])
    with pytest.raises(ImportError, match="acim-fast"):
        MetricsLog(tmp_path, ["wandb"])


def test_the_log_flag_is_validated_at_parse_time(capsys):
    assert parse_args([])[0].log == ()
    config, _ = parse_args(["--log", "tensorboard,wandb,tensorboard"])
    assert config.log == ("tensorboard", "wandb")
    assert Config.from_dict(json.loads(config.to_json())) == config  # a resumed run logs where it did
    with pytest.raises(SystemExit):
        parse_args(["--log", "tensorboard,mlflow"])
    assert "Config.log: unknown logging backend(s) ['mlflow']" in capsys.readouterr().err
    with pytest.raises(ValueError, match="Config.log must be a list"):
        Config(log=3)
    assert Config(log="wandb").log == ("wandb",)


@pytest.mark.slow
def test_a_run_logs_to_tensorboard_what_it_writes_to_metrics_jsonl_and_a_resume_adds_no_step(tmp_path,
                                                                                            tensorboard_scalars):
    """The trainer itself (the smoke preset, shrunk: a barely warmed-up model, one iteration), then a resume that
    redoes iteration 1, as after a process killed between its metrics line and its checkpoint."""
    import shutil

    from acim_fast.run import train

    run = tmp_path / "run"
    config = dataclasses.replace(smoke_preset(), out_dir=str(run), warmup_steps=3, iterations=1, problems_per_iter=2,
                                 eval_problems=2, log=("tensorboard",))
    train(config, log=lambda _: None)
    first = _tensorboard_equals_jsonl(run, tensorboard_scalars)
    shutil.rmtree(run / "checkpoints" / "iter_0001")  # iteration 1's line and events exist, its checkpoint not
    train(config, resume_dir=run, log=lambda _: None)
    again = _tensorboard_equals_jsonl(run, tensorboard_scalars)
    assert [r["iteration"] for r in again] == [0, 1]
    assert again[0] == first[0] and again[1]["time_s"] != first[1]["time_s"]  # iteration 1 was redone


def _tensorboard_equals_jsonl(run_dir, tensorboard_scalars):
    """Every numeric, finite value of every metrics.jsonl line is a scalar at its iteration, and nothing else."""
    lines = read_metrics(run_dir)
    scalars = tensorboard_scalars(run_dir)
    assert {"eval/pass_at_1", "estep/buffer", "time_s"} <= set(scalars)
    for tag, points in scalars.items():
        expected = [(r["iteration"], r[tag]) for r in lines if isinstance(r.get(tag), (int, float))]
        assert points == [(step, pytest.approx(value, rel=1e-6)) for step, value in expected], tag  # float32
    return lines
