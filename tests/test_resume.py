"""A run that stops keeps its progress: a stop at any step (Ctrl-C, SIGTERM, a signal inside the forward or inside
the weight update, a streamed task that fails) saves a state that resumes bit for bit, with the same metrics."""

from __future__ import annotations

import contextlib
import json
import os
import signal
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from dvn_cli.data.streaming import StreamFailed
from dvn_cli.modelfile.container import read_metadata
from dvn_cli.training import loop, observer
from dvn_cli.training import step as training_step
from dvn_cli.training.loop import fit
from dvn_cli.training.stops import Interrupted, StopSignals

from .conftest import StopAt, make_image_folder, synthetic_task, tiny_train_config, two_synthetic_tasks


def _memory(where: Path):
    return tiny_train_config(where), two_synthetic_tasks  # 4 steps per epoch, 8 steps


def _affinity(where: Path):
    def tasks():
        return [synthetic_task("alpha", 3, seed=1), synthetic_task("beta", 4, seed=2), synthetic_task("gamma", 3)]

    cfg = tiny_train_config(where, tasks=("alpha", "beta", "gamma"), order_rule="affinity", affinity_steps=6)
    return cfg, tasks  # the warm-up ends at step 6 of 8


def _stream(where: Path):
    base = where.parent
    colours = make_image_folder(base / "colours", per_class=8) if not (base / "colours").exists() else base / "colours"
    bands = base / "bands"
    if not bands.exists():
        make_image_folder(bands, classes=("top", "middle"), per_class=8, seed=5)
    tasks = (f"colours={colours}", f"bands={bands}")
    cfg = tiny_train_config(where, tasks=tasks, data_mode="stream", workers=1, batch_size=8)
    return cfg, lambda: None  # 2 steps per epoch, 4 steps; the workers decode


SLOW = pytest.mark.slow
KINDS = {"memory": _memory, "affinity": _affinity, "stream": _stream, "threads": _memory}
THREADS = {"threads": 2}  # two CPU threads: each task's step runs in its own thread (training.task_threads)


@contextlib.contextmanager
def _cpu_threads(kind: str):
    before = torch.get_num_threads()
    torch.set_num_threads(THREADS.get(kind, 1))
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def sigterm_is_not_fatal():
    """SIGTERM raises an error around each test, so that a run which failed to handle it fails the test rather
    than ending pytest."""

    def safety(signum, frame):
        raise RuntimeError("SIGTERM reached the handler of before the run")

    before = signal.signal(signal.SIGTERM, safety)
    yield safety
    signal.signal(signal.SIGTERM, before)


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """The uninterrupted run of each kind, trained once: kind -> its run folder."""
    runs: dict[str, Path] = {}

    def run(kind: str) -> Path:
        if kind not in runs:
            cfg, data = KINDS[kind](tmp_path_factory.mktemp(kind) / "a")
            with _cpu_threads(kind):
                runs[kind] = Path(fit(cfg, data=data()).checkpoint).parent
        return runs[kind]

    return run


def _signal_on_call(monkeypatch, owner, name: str, call: int, signum: int) -> None:
    """Send ``signum`` to this process from inside ``owner.name`` on its ``call``-th call (1 = the first)."""
    original, calls = getattr(owner, name), []

    def wrapped(*args, **kwargs):
        calls.append(1)
        if len(calls) == call:
            signal.raise_signal(signum)
        return original(*args, **kwargs)

    monkeypatch.setattr(owner, name, wrapped)


def _signal_in_loss(monkeypatch, step: int, tasks: int, signum: int, task: int = 0) -> None:
    """Send ``signum`` from task ``task``'s loss of step ``step`` (``task_loss`` runs once per task and step; in
    a task's thread when the tasks run side by side, and the main thread then takes the signal while it waits)."""
    _signal_on_call(monkeypatch, training_step, "task_loss", (step - 1) * tasks + 1 + task, signum)


