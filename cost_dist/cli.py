"""`cost-dist`: the command line. Every stage command takes --config FILE, --run DIR and --set key=value."""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Any, Callable

from cost_dist.errors import CostDistError

log = logging.getLogger("cost_dist")

STAGE_COMMANDS = {
    # command name -> (stage name, help)
    "prepare": ("prepare", "load the configured dataset into RUN/prepare/ (items, interactions, sequences)"),
    "embed": ("embed", "embed item text with sentence-transformers on Ray Data -> RUN/embed/embeddings.parquet"),
    "tokenize": ("tokenize", "train the CoST quantizer with Ray Train + DeepSpeed -> RUN/tokenize/"),
    "assign": ("assign", "assign unique semantic IDs to every item -> RUN/assign/codes.parquet"),
    "train-generator": ("generate", "train the TIGER-style generator with Ray Train + DeepSpeed -> RUN/generate/"),
    "evaluate": ("evaluate", "leave-one-out evaluation with constrained beam search and baselines -> metrics.json"),
}


def add_run_args(p: argparse.ArgumentParser, run_required: bool = True) -> None:
    p.add_argument("--config", help="YAML config file (jobs/configs/*.yaml); defaults when omitted")
    p.add_argument("--run", required=run_required, help="run directory: a local path or a pyarrow.fs URI (s3://, gs://)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override one config field, e.g. --set tokenizer.codebook_size=256 (repeatable)")


def load_config(args: argparse.Namespace):
    from cost_dist.config import Config

    return Config.load(args.config, args.overrides)


def _cmd_stage(args: argparse.Namespace) -> int:
    from cost_dist.pipeline import run_stage
    from cost_dist.rundir import RunDir

    cfg = load_config(args)
    run = RunDir(args.run)
    stage = STAGE_COMMANDS[args.command][0]
    metrics = run_stage(cfg, run, stage, force=args.force)
    if metrics is None:
        print(f"{stage}: already complete for this config in {run.uri()} (use --force to rerun)")
    else:
        print(f"{stage}: done -> {run.uri(stage)}")
    if stage == "evaluate":
        from cost_dist.report import format_summary

        print(format_summary(run.read_metrics()))
    return 0


def _cmd_run(args: argparse.Namespace) -> int:
    from cost_dist.pipeline import STAGE_NAMES, run_pipeline
    from cost_dist.report import format_summary, write_report
    from cost_dist.rundir import RunDir

    cfg = load_config(args)
    run = RunDir(args.run)
    stages = tuple(args.stages.split(",")) if args.stages else STAGE_NAMES
    metrics = run_pipeline(cfg, run, stages=stages)
    write_report(run)
    print(format_summary(metrics))
    print(f"report: {run.uri('report.md')}")
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from cost_dist.report import format_summary, write_report
    from cost_dist.rundir import RunDir

    run = RunDir(args.run_dir)
    if not run.exists("metrics.json"):
        raise CostDistError(f"no metrics.json in {run.uri()}: is this a run directory?")
    if args.write:
        write_report(run)
    print(format_summary(run.read_metrics()))
    return 0


def _cmd_serve(args: argparse.Namespace) -> int:
    from cost_dist.serving import serve_run

    serve_run(args.run_dir, host=args.host, port=args.port, blocking=True)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cost-dist",
        description="Generative retrieval on Ray: CoST semantic IDs + a TIGER-style generator. "
        "Stages: prepare -> embed -> tokenize -> assign -> train-generator -> evaluate; `run` does them all.",
    )
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    parser.add_argument("--log-level", default="INFO", help="logging level (DEBUG, INFO, WARNING)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    from cost_dist.data.cli import register as register_data

    register_data(sub)

    p = sub.add_parser("run", help="run every stage (skipping completed ones) and write the report")
    add_run_args(p)
    p.add_argument("--stages", help="comma-separated subset of stages to run")
    p.set_defaults(func=_cmd_run)

    for name, (_, help_text) in STAGE_COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        add_run_args(p)
        p.add_argument("--force", action="store_true", help="rerun even if complete for this config")
        p.set_defaults(func=_cmd_stage)

    p = sub.add_parser("report", help="print the summary table of a run (and rewrite report.md with --write)")
    p.add_argument("run_dir", metavar="RUN")
    p.add_argument("--write", action="store_true", help="regenerate report.md and its plots")
    p.set_defaults(func=_cmd_report)

    p = sub.add_parser("serve", help="serve a finished run over HTTP with Ray Serve (local use)")
    p.add_argument("run_dir", metavar="RUN")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.set_defaults(func=_cmd_serve)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=getattr(logging, str(args.log_level).upper(), logging.INFO),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    func: Callable[[argparse.Namespace], Any] = args.func
    try:
        return int(func(args) or 0)
    except CostDistError as exc:
        if args.debug:
            raise
        print(f"cost-dist: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("cost-dist: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
