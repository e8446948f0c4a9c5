"""Progress display of a run: a rich progress bar with loss, tokens/s, accuracy and the trainer's own columns
(``summary_columns``, e.g. MaxVio), and the summary table.

On a terminal the bar redraws in place; elsewhere (logs, CI, a pipe) a plain line is printed every ~10% of the
steps instead, so captured output stays readable.
"""

from __future__ import annotations

from typing import Any

__all__ = ["Reporter", "summary_table"]


def _fmt(value: Any, spec: str = ".4g") -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return format(value, spec)
    return str(value)


class Reporter:
    """Shows training progress on a rich console.

    Args:
        console: a ``rich.console.Console`` (stderr when ``--json`` keeps stdout for the summary).
        enabled: False shows nothing but messages (``[logging] progress = false``).
    """

    def __init__(self, console: Any, enabled: bool = True):
        self.console = console
        self.enabled = enabled
        self._progress = None
        self._task = None
        self._total = 0
        self._label = ""
        self._last_line = 0
        self._fields: dict[str, Any] = {}
        self._columns: list[tuple[str, str, str]] = []

    def start(self, total: int, label: str, completed: int = 0, columns: Any = ()) -> None:
        """Begin a bar of ``total`` steps (``completed`` already done when resuming); ``columns`` are the
        trainer's own ``(key, label, format)`` columns shown after the loss, throughput and accuracy."""
        self._total, self._label, self._last_line = total, label, completed
        self._columns = [tuple(c) for c in columns]
        if not self.enabled:
            return
        if self.console.is_terminal:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self._progress = Progress(
                TextColumn("[bold]{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeRemainingColumn(),
                TextColumn("{task.fields[status]}"),
                console=self.console,
                transient=False,
            )
            self._progress.start()
            self._task = self._progress.add_task(label, total=total, completed=completed, status="")
        else:
            self.console.print(f"{label}: {total} steps" + (f", resuming after step {completed}" if completed else ""))

    def _status(self) -> str:
        f = self._fields
        parts = [f"loss {_fmt(f.get('loss'), '.4f')}"]
        if f.get("tokens_per_s") is not None:
            parts.append(f"{f['tokens_per_s']:,.0f} tok/s")
        if f.get("eval/accuracy") is not None:
            parts.append(f"acc {100 * f['eval/accuracy']:.1f}%")
        for key, label, spec in self._columns:
            if isinstance(f.get(key), (int, float)):
                parts.append(f"{label} {format(f[key], spec)}")
        if f.get("nonfinite_skipped"):
            parts.append(f"[yellow]skipped {f['nonfinite_skipped']}[/]")
        return "  ".join(parts)

    def update(self, step: int, row: dict[str, Any]) -> None:
        """Record a metrics row (train or eval) of ``step`` and redraw."""
        self._fields.update({k: v for k, v in row.items() if v is not None})
        if not self.enabled:
            return
        if self._progress is not None:
            self._progress.update(self._task, completed=step, status=self._status())
            return
        every = max(1, self._total // 10)
        if step - self._last_line >= every or step == self._total or row.get("kind") == "eval":
            self._last_line = step
            self.console.print(f"  step {step}/{self._total}  {self._status()}", highlight=False)

    def message(self, text: str) -> None:
        """Print a line above the bar."""
        self.console.print(text, highlight=False)

    def stop(self) -> None:
        """Close the bar (idempotent)."""
        if self._progress is not None:
            self._progress.stop()
            self._progress = None


def summary_table(summary: dict[str, Any]) -> Any:
    """The end-of-run rich table: one row per stage with its final numbers."""
    from rich.table import Table

    stages = summary.get("stages", [])
    multi = any(st.get("stage") for st in stages)
    extra: list[tuple[str, str, str]] = []  # the trainers' own columns (their ``summary_columns``)
    for st in stages:
        for col in st.get("columns") or []:
            if tuple(col) not in extra:
                extra.append(tuple(col))
    table = Table(title=f"dsk train: {summary.get('status', '?')}", title_justify="left")
    columns = (["stage"] if multi else []) + [
        "trainer",
        "step",
        "loss",
        "tok/s",
        "accuracy",
        *(label for _, label, _ in extra),
        "skipped",
        "time",
    ]
    for col in columns:
        table.add_column(col, justify="left" if col in ("stage", "trainer") else "right", no_wrap=True)
    for st in stages:
        acc = st.get("eval/accuracy")
        cells = [
            st.get("trainer") or "-",
            f"{st.get('step', 0)}/{st.get('steps', '?')}",
            _fmt(st.get("final_loss"), ".4f"),
            _fmt(st.get("tokens_per_s"), ",.0f"),
            "-" if acc is None else f"{100 * acc:.1f}%",
            *(_fmt(st.get(key), spec) for key, _, spec in extra),
            str(st.get("nonfinite_skipped", 0)),
            f"{st.get('wall_s', 0):.0f}s",
        ]
        table.add_row(*([st.get("stage") or "-"] if multi else []), *cells)
    return table
