"""Writing results: ``results.json``, ``report.md`` and ``accuracy.png`` for one evaluation, and the checkpoint
comparison (``comparison.md``, ``comparison.json``, ``comparison.png``) across several."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from lingshu_rl.eval.charts import accuracy_chart, comparison_chart
from lingshu_rl.eval.results import macro_average
from lingshu_rl.telemetry.jsonl import to_jsonable

SCORING_NOTE = ("Scoring rules, and where they differ from MedEvalKit: `lingshu_rl/eval/scoring.py`. Accuracy is "
                "in %, with its 95% Wilson interval; a missing prediction counts as wrong.")
_SHOWN_IDS = 20


def pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.2f}"


def _ci(entry: dict[str, Any]) -> str:
    return "-" if entry.get("accuracy") is None else f"{pct(entry['ci95'][0])}-{pct(entry['ci95'][1])}"


def headline(result: dict[str, Any]) -> str:
    """``accuracy: 0.6312 (95% CI 0.6045-0.6571, n=1273)``, or the report metrics of a report benchmark."""
    if result.get("accuracy") is None and "report" in result:
        m = result["report"]
        return (f"report metrics: BLEU-1 {m['bleu1']:.4f}, BLEU-4 {m['bleu4']:.4f}, ROUGE-L {m['rouge_l']:.4f}, "
                f"CIDEr {m['cider']:.4f} (n={m['n']})")
    if result.get("accuracy") is None:
        return f"accuracy: - (n={result['n']})"
    low, high = result["ci95"]
    return f"accuracy: {result['accuracy']:.4f} (95% CI {low:.4f}-{high:.4f}, n={result['n']})"


def format_ids(ids: list[str]) -> str:
    """The first ids and how many there are in all (the full lists are in ``results.json``)."""
    return ", ".join(ids[:_SHOWN_IDS]) + (f", ... ({len(ids)} in all)" if len(ids) > _SHOWN_IDS else "")


_REPORT_KEYS = ("bleu1", "bleu2", "bleu3", "bleu4", "rouge_l", "cider")


def _benchmark_section(r: dict[str, Any]) -> list[str]:
    bullets = [f"- {note}" for note in r["notes"]]
    if r["missing"]:
        bullets.append(f"- {len(r['missing'])} item(s) without a prediction, counted wrong: "
                       f"{format_ids(r['missing'])}")
    if r["unknown"]:
        bullets.append(f"- {len(r['unknown'])} prediction id(s) not in the benchmark, ignored: "
                       f"{format_ids(r['unknown'])}")
    lines = [f"## {r['benchmark']}: {r['title']}"] + ([""] + bullets if bullets else [])
    for label, values in r["subsets"].items():
        lines += ["", f"| {label} | n | accuracy | 95% CI |", "|---|---:|---:|---|"]
        lines += [f"| {value} | {e['n']} | {pct(e['accuracy'])} | {_ci(e)} |" for value, e in values.items()]
    if "open" in r:
        o = r["open"]
        lines += ["", f"Open answers ({o['n']}): token precision {pct(o['precision'])}, recall {pct(o['recall'])}, "
                      f"F1 {pct(o['f1'])}."]
    if "report" in r:
        m = r["report"]
        lines += ["", "| reports | BLEU-1 | BLEU-2 | BLEU-3 | BLEU-4 | ROUGE-L | CIDEr |", "|" + "---:|" * 7,
                  f"| {m['n']} | " + " | ".join(f"{m[k]:.4f}" for k in _REPORT_KEYS) + " |"]
    return lines + [""]


def markdown(results: dict[str, Any]) -> str:
    benchmarks = results["benchmarks"]
    lines = [f"# Evaluation of {results.get('model') or results.get('predictions') or 'predictions'}", "",
             SCORING_NOTE, ""]
    if results.get("engine"):
        lines.append(f"Engine: {results['engine']}; greedy decoding, at most {results['max_new_tokens']} new tokens"
                     + (f"; first {results['limit']} items per benchmark" if results.get("limit") else "") + ".")
        lines.append("")
    lines += ["| benchmark | n | accuracy | 95% CI | answer read | missing |", "|---|---:|---:|---|---:|---:|"]
    for name, r in benchmarks.items():
        lines.append(f"| {name} | {r['n']} | {pct(r['accuracy'])} | {_ci(r)} | {pct(r['extracted'])} | "
                     f"{len(r['missing'])} |")
    if len(benchmarks) > 1:
        lines.append(f"| average (unweighted) | | {pct(macro_average(benchmarks))} | | | |")
    lines.append("")
    for r in benchmarks.values():
        lines += _benchmark_section(r)
    return "\n".join(lines)


def write_results(results: dict[str, Any], output_dir: Path) -> Path:
    """Write ``results.json``, ``report.md`` and ``accuracy.png`` into ``output_dir``; return the JSON path."""
    output_dir.mkdir(parents=True, exist_ok=True)
    path = output_dir / "results.json"
    path.write_text(json.dumps(to_jsonable(results), indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    (output_dir / "report.md").write_text(markdown(results), encoding="utf-8")
    accuracy_chart(results["benchmarks"], output_dir / "accuracy.png", "accuracy by benchmark")
    return path


def _headline(result: dict[str, Any] | None) -> dict[str, Any] | None:
    return None if result is None else {k: result[k] for k in ("n", "correct", "accuracy", "ci95")}


def _load(path: Path) -> dict[str, Any]:
    path = path / "results.json" if path.is_dir() else path
    return json.loads(path.read_text(encoding="utf-8"))


def compare(results_by_name: dict[str, Path], output_dir: Path) -> Path:
    """One table and one chart comparing evaluations (e.g. base, SFT, GRPO checkpoints), in the given order.

    Each value is a ``results.json`` or the directory holding it. Writes ``comparison.md`` (accuracy and 95%
    interval per benchmark and checkpoint, the unweighted average over the benchmarks every checkpoint has, and
    the change from the first to the last checkpoint), ``comparison.json`` and ``comparison.png``; returns the
    Markdown path.
    """
    runs = {name: _load(Path(path))["benchmarks"] for name, path in results_by_name.items()}
    names = list(dict.fromkeys(b for benchmarks in runs.values() for b in benchmarks))
    common = [b for b in names if all(b in benchmarks for benchmarks in runs.values())]
    averages = {run: macro_average({b: benchmarks[b] for b in common}) for run, benchmarks in runs.items()}
    first, last = list(runs)[0], list(runs)[-1]
    lines = ["# Checkpoint comparison", "", SCORING_NOTE, "",
             "| benchmark | " + " | ".join(runs) + f" | {last} - {first} |",
             "|---|" + "---:|" * (len(runs) + 1)]
    for b in names:
        cells = [f"{pct(runs[r][b]['accuracy'])} ({_ci(runs[r][b])})" if b in runs[r] else "-" for r in runs]
        accs = [runs[r].get(b, {}).get("accuracy") for r in (first, last)]
        delta = f"{100 * (accs[1] - accs[0]):+.2f}" if None not in accs else "-"
        lines.append(f"| {b} | " + " | ".join(cells) + f" | {delta} |")
    average_first, average_last = averages[first], averages[last]
    delta = (f"{100 * (average_last - average_first):+.2f}"
             if average_first is not None and average_last is not None else "-")
    lines.append("| average (unweighted, shared benchmarks) | " + " | ".join(pct(averages[r]) for r in runs)
                 + f" | {delta} |")
    output_dir.mkdir(parents=True, exist_ok=True)
    table = output_dir / "comparison.md"
    table.write_text("\n".join(lines) + "\n", encoding="utf-8")
    summary = {"checkpoints": {n: str(p) for n, p in results_by_name.items()}, "average": averages,
               "benchmarks": {b: {r: _headline(runs[r].get(b)) for r in runs} for b in names}}
    (output_dir / "comparison.json").write_text(json.dumps(to_jsonable(summary), indent=2) + "\n", encoding="utf-8")
    comparison_chart(runs, names, output_dir / "comparison.png")
    return table
