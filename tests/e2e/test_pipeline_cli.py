"""``dsk train recipes/dualpipe.toml --nproc 2`` end to end: DualPipe, DualPipeV and 1F1B give the losses of the
pipeline-off single process at each of 20 steps after a SIGKILL of the launcher and ``--resume``, the checkpoint
loads into one process for ``dsk eval`` and ``dsk generate``, and shapes the schedule cannot run are
exit 2 before any rank starts.

Each launch costs a few seconds of start-up; the killed-and-resumed runs are the loss comparison too (a resume that
were not exact would leave it), so there are eight launches in all. That a pipelined run resumed from its checkpoint
continues as the uninterrupted one does is checked in float64 (to 1e-10) by
tests/unit/plugins/dsk_parallel/test_pipeline.py.

The reference. Rows are packed (every row seq_len tokens, so a 64-row batch and four 16-row batches hold the same
rows). In float32, two single processes that compute the same step in other orders (one 64-row micro-batch, or four
16-row micro-batches accumulated) drift apart: MoE top-k routing turns 1e-7 differences into flipped expert choices,
and by step 20 their losses differ by up to 4e-5 relative. So each schedule is compared with the one-process run whose
gradient sums it reproduces: DualPipeV and 1F1B accumulate the chunks one after the other, as four accumulated 16-row
micro-batches do (DualPipe's own check, ``ref_step``, runs micro-batch by micro-batch); DualPipe adds the two
directions' sums, which agrees with the single 64-row micro-batch. Exactness is the float64 tests' business
(tests/unit/plugins/dsk_parallel/test_pipeline.py, 1e-12).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from tests.distributed.harness import GROUP
from tests.e2e.test_distributed_cli import _dsk, _losses, _train_rows, kill_launcher_after

pytestmark = pytest.mark.xdist_group(GROUP)

ROOT = Path(__file__).resolve().parents[2]
RECIPE = str(ROOT / "recipes" / "dualpipe.toml")
STEPS = 20
SHORT = [
    "--set", f"trainer.steps={STEPS}", "--set", "trainer.eval_every=0", "--set", "trainer.eval_samples=4",
    "--set", "trainer.eval_max_new_tokens=8", "--set", "checkpoint.every=5", "--set", "checkpoint.keep=5",
    "--set", "trainer.packing=true",
]  # fmt: skip
OFF = ["--set", "parallel.pipeline.enabled=false"]
TYPES = {"dualpipe": [], "dualpipev": ["--set", 'parallel.pipeline.type="dualpipev"'],
         "1f1b": ["--set", 'parallel.pipeline.type="1f1b"']}  # fmt: skip


@pytest.fixture(scope="session")
def one_process(tmp_path_factory) -> Path:
    """The recipe with the pipeline off, in one process: each step's 64 rows in one micro-batch."""
    run = tmp_path_factory.mktemp("pp-off") / "run"
    done = _dsk("train", RECIPE, *SHORT, *OFF, "--run-dir", str(run))
    assert done.returncode == 0, done.stderr[-3000:]
    return run


@pytest.fixture(scope="session")
def one_process_chunked(tmp_path_factory) -> Path:
    """The same, each step's rows as four accumulated 16-row micro-batches: the pipeline's chunks."""
    run = tmp_path_factory.mktemp("pp-off-chunked") / "run"
    accumulate = ["--set", "trainer.batch_size=16", "--set", "trainer.grad_accum=4"]
    done = _dsk("train", RECIPE, *SHORT, *OFF, *accumulate, "--run-dir", str(run))
    assert done.returncode == 0, done.stderr[-3000:]
    return run


def _close_to(reference: list[float], losses: list[float], what: str) -> None:
    assert len(reference) == len(losses) == STEPS, (len(reference), len(losses))
    for step, (a, b) in enumerate(zip(reference, losses, strict=True), start=1):
        assert abs(a - b) <= 1e-5 * abs(a), f"{what} step {step}: one process {a}, pipeline {b}"


