"""The run report: a summary table for the terminal and RUN/report.md with PNG plots, from metrics.json.

Everything here reads metrics.json only (plus the PNGs stages left under RUN/plots/), so a report can
be rebuilt at any time (`cost-dist report RUN --write`) and stays consistent with the metrics.
The plots this module draws are named `report_*.png` so they never overwrite a stage's own plot.
"""

from __future__ import annotations

import io
import logging
import math
import re
from typing import Any, Iterable

import yaml

from cost_dist.rundir import RunDir

log = logging.getLogger(__name__)

STAGE_ORDER = ("prepare", "embed", "tokenize", "assign", "generate", "evaluate")
METHOD_ORDER = ("cost-dist", "sasrec", "dense", "pop")
_AT_K = re.compile(r"^(recall|ndcg|hit|mrr)@(\d+)$")
# History columns that are bookkeeping, not training curves.
_NOT_CURVES = {"epoch", "step", "steps", "samples", "samples_per_s", "wall_s", "time_s", "lr", "level",
               "dead_codes_reseeded"}


# --------------------------------------------------------------------------------------------------
# Reading metrics.json defensively: a report of a half-finished run must still work.
# --------------------------------------------------------------------------------------------------


def _get(d: Any, *keys: str, default: Any = None) -> Any:
    for k in keys:
        if not isinstance(d, dict) or k not in d:
            return default
        d = d[k]
    return d


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v))


def ranking_table(metrics: dict[str, Any], split: str) -> tuple[list[str], list[str], dict[str, dict[str, float]]]:
    """(methods, metric names ordered by kind then K, {method: {metric: value}}) of evaluate.<split>."""
    per_method = _get(metrics, "evaluate", split, default={}) or {}
    rows: dict[str, dict[str, float]] = {}
    names: set[str] = set()
    for method, values in per_method.items():
        if not isinstance(values, dict):
            continue
        kept = {k: float(v) for k, v in values.items() if _AT_K.match(str(k)) and _is_number(v)}
        if kept:
            rows[method] = kept
            names.update(kept)
    kinds = ["recall", "ndcg", "hit", "mrr"]
    ordered = sorted(names, key=lambda n: (kinds.index(_AT_K.match(n).group(1)), int(_AT_K.match(n).group(2))))
    methods = sorted(rows, key=lambda m: (METHOD_ORDER.index(m) if m in METHOD_ORDER else len(METHOD_ORDER), m))
    return methods, ordered, rows


def history_series(history: Any) -> tuple[list[float], dict[str, list[float]]]:
    """Normalise a training history into (x, {series: values}).

    Accepts a list of per-epoch dicts (x from "epoch" or "step" when present), a dict of lists, or a
    plain list of losses.
    """
    if isinstance(history, dict):
        series = {k: [float(x) if _is_number(x) else math.nan for x in v]
                  for k, v in history.items() if isinstance(v, list) and any(_is_number(x) for x in v)}
        x_key = next((k for k in ("epoch", "step") if k in series), None)
        x = series.pop(x_key) if x_key else list(range(1, 1 + max((len(v) for v in series.values()), default=0)))
        return x, series
    if isinstance(history, list) and history and all(_is_number(v) for v in history):
        return list(range(1, len(history) + 1)), {"loss": [float(v) for v in history]}
    if isinstance(history, list) and history and all(isinstance(v, dict) for v in history):
        keys: list[str] = []
        for row in history:
            keys.extend(k for k, v in row.items() if _is_number(v) and k not in keys)
        x_key = next((k for k in ("epoch", "step") if k in keys), None)
        x = [float(row.get(x_key, i + 1)) for i, row in enumerate(history)] if x_key else \
            [float(i + 1) for i in range(len(history))]
        series = {k: [float(row[k]) if _is_number(row.get(k)) else math.nan for row in history]
                  for k in keys if k != x_key}
        return x, series
    return [], {}


def _code_usage(diagnostics: Any) -> dict[str, list[float]]:
    """Per-level series found in the tokenizer diagnostics ({name: [value per level]}).

    Takes every list of numbers (one per level), or a list of per-level dicts, whatever its name, so
    the tokenizer may add diagnostics without touching the report.
    """
    out: dict[str, list[float]] = {}
    if not isinstance(diagnostics, dict):
        return out
    for key, value in diagnostics.items():
        if key in _NOT_CURVES:
            continue
        if isinstance(value, list) and value and all(_is_number(v) for v in value):
            out[key] = [float(v) for v in value]
        elif isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
            for sub in value[0]:
                vals = [v.get(sub) for v in value]
                if sub not in _NOT_CURVES and all(_is_number(v) for v in vals):
                    out[f"{key}.{sub}"] = [float(v) for v in vals]
        elif isinstance(value, dict) and value and all(isinstance(v, dict) for v in value.values()):
            # {"level_0": {...}, "level_1": {...}}
            levels = list(value.values())
            for sub in levels[0]:
                vals = [v.get(sub) for v in levels]
                if sub not in _NOT_CURVES and all(_is_number(v) for v in vals):
                    out[f"{key}.{sub}"] = [float(v) for v in vals]
    return out


