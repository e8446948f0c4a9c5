"""metrics.jsonl writing: strict JSON and truncation on resume."""

import json

from dsk.train.metrics import MetricsWriter, read_metrics


def test_non_finite_values_are_written_as_null(tmp_path):
    writer = MetricsWriter(tmp_path / "m.jsonl")
    writer.write({"step": 1, "loss": float("nan"), "grad_norm": float("inf")})
    line = (tmp_path / "m.jsonl").read_text().strip()
    assert json.loads(line) == {"step": 1, "loss": None, "grad_norm": None}


def test_truncate_after_drops_rows_of_later_steps_and_a_torn_line(tmp_path):
    writer = MetricsWriter(tmp_path / "m.jsonl")
    for step in range(1, 6):
        writer.write({"step": step, "loss": float(step)})
    with open(tmp_path / "m.jsonl", "a") as f:
        f.write('{"step": 6, "lo')  # a process killed mid-write
    assert writer.truncate_after(3) == 2
    assert [r["step"] for r in read_metrics(tmp_path / "m.jsonl")] == [1, 2, 3]
    assert (tmp_path / "m.jsonl").read_text().endswith("\n")
