"""`kmnist report`: the results table (Markdown, CSV), learning-curve figures and one self-contained HTML page.

Everything is built from saved run files (config.json, summary.json, metrics.csv, environment.json).
"""

from __future__ import annotations

import base64
import csv
import hashlib
import html
import io
import re
from pathlib import Path
from typing import Any, Iterable

from kmnist import plots, runs
from kmnist.data import is_balanced
from kmnist.errors import KmnistError
from kmnist.files import folder_safe
from kmnist.results import (METRICS, TABLE_FIELDS, Group, Results, Run, collect, format_setting, group_curves,
                            versus_field)

MARKDOWN = "results.md"
CSV = "results.csv"
HTML = "report.html"
OVERLAY = "overlay.png"
CURVES = "curves"

BALANCED_COLUMN = "test balanced acc at best val epoch (%)"
FINAL_COLUMN = "final test acc (%)"
FINAL_BALANCED_COLUMN = "final test balanced acc (%)"
# The table's notes, each with the column it explains (None: always shown); a note is shown with its column.
NOTES = (
    (None, "Mean ± sample standard deviation over seeds (n − 1 in the denominator); *seeds* is the number of runs."),
    (None, "*Test acc at best val epoch*: the test accuracy of the epoch with the best validation accuracy "
           "(balanced accuracy for imbalanced datasets such as K49) — "
           "the honest estimate, since the epoch is chosen without looking at the test set."),
    (None, "*Max test acc*: the highest test accuracy over all epochs — the epoch is chosen **on the test set**, as "
           "the report measured it. It is optimistic and is shown only to compare with the report."),
    (None, "*Seconds*: training time per run (epochs only, evaluation excluded)."),
    (FINAL_COLUMN, "*Final test acc* (shown when some runs hold out no validation split): the test accuracy after "
                   "the last epoch, the result of a fixed recipe where nothing is chosen after training."),
    (BALANCED_COLUMN, "*Test balanced acc* (imbalanced datasets such as K49): mean of the per-class test accuracies "
                      "of the epoch with the best validation balanced accuracy, the dataset's official score; "
                      "accuracy columns stand beside it."),
    (FINAL_BALANCED_COLUMN, "*Final test balanced acc*: the same after the last epoch, for runs that hold out no "
                            "validation split."),
)


def table_notes(results: Results) -> list[str]:
    """The notes (Markdown) of the columns this table shows."""
    columns = table_columns(results)
    return [text for column, text in NOTES if column is None or column in columns]


def unreadable_text(results: Results) -> str:
    names = ", ".join(str(path) for path in results.unreadable)
    return (f"Left out ({len(results.unreadable)} folder(s) with run files but no {runs.CONFIG}, so no settings to "
            f"group them by): {names}")


def format_stat(stat: tuple[float, float | None], digits: int = 2) -> str:
    mean, std = stat
    if mean != mean:  # NaN: no value
        return "–"
    return f"{mean:.{digits}f}" if std is None else f"{mean:.{digits}f} ± {std:.{digits}f}"


def table_columns(results: Results) -> list[str]:
    extra = [name for name in results.columns if name not in TABLE_FIELDS]
    columns = ["configuration", *extra, "batch size", "learning rate", "epochs", "seeds", "train acc (%)",
               "test acc at best val epoch (%)", "max test acc (%, test-selected)"]
    if any(is_balanced(group.settings.get("dataset", "kmnist")) for group in results.groups):
        columns.insert(columns.index("max test acc (%, test-selected)"), BALANCED_COLUMN)
    if any(not group.settings.get("val_size") for group in results.groups):  # nothing chosen: the last epoch counts
        columns.insert(columns.index("test acc at best val epoch (%)") + 1, FINAL_COLUMN)
        if any(not group.settings.get("val_size") and is_balanced(group.settings.get("dataset", "kmnist"))
               for group in results.groups):  # K49's official score of such a run
            columns.insert(columns.index(FINAL_COLUMN) + 1, FINAL_BALANCED_COLUMN)
    if any(group.reported_max_test_acc is not None for group in results.groups):
        columns.append("report: max test acc (%)")
    return [*columns, "seconds"]


