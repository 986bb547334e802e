"""`cost-dist data prepare` and `cost-dist data stats`: the data layer from the command line."""

from __future__ import annotations

import argparse
import json
from typing import Any

from cost_dist.errors import DataError

PREPARE_EPILOG = """\
datasets and what --path must hold (.gz versions of every file are read too):
  synthetic        no files: a catalog generated from latent topics (the offline default);
                   sized by --num-items/--num-users/--num-topics, deterministic by --seed
  ml-100k          RecBole atomic files: ml-100k.inter (user_id, item_id, rating, timestamp) and
                   ml-100k.item (item_id, movie_title, release_year, class); any RecBole dataset works
  ml-latest-small  GroupLens CSV layout: ratings.csv (userId,movieId,rating,timestamp) + movies.csv
                   (movieId,title,genres); also ml-latest, ml-25m
  amazon-2014      Amazon 2014 reviews: reviews_<Cat>_5.json (reviewerID, asin, unixReviewTime) +
                   meta_<Cat>.json (asin, title, brand, categories, description; Python-literal lines
                   accepted); or the P5/S3-Rec layout sequential_data.txt + datamaps.json (no text)
  amazon-lcrec     LC-Rec/LETTER layout: <Name>.inter.json {user: [items in order]} +
                   <Name>.item.json {item: {title, description, brand, categories}} (order only)
  mind             MIND news.tsv + behaviors.tsv: clicked impressions become interactions at the
                   impression time; each user's click history is put before it (data.mind_include_history)
  generic          --interactions FILE --items FILE (Parquet, CSV, TSV or JSON lines, optionally .gz)
                   with --user-col/--item-col/--time-col and --text-fields mapping the columns

what prepare does:
  ids become strings; rows with empty ids or unreadable timestamps, duplicate item ids, interactions
  naming unknown items, rows with non-UTF-8 bytes and users with fewer than --min-user-interactions
  (>= 3) interactions are dropped and counted (stats.json "dropped"), or rejected with
  --on-bad-rows error; optional k-core; items without interactions are dropped unless
  --keep-unused-items; item text = the template over the text fields (HTML entities unescaped);
  interactions sorted by user then time (ties keep file order; order-only data uses list position).

outputs in --out DIR: items.parquet (item_id, text fields, text), interactions.parquet (user_id,
  item_id, timestamp), sequences.parquet (user_id, item_ids), stats.json. Leave-one-out (last item
  test, second last validation, histories truncated to the last --max-len items) is applied by the
  training and evaluation stages from sequences.parquet.

bad input exits with status 2 and a one-line error (cost-dist --debug data prepare ... shows the traceback).

examples:
  cost-dist data prepare --dataset ml-100k --path ../shared/data/movielens-100k --out data/ml-100k
  cost-dist data prepare --dataset generic --interactions inter.csv --items items.jsonl \\
      --user-col uid --item-col iid --time-col ts --text-fields title,brand --out data/mine
  cost-dist data prepare --dataset synthetic --num-items 100000 --num-users 50000 --out data/synth
  cost-dist data stats data/ml-100k
"""


