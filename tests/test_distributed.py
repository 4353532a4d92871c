"""Data-parallel training and precision: 2 gloo processes match 1 process; bf16/fp16 autocast trains on CPU.

Two levels of evidence for the distributed path:
- exact: with batch norm in eval mode (no batch statistics), the gradients that 2 ranks average from their shards
  equal the single-process gradient of the global batch to float rounding (``torch.multiprocessing`` spawn, gloo);
- end to end: ``torchrun --nproc_per_node 2 -m dvn_cli train`` ends within a stated tolerance of
  ``dvn train`` with the same global batch. The gap comes from batch-norm statistics, which are per rank
  (each rank normalises its own B/2 images); measured on this setup: 0.8% relative L2 difference of the weights,
  against 66% between two seeds.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from safetensors import safe_open
from typer.testing import CliRunner

from dvn_cli.cli.app import app
from dvn_cli.config import TrainConfig
from dvn_cli.core.layers import UnitConv2d
from dvn_cli.data.batches import TaskBatches
from dvn_cli.errors import BadConfig, DvnError
from dvn_cli.modelfile.checkpoint import STATE_FORMAT, load_checkpoint
from dvn_cli.modelfile.container import read_dvn_file, read_metadata, write_dvn_file
from dvn_cli.training.distributed import DistEnv, PeerFailed, ShardedBatches, detect_env
from dvn_cli.training.loop import fit
from dvn_cli.training.observer import TrainObserver
from dvn_cli.training.schedule import resolve_precision

from .conftest import REPO, make_image_folder, synthetic_task, tiny_config, tiny_train_config, two_synthetic_tasks

VENV_BIN = Path(sys.executable).parent
TOLERANCE_WEIGHTS = 0.05  # relative L2 difference of all weights, 2 processes vs 1 (measured 0.008)
TOLERANCE_LOSS = 0.10  # relative difference of every epoch's mean training loss (measured <= 0.04)


# ---------------------------------------------------------------------------------------------- environment


def test_detect_env_reads_torchrun_variables():
    assert detect_env({}) == DistEnv(0, 1, 0)
    env = detect_env({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1"})
    assert env == DistEnv(3, 4, 1) and env.distributed and not env.is_main
    with pytest.raises(BadConfig, match="bad torchrun environment: RANK=4 WORLD_SIZE=4"):
        detect_env({"RANK": "4", "WORLD_SIZE": "4"})
    with pytest.raises(BadConfig, match="must be integers"):
        detect_env({"WORLD_SIZE": "two"})


def test_shards_of_two_ranks_make_up_the_single_process_batch():
    data = synthetic_task("alpha", 3, n=64, seed=1)
    single = TaskBatches(data, 16, seed=5)
    shards = [ShardedBatches(TaskBatches(data, 16, seed=5), DistEnv(r, 2, r)) for r in range(2)]
    for _ in range(5):  # crosses an epoch boundary (48 images / 16)
        x, y = next(single)
        parts = [next(s) for s in shards]
        assert torch.equal(torch.cat([p[0] for p in parts]), x) and torch.equal(torch.cat([p[1] for p in parts]), y)
        assert all(len(p[1]) == 8 for p in parts)
    with pytest.raises(BadConfig, match="batch size 15 is not divisible by the 2 processes; use a --batch-size"):
        ShardedBatches(TaskBatches(data, 15), DistEnv(0, 2, 0))
    with pytest.raises(BadConfig, match=r"batch size 45 \(task 'alpha' has only 45 training images\)"):
        ShardedBatches(TaskBatches(synthetic_task("alpha", 3, n=60), 64), DistEnv(0, 2, 0))


# --------------------------------------------------------------------------------- 2 gloo processes, exact


def _exact_worker(rank: int, world: int, rendezvous: str) -> None:
    """One rank: averaged shard gradients == global-batch gradient; None grads; buffers; agree()."""
    import torch.distributed as dist

    from dvn_cli.core.network import build_network
    from dvn_cli.training.distributed import agree, all_reduce_gradients, average_buffers, broadcast_module
    from dvn_cli.training.loss import multitask_loss

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=world)
    try:
        env = DistEnv(rank, world, rank)
        data = [synthetic_task("alpha", 3, n=64, seed=1), synthetic_task("beta", 4, n=64, seed=2)]
        torch.manual_seed(100 + rank)  # different on purpose: broadcast_module must make them equal
        network = build_network(tiny_config(), [d.spec for d in data]).eval()  # eval: BN has no batch statistics
        broadcast_module(network)
        streams = [TaskBatches(d, 16, seed=7, task_index=i) for i, d in enumerate(data)]
        global_batches = [next(s) for s in streams]

        network.zero_grad()
        reference, _ = multitask_loss(network, global_batches)
        reference.backward()
        expected = {n: p.grad.clone() for n, p in network.named_parameters()}

        network.zero_grad(set_to_none=True)
        shards = [ShardedBatches(TaskBatches(d, 16, seed=7, task_index=i), env) for i, d in enumerate(data)]
        loss, task_losses = multitask_loss(network, [next(s) for s in shards])
        loss.backward()
        averaged = all_reduce_gradients(list(network.parameters()), torch.tensor(task_losses))
        assert abs(float(averaged.sum()) - float(reference)) < 1e-5 * float(reference)
        for name, p in network.named_parameters():
            torch.testing.assert_close(p.grad, expected[name], rtol=1e-5, atol=1e-7, msg=name)

        # None counts as zeros; no gradient on any rank stays None.
        a, b = torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.zeros(2))
        if rank == 0:
            a.grad = torch.full((3,), 4.0)
        all_reduce_gradients([a, b])
        assert torch.equal(a.grad, torch.full((3,), 4.0 / world)) and b.grad is None

        bn = torch.nn.BatchNorm1d(2)
        bn.running_mean.fill_(float(rank))
        average_buffers(bn)
        assert torch.allclose(bn.running_mean, torch.full((2,), (world - 1) / 2))

        agree(None)
        try:
            agree(DvnError("disk full") if rank == 1 else None)
            raise AssertionError("agree() did not raise")
        except PeerFailed as exc:
            assert rank == 0 and str(exc) == "rank 1 stopped: disk full"
        except DvnError as exc:
            assert rank == 1 and str(exc) == "disk full"
    finally:
        dist.destroy_process_group()


def test_two_gloo_processes_average_gradients_exactly(tmp_path):
    mp.spawn(_exact_worker, args=(2, str(tmp_path / "rendezvous")), nprocs=2, join=True)


# ------------------------------------------------------------------------------ torchrun, end to end vs 1 process


def _train_args(base: Path, out: Path) -> list[str]:
    return [
        "train", "--tasks", f"colours={base / 'colours'},bands={base / 'bands'}", "--depth", "8",
        "--widths", "8,16,32", "--input-size", "16", "--epochs", "4", "--batch-size", "16", "--lr", "0.02",
        "--warmup-steps", "2", "--seed", "0", "--data-root", str(base / "data"), "--out", str(out),
    ]  # fmt: skip


def _relative_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    keys = [k for k in a if a[k].is_floating_point() and "running" not in k]
    num = sum(float(((a[k] - b[k]) ** 2).sum()) for k in keys) ** 0.5
    return num / sum(float((a[k] ** 2).sum()) for k in keys) ** 0.5


def _epoch_losses(run: Path) -> list[float]:
    return [sum(json.loads(line)["train_loss"].values()) for line in (run / "metrics.jsonl").read_text().splitlines()]


TEARDOWN_ABORT = "terminate called without an active exception"


def _run_torchrun(command: list[str], env: dict[str, str], out: Path) -> subprocess.CompletedProcess:
    """Run torchrun; retry ONCE when a rank aborted in process-group teardown after the run had finished.

    Why a retry: in 1 of 5 full-suite runs under heavy load, rank 1 aborted with "terminate called without an
    active exception" after the finished checkpoint was written (gloo teardown), and 40 direct runs did not
    reproduce it. ``shutdown_distributed`` now waits at a barrier first; any other failure, or the same one
    twice, still fails the test.
    """
    proc = subprocess.run(command, capture_output=True, text=True, env=env, cwd=REPO, timeout=120)
    checkpoint = out / "model.safetensors"
    finished = checkpoint.is_file() and read_metadata(checkpoint)["training"].get("finished") is True
    if proc.returncode != 0 and TEARDOWN_ABORT in proc.stderr and finished:
        shutil.rmtree(out)
        proc = subprocess.run(command, capture_output=True, text=True, env=env, cwd=REPO, timeout=120)
    return proc


def test_torchrun_two_processes_match_one_process_within_tolerance(tmp_path):
    make_image_folder(tmp_path / "colours", ("red", "green", "blue"), per_class=16)
    make_image_folder(tmp_path / "bands", ("top", "middle"), per_class=12)
    one, two = tmp_path / "one", tmp_path / "two"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    torchrun = [str(VENV_BIN / "torchrun"), "--standalone", "--nproc_per_node", "2", "-m", "dvn_cli"]
    proc = _run_torchrun([*torchrun, *_train_args(tmp_path, two)], env, two)
    assert proc.returncode == 0, proc.stderr[-3000:]
    single = CliRunner().invoke(app, _train_args(tmp_path, one))
    assert single.exit_code == 0, single.output

    # only rank 0 wrote and printed; the checkpoint loads like any other and says how it was trained
    assert sorted(p.name for p in two.iterdir()) == [
        "config.json",
        "metrics.jsonl",
        "model.safetensors",
        "train_state.safetensors",
    ]
    assert proc.stdout.count("validation accuracy, task x level") == 1
    assert proc.stderr.count("epoch 4 (step 8") == 1 and "Traceback" not in proc.stderr
    training = read_metadata(two / "model.safetensors")["training"]
    assert training["world_size"] == 2 and training["finished"] and training["steps"] == 8

    a = load_checkpoint(one / "model.safetensors").network.state_dict()
    b = load_checkpoint(two / "model.safetensors").network.state_dict()
    assert _relative_difference(b, a) < TOLERANCE_WEIGHTS
    for x, y in zip(_epoch_losses(two), _epoch_losses(one), strict=True):
        assert abs(x - y) <= TOLERANCE_LOSS * y, (_epoch_losses(two), _epoch_losses(one))


# ------------------------------------------------------------------------------------------------ precision


def _cfg(tmp_path: Path, **overrides) -> TrainConfig:
    return tiny_train_config(tmp_path, **{"epochs": 4, **overrides})


class RecordLosses(TrainObserver):
    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_step(self, info) -> None:
        self.losses.append(sum(info.task_losses.values()))


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_autocast_on_cpu_lowers_the_loss_and_keeps_float32_weights(tmp_path, precision):
    record, dtypes = RecordLosses(), set()

    def convolution_dtype(module, _inputs, output) -> None:
        if isinstance(module, UnitConv2d):
            dtypes.add(output.dtype)

    hook = torch.nn.modules.module.register_module_forward_hook(convolution_dtype)
    try:
        result = fit(_cfg(tmp_path, precision=precision, epochs=6), observer=record, data=two_synthetic_tasks())
    finally:
        hook.remove()
    expected = {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    assert expected in dtypes  # the training convolutions ran in the precision asked for
    assert sum(record.losses[-3:]) < 0.8 * sum(record.losses[:3])
    state = load_checkpoint(result.checkpoint).network.state_dict()
    assert all(t.dtype == torch.float32 for t in state.values() if t.is_floating_point())
    assert result.summary["config"]["precision"] == precision


def test_fp16_resume_restores_the_gradient_scaler(tmp_path):
    class StopAt(TrainObserver):
        def on_step(self, info) -> None:
            if info.step == 5:
                raise KeyboardInterrupt

    straight = fit(_cfg(tmp_path / "a", precision="fp16"), data=two_synthetic_tasks())
    with pytest.raises(KeyboardInterrupt):
        fit(_cfg(tmp_path / "b", precision="fp16"), observer=StopAt(), data=two_synthetic_tasks())
    state = tmp_path / "b" / "run" / "train_state.safetensors"
    assert read_metadata(state)["step"] == 5
    with safe_open(str(state), framework="pt") as f:
        assert {"amp.scale", "amp.growth_tracker"} <= set(f.keys())
    resumed = fit(_cfg(tmp_path / "b", precision="fp16"), resume=True, data=two_synthetic_tasks())
    a = load_checkpoint(straight.checkpoint).network.state_dict()
    b = load_checkpoint(resumed.checkpoint).network.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_precision_may_change_on_resume_and_older_state_files_resume(tmp_path):
    class StopAt(TrainObserver):
        def on_step(self, info) -> None:
            if info.step == 3:
                raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        fit(_cfg(tmp_path), observer=StopAt(), data=two_synthetic_tasks())
    state = tmp_path / "run" / "train_state.safetensors"
    tensors, meta = read_dvn_file(state, (STATE_FORMAT,))
    assert "precision" not in meta["config"]  # how a run computes, like --device, may change on resume
    del meta["config"]["distill"]  # as a dvn from before a field existed wrote it: the default is assumed
    write_dvn_file(state, tensors, STATE_FORMAT, {k: v for k, v in meta.items() if k not in ("format", "version")})
    result = fit(_cfg(tmp_path, precision="bf16"), resume=True, data=two_synthetic_tasks())
    assert result.summary["finished"] and result.summary["config"]["precision"] == "bf16"
    with pytest.raises(BadConfig, match="another configuration"):
        fit(_cfg(tmp_path, seed=4), resume=True, data=two_synthetic_tasks())


def test_precision_is_checked_early_and_on_the_command_line(tmp_path):
    with pytest.raises(BadConfig, match="unknown precision 'fp8'; use fp32, bf16, fp16"):
        _cfg(tmp_path, precision="fp8")
    assert resolve_precision("fp32", torch.device("cpu")) is None
    assert resolve_precision("bf16", torch.device("cpu")) is torch.bfloat16
    result = CliRunner().invoke(app, ["train", "--tasks", "mnist", "--precision", "half", "--data-root", str(tmp_path)])
    assert result.exit_code == 1
    assert result.stderr == "error: unknown precision 'half'; use fp32, bf16, fp16\n"
    folder = make_image_folder(tmp_path / "colours", per_class=4)
    fp16 = CliRunner().invoke(
        app,
        ["train", "--tasks", f"colours={folder}", "--precision", "fp16", "--epochs", "1", "--depth", "8",
         "--widths", "8,16,32", "--input-size", "16", "--batch-size", "4", "--out", str(tmp_path / "run")],
    )  # fmt: skip
    assert fp16.exit_code == 0, fp16.output
    assert fp16.stderr.startswith("note: fp16 on CPU has no fast kernels")