def table_rows(results: Results) -> list[dict[str, str]]:
    """The table as strings, one dict per configuration, keyed by `table_columns`."""
    columns = table_columns(results)
    rows = []
    for group in results.groups:
        row = {"configuration": group.label, "batch size": format_setting(group.settings.get("batch_size")),
               "learning rate": format_setting(group.settings.get("lr")),
               "epochs": format_setting(group.settings.get("epochs")), "seeds": str(len(group.runs)),
               "train acc (%)": format_stat(group.stats["final_train_acc"]),
               "test acc at best val epoch (%)": format_stat(group.stats["test_acc_at_best_val"]),
               "max test acc (%, test-selected)": format_stat(group.stats["max_test_acc"]),
               BALANCED_COLUMN: format_stat(group.stats["test_bal_acc_at_best_val"]),
               FINAL_COLUMN: format_stat(group.stats["final_test_acc"]),
               FINAL_BALANCED_COLUMN: format_stat(group.stats["final_test_bal_acc"]),
               "seconds": format_stat(group.stats["train_seconds"], digits=0)}
        for name in results.columns:
            if name not in TABLE_FIELDS:
                row[name] = format_setting(group.settings.get(name))
        if "report: max test acc (%)" in columns:
            reported = group.reported_max_test_acc
            row["report: max test acc (%)"] = "–" if reported is None else f"{reported:.2f}"
        rows.append({column: row[column] for column in columns})
    return rows


def markdown(results: Results) -> str:
    """The table and its notes, and the runs left out of it with how far each got."""
    if not results.groups:
        lines = ["No finished runs yet: nothing to tabulate.", ""]
    else:
        columns = table_columns(results)
        escape = lambda text: text.replace("|", "\\|")  # noqa: E731
        lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
        lines += ["| " + " | ".join(escape(row[c]) for c in columns) + " |" for row in table_rows(results)]
        lines += ["", *(f"- {note}" for note in table_notes(results))]
    if results.hardware:
        lines.append(f"- Hardware: {'; '.join(results.hardware)}.")
    for group in results.groups:
        if group.repeated_seeds:
            lines.append(f"- {group.label}: {repeated_text(group)}.")
    if results.incomplete:
        lines.append(f"- {incomplete_text(results)}.")
    if results.unreadable:
        lines.append(f"- {unreadable_text(results)}.")
    return "\n".join(lines) + "\n"


def incomplete_text(results: Results) -> str:
    """The runs left out of the table, each with how far it got; those with epochs have curves in report.html."""
    progress = results.progress
    names = [f"{run.name} ({epochs_text(run, progress[run.name])})" if run.name in progress else run.name
             for run in results.incomplete]
    curves = "; those with a finished epoch are drawn in report.html, as far as they got" if progress else ""
    return (f"Not in the table ({len(results.incomplete)} run(s) without summary.json: cut off, running or "
            f"failed{curves}): {', '.join(names)}")


def epochs_text(run: Run, history: list[dict[str, Any]]) -> str:
    total = run.config.get("epochs")
    return f"{history[-1]['epoch']} of {total} epochs" if total else f"{history[-1]['epoch']} epochs"


def repeated_text(group: Group) -> str:
    seeds = ", ".join(map(str, group.repeated_seeds))
    return (f"{len(group.runs)} runs but {len(set(group.seeds))} distinct seed(s); seed {seeds} was run more than "
            "once (the same computation again), so its ± is not a spread over seeds")


def csv_text(results: Results) -> str:
    extra = [name for name in results.varying if name not in TABLE_FIELDS]
    header = ["configuration", *extra, *TABLE_FIELDS, "seed_values", "runs"]
    for metric in METRICS:
        header += [f"{metric}_mean", f"{metric}_std"]
    header += ["reported_max_test_acc", "run_dirs"]
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    for group in results.groups:
        row: list[Any] = [group.label, *(group.settings.get(name) for name in [*extra, *TABLE_FIELDS])]
        row += [" ".join(map(str, group.seeds)), len(group.runs)]
        for metric in METRICS:
            mean, std = group.stats[metric]
            row += ["" if mean != mean else f"{mean:.4f}", "" if std is None else f"{std:.4f}"]
        row += ["" if group.reported_max_test_acc is None else group.reported_max_test_acc,
                ";".join(str(run.run_dir) for run in group.runs)]
        writer.writerow(row)
    return buffer.getvalue()


def file_stem(name: str) -> str:
    """A file name for `name`; names that had to be changed get a digest of the original, so two never meet."""
    stem = folder_safe(name)
    return stem if stem == name else f"{stem}~{hashlib.sha1(name.encode()).hexdigest()[:8]}"