def _kill_and_resume(run: Path, extra: list[str]) -> None:
    """Start a 2-rank run, SIGKILL its launcher after step 7 (past the step-5 checkpoint), check its workers went
    with it, then --resume it to the end."""
    args = [sys.executable, "-m", "dsk", "train", RECIPE, "--nproc", "2", *SHORT, *extra, "--run-dir", str(run)]
    kill_launcher_after(args, run, 7)
    assert len(_train_rows(run)) < STEPS
    resumed = _dsk("train", RECIPE, "--nproc", "2", *SHORT, *extra, "--run-dir", str(run), "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from" in resumed.stdout
    assert [r["step"] for r in _train_rows(run)] == list(range(1, STEPS + 1))


def test_dualpipe_killed_and_resumed_gives_the_one_process_losses_and_serves_one_process(tmp_path, one_process):
    run = tmp_path / "run"
    _kill_and_resume(run, TYPES["dualpipe"])
    _close_to(_losses(one_process), _losses(run), "dualpipe")
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "completed"
    ckpt = summary["checkpoint"]
    ev = _dsk("eval", ckpt, "--samples", "4", "--max-new-tokens", "8", "--json")
    assert ev.returncode == 0, ev.stderr[-2000:]
    assert 0.0 <= json.loads(ev.stdout)["eval/accuracy"] <= 1.0
    gen = _dsk("generate", ckpt, "--prompt", "12+34=", "--max-new-tokens", "8")
    assert gen.returncode == 0, gen.stderr[-2000:]
    assert gen.stdout.strip()
    # the pipelined run's weights are the one process's, to float32 rounding over 20 steps (which Adam's
    # m / sqrt(v) enlarges for entries whose gradients are near zero: compare whole tensors, not entries)
    from safetensors.torch import load_file

    step = f"step-{STEPS}"
    a = load_file(str(next((run / "checkpoints" / step).glob("model*.safetensors"))))
    b = load_file(str(next((one_process / "checkpoints" / step).glob("model*.safetensors"))))
    assert a.keys() == b.keys()
    for key in a:
        assert float((a[key] - b[key]).norm()) <= 1e-2 * float(b[key].norm()) + 1e-6, key


@pytest.mark.parametrize("kind", ["dualpipev", "1f1b"])
def test_torch_schedules_killed_and_resumed_give_the_one_process_losses(tmp_path, one_process_chunked, kind):
    run = tmp_path / "run"
    _kill_and_resume(run, TYPES[kind])
    _close_to(_losses(one_process_chunked), _losses(run), kind)


def test_shapes_the_pipeline_cannot_run_are_exit_2_before_any_rank_starts(tmp_path):
    cases = [
        (["--nproc", "3"], "parallel.pipeline.pp = 2 does not divide the 3 processes"),
        (["--nproc", "2", "--set", "parallel.pipeline.pp=3"], "DualPipe runs on an even number"),
        (["--nproc", "2", "--set", "parallel.pipeline.chunks=2"], "needs at least 4 micro-batches"),
        (["--nproc", "2", "--set", "parallel.pipeline.chunks=6", "--set", "trainer.batch_size=64"],
         "trainer.batch_size = 64 does not cut into parallel.pipeline.chunks = 6"),
        (["--nproc", "2", "--set", "parallel.pipeline.layers_per_stage=[3, 3]"], "sums to 6, but model.n_layers = 8"),
        (["--nproc", "4", "--set", "parallel.pipeline.pp=2"], "leave 2 data-parallel ranks"),
        (["--nproc", "4", "--set", "parallel.pipeline.pp=2", "--set", 'parallel.data.type="zero1"',
          "--set", 'parallel.expert.type="node_limited"', "--set", "parallel.expert.ep=4",
          "--set", "parallel.expert.ranks_per_node=2"],
         "parallel.expert.ep = 4 must divide the 2 data-parallel ranks"),
        (["--nproc", "2", "--set", 'parallel.pipeline.type="dualpipev"', "--set", "model.n_layers=3"],
         "model.n_layers = 3 cannot be cut into the 4 stages of dualpipev"),
        (["--nproc", "2", "--set", 'parallel.pipeline.type="dualpipev"', "--set", 'features.compile.type="compile"'],
         "which it refuses for compiled stages"),
        (["--nproc", "2", "--set", 'features.compile.type="compile"'], "zero-bubble chunks split the backward"),
        (["--set", "parallel.pipeline.pp=2"], "needs torch.distributed ranks: run with --nproc"),
    ]  # fmt: skip
    for i, (args, expected) in enumerate(cases):
        run = tmp_path / f"run{i}"
        done = _dsk("train", RECIPE, *args, "--set", "trainer.steps=2", "--run-dir", str(run), timeout=60)
        err = " ".join(done.stderr.split())
        assert done.returncode == 2, (args, done.returncode, done.stderr[-2000:])
        assert expected in err, (args, err[-2000:])
        assert "Traceback" not in done.stderr
        assert "rank 0" not in err and "rank 1" not in err, f"{args}: a rank started"


def test_bf16_autocast_covers_every_stage(tmp_path):
    """The BF16 feature's autocast region, entered by a hook on the whole model, frames each stage's forward: the
    pipelined run's losses are one-process BF16's (FP32's differ by 5e-5 relative at step 1)."""
    bf16 = ["--set", "features.bf16.type=bf16", "--set", "trainer.steps=2", "--set", "trainer.eval_every=0",
            "--set", "trainer.eval_samples=4", "--set", "trainer.eval_max_new_tokens=8"]  # fmt: skip
    piped, alone = tmp_path / "piped", tmp_path / "alone"
    done = _dsk("train", RECIPE, "--nproc", "2", *bf16, "--run-dir", str(piped))
    assert done.returncode == 0, done.stderr[-3000:]
    done = _dsk("train", RECIPE, *bf16, *OFF, "--run-dir", str(alone))
    assert done.returncode == 0, done.stderr[-3000:]
    # Step 1 is the forward alone, what autocast decides: within 1e-5 (FP32's is 5e-5 away). Step 2 follows a BF16
    # backward and update computed on the stages' chunks: 1.4e-5 apart on an AMD EPYC without AVX-512 (2026-12-02),
    # within 1e-5 on the machines before it.
    for step, (a, b) in enumerate(zip(_losses(alone), _losses(piped), strict=True), start=1):
        tol = 1e-5 if step == 1 else 5e-5
        assert abs(a - b) <= tol * abs(a), f"step {step}: one process {a}, pipeline {b}"


def test_profile_of_a_pipelined_run_reports_every_ranks_schedule(tmp_path):
    """`dsk profile --nproc 2` on the DualPipe recipe: the writer's report holds both ranks' executed actions, their
    bubbles, the schedule's own time as the part "pipeline idle", and the timeline plot."""
    out = tmp_path / "out"
    done = _dsk("profile", RECIPE, "--nproc", "2", "--warmup", "1", "--steps", "2", "--out", str(out), "--json")
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout)
    pipeline = report["parallel"]
    assert pipeline["schedule"] == "dualpipe" and pipeline["pp"] == 2
    assert {a["rank"] for a in pipeline["timeline"]} == {0, 1}
    assert len(pipeline["bubble"]) == 2 and all(0 <= b < 1 for b in pipeline["bubble"])
    assert "pipeline idle" in report["components_raw_s_per_step"]
    assert report["world_size"] == 2
    assert (out / "dualpipe" / "pipeline.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
