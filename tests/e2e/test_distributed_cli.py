"""``dsk train --nproc 2`` end to end: the quickstart recipe with node-limited expert parallelism gives the
single-process losses, a SIGKILLed launcher takes its workers with it and ``--resume`` continues exactly, a dead
worker stops the run within a bound, bad input is exit 2 before any rank starts.

Each launch costs a few seconds of start-up; the runs are short (20 steps of a small batch) and shared between
tests through module fixtures.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.distributed.harness import GROUP

pytestmark = pytest.mark.xdist_group(GROUP)

ROOT = Path(__file__).resolve().parents[2]
QUICKSTART = str(ROOT / "recipes" / "quickstart.toml")
STEPS = 20
PER_RANK = 64
SHORT = [
    "--set", f"trainer.steps={STEPS}", "--set", "trainer.eval_every=0", "--set", "trainer.eval_samples=4",
    "--set", "trainer.eval_max_new_tokens=8", "--set", "checkpoint.every=5", "--set", "checkpoint.keep=5",
]  # fmt: skip
EP = ["--set", 'parallel.expert.type="node_limited"']


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.pop("DSK_DEBUG_SAVE_DELAY", None)
    env["DSK_DIST_TIMEOUT_S"] = "30"
    return env


def _dsk(*args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "dsk", *args], capture_output=True, text=True, timeout=timeout, env=_env(), cwd=ROOT
    )


def _train_rows(run_dir: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [r for r in rows if r.get("kind") == "train"]


def _losses(run_dir: Path) -> list[float]:
    return [r["loss"] for r in _train_rows(run_dir)]


def _alive(marker: str) -> list[int]:
    out = subprocess.run(["pgrep", "-f", marker], capture_output=True, text=True).stdout.split()
    return [int(p) for p in out if int(p) != os.getpid()]


def kill_launcher_after(args: list[str], run: Path, step: int) -> None:
    """Start the launcher ``args`` writing ``run``, SIGKILL it once ``step`` train rows are in ``metrics.jsonl``,
    and check that its workers went with it."""
    launcher = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=_env(), cwd=ROOT)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if (run / "metrics.jsonl").exists() and len(_train_rows(run)) >= step:
            break
        time.sleep(0.05)
    else:
        launcher.kill()
        pytest.fail(f"the run did not reach step {step}")
    launcher.send_signal(signal.SIGKILL)
    launcher.wait(timeout=10)
    marker = str(run)
    gone_by = time.monotonic() + 10
    while _alive(marker) and time.monotonic() < gone_by:
        time.sleep(0.05)
    assert not _alive(marker), "workers outlived their SIGKILLed launcher"


@pytest.fixture(scope="session")  # once per test process: xdist may interleave other modules
def one_process(tmp_path_factory) -> Path:
    """The quickstart recipe in one process with the global batch of the 2-rank runs."""
    run = tmp_path_factory.mktemp("single") / "run"
    done = _dsk("train", QUICKSTART, *SHORT, "--set", f"trainer.batch_size={2 * PER_RANK}", "--run-dir", str(run))
    assert done.returncode == 0, done.stderr[-3000:]
    return run


@pytest.fixture(scope="session")  # once per test process: xdist may interleave other modules
def two_ranks(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """The same run on 2 ranks with node-limited expert parallelism (batch PER_RANK per rank)."""
    run = tmp_path_factory.mktemp("ep2") / "run"
    done = _dsk(
        "train", QUICKSTART, "--nproc", "2", *SHORT, *EP, "--set", f"trainer.batch_size={PER_RANK}",
        "--run-dir", str(run),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    return run, done


def test_two_ranks_of_expert_parallelism_give_the_one_process_losses(one_process, two_ranks):
    run, done = two_ranks
    single, double = _losses(one_process), _losses(run)
    assert len(single) == len(double) == STEPS
    for step, (a, b) in enumerate(zip(single, double, strict=True), start=1):
        assert abs(a - b) <= 1e-5 * abs(a), f"step {step}: one process {a}, two ranks {b}"
    # one writer: one row per step, one summary, one resolved.toml; rank 0 printed the summary once
    assert [r["step"] for r in _train_rows(run)] == list(range(1, STEPS + 1))
    assert sorted(p.name for p in run.rglob("summary.json")) == ["summary.json"]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "completed"
    assert done.stdout.count("run directory:") == 1
    # the checkpoint is the one-process format: one process evaluates it
    ckpt = summary["checkpoint"]
    ev = _dsk("eval", ckpt, "--samples", "4", "--max-new-tokens", "8", "--json")
    assert ev.returncode == 0, ev.stderr[-2000:]
    assert 0.0 <= json.loads(ev.stdout)["eval/accuracy"] <= 1.0


def test_a_killed_launcher_takes_its_workers_and_resume_continues_exactly(tmp_path, two_ranks):
    reference = _losses(two_ranks[0])
    run = tmp_path / "run"
    args = [
        sys.executable, "-m", "dsk", "train", QUICKSTART, "--nproc", "2", *SHORT, *EP,
        "--set", f"trainer.batch_size={PER_RANK}", "--run-dir", str(run),
    ]  # fmt: skip
    kill_launcher_after(args, run, 7)  # past the step-5 checkpoint, before the end
    written = {p: p.stat().st_mtime_ns for p in run.rglob("*")}
    rows_then = len(_train_rows(run))
    time.sleep(1.0)
    assert {p: p.stat().st_mtime_ns for p in run.rglob("*")} == written, "something was written after the kill"
    assert rows_then < STEPS
    # any rank count resumes the checkpoint: one process continues a copy of the directory to the end
    copy = tmp_path / "copy"
    shutil.copytree(run, copy)
    alone = _dsk(
        "train", QUICKSTART, *SHORT, *EP, "--set", f"trainer.batch_size={PER_RANK}", "--run-dir", str(copy),
        "--resume",
    )  # fmt: skip
    assert alone.returncode == 0, alone.stderr[-3000:]
    assert [r["step"] for r in _train_rows(copy)] == list(range(1, STEPS + 1))
    resumed = _dsk(
        "train", QUICKSTART, "--nproc", "2", *SHORT, *EP, "--set", f"trainer.batch_size={PER_RANK}",
        "--run-dir", str(run), "--resume",
    )  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from" in resumed.stdout
    assert [r["step"] for r in _train_rows(run)] == list(range(1, STEPS + 1))
    assert _losses(run) == reference  # bit for bit: the interrupted run continues the uninterrupted one


def test_a_dead_worker_stops_every_rank_within_the_bound(tmp_path):
    run = tmp_path / "run"
    args = [
        sys.executable, "-m", "dsk", "train", QUICKSTART, "--nproc", "2", "--set", "trainer.steps=400",
        "--set", "trainer.eval_every=0", "--set", f"trainer.batch_size={PER_RANK}", "--set", "checkpoint.every=5",
        "--run-dir", str(run),
    ]  # fmt: skip
    launcher = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(), cwd=ROOT)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if (run / "metrics.jsonl").exists() and len(_train_rows(run)) >= 6:
            break
        time.sleep(0.05)
    workers = [p for p in _alive(str(run)) if p != launcher.pid]
    assert len(workers) == 2, workers
    rank1 = next(p for p in workers if "RANK=1" in Path(f"/proc/{p}/environ").read_bytes().decode().split("\0"))
    os.kill(rank1, signal.SIGKILL)
    killed = time.monotonic()
    _, err = launcher.communicate(timeout=60)
    stopped = time.monotonic() - killed
    assert launcher.returncode not in (0, None)
    assert not _alive(str(run))
    assert "rank 1" in err and "SIGKILL" in err, err[-2000:]
    assert stopped < 30, f"the run took {stopped:.1f} s to stop after a worker died"
    # the last complete checkpoint still loads in one process
    ckpts = sorted((run / "checkpoints").glob("step-*"), key=lambda p: int(p.name.split("-")[1]))
    ev = _dsk("eval", str(ckpts[-1]), "--samples", "2", "--max-new-tokens", "8", "--json")
    assert ev.returncode == 0, ev.stderr[-2000:]


def test_bad_input_with_nproc_is_exit_2_before_any_rank_starts(tmp_path):
    done = _dsk("train", QUICKSTART, "--nproc", "2", "--set", "trainer.stepz=3", "--run-dir", str(tmp_path / "r"))
    assert done.returncode == 2
    assert "trainer.stepz" in done.stderr
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "r").exists()


def test_grpo_on_two_ranks_raises_the_reward_and_gives_the_one_process_losses(tmp_path):
    from tests.e2e.test_post_training import BASE, GRPO, MODEL, PROMPTS, write

    root = tmp_path
    write(root, "model.toml", MODEL)
    rows = [{"prompt": f"({a}+{b})%5=", "completion": f"<answer>{(a + b) % 5}</answer>", "answer": str((a + b) % 5)}
            for a, b in PROMPTS]  # fmt: skip
    write(root, "prompts.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    base = _dsk("train", str(write(root, "base.toml", BASE)), "--run-dir", str(root / "base"), "--json")
    assert base.returncode == 0, base.stderr[-3000:]
    recipe = write(root, "grpo.toml", GRPO.format(base=json.loads(base.stdout)["checkpoint"], root=root))
    short = ["--set", "trainer.steps=20", "--set", "trainer.log_completions=0"]
    one = _dsk("train", str(recipe), *short, "--run-dir", str(root / "one"))
    assert one.returncode == 0, one.stderr[-3000:]
    two = _dsk("train", str(recipe), "--nproc", "2", *short, "--run-dir", str(root / "two"))
    assert two.returncode == 0, two.stderr[-3000:]
    single, double = _train_rows(root / "one"), _train_rows(root / "two")
    assert [r["step"] for r in double] == list(range(1, 21))
    for a, b in zip(single, double, strict=True):  # the same prompts, the same completions, the same update
        assert a["rewards/accuracy/mean"] == b["rewards/accuracy/mean"], a["step"]
        assert abs(a["loss"] - b["loss"]) <= 1e-5 * max(1.0, abs(a["loss"])), (a["step"], a["loss"], b["loss"])
    accuracy = [r["rewards/accuracy/mean"] for r in double]
    assert sum(accuracy[-5:]) / 5 > accuracy[0] + 0.15, accuracy


def _tensors(path: Path) -> dict:
    """A safetensors file's tensors."""
    from safetensors.torch import load_file

    return load_file(str(path))


