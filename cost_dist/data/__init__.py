"""Data layer: dataset loaders, the synthetic catalog, text templating, validation and splits.

- prepare.py   the prepare stage (`run_prepare_stage`), `prepare_dataset`, `prepare_to`, `write_prepared`
- loaders.py   one loader per source format (generic files, RecBole ml-100k, GroupLens CSV, Amazon 2014 /
               P5, LC-Rec, MIND) -> RawDataset
- readers.py   Parquet / CSV / TSV / JSONL reading with UTF-8 checks, timestamps to int64 seconds
- synthetic.py the built-in topic-structured generator (streamed in batches)
- validate.py  the bad-row policy (counted drop or error), k-core, minimum user length
- text.py      `render_text` and the default templates
- splits.py    `sort_interactions`, `build_sequences`, `leave_one_out`
- stats.py     stats.json figures and the printed table
- cli.py       `cost-dist data prepare|stats`
"""