def _scalars(d: Any, prefix: str = "", depth: int = 2) -> list[tuple[str, Any]]:
    """Flat (dotted key, value) list of the scalar entries of a metrics section."""
    out: list[tuple[str, Any]] = []
    if not isinstance(d, dict):
        return out
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, bool) or isinstance(v, str) or _is_number(v):
            out.append((key, v))
        elif isinstance(v, dict) and depth > 0:
            out.extend(_scalars(v, key + ".", depth - 1))
    return out


def _fmt(v: Any) -> str:
    if isinstance(v, bool) or not _is_number(v):
        return str(v)
    if isinstance(v, int):
        return f"{v:,}"
    if abs(v) >= 100:
        return f"{v:,.1f}"
    return f"{v:.4f}"


# --------------------------------------------------------------------------------------------------
# Terminal summary
# --------------------------------------------------------------------------------------------------


def _text_table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
             for r in [header, *rows]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def stage_rows(metrics: dict[str, Any]) -> list[list[str]]:
    timings = metrics.get("timings") or {}
    last = metrics.get("last_run") or {}
    ran, skipped = set(last.get("stages_run") or ()), set(last.get("stages_skipped") or ())
    rows = []
    for stage in STAGE_ORDER:
        if stage in ran:
            status = "ran"
        elif stage in skipped:
            status = "skipped (done before)" if stage in timings else "not run"
        else:
            status = "done" if stage in timings else "-"
        wall = timings.get(stage)
        rows.append([stage, status, f"{wall:.1f}" if _is_number(wall) else "-"])
    return rows


def format_summary(metrics: dict[str, Any]) -> str:
    """The summary table `cost-dist report RUN` and the jobs print: stages, data, ranking metrics."""
    cfg = metrics.get("config") or {}
    lines = [f"cost-dist run {metrics.get('run', '?')} (config {cfg.get('name', '?')}, seed {cfg.get('seed', '?')})", ""]
    lines.append(_text_table(["stage", "status", "wall s"], stage_rows(metrics)))
    last = metrics.get("last_run") or {}
    if _is_number(last.get("wall_s")):
        lines.append(f"total wall time of the last run: {last['wall_s']:.1f} s")
    data = metrics.get("data") or {}
    counts = [(k, data[k]) for k in ("num_items", "num_users", "num_interactions") if _is_number(data.get(k))]
    if counts:
        lines += ["", "data: " + ", ".join(f"{k.removeprefix('num_')} {_fmt(v)}" for k, v in counts)]
    for split in ("test", "valid"):
        methods, names, rows = ranking_table(metrics, split)
        if not methods:
            continue
        lines += ["", f"{split} (leave-one-out, full-catalog ranking)"]
        lines.append(_text_table(["method", *names], [[m, *(f"{rows[m].get(n, math.nan):.4f}" for n in names)]
                                                      for m in methods]))
    if not any(ranking_table(metrics, s)[0] for s in ("test", "valid")):
        lines += ["", "no evaluation metrics yet (the evaluate stage has not finished)"]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------
# Plots and report.md
# --------------------------------------------------------------------------------------------------


def _figure_bytes(fig) -> bytes:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # no display on clusters and in CI
    import matplotlib.pyplot as plt

    return plt


def plot_history(history: Any, title: str) -> bytes | None:
    x, series = history_series(history)
    if not series:
        return None
    plt = _pyplot()
    from matplotlib.ticker import MaxNLocator

    losses = {k: v for k, v in series.items() if "loss" in k.lower()}
    others = {k: v for k, v in series.items() if k not in losses and k not in _NOT_CURVES}
    panels = [p for p in (losses, others) if p]
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 3.8), squeeze=False)
    for ax, panel, ylabel in zip(axes[0], panels, ("loss", "value")):
        for name, values in panel.items():
            ax.plot(x[: len(values)], values, marker="o", markersize=3, label=name)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title)
    return _figure_bytes(fig)


def plot_code_usage(diagnostics: Any) -> bytes | None:
    usage = _code_usage(diagnostics)
    if not usage:
        return None
    plt = _pyplot()
    names = list(usage)
    fig, axes = plt.subplots(1, len(names), figsize=(3.2 * len(names), 3.4), squeeze=False)
    for ax, name in zip(axes[0], names):
        values = usage[name]
        ax.bar(range(1, len(values) + 1), values, color="tab:blue")
        ax.set_xticks(range(1, len(values) + 1))
        ax.set_xlabel("level")
        ax.set_title(name, fontsize=9)
        ax.grid(alpha=0.3, axis="y")
    fig.suptitle("tokenizer: per-level code usage")
    return _figure_bytes(fig)