def _stop(monkeypatch, tasks: int, how: str, step: int):
    """Arrange the stop; returns the observer and the step the saved state must be at."""
    if how == "observer":  # Ctrl-C between steps (an exception from the progress display)
        return StopAt(step), step
    if how == "forward":  # SIGTERM while the step computes its loss: the step is undone
        _signal_in_loss(monkeypatch, step, tasks, signal.SIGTERM)
        return None, step - 1
    if how == "second task":  # SIGTERM once the first task's forwards have updated its batch-norm statistics
        _signal_in_loss(monkeypatch, step, tasks, signal.SIGTERM, task=1)
        return None, step - 1
    # SIGINT while the optimiser updates the weights: the update (and the placement after a warm-up) ends first
    _signal_on_call(monkeypatch, torch.amp.GradScaler, "step", step, signal.SIGINT)
    return None, step


def _history(run: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in row.items() if k != "seconds"} for row in rows]


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def _assert_same_run(a: Path, b: Path) -> None:
    """Every tensor of the checkpoint and of the training state, and the logged metrics, are equal."""
    for name in ("model.safetensors", "train_state.safetensors"):
        ta, tb = _tensors(a / name), _tensors(b / name)
        assert ta.keys() == tb.keys(), name
        different = [k for k in ta if not torch.equal(ta[k], tb[k])]
        assert not different, f"{name}: {len(different)} of {len(ta)} tensors differ, e.g. {different[:3]}"
    assert _history(a) == _history(b)


@pytest.mark.parametrize(
    ("kind", "how", "step"),
    [
        pytest.param("memory", "observer", 3, marks=SLOW),  # mid-epoch
        pytest.param("memory", "observer", 4, marks=SLOW),  # at an epoch end, before its validation: --resume validates
        ("memory", "forward", 6),
        ("memory", "second task", 3),  # the batch norms' running statistics are undone too
        pytest.param("memory", "update", 5, marks=SLOW),
        pytest.param("affinity", "forward", 4, marks=SLOW),  # inside the warm-up
        pytest.param("affinity", "update", 6, marks=SLOW),  # the step that ends the warm-up and places the tasks
        pytest.param("affinity", "forward", 8, marks=SLOW),  # after it
        pytest.param("stream", "forward", 3, marks=SLOW),  # mid-epoch, the workers restarted where the stream stood
        pytest.param("stream", "update", 1, marks=SLOW),
        ("threads", "forward", 3),  # the signal raised in a task's thread
        pytest.param("threads", "update", 6, marks=SLOW),
    ],
)
def test_a_stop_at_any_step_resumes_bit_for_bit(tmp_path, monkeypatch, straight, kind, how, step):
    cfg, data = KINDS[kind](tmp_path / "b")
    observer, saved_step = _stop(monkeypatch, len(cfg.tasks), how, step)
    with _cpu_threads(kind), pytest.raises(KeyboardInterrupt) as caught:
        fit(cfg, observer=observer, data=data())
    monkeypatch.undo()
    run = Path(cfg.out)
    assert caught.value.result.summary["steps"] == saved_step == read_metadata(run / "train_state.safetensors")["step"]
    assert not (run / ".lock").exists()
    with _cpu_threads(kind):
        fit(cfg, resume=True, data=data())
    _assert_same_run(straight(kind), run)


def test_sigterm_saves_and_names_its_signal(tmp_path, monkeypatch, sigterm_is_not_fatal):
    cfg = tiny_train_config(tmp_path, epochs=1)
    _signal_in_loss(monkeypatch, 3, 2, signal.SIGTERM)
    with pytest.raises(Interrupted) as caught:
        fit(cfg, data=two_synthetic_tasks())
    assert caught.value.signum == signal.SIGTERM
    assert caught.value.result.interrupted and caught.value.result.summary["steps"] == 2
    assert read_metadata(tmp_path / "run" / "train_state.safetensors")["step"] == 2
    assert not (tmp_path / "run" / ".lock").exists()
    assert signal.getsignal(signal.SIGTERM) is sigterm_is_not_fatal  # the handler of before the run is back


def test_a_stop_before_the_first_step_saves_nothing(tmp_path, monkeypatch):
    _signal_in_loss(monkeypatch, 1, 2, signal.SIGTERM)
    with pytest.raises(Interrupted) as caught:
        fit(tiny_train_config(tmp_path, epochs=1), data=two_synthetic_tasks())
    assert caught.value.result is None
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["config.json"]


