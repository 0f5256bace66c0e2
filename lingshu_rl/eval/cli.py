"""``python -m lingshu_rl.eval``: export benchmark items, score predictions, run a model, compare checkpoints.

    python -m lingshu_rl.eval list
    python -m lingshu_rl.eval export --benchmark medqa --data-dir DATA --output items.jsonl
    python -m lingshu_rl.eval score --benchmark medqa --data-dir DATA --predictions preds.jsonl --output-dir OUT
    python -m lingshu_rl.eval run --benchmark medqa,pubmedqa --data-dir DATA --model PATH [--engine vllm]
        [--limit 50] [--text-only] --output-dir OUT
    python -m lingshu_rl.eval compare --results base=A/ --results grpo=B/ --output-dir OUT

``DATA`` is a benchmark's folder or a root with one folder per benchmark (folder names as
printed by ``list``). ``score`` reads ``{"id", "response"}`` rows and prints the overall accuracy as its last line.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from lingshu_rl.eval.benchmarks import BENCHMARKS, get_benchmark, load_items
from lingshu_rl.eval.report import compare, format_ids, headline, write_results
from lingshu_rl.eval.results import load_predictions, summarize
from lingshu_rl.eval.runner import DEFAULT_MAX_NEW_TOKENS, ENGINES, EvalError, evaluate
from lingshu_rl.eval.scoring import score_items
from lingshu_rl.models.builtin import model_path


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m lingshu_rl.eval", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="the benchmarks, their folders, files and documented item counts")
    export = sub.add_parser("export", help="write a benchmark's items as JSON lines")
    score = sub.add_parser("score", help="score a JSONL of {id, response} rows (no model)")
    run = sub.add_parser("run", help="generate with a model, score and report")
    for p in (export, score, run):
        p.add_argument("--data-dir", type=Path, help="benchmark folder, or a root with one folder per benchmark")
    for p in (export, score):
        p.add_argument("--benchmark", required=True, choices=list(BENCHMARKS))
    export.add_argument("--output", type=Path, required=True)
    export.add_argument("--limit", type=int, help="only the first N items")
    score.add_argument("--predictions", type=Path, required=True)
    score.add_argument("--output-dir", type=Path, required=True)
    run.add_argument("--benchmark", required=True, help="NAME[,NAME...]: " + ", ".join(BENCHMARKS))
    run.add_argument("--model", required=True,
                     help="a Hugging Face model directory, or 'tiny' / 'tiny-vl' (the demo models)")
    run.add_argument("--engine", default="auto", choices=ENGINES, help="auto: vLLM when installed, else transformers")
    run.add_argument("--limit", type=int, help="only the first N items of each benchmark")
    run.add_argument("--batch-size", type=int, default=32)
    run.add_argument("--max-new-tokens", type=int, default=DEFAULT_MAX_NEW_TOKENS)
    run.add_argument("--text-only", action="store_true",
                     help="run image benchmarks without their images (the report says so)")
    run.add_argument("--redact-text", action="store_true",
                     help="keep prompts, responses, answers and image paths out of the predictions files")
    run.add_argument("--output-dir", type=Path, required=True)
    comp = sub.add_parser("compare", help="one table and chart comparing several evaluations")
    comp.add_argument("--results", action="append", required=True, metavar="NAME=PATH",
                      help="a results.json or its folder, in order (e.g. base=..., sft=..., grpo=...)")
    comp.add_argument("--output-dir", type=Path, required=True)
    return parser


def cmd_list() -> None:
    for bench in BENCHMARKS.values():
        where = f"{bench.folder}/ ({', '.join(bench.files)})" if bench.needs_data else "generated, no data"
        print(f"{bench.name:13} {bench.count if bench.count is not None else '-':>5}  {bench.title}; {where}"
              + (f"; HF {bench.hf_id}" if bench.hf_id else ""))


def cmd_export(args: argparse.Namespace) -> None:
    items = load_items(args.benchmark, args.data_dir, args.limit)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    with args.output.open("w", encoding="utf-8") as handle:
        for item in items:
            handle.write(json.dumps(item.to_row(), ensure_ascii=False) + "\n")
    print(f"{args.benchmark}: wrote {len(items)} items to {args.output}")


def cmd_score(args: argparse.Namespace) -> None:
    items = load_items(args.benchmark, args.data_dir)
    predictions = load_predictions(args.predictions)
    known = {item.id for item in items}
    unknown = [key for key in predictions if key not in known]
    scores = score_items(items, predictions)
    bench = get_benchmark(args.benchmark)
    result = summarize(args.benchmark, bench.title, items, scores, unknown)
    if result["missing"]:
        print(f"warning: {len(result['missing'])} item(s) have no prediction and count as wrong: "
              f"{format_ids(result['missing'])}", file=sys.stderr)
    if unknown:
        print(f"warning: {len(unknown)} prediction id(s) are not in {args.benchmark} and were ignored: "
              f"{format_ids(unknown)}", file=sys.stderr)
    write_results({"predictions": str(args.predictions), "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                   "benchmarks": {args.benchmark: result}}, args.output_dir)
    with (args.output_dir / "scores.jsonl").open("w", encoding="utf-8") as handle:
        for item, score in zip(items, scores):
            row = {"response": predictions.get(item.id), "answer": item.answer, **vars(score)}
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")
    print(f"wrote {args.output_dir}/results.json, report.md, accuracy.png, scores.jsonl")
    print(headline(result))


def cmd_run(args: argparse.Namespace) -> None:
    names = [name.strip() for name in args.benchmark.split(",") if name.strip()]
    for name in names:
        get_benchmark(name)
    model = model_path(args.model)  # a directory, a hub id, or a built-in: tiny | tiny-vl
    results = evaluate(model, names, args.data_dir, args.output_dir, args.engine, args.limit, args.batch_size,
                       args.max_new_tokens, args.text_only, args.redact_text)
    print(f"wrote {args.output_dir}/results.json, report.md, accuracy.png, predictions/")
    for name, result in results["benchmarks"].items():
        print(f"{name}: {headline(result)}")


def cmd_compare(args: argparse.Namespace) -> None:
    pairs = [spec.split("=", 1) for spec in args.results]
    if any(len(pair) != 2 for pair in pairs):
        raise EvalError("--results takes NAME=PATH")
    print(f"wrote {compare({name: Path(path) for name, path in pairs}, args.output_dir)}")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "list":
            cmd_list()
        else:
            {"export": cmd_export, "score": cmd_score, "run": cmd_run, "compare": cmd_compare}[args.command](args)
    except (ValueError, EvalError, OSError) as err:  # BenchmarkError, PredictionsError, engine errors
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0