def plot_ranking(metrics: dict[str, Any], split: str) -> bytes | None:
    methods, names, rows = ranking_table(metrics, split)
    kinds = [k for k in ("recall", "ndcg") if any(n.startswith(k + "@") for n in names)]
    if not methods or not kinds:
        return None
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(kinds), figsize=(5.2 * len(kinds), 3.8), squeeze=False)
    for ax, kind in zip(axes[0], kinds):
        ks = sorted(int(n.split("@")[1]) for n in names if n.startswith(kind + "@"))
        for method in methods:
            ax.plot(ks, [rows[method].get(f"{kind}@{k}", math.nan) for k in ks], marker="o", label=method)
        ax.set_xticks(ks)
        ax.set_xlabel("K")
        ax.set_ylabel(f"{kind.upper() if kind == 'ndcg' else kind.capitalize()}@K")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"{split}: ranking quality against the baselines")
    return _figure_bytes(fig)


def _md_table(header: list[str], rows: Iterable[list[str]]) -> str:
    rows = list(rows)
    out = ["| " + " | ".join(header) + " |", "| " + " | ".join(["---"] * len(header)) + " |"]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(out)


def _stage_plots(run: RunDir) -> list[str]:
    import pyarrow.fs as pafs

    if not run.exists("plots"):
        return []
    infos = run.fs.get_file_info(pafs.FileSelector(run.path("plots")))
    return sorted(i.base_name for i in infos if i.type == pafs.FileType.File and i.base_name.endswith(".png")
                  and not i.base_name.startswith(("report_", ".tmp-")))


def write_report(run: RunDir) -> str:
    """Write RUN/report.md and its plots (RUN/plots/report_*.png); returns the report's URI."""
    metrics = run.read_metrics()
    plots: dict[str, str] = {}  # file -> caption

    def save(name: str, png: bytes | None, caption: str) -> None:
        if png:
            run.write_bytes(f"plots/{name}", png)
            plots[name] = caption

    tokenizer_history = _get(metrics, "tokenizer", "train", "history")
    generator_history = _get(metrics, "generator", "history")
    save("report_tokenizer_loss.png", plot_history(tokenizer_history, "tokenizer training"), "Tokenizer loss per epoch")
    save("report_generator_loss.png", plot_history(generator_history, "generator training"),
         "Generator loss (and validation metrics) per epoch")
    save("report_code_usage.png", plot_code_usage(_get(metrics, "tokenizer", "diagnostics")), "Per-level code usage")
    for split in ("test", "valid"):
        save(f"report_{split}_at_k.png", plot_ranking(metrics, split), f"{split}: Recall@K and NDCG@K per method")

    cfg = metrics.get("config") or {}
    md = [f"# cost-dist report: {cfg.get('name', 'run')}", "",
          f"Run directory: `{metrics.get('run', run.uri())}`", ""]
    md += ["## Stages", "", _md_table(["stage", "status", "wall s"], stage_rows(metrics)), ""]
    last = metrics.get("last_run") or {}
    if _is_number(last.get("wall_s")):
        md += [f"Total wall time of the last run: {last['wall_s']:.1f} s.", ""]

    for split in ("test", "valid"):
        methods, names, rows = ranking_table(metrics, split)
        if methods:
            md += [f"## Ranking quality ({split})", "",
                   "Leave-one-out, ranking over the full catalog"
                   + (" (test figures of the checkpoint best on validation)." if split == "test" else "."), "",
                   _md_table(["method", *names], ([m, *(f"{rows[m].get(n, math.nan):.4f}" for n in names)]
                                                  for m in methods)), ""]
            if f"report_{split}_at_k.png" in plots:
                md += [f"![{plots[f'report_{split}_at_k.png']}](plots/report_{split}_at_k.png)", ""]

    sections = [("Data", metrics.get("data")), ("Embedding", metrics.get("embed")),
                ("Tokenizer training", _get(metrics, "tokenizer", "train")),
                ("Tokenizer diagnostics", _get(metrics, "tokenizer", "diagnostics")),
                ("ID assignment", metrics.get("assign")), ("Generator", metrics.get("generator"))]
    for title, section in sections:
        scalars = _scalars(section)
        if scalars:
            md += [f"## {title}", "", _md_table(["metric", "value"], ([k, _fmt(v)] for k, v in scalars)), ""]
        for name in {"Tokenizer training": ["report_tokenizer_loss.png"],
                     "Tokenizer diagnostics": ["report_code_usage.png"],
                     "Generator": ["report_generator_loss.png"]}.get(title, []):
            if name in plots:
                md += [f"![{plots[name]}](plots/{name})", ""]

    stage_pngs = _stage_plots(run)
    if stage_pngs:
        md += ["## Plots written by the stages", ""]
        md += [f"![{name}](plots/{name})\n" for name in stage_pngs]

    versions = metrics.get("versions") or {}
    if versions:
        md += ["## Versions", "", _md_table(["package", "version"], ([k, str(v)] for k, v in versions.items())), ""]
    if cfg:
        md += ["## Resolved config", "", "```yaml", yaml.safe_dump(cfg, sort_keys=False).rstrip(), "```", ""]
    run.write_text("report.md", "\n".join(md))
    log.info("report written to %s", run.uri("report.md"))
    return run.uri("report.md")
