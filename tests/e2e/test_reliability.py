"""Reliability of ``dsk train`` in real processes: SIGKILL during a save, exact resume after SIGKILL, Ctrl-C.

Each test runs the CLI in a subprocess (one torch thread, like the test workers) and kills or interrupts it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dsk.train.checkpoint import latest_checkpoint, list_checkpoints, load_checkpoint
from dsk.train.metrics import read_metrics
from tests.unit.train.helpers import write_recipe

pytestmark = pytest.mark.xdist_group("subprocess-train")

_MAIN = "import sys; from dsk.cli import main; main(sys.argv[1:])"


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DSK_")}
    env.update({"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **extra})
    return env


def _start(args: list, **env: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", _MAIN, *map(str, args)],
        env=_env(**env),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _run(args: list, timeout: float = 120, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", _MAIN, *map(str, args)], env=_env(**env), capture_output=True, text=True,
        timeout=timeout,
    )  # fmt: skip


def _wait_for(predicate, proc: subprocess.Popen, timeout: float = 90.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc.poll() is not None:
            out, err = proc.communicate()
            pytest.fail(f"the run ended (rc {proc.returncode}) before the test could act:\n{out}\n{err}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail("timed out waiting for the run")
        time.sleep(0.05)


def _train_losses(run_dir: Path) -> list[tuple[int, float, float]]:
    return [
        (r["step"], r["loss"], r["grad_norm"]) for r in read_metrics(run_dir / "metrics.jsonl") if r["kind"] == "train"
    ]


def _args(recipe: Path, run_dir: Path, *extra: str) -> list:
    return ["train", recipe, "--run-dir", run_dir, "--set", "trainer.eval_samples=2", *extra]


def test_sigkill_during_a_save_leaves_the_previous_checkpoint_loadable(tmp_path):
    from dsk.model import load_pretrained

    recipe = write_recipe(tmp_path)
    run_dir = tmp_path / "run"
    # every = 4: step-4 is saved normally; the save of step 8 sleeps between writing its files and the rename
    proc = _start(_args(recipe, run_dir), DSK_DEBUG_SAVE_DELAY="60:8")
    root = run_dir / "checkpoints"

    def inside_second_save() -> bool:
        return any((p / "state.json").exists() for p in root.glob(".tmp-step-8-*")) if root.exists() else False

    _wait_for(inside_second_save, proc)
    proc.kill()  # SIGKILL while the step-8 checkpoint is fully written but not yet renamed
    proc.wait(timeout=30)
    assert [s for s, _ in list_checkpoints(run_dir)] == [4]
    ckpt = load_checkpoint(run_dir)
    assert ckpt.step == 4 and ckpt.optimizer_meta is not None
    load_pretrained(latest_checkpoint(run_dir))

    done = _run([*_args(recipe, run_dir), "--resume"])
    assert done.returncode == 0, done.stderr
    assert "resuming from" in done.stdout and "step-4 at step 4" in done.stdout
    assert not list(root.glob(".tmp-*"))  # the killed save's leftovers were cleaned up
    assert [r[0] for r in _train_losses(run_dir)] == list(range(1, 13))


def test_resume_after_sigkill_repeats_the_uninterrupted_losses_exactly(tmp_path):
    recipe = write_recipe(tmp_path)
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    extra = ("--set", "checkpoint.every=2")
    # the interrupted run: each save from step 4 on sleeps 1 s before its rename, so the kill (once step-6 is
    # complete) lands while steps 7-8 are done and step-8 is being saved: metrics rows past the checkpoint exist
    proc = _start(_args(recipe, killed, *extra), DSK_DEBUG_SAVE_DELAY="1:4")
    _wait_for(lambda: latest_checkpoint(killed) is not None and latest_checkpoint(killed).name == "step-6", proc)
    proc.kill()
    proc.wait(timeout=30)
    reference = _run(_args(recipe, straight, *extra))
    assert reference.returncode == 0, reference.stderr
    before = len(_train_losses(killed))
    assert 6 <= before < 12  # rows past the checkpoint may exist: the resume must drop and redo them

    resumed = _run([*_args(recipe, killed, *extra), "--resume"])
    assert resumed.returncode == 0, resumed.stderr
    assert "step-6 at step 6" in resumed.stdout
    expected, got = _train_losses(straight), _train_losses(killed)
    assert [s for s, _, _ in got] == list(range(1, 13))
    assert got == expected  # loss and gradient norm, step for step, bit for bit
    a, b = load_checkpoint(straight), load_checkpoint(killed)
    assert all(a.model_state[k].equal(b.model_state[k]) for k in a.model_state)


def test_ctrl_c_saves_a_checkpoint_and_exits_cleanly(tmp_path):
    recipe = write_recipe(tmp_path)
    run_dir = tmp_path / "run"
    proc = _start(_args(recipe, run_dir, "--set", "trainer.steps=2000", "--set", "checkpoint.every=0"))
    _wait_for(lambda: len(read_metrics(run_dir / "metrics.jsonl")) >= 3, proc)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "Interrupted" in err and "--resume" in err and "Traceback" not in err
    ckpt = load_checkpoint(run_dir)
    assert ckpt.state["reason"] == "interrupt"
    assert ckpt.step == max(r["step"] for r in read_metrics(run_dir / "metrics.jsonl"))
    assert 3 <= ckpt.step < 2000
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "interrupted" and summary["stages"][0]["checkpoint"] == str(ckpt.path)