def write_figures(results: Results, out: Path, vs: str | None, progress: bool = False) -> dict[str, Any]:
    """Per-run learning curves (of unfinished runs too, as far as they got), the overlay, and accuracy against
    the one varying numeric setting. `progress`: a bar over the runs (on a terminal), for folders of many."""
    from tqdm import tqdm

    figures: dict[str, Any] = {"curves": [], "unfinished": []}
    total = len(results.progress) + sum(len(group.runs) for group in results.groups)
    with tqdm(total=total, desc="drawing learning curves", unit="run", leave=False,
              disable=None if progress else True, dynamic_ncols=True) as bar:  # closed on an error too
        for run in results.incomplete:
            history = results.progress.get(run.name)
            if history:
                bar.update()
                path = plots.learning_curves(
                    history, out / CURVES / f"{file_stem(run.name)}.png",
                    title=f"{run.name} ({run.config['model']} on {run.config['dataset']}; unfinished: "
                          f"{epochs_text(run, history)})",
                    balanced=is_balanced(run.config["dataset"]))
                figures["unfinished"].append((run.name, epochs_text(run, history), path))
        for group in results.groups:
            for run in group.runs:
                bar.update()
                path = plots.learning_curves(
                    runs.read_metrics(run.run_dir), out / CURVES / f"{file_stem(run.name)}.png",
                    title=f"{run.name} ({run.config['model']} on {run.config['dataset']})",
                    balanced=is_balanced(run.config["dataset"]))
                figures["curves"].append((group.label, run.name, path))
    if results.groups:
        figures["overlay"] = plots.overlay_curves([group_curves(group) for group in results.groups], out / OVERLAY)
    setting = versus_field(results, vs)
    if setting is not None:
        figures["versus"] = plots.accuracy_versus(setting, versus_series(results, setting),
                                                  out / f"accuracy_vs_{file_stem(setting)}.png",
                                                  dashed=("max test accuracy (test-selected)",))
        figures["versus_setting"] = setting
    return figures


def versus_series(results: Results, setting: str) -> dict[str, tuple[list[float], list[float], list[float]]]:
    """Lines of accuracy against `setting`: name -> (setting values, means, stds). Where other settings vary
    too, one line per combination of them, of the honest numbers only."""
    others = [name for name in results.varying if name != setting]
    metrics = [("best_val_acc", "validation accuracy (best epoch)"),
               ("test_acc_at_best_val", "test accuracy at best validation epoch"),
               ("final_test_acc", "final test accuracy (no validation split)"),
               ("max_test_acc", "max test accuracy (test-selected)")]
    if others:
        metrics = [metrics[1], metrics[2]]
    combinations: dict[str, list[Group]] = {}
    for group in results.groups:
        label = ", ".join(f"{name}={format_setting(group.settings.get(name))}" for name in others)
        combinations.setdefault(label, []).append(group)
    series = {}
    for label, members in combinations.items():
        members.sort(key=lambda group: group.settings[setting])
        for metric, name in metrics:
            if metric == "final_test_acc" and all(group.settings.get("val_size") for group in members):
                continue  # with a validation split, the epoch chosen on it is the result
            stats = [group.stats[metric] for group in members]
            if all(mean != mean for mean, _ in stats):
                continue
            series[f"{name}: {label}" if label else name] = (
                [group.settings[setting] for group in members], [mean for mean, _ in stats],
                [std or 0.0 for _, std in stats])
    return series


