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


def add_run_args(p: argparse.ArgumentParser, run_required: bool = False) -> None:
    p.add_argument("--config", help="YAML config file (jobs/configs/*.yaml); defaults when omitted")
    p.add_argument("--run", required=run_required, help="run directory: a local path or a pyarrow.fs URI (s3://, gs://); default runs/<config name>")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override one config field, e.g. --set tokenizer.codebook_size=256 (repeatable)")
    p.add_argument("--num-cpus", type=int, default=None,
                   help="logical CPUs of the local Ray cluster started when no cluster is given (default: all)")


def load_config(args: argparse.Namespace):
    from cost_dist.config import Config

    return Config.load(args.config, args.overrides)


def find_user_error(exc: BaseException) -> CostDistError | None:
    """The CostDistError behind an exception, also when Ray wrapped it (task errors, Train worker failures)."""
    seen: set[int] = set()
    stack: list[BaseException] = [exc]
    while stack:
        e = stack.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, CostDistError):
            return e
        # RayTaskError keeps the original as .cause; Ray Train's failures keep per-worker errors.
        for attr in ("cause", "__cause__", "__context__"):
            nxt = getattr(e, attr, None)
            if isinstance(nxt, BaseException):
                stack.append(nxt)
        for attr in ("worker_failures", "_worker_failures"):
            failures = getattr(e, attr, None)
            if isinstance(failures, dict):
                stack.extend(v for v in failures.values() if isinstance(v, BaseException))
        for nested in getattr(e, "exceptions", None) or ():
            if isinstance(nested, BaseException):
                stack.append(nested)
    return None


def _cmd_stage(args: argparse.Namespace) -> int:
    return _job(STAGE_COMMANDS[args.command][0], args)


def _cmd_run(args: argparse.Namespace) -> int:
    return _job(None, args)


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

    p = sub.add_parser("run", help="run every stage (skipping completed ones) and write the report "
                       "(same as jobs/full_pipeline.py)")
    add_run_args(p)
    p.add_argument("--stages", help="comma-separated subset of stages to run")
    p.add_argument("--force", default="", help="comma-separated stages to rerun even if complete")
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
    return _run_reporting_errors("cost-dist", lambda: func(args), debug=args.debug)


def _run_reporting_errors(prog: str, func: Callable[[], Any], debug: bool = False) -> int:
    """Run func; a user error (also one wrapped by Ray) becomes one line on stderr and exit status 2."""
    try:
        return int(func() or 0)
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        user_error = find_user_error(exc)
        if user_error is None or debug:
            raise
        print(f"{prog}: error: {type(user_error).__name__}: {user_error}", file=sys.stderr)
        return 2


def job_main(stage: str | None = None, argv: list[str] | None = None) -> int:
    """Entry point of the `ray job submit` scripts: jobs/full_pipeline.py (stage None) and jobs/<stage>.py.

    Joins the cluster the job was submitted to (or starts a local one when run directly), runs the
    pipeline or one stage over --run, writes the report and prints the summary table. Same flags as
    `cost-dist run` / `cost-dist <stage>`.
    """
    from cost_dist.pipeline import STAGE_NAMES

    prog = f"jobs/{stage or 'full_pipeline'}.py"
    what = f"the {stage} stage" if stage else "every stage (" + " -> ".join(STAGE_NAMES) + ")"
    parser = argparse.ArgumentParser(prog=prog, description=f"Run {what} over one run directory, skipping stages "
                                     "already complete for the same config and resuming an interrupted one.")
    add_run_args(parser, run_required=False)
    if stage is None:
        parser.add_argument("--stages", help="comma-separated subset of stages to run")
        parser.add_argument("--force", default="", help="comma-separated stages to rerun even if complete")
    else:
        parser.add_argument("--force", action="store_true", help="rerun even if complete for this config")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks of input errors")
    parser.add_argument("--log-level", default="INFO", help="logging level (DEBUG, INFO, WARNING)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=getattr(logging, str(args.log_level).upper(), logging.INFO),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True)
    return _run_reporting_errors(prog, lambda: _job(stage, args), debug=args.debug)


def _job(stage: str | None, args: argparse.Namespace) -> int:
    import os

    from cost_dist.pipeline import STAGE_NAMES, get_stage, run_pipeline, run_stage
    from cost_dist.report import format_summary, write_report
    from cost_dist.rundir import RunDir

    cfg = load_config(args)
    run_uri = args.run or f"runs/{cfg.name}"
    if "://" not in run_uri and not os.path.isabs(run_uri) and os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR"):
        log.warning("--run %s is relative: inside `ray job submit` it lands in the job's temporary working "
                    "directory copy; give an absolute path or a URI (s3://...) to keep the results", run_uri)
    run = RunDir(run_uri)
    log.info("run directory: %s (config %s)", run.uri(), args.config or "defaults")
    try:
        if stage is None:
            stages = tuple(s.strip() for s in args.stages.split(",") if s.strip()) if args.stages else STAGE_NAMES
            force = tuple(s.strip() for s in args.force.split(",") if s.strip())
            run_pipeline(cfg, run, stages=stages, force=force, num_cpus=args.num_cpus)
        else:
            get_stage(stage)
            from cost_dist.versions import versions

            run.update_metrics({"config": cfg.to_dict(), "versions": versions(), "run": run.uri()})
            done = run_stage(cfg, run, stage, force=args.force, num_cpus=args.num_cpus)
            if done is None:
                print(f"{stage}: already complete for this config in {run.uri()} (use --force to rerun)")
        if stage is None or stage == "evaluate":
            write_report(run)
        print(format_summary(run.read_metrics()))
        if run.exists("report.md"):
            print(f"report: {run.uri('report.md')}")
    finally:
        import ray

        if ray.is_initialized():
            ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
