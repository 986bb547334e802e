"""Batched constrained beam search vs faiss flat search as the catalog grows (10^3 .. 10^6 items).

Generative retrieval's promise is that the cost of a recommendation barely depends on the catalog:
the decoder's work is the same for any catalog size, only the trie lookups grow (logarithmically,
PrefixIndex uses searchsorted over sorted key arrays). Exact dense retrieval (faiss IndexFlatIP) is
linear in the catalog. This script measures both, one run, one table.

Per size (each in a fresh subprocess, so peak RSS belongs to that size alone):
- synthetic unique semantic IDs (M=3 random codes of K=64, the tokenizer default, + collision suffix),
- a randomly initialised generator at the TIGER defaults (4+4 layers, d_model 128, 6 heads, FFN 1024),
- users/s of batched beam search (k=10, beam 20) over batches of random histories of 20 items,
- faiss IndexFlatIP queries/s over random unit vectors of the embedding dimension (384, MiniLM),
- peak RSS of the process and the bytes of the constraint structure.

    python benchmarks/beam_search.py --sizes 1000,10000,100000,1000000 --json PATH
writes {"rows": [{"items", "beam_users_per_s", "faiss_queries_per_s", "peak_rss_mib", "constraint_mib", ...}]}.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time


def measure(items: int, args) -> dict:
    import numpy as np
    import torch

    from cost_dist.config import GeneratorConfig
    from cost_dist.generator.constraints import PrefixIndex
    from cost_dist.generator.model import TigerModel
    from cost_dist.generator.search import beam_search
    from cost_dist.generator.testing import random_semantic_ids
    from cost_dist.generator.vocab import PAD, Vocabulary

    torch.manual_seed(0)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    sid, num_suffix = random_semantic_ids(items, args.levels, args.codebook_size, seed=0)
    vocab = Vocabulary(args.levels, args.codebook_size, max(num_suffix, 1), 2000, args.history)
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    t0 = time.time()
    index = PrefixIndex(sid, [s for _, s in vocab.position_ranges]).to(device)
    build_s = time.time() - t0
    model = TigerModel(vocab, GeneratorConfig()).to(device).eval()
    tokens = vocab.item_tokens(sid)
    rng = np.random.default_rng(1)

    def batch() -> torch.Tensor:
        hist = rng.integers(0, items, size=(args.users_per_batch, args.history))
        out = np.full((args.users_per_batch, vocab.encoder_length), PAD, dtype=np.int64)
        out[:, 0] = vocab.user_token("u")
        out[:, 1:-1] = tokens[hist].reshape(args.users_per_batch, -1)
        out[:, -1] = 1
        return torch.from_numpy(out).to(device)

    beam_search(model, index, batch(), k=args.k, beam_size=args.beam)  # warm-up
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.time()
    users = 0
    while users < args.min_users or time.time() - t0 < args.min_seconds:
        rows, _ = beam_search(model, index, batch(), k=args.k, beam_size=args.beam)
        assert (rows >= 0).all()
        users += args.users_per_batch
    if device.type == "cuda":
        torch.cuda.synchronize()
    beam_ups = users / (time.time() - t0)
    del model

    import faiss

    xb = rng.standard_normal((items, args.dim), dtype=np.float32)
    xb /= np.linalg.norm(xb, axis=1, keepdims=True)
    flat = faiss.IndexFlatIP(args.dim)
    flat.add(xb)
    xq = rng.standard_normal((args.faiss_queries, args.dim), dtype=np.float32)
    xq /= np.linalg.norm(xq, axis=1, keepdims=True)
    flat.search(xq[:8], args.k)
    t0 = time.time()
    flat.search(xq, args.k)
    faiss_qps = args.faiss_queries / (time.time() - t0)
    return {
        "items": items,
        "beam_users_per_s": round(beam_ups, 2),
        "faiss_queries_per_s": round(faiss_qps, 2),
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "constraint_mib": round(index.nbytes() / 2**20, 2),
        "constraint_build_s": round(build_s, 3),
        "rss_before_index_mib": round(rss_before, 1),
        "num_suffix": int(num_suffix),
        "device": str(device),
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default="1000,10000,100000,1000000")
    p.add_argument("--json", help="write the table here")
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--beam", type=int, default=20)
    p.add_argument("--levels", type=int, default=3)
    p.add_argument("--codebook-size", type=int, default=64)
    p.add_argument("--history", type=int, default=20)
    p.add_argument("--users-per-batch", type=int, default=64)
    p.add_argument("--min-users", type=int, default=128)
    p.add_argument("--min-seconds", type=float, default=5.0)
    p.add_argument("--dim", type=int, default=384)
    p.add_argument("--faiss-queries", type=int, default=256)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch default)")
    p.add_argument("--device", default="cuda" if _cuda() else "cpu")
    p.add_argument("--one", type=int, help=argparse.SUPPRESS)  # internal: measure one size, print JSON
    args = p.parse_args(argv)
    if args.one is not None:
        print("ROW " + json.dumps(measure(args.one, args)), flush=True)
        return 0
    rows = []
    passthrough = [a for a in (argv if argv is not None else sys.argv[1:])]
    passthrough = _drop(passthrough, ("--sizes", "--json"))
    for n in [int(s) for s in args.sizes.split(",") if s.strip()]:
        out = subprocess.run([sys.executable, __file__, "--one", str(n), *passthrough], capture_output=True, text=True,
                             env=dict(os.environ, TOKENIZERS_PARALLELISM="false"))
        lines = [line for line in out.stdout.splitlines() if line.startswith("ROW ")]
        if out.returncode != 0 or not lines:
            sys.stderr.write(out.stderr[-4000:])
            raise SystemExit(f"size {n} failed (exit {out.returncode})")
        rows.append(json.loads(lines[-1][4:]))
        print(_fmt_row(rows[-1]), flush=True)
    base = rows[0]["beam_users_per_s"] if rows else 0
    table = {"rows": rows, "settings": {"k": args.k, "beam": args.beam, "levels": args.levels, "codebook_size": args.codebook_size,
                                        "history": args.history, "users_per_batch": args.users_per_batch, "dim": args.dim},
             "beam_throughput_ratio_last_vs_first": round(rows[-1]["beam_users_per_s"] / base, 3) if base else None}
    print("\n" + _table(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(table, f, indent=2)
    return 0


def _drop(argv: list[str], flags: tuple[str, ...]) -> list[str]:
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
            continue
        if a in flags:
            skip = True
            continue
        if any(a.startswith(f + "=") for f in flags):
            continue
        out.append(a)
    return out


def _cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


def _fmt_row(r: dict) -> str:
    return (f"items={r['items']:>8}  beam users/s={r['beam_users_per_s']:>8.1f}  faiss q/s={r['faiss_queries_per_s']:>9.1f}  "
            f"peak RSS={r['peak_rss_mib']:>7.1f} MiB  constraint={r['constraint_mib']:.2f} MiB")


def _table(rows: list[dict]) -> str:
    head = "| items | beam search users/s (k=10, beam 20) | faiss flat queries/s | peak RSS MiB | constraint MiB |\n|---:|---:|---:|---:|---:|"
    body = "\n".join(f"| {r['items']:,} | {r['beam_users_per_s']:.1f} | {r['faiss_queries_per_s']:.1f} | {r['peak_rss_mib']:.0f} | "
                     f"{r['constraint_mib']:.2f} |" for r in rows)
    return head + "\n" + body


if __name__ == "__main__":
    sys.exit(main())