_SLOW_LOADING = """
import sys, time
from dvn_cli.training import loop

def slow(cfg):
    print("loading", flush=True)
    time.sleep(60)

loop.load_tasks = slow
from dvn_cli.cli.app import app
app(sys.argv[1:], prog_name="dvn")
"""


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_while_the_data_loads_exits_128_plus_it_saying_nothing_saved(tmp_path, signum):
    """SIGTERM 3 s into dvn train (loading data) once ended in ``AttributeError: 'NoneType' object has no attribute
    'summary'`` and exit 1."""
    import subprocess
    import sys

    from .test_faults import _subprocess_env, _tiny_train_args

    folder = make_image_folder(tmp_path / "colours", per_class=4)
    args = _tiny_train_args(f"colours={folder}", tmp_path / "run", tmp_path / "data", "--input-channels", 3)
    child = subprocess.Popen(
        [sys.executable, "-c", _SLOW_LOADING, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=_subprocess_env(),
    )
    try:
        assert child.stdout.readline().strip() == "loading"
        child.send_signal(signum)
        _, stderr = child.communicate(timeout=60)
    finally:
        child.kill()
    assert child.returncode == 128 + signum, stderr[-2000:]
    what = "interrupted" if signum == signal.SIGINT else "stopped by SIGTERM"
    assert stderr == f"error: {what}; nothing saved\n"
    assert not (tmp_path / "run").exists()


def test_a_signal_in_a_deferred_block_waits_for_its_end():
    done = []
    with StopSignals() as stops, pytest.raises(Interrupted) as caught:
        with stops.deferred():
            signal.raise_signal(signal.SIGTERM)
            done.append("after the signal")
    assert done == ["after the signal"] and caught.value.signum == signal.SIGTERM


class _GlobalRngStates(observer.TrainObserver):
    """Torch's global RNG state when the steps start and after every step."""

    def __init__(self) -> None:
        self.states: list[torch.Tensor] = []

    def on_start(self, total_steps, start_step, data) -> None:
        self.states.append(torch.get_rng_state())

    def on_step(self, info) -> None:
        self.states.append(torch.get_rng_state())


@pytest.mark.parametrize("kind", ["memory", "threads"])
def test_no_step_draws_from_torchs_global_generator(tmp_path, kind):
    """Why the training state keeps no RNG state (it once held ``rng.torch``, saved and restored for nothing): the
    initialisation is seeded, and every draw of a step (batch order, augmentation, the sandwich's level) comes from a
    generator of its own. A step that drew from the global one would need it back; this test would then fail."""
    record = _GlobalRngStates()
    cfg = tiny_train_config(tmp_path, epochs=1, level_sampling="sandwich")
    with _cpu_threads(kind):
        fit(cfg, observer=record, data=two_synthetic_tasks())
    assert len(record.states) == 5 and all(torch.equal(s, record.states[0]) for s in record.states)  # 4 steps
    assert not [k for k in _tensors(tmp_path / "run" / "train_state.safetensors") if k.startswith("rng.")]


def test_a_state_file_of_an_older_dvn_with_its_rng_state_still_resumes(tmp_path):
    """Files written before ``rng.torch`` was dropped hold it; resume ignores it and matches an uninterrupted run."""
    from safetensors.torch import save_file

    straight = Path(fit(tiny_train_config(tmp_path / "a", epochs=1), data=two_synthetic_tasks()).checkpoint).parent
    with pytest.raises(KeyboardInterrupt):
        fit(tiny_train_config(tmp_path / "b", epochs=1), observer=StopAt(3), data=two_synthetic_tasks())
    state = tmp_path / "b" / "run" / "train_state.safetensors"
    with safe_open(str(state), framework="pt") as f:
        metadata = f.metadata()
    save_file({**_tensors(state), "rng.torch": torch.get_rng_state()}, str(state), metadata=metadata)
    fit(tiny_train_config(tmp_path / "b", epochs=1), resume=True, data=two_synthetic_tasks())
    _assert_same_run(straight, tmp_path / "b" / "run")


def test_the_running_loss_survives_a_resume(tmp_path):
    """The epoch's logged train_loss was once the mean of the steps after the resume only."""
    straight = fit(tiny_train_config(tmp_path / "a", epochs=1), data=two_synthetic_tasks())
    with pytest.raises(KeyboardInterrupt):
        fit(tiny_train_config(tmp_path / "b", epochs=1), observer=StopAt(3), data=two_synthetic_tasks())
    fit(tiny_train_config(tmp_path / "b", epochs=1), resume=True, data=two_synthetic_tasks())
    assert _history(Path(straight.checkpoint).parent) == _history(tmp_path / "b" / "run")


# --------------------------------------------------------------------------- a streamed task that fails mid-run


def _unreadable_from(step: int, folder: Path) -> observer.TrainObserver:
    """Every image of ``folder`` stops being readable once ``step`` steps were taken."""

    class Spoil(observer.TrainObserver):
        def on_step(self, info):
            if info.step == step:
                for image in folder.rglob("*.png"):
                    image.write_bytes(b"gone")

    return Spoil()


def _streamed(tmp_path: Path, folder: Path):
    return tiny_train_config(tmp_path, tasks=(f"colours={folder}",), data_mode="stream", workers=0, batch_size=8)


def test_a_file_gone_mid_run_saves_the_progress_and_promises_resume(tmp_path):
    folder = make_image_folder(tmp_path / "colours", per_class=8)
    cfg = _streamed(tmp_path, folder)
    with pytest.raises(StreamFailed) as caught:
        fit(cfg, observer=_unreadable_from(1, folder))
    message = str(caught.value)
    assert "can no longer be read" in message and "\n" not in message
    assert message.endswith(f"; checkpoint of step 1 saved in {tmp_path / 'run'}; --resume continues"), message
    assert read_metadata(tmp_path / "run" / "train_state.safetensors")["step"] == 1
    assert not (tmp_path / "run" / ".lock").exists()


def test_a_file_gone_before_the_first_step_promises_no_resume(tmp_path):
    folder = make_image_folder(tmp_path / "colours", per_class=8)
    cfg = _streamed(tmp_path, folder)
    data = loop.load_tasks(cfg)  # opens fine
    for image in folder.rglob("*.png"):
        image.write_bytes(b"gone")
    with pytest.raises(StreamFailed) as caught:
        fit(cfg, data=data)
    assert str(caught.value).endswith("restore it, or remove it and start again; nothing saved"), str(caught.value)
    assert "--resume" not in str(caught.value)
    assert not (tmp_path / "run" / "train_state.safetensors").exists()


def test_a_worker_death_reported_outside_next_is_one_line_with_a_checkpoint(tmp_path, monkeypatch):
    """DataLoader's SIGCHLD handler raises RuntimeError wherever the main thread is (here: in the forward)."""
    calls = []
    original = training_step.task_loss

    def dies(*args, **kwargs):
        calls.append(1)
        if len(calls) == 5:  # step 3's first task
            raise RuntimeError(f"DataLoader worker (pid {os.getpid()}) is killed by signal: Killed. ")
        return original(*args, **kwargs)

    monkeypatch.setattr(training_step, "task_loss", dies)
    with pytest.raises(StreamFailed) as caught:
        fit(tiny_train_config(tmp_path, epochs=1), data=two_synthetic_tasks())
    assert str(caught.value) == (
        f"a data worker of a streamed task died: DataLoader worker (pid {os.getpid()}) is killed by signal: "
        f"Killed.; checkpoint of step 2 saved in {tmp_path / 'run'}; --resume continues"
    )
    assert read_metadata(tmp_path / "run" / "train_state.safetensors")["step"] == 2


def test_other_runtime_errors_are_not_taken_for_a_worker_death(tmp_path, monkeypatch):
    monkeypatch.setattr(training_step, "task_loss", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("a bug")))
    with pytest.raises(RuntimeError, match="a bug"):
        fit(tiny_train_config(tmp_path, epochs=1), data=two_synthetic_tasks())
