"""Progress display of a run: a rich progress bar with loss, tokens/s, accuracy (or held-out loss) and the
trainer's own columns (``summary_columns``, e.g. MaxVio), and the end-of-run summary.

On a terminal the bar redraws in place; elsewhere (logs, CI, a pipe) a plain line is printed every ~10% of the
steps instead, so captured output stays readable. The summary table (:class:`FittedTable`) fits the console's
width, 80 columns in a log: wide when it fits, one row per number otherwise, never a cell cut to "…".
"""

from __future__ import annotations

from typing import Any

__all__ = ["FittedTable", "Reporter", "print_summary", "summary_examples", "summary_table"]


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
        if f.get("eval/loss") is not None:
            parts.append(f"eval loss {f['eval/loss']:.4f}")
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


class FittedTable:
    """A summary table that stays readable at any width: nothing is ever cut to "…".

    Rendered wide (one row per item, e.g. a stage, one column per number) when that fits the console; otherwise in
    long form, one row per number and one column per item (the item's name, from the first column, heads it),
    as many items side by side as fit, the rest in further tables below. The width is the console's (80 columns
    in a log or pipe, unless ``COLUMNS`` says otherwise); a cell too long for the narrowest layout wraps (folds)
    instead of being truncated.

    Args:
        title: the title, a line above the table(s).
        columns: the column names; the first names the items.
        rows: one list of cell texts per item, in column order.
        left: the columns aligned left in the wide form (the others, numbers, are aligned right).
    """

    def __init__(self, title: str, columns: list[str], rows: list[list[str]], left: tuple[str, ...] = ()):
        self.title = title
        self.columns = list(columns)
        self.rows = [list(r) for r in rows]
        self.left = left

    def wide(self) -> Any:
        """The wide form: one row per item."""
        from rich.table import Table
        from rich.text import Text

        table = Table()
        for col in self.columns:
            table.add_column(Text(col), justify="left" if col in self.left else "right", overflow="fold")
        for row in self.rows:
            table.add_row(*(Text(cell) for cell in row))  # plain text: a stage name is no markup
        return table

    def long(self, items: list[int]) -> Any:
        """The long form of the items at ``items``: one row per number, one column per item."""
        from rich.table import Table
        from rich.text import Text

        table = Table()
        table.add_column(Text(self.columns[0]), justify="left", overflow="fold")
        for i in items:
            table.add_column(Text(self.rows[i][0]), justify="right", overflow="fold")
        for j, name in enumerate(self.columns[1:], start=1):
            table.add_row(Text(name), *(Text(self.rows[i][j]) for i in items))
        return table

    @staticmethod
    def _natural_width(console: Any, options: Any, table: Any) -> int:
        """Columns the table takes with every cell on one line (rich's measure, unbounded)."""
        return table.__rich_measure__(console, options.update_width(100_000)).maximum

    def __rich_console__(self, console: Any, options: Any) -> Any:
        from rich.text import Text

        width = options.max_width
        yield Text(self.title, style="table.title")  # a line of its own: no padding to the width
        wide = self.wide()
        if not self.rows or self._natural_width(console, options, wide) <= width:
            yield wide
            return
        chunk: list[int] = []
        for i in range(len(self.rows)):
            if chunk and self._natural_width(console, options, self.long([*chunk, i])) > width:
                yield self.long(chunk)
                chunk = []
            chunk.append(i)
        yield self.long(chunk)