def data_uri(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(Path(path).read_bytes()).decode("ascii")


def _inline_markdown(text: str) -> str:
    text = html.escape(text)
    text = re.sub(r"\*\*(.+?)\*\*", r"<strong>\1</strong>", text)
    return re.sub(r"\*(.+?)\*", r"<em>\1</em>", text)


def html_page(results: Results, figures: dict[str, Any], sources: Iterable[str]) -> str:
    """One file holding the table and every figure (PNG as data URIs): nothing to fetch, nothing beside it."""
    columns = table_columns(results)
    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(row[c])}</td>" for c in columns) + "</tr>"
                   for row in table_rows(results))
    notes = "".join(f"<li>{_inline_markdown(note)}</li>" for note in table_notes(results))
    if results.hardware:
        notes += f"<li>Hardware: {html.escape('; '.join(results.hardware))}.</li>"
    notes += "".join(f"<li>{html.escape(group.label)}: {html.escape(repeated_text(group))}.</li>"
                     for group in results.groups if group.repeated_seeds)
    parts = [
        "<!DOCTYPE html>", "<html lang='en'><head><meta charset='utf-8'><title>kmnist results</title>",
        "<style>body{font-family:sans-serif;margin:2em;max-width:1400px}table{border-collapse:collapse}"
        "td,th{border:1px solid #bbb;padding:4px 8px;text-align:right}td:first-child,th:first-child{text-align:left}"
        "th{background:#f0f0f0}img{max-width:100%}figure{margin:1em 0}figcaption{color:#555;font-size:90%}"
        ".curves{display:grid;grid-template-columns:repeat(auto-fill,minmax(560px,1fr));gap:1em}</style></head><body>",
        "<h1>kmnist results</h1>",
        f"<p>{len([r for g in results.groups for r in g.runs])} finished run(s) in {len(results.groups)} "
        f"configuration(s), from {html.escape(', '.join(sources))}.</p>",
    ]
    if results.groups:
        parts += ["<h2>Results</h2>", f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>",
                  f"<ul>{notes}</ul>"]
    else:
        parts.append("<p>No finished runs yet: nothing to tabulate.</p>")
    if results.incomplete:
        parts.append(f"<p>{html.escape(incomplete_text(results))}.</p>")
    if results.unreadable:
        parts.append(f"<p>{html.escape(unreadable_text(results))}.</p>")
    if "versus" in figures:
        setting = html.escape(figures["versus_setting"])
        parts += [f"<h2>Accuracy against {setting}</h2>",
                  f"<figure><img alt='accuracy against {setting}' src='{data_uri(figures['versus'])}'>"
                  "<figcaption>Mean ± std over seeds. The dashed line is chosen on the test set."
                  "</figcaption></figure>"]
    if "overlay" in figures:
        parts += ["<h2>Runs compared</h2>",
                  f"<figure><img alt='runs compared' src='{data_uri(figures['overlay'])}'></figure>"]
    parts += curve_grid("Learning curves per run",
                        [(name, f"{label}: {name}", path) for label, name, path in figures["curves"]])
    parts += curve_grid("Unfinished runs (not in the table): learning curves so far",
                        [(name, f"{name}: {progress}", path) for name, progress, path in figures["unfinished"]])
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


def curve_grid(heading: str, figures: list[tuple[str, str, Path]]) -> list[str]:
    """A heading and a grid of (name, caption, PNG) figures; nothing where there are none."""
    if not figures:
        return []
    return [f"<h2>{html.escape(heading)}</h2><div class='curves'>",
            *(f"<figure><img alt='{html.escape(name)}' src='{data_uri(path)}'>"
              f"<figcaption>{html.escape(caption)}</figcaption></figure>" for name, caption, path in figures),
            "</div>"]


def write_report(paths: list[str | Path], out: str | Path, vs: str | None = None,
                 progress: bool = False) -> dict[str, Any]:
    """Build every report file in `out` from the run directories below `paths`; returns what was written."""
    results = collect(paths)
    if not results.groups and not results.incomplete and results.unreadable:
        raise KmnistError(f"nothing to report; {unreadable_text(results)}")
    if not results.groups and not results.progress:
        raise KmnistError(f"nothing to report: {len(results.incomplete)} run(s) without summary.json and without "
                          f"a readable finished epoch (cut off, running or failed): "
                          f"{', '.join(run.name for run in results.incomplete)}")
    for run in (run for group in results.groups for run in group.runs):  # before any file is written
        if not runs.read_metrics(run.run_dir):
            raise KmnistError(f"{run.run_dir / runs.METRICS} holds no epochs, yet its summary.json says the run "
                              "finished")
    versus_field(results, vs)  # a bad --vs, too, is refused before any file is written
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    table = markdown(results)
    runs.atomic_write_text(out / MARKDOWN, table)
    runs.atomic_write_text(out / CSV, csv_text(results))
    figures = write_figures(results, out, vs, progress)
    runs.atomic_write_text(out / HTML, html_page(results, figures, [str(p) for p in paths]))
    written = [out / MARKDOWN, out / CSV, out / HTML]
    written += [figures[name] for name in ("overlay", "versus") if name in figures]
    return {"out": str(out), "markdown": table, "html": str(out / HTML), "files": [str(p) for p in written],
            "curves": len(figures["curves"]), "unfinished_curves": len(figures["unfinished"]),
            "groups": len(results.groups),
            "runs": sum(len(group.runs) for group in results.groups), "incomplete": len(results.incomplete),
            "unreadable": [str(path) for path in results.unreadable], "versus": figures.get("versus_setting")}