def _csv_list(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def register(sub) -> None:
    p = sub.add_parser("data", help="prepare datasets and print their statistics",
                       description="Prepare datasets into the canonical tables and print their statistics.")
    data_sub = p.add_subparsers(dest="data_command", required=True, metavar="DATA_COMMAND")

    pp = data_sub.add_parser(
        "prepare", help="load a dataset into DIR/{items,interactions,sequences}.parquet + stats.json",
        description="Load a dataset, validate and filter it, template item text, and write the canonical tables.",
        epilog=PREPARE_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    from cost_dist.data.prepare import DATASETS

    pp.add_argument("--dataset", choices=DATASETS, help="source format (default: the config's data.dataset, synthetic)")
    pp.add_argument("--out", required=True, metavar="DIR", help="output directory (local path or pyarrow.fs URI)")
    pp.add_argument("--path", metavar="DIR", help="dataset folder (every dataset but synthetic and generic)")
    pp.add_argument("--interactions", metavar="FILE", help="generic: interactions file")
    pp.add_argument("--items", metavar="FILE", help="generic: items file")
    pp.add_argument("--user-col", help="generic: user id column (default user_id)")
    pp.add_argument("--item-col", help="generic: item id column in both files (default item_id)")
    pp.add_argument("--time-col", help="generic: timestamp column (default timestamp; '' = none, row order is time order); "
                    "numbers are Unix seconds, strings are parsed as dates")
    pp.add_argument("--text-fields", type=_csv_list, metavar="A,B", help="generic: item text columns (default title)")
    pp.add_argument("--delimiter", help="generic CSV delimiter (default ',' or tab for .tsv)")
    pp.add_argument("--template", help="item text template over the text fields, e.g. 'Title: {title}. Brand: {brand}.' "
                    "(default: the dataset's own)")
    pp.add_argument("--no-unescape-html", dest="unescape_html", action="store_false", default=None,
                    help="keep HTML entities (&amp;) in item text as they are")
    pp.add_argument("--kcore", type=int, metavar="K", help="keep the K-core: users and items with >= K interactions (0 = off)")
    pp.add_argument("--min-user-interactions", type=int, metavar="N", help="drop users with fewer than N (>= 3) interactions")
    pp.add_argument("--on-bad-rows", choices=("drop", "error"), help="drop bad rows (counted, logged; default) or stop with an error")
    pp.add_argument("--keep-unused-items", action="store_true", default=None, help="keep catalog items nobody interacted with")
    pp.add_argument("--max-len", type=int, help="history length the models see (default 20); recorded in stats")
    pp.add_argument("--seed", type=int, help="random seed (synthetic data)")
    pp.add_argument("--num-items", type=int, help="synthetic: catalog size (10^2 .. 10^6)")
    pp.add_argument("--num-users", type=int, help="synthetic: number of users")
    pp.add_argument("--num-topics", type=int, help="synthetic: number of latent topics")
    pp.add_argument("--config", help="YAML config whose data section (and seed) are the starting point")
    pp.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="config override, e.g. --set data.synthetic.topic_stickiness=0.9 (repeatable)")
    pp.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks on errors")
    pp.set_defaults(func=_cmd_prepare)

    ps = data_sub.add_parser("stats", help="print the statistics table of a prepared dataset",
                             description="Print the statistics of a prepared dataset: DIR from `data prepare --out DIR`, "
                             "or a run directory (reads RUN/prepare/stats.json).")
    ps.add_argument("dir", metavar="DIR")
    ps.add_argument("--json", action="store_true", help="print stats.json as it is")
    ps.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks on errors")
    ps.set_defaults(func=_cmd_stats)


def config_from_args(args: argparse.Namespace):
    """Config from --config/--set, then the prepare flags on top."""
    from cost_dist.config import Config

    cfg = Config.load(args.config, args.overrides)
    d = cfg.data
    simple = {"dataset": "dataset", "path": "path", "interactions": "interactions", "items": "items",
              "template": "text_template", "kcore": "kcore", "min_user_interactions": "min_user_interactions",
              "on_bad_rows": "on_bad_rows", "keep_unused_items": "keep_unused_items", "max_len": "max_len",
              "delimiter": "delimiter", "unescape_html": "unescape_html"}
    for arg, attr in simple.items():
        value = getattr(args, arg)
        if value is not None:
            setattr(d, attr, value)
    for arg, attr in (("user_col", "user_id"), ("item_col", "item_id"), ("time_col", "timestamp"), ("text_fields", "text_fields")):
        value = getattr(args, arg)
        if value is not None:
            setattr(d.columns, attr, value)
    for arg, attr in (("num_items", "num_items"), ("num_users", "num_users"), ("num_topics", "num_topics")):
        value = getattr(args, arg)
        if value is not None:
            setattr(d.synthetic, attr, value)
    if args.seed is not None:
        cfg.seed = args.seed
    if d.dataset not in ("synthetic", "generic") and not d.path:
        raise DataError(f"dataset {d.dataset!r} needs --path DIR (the folder holding its files)")
    if d.dataset != "generic" and (args.interactions or args.items):
        raise DataError("--interactions/--items are for --dataset generic")
    return cfg


def _cmd_prepare(args: argparse.Namespace) -> int:
    from cost_dist.data.prepare import prepare_to
    from cost_dist.data.stats import format_stats_table
    from cost_dist.rundir import RunDir

    cfg = config_from_args(args)
    out = RunDir(args.out)
    stats = prepare_to(out, cfg.data, cfg.seed)
    print(format_stats_table(stats))
    print(f"wrote {out.uri()}/{{items,interactions,sequences}}.parquet and stats.json")
    return 0


def _read_stats(directory: str) -> dict[str, Any]:
    from cost_dist.rundir import RunDir, resolve_filesystem

    fs, root = resolve_filesystem(directory)
    import pyarrow.fs as pafs

    if fs.get_file_info(root).type == pafs.FileType.NotFound:
        raise DataError(f"no such directory: {directory}")
    run = RunDir(directory)
    for rel in ("stats.json", "prepare/stats.json"):
        if run.exists(rel):
            try:
                return json.loads(run.read_text(rel))
            except json.JSONDecodeError as exc:
                raise DataError(f"{run.uri(rel)} is not valid JSON: {exc}") from None
    raise DataError(f"no stats.json in {directory} (nor in {directory}/prepare): run `cost-dist data prepare --out {directory}` first")


def _cmd_stats(args: argparse.Namespace) -> int:
    from cost_dist.data.stats import format_stats_table

    stats = _read_stats(args.dir)
    print(json.dumps(stats, indent=2) if args.json else format_stats_table(stats))
    return 0