def _pct(value: Any) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def summary_table(summary: dict[str, Any]) -> FittedTable:
    """The end-of-run table: one row per stage with its final numbers (in long form when that is too wide)."""
    stages = summary.get("stages", [])
    multi = any(st.get("stage") for st in stages)
    extra: list[tuple[str, str, str]] = []  # the trainers' own columns (their ``summary_columns``)
    for st in stages:
        for col in st.get("columns") or []:
            if tuple(col) not in extra:
                extra.append(tuple(col))
    held_out = any(st.get("eval/loss") is not None for st in stages)  # text data: the held-out loss
    accuracy = not held_out or any(st.get("eval/accuracy") is not None for st in stages)
    columns = (["stage"] if multi else []) + [
        "trainer",
        "step",
        "loss",
        "tok/s",
        *(["accuracy"] if accuracy else []),
        *(["eval loss", "eval ppl"] if held_out else []),
        *(label for _, label, _ in extra),
        "skipped",
        "time",
    ]
    rows = []
    for st in stages:
        cells = [
            st.get("trainer") or "-",
            f"{st.get('step', 0)}/{st.get('steps', '?')}",
            _fmt(st.get("final_loss"), ".4f"),
            _fmt(st.get("tokens_per_s"), ",.0f"),
            *([_pct(st.get("eval/accuracy"))] if accuracy else []),
            *([_fmt(st.get("eval/loss"), ".4f"), _fmt(st.get("eval/ppl"), ".2f")] if held_out else []),
            *(_fmt(st.get(key), spec) for key, _, spec in extra),
            str(st.get("nonfinite_skipped", 0)),
            f"{st.get('wall_s', 0):.0f}s",
        ]
        rows.append(([st.get("stage") or "-"] if multi else []) + cells)
    return FittedTable(f"dsk train: {summary.get('status', '?')}", columns, rows, left=("stage", "trainer"))


def summary_examples(summary: dict[str, Any]) -> Any:
    """The example completions of the final evaluation, once: those of the last stage that has them (a
    ``[[stages]]`` run keeps every stage's in ``summary.json``). Long completions wrap. None when there are none."""
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    examples = {k: v for k, v in (summary.get("examples") or {}).items() if v}
    if not examples:
        return None
    name, rows = list(examples.items())[-1]
    grid = Table.grid(padding=(0, 1))
    grid.add_column(no_wrap=True)
    grid.add_column(overflow="fold")
    for row in rows:
        mark = Text("  ✓", style="green") if row.get("correct") else Text("  ✗", style="red")
        grid.add_row(mark, Text(f"{row.get('prompt', '')}{row.get('completion', '')}"))
    stages = summary.get("stages", [])
    if any(st.get("stage") for st in stages):
        return Group(Text(f"examples of stage {name}:"), _RightStripped(grid))
    return _RightStripped(grid)


class _RightStripped:
    """A renderable's lines without the blanks that pad them to its width (a log keeps no trailing spaces)."""

    def __init__(self, renderable: Any):
        self.renderable = renderable

    def __rich_console__(self, console: Any, options: Any) -> Any:
        from rich.segment import Segment

        for line in console.render_lines(self.renderable, options, pad=False):
            while line and not line[-1].text.strip() and not line[-1].control:
                line.pop()
            if line and line[-1].text != line[-1].text.rstrip():
                last = line.pop()
                line.append(Segment(last.text.rstrip(), last.style))
            yield from line
            yield Segment.line()


def print_summary(console: Any, summary: dict[str, Any], run_dir: Any) -> None:
    """What ``dsk train`` prints at the end: the summary table, the final examples once, the held-out result
    (greedy accuracy, or the held-out loss of text data) and the run directory."""
    from rich.markup import escape

    console.print(summary_table(summary), soft_wrap=False)  # the console's width (80 in a log): it fits
    examples = summary_examples(summary)
    if examples is not None:
        console.print(examples, soft_wrap=False)
    acc = summary.get("eval/accuracy")
    n = next((st.get("eval/samples") for st in reversed(summary.get("stages", [])) if "eval/samples" in st), None)
    loss, ppl = summary.get("eval/loss"), summary.get("eval/ppl")
    if acc is not None:
        console.print(f"held-out greedy accuracy {100 * acc:.1f}% on {n} test problems", soft_wrap=False)
    elif loss is not None and ppl is not None:  # text data
        console.print(f"held-out loss {loss:.4f} (perplexity {ppl:.2f}) on {n} test records", soft_wrap=False)
    # the path stays on one line, however long, so that it can be copied
    console.print(f"run directory: {escape(str(run_dir))}")
