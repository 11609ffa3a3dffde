"""common.train: kill-and-resume bit-exactness, multi-process accelerate launch, non-finite loss."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from common.train import NonFiniteLossError, TrainConfig, latest_checkpoint, train
from tests.conftest import PYTHON, REPO, subprocess_env

TOY = str(REPO / "tests" / "helpers" / "toy_train.py")


def _run(out: Path, *args: str, timeout: float = 180) -> dict:
    subprocess.run([PYTHON, TOY, str(out), *args], check=True, env=subprocess_env(), timeout=timeout,
                   capture_output=True)
    return json.loads((out / "final.json").read_text())


@pytest.mark.slow
def test_sigkill_and_resume_is_bit_exact(tmp_path):
    ref = _run(tmp_path / "ref", "--steps", "12")
    killed_dir = tmp_path / "killed"
    proc = subprocess.Popen([PYTHON, TOY, str(killed_dir), "--steps", "12", "--sleep", "0.4"],
                            env=subprocess_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and not (killed_dir / "step_00000006").exists():
        assert proc.poll() is None, "toy run ended before it could be killed"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (killed_dir / "final.json").exists(), "the run finished before SIGKILL: nothing was tested"
    ckpt = latest_checkpoint(killed_dir)
    assert ckpt is not None and 6 <= int(ckpt.name.split("_")[1]) < 12
    resumed = _run(killed_dir, "--steps", "12")
    assert resumed["resumed_from"] is not None and resumed["resumed_from"] >= 6
    assert resumed["weights_sha256"] == ref["weights_sha256"]
    assert resumed["final_loss"] == ref["final_loss"]


def test_half_written_checkpoint_is_ignored(tmp_path):
    (tmp_path / ".tmp-step_00000008").mkdir()
    (tmp_path / "step_00000004").mkdir()
    (tmp_path / "step_00000004" / "COMPLETE.json").write_text("{}")
    (tmp_path / "step_00000006").mkdir()  # no COMPLETE marker: a rename never happens without one
    assert latest_checkpoint(tmp_path).name == "step_00000004"


@pytest.mark.slow
def test_accelerate_launch_two_processes(tmp_path):
    """`accelerate launch --multi_gpu --num_processes 2` on CPU gives a gloo world of 2 (torchrun).

    (`--cpu --num_processes 2` silently runs ONE process unless MPI is set up; see README.)"""
    out = tmp_path / "ddp"
    cmd = [str(Path(PYTHON).parent / "accelerate"), "launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port",
           "29517", TOY, str(out), "--steps", "4"]
    proc = subprocess.run(cmd, env=subprocess_env(), capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads((out / "final.json").read_text())
    assert res["world_size"] == 2
    assert res["step"] == 4 and torch.isfinite(torch.tensor(res["final_loss"]))


def test_nonfinite_loss_stops_with_clear_error(tmp_path):
    model = torch.nn.Linear(3, 1)
    data = [torch.ones(3) for _ in range(8)]

    calls = []

    def loss_fn(m, batch):
        calls.append(1)
        out = m(batch).mean()
        return out * float("nan") if len(calls) >= 2 else out  # NaN from the 2nd step on

    cfg = TrainConfig(max_steps=5, batch_size=2, lr=0.1, checkpoint_every=0)
    with pytest.raises(NonFiniteLossError, match="non-finite loss .* at step 2"):
        train(model, data, cfg, tmp_path, loss_fn=loss_fn)


def test_losses_decrease_on_learnable_task(tmp_path):
    torch.manual_seed(0)
    x = torch.randn(64, 4)
    y = x @ torch.tensor([1.0, -2.0, 0.5, 3.0])
    data = list(zip(x, y))

    def loss_fn(m, batch):
        xb, yb = batch
        return torch.nn.functional.mse_loss(m(xb).squeeze(-1), yb)

    cfg = TrainConfig(max_steps=60, batch_size=8, lr=0.05, lr_schedule="constant", checkpoint_every=20)
    res = train(torch.nn.Linear(4, 1), data, cfg, tmp_path, loss_fn=loss_fn)
    assert res.step == 60 and res.final_loss < 0.05 * res.losses[0]
    assert latest_checkpoint(tmp_path).name == "step_00000060"
    assert len(list(tmp_path.glob("step_*"))) == cfg.keep_checkpoints


def test_a_shared_accelerator_checkpoints_only_the_current_run(tmp_path):
    """Consecutive train() calls on one accelerator (the curriculum study's runs): each checkpoint holds
    only its own model and optimizer, and a fresh process (a new accelerator) resumes it. Before the fix the
    k-th run's checkpoint held k models and k progress objects and a fresh accelerator refused it."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from common.train import make_accelerator

    def make_model():
        torch.manual_seed(0)
        return GPT2LMHeadModel(GPT2Config(vocab_size=64, n_positions=16, n_embd=16, n_layer=1, n_head=2))

    def make_data():
        rows = torch.randint(0, 64, (32, 16), generator=torch.Generator().manual_seed(1))
        return [{"input_ids": r, "labels": r} for r in rows]

    cfg = TrainConfig(max_steps=4, batch_size=4, lr=1e-3, checkpoint_every=2, cpu=True, log_with="none")
    shared = make_accelerator(cfg)
    for k in range(3):
        train(make_model(), make_data(), cfg, tmp_path / f"run{k}", accelerator=shared)
    last = latest_checkpoint(tmp_path / "run2")
    weights = [p for p in last.iterdir() if p.name.startswith(("model", "pytorch_model"))]
    optims = [p for p in last.iterdir() if p.name.startswith("optimizer")]
    assert len(weights) == 1 and len(optims) == 1, sorted(p.name for p in last.iterdir())
    longer = TrainConfig(max_steps=6, batch_size=4, lr=1e-3, checkpoint_every=2, cpu=True, log_with="none")
    res = train(make_model(), make_data(), longer, tmp_path / "run2", accelerator=make_accelerator(longer))
    assert res.resumed_from == 4 and res.step == 6