def test_fsdp_with_ema_and_bf16_moments_survives_a_kill_and_resume_as_one_process(tmp_path):
    """FSDP2 shards the weights and the BF16 moments; the EMA follows the gathered weights; a 2-rank run killed
    after its step-3 checkpoint and resumed ends with one process's weights, EMA and moments."""
    extra = [
        "--set", "trainer.steps=6", "--set", "trainer.eval_every=0", "--set", "trainer.eval_samples=2",
        "--set", "trainer.eval_max_new_tokens=4", "--set", "checkpoint.every=3", "--set", "features.ema.type=ema",
        "--set", "features.ema.decay=0.5", "--set", "optimizer.type=adamw_bf16",
    ]  # fmt: skip
    one = tmp_path / "one"
    done = _dsk("train", QUICKSTART, *extra, "--set", f"trainer.batch_size={2 * PER_RANK}", "--run-dir", str(one))
    assert done.returncode == 0, done.stderr[-3000:]
    run = tmp_path / "fsdp"
    sharded = [*extra, "--set", 'parallel.data.type="fsdp"', "--set", f"trainer.batch_size={PER_RANK}"]
    args = [sys.executable, "-m", "dsk", "train", QUICKSTART, "--nproc", "2", *sharded, "--run-dir", str(run)]
    launcher = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=_env(), cwd=ROOT)
    deadline = time.monotonic() + 180
    while not (run / "checkpoints" / "step-3" / "state.json").exists():
        assert time.monotonic() < deadline and launcher.poll() is None, "no step-3 checkpoint"
        time.sleep(0.05)
    launcher.send_signal(signal.SIGKILL)
    launcher.wait(timeout=10)
    resumed = _dsk("train", QUICKSTART, "--nproc", "2", *sharded, "--run-dir", str(run), "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    import torch

    a, b = one / "checkpoints" / "step-6", run / "checkpoints" / "step-6"
    for name in ("model.safetensors", "features.safetensors", "optimizer.safetensors"):
        ta, tb = _tensors(a / name), _tensors(b / name)
        assert ta.keys() == tb.keys(), name
        for key in ta:
            assert ta[key].dtype == tb[key].dtype, (name, key)
            diff = (ta[key].double() - tb[key].double()).abs().max().item()
            scale = ta[key].double().abs().max().item()
            rel = 2.0**-7 if ta[key].dtype == torch.bfloat16 else 1e-4  # a BF16 moment may round one ulp apart
            assert diff <= rel * max(scale, 1e-3), (name, key, diff, scale)
    moments = _tensors(b / "optimizer.safetensors")
    assert {str(v.dtype) for k, v in moments.items() if k.endswith("/exp_avg")} == {"torch.bfloat16"}
    assert any(k.startswith("ema/weights/") for k in _tensors(b / "features.safetensors"))
