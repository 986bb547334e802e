"""The quality benchmark script end to end on tiny synthetic data (real pipeline, Ray, DeepSpeed)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _quality_module():
    spec = importlib.util.spec_from_file_location("benchmarks_quality", REPO / "benchmarks" / "quality.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_quality_smoke_writes_table_json_and_plot(ray_session, tmp_path):
    quality = _quality_module()
    out = tmp_path / "quality"
    assert quality.main(["--smoke", "--out", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())
    entry = results["datasets"]["synthetic"]
    names = [f"{m}@{k}" for m in ("recall", "ndcg") for k in (5, 10, 20, 40)]
    for method in quality.SMOKE_METHODS:
        summary = entry["summary"][method]
        assert summary["seeds"] == 1 and summary["failed"] == 0, (method, entry["runs"][method])
        for name in names:
            assert 0.0 <= summary[name]["mean"] <= 1.0 and summary[name]["std"] == 0.0
        run = entry["runs"][method]["0"]
        assert set(run["test"]) >= set(names) and set(run["valid"]) >= set(names)
    # Methods scored by the benchmark itself also report the whole-past masking protocol.
    assert set(entry["summary_fullmask"]) == {"pop", "dense", "sasrec"}
    assert set(entry["runs"]["sasrec"]["0"]["test_fullmask"]) >= set(names)
    # Recall@K never decreases with K, for every method.
    for method, summary in entry["summary"].items():
        recalls = [summary[f"recall@{k}"]["mean"] for k in (5, 10, 20, 40)]
        assert recalls == sorted(recalls), method
    # The generative run reused the shared prepare/embed outputs instead of re-embedding.
    marker = json.loads((out / "runs" / "synthetic" / "random-seed0" / "embed" / "_COMPLETE").read_text())
    assert marker["shared_from"].endswith("base-seed0/embed")
    table = (out / "results.md").read_text()
    assert "| SASRec | 1 |" in table and "| random IDs | 1 |" in table and "R@10" in table
    assert results["command"].startswith("python benchmarks/quality.py --smoke")
    assert (out / "recall_at_k.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # A second run skips every finished stage and reproduces the numbers.
    assert quality.main(["--smoke", "--out", str(out), "--methods", "pop,sasrec"]) == 0
    again = json.loads((out / "results.json").read_text())["datasets"]["synthetic"]
    assert again["runs"]["sasrec"]["0"]["test"] == entry["runs"]["sasrec"]["0"]["test"]


def test_quality_bad_arguments_are_one_line_errors(tmp_path, capsys):
    quality = _quality_module()
    assert quality.main(["--out", str(tmp_path), "--datasets", "ml-100k=/nonexistent/folder"]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert quality.main(["--out", str(tmp_path), "--smoke", "--methods", "pop,tiger"]) == 2
    assert "unknown method" in capsys.readouterr().err
    assert quality.main(["--out", str(tmp_path), "--datasets", "ml-100k"]) == 2
    assert "LOADER=PATH" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        quality.main(["--help"])


def test_real_dataset_base_is_prepared_once_for_every_seed(tmp_path):
    """A real dataset is the same for every seed: the shared base run keeps the one made with seed 0
    instead of being cleared (and re-embedded) when the next seed starts."""
    quality = _quality_module()
    from cost_dist.pipeline import stage_fingerprints

    data = tmp_path / "ml"
    data.mkdir()
    rows = [(u, (u * 3 + j) % 12 + 1, 1000 * u + j) for u in range(1, 21) for j in range(8)]
    (data / "ratings.csv").write_text("userId,movieId,rating,timestamp\n" + "".join(f"{u},{i},4.0,{t}\n" for u, i, t in rows))
    (data / "movies.csv").write_text("movieId,title,genres\n" + "".join(f"{i},Film {i} (1990),Drama\n" for i in range(1, 13)))
    out = tmp_path / "quality"
    args = ["--datasets", f"ml-latest-small={data}", "--methods", "pop", "--out", str(out)]
    assert quality.main([*args, "--seeds", "0"]) == 0
    marker = out / "runs" / "ml-latest-small" / "base" / "prepare" / "_COMPLETE"
    first = marker.read_text()
    assert quality.main([*args, "--seeds", "1,2"]) == 0
    assert marker.read_text() == first  # neither cleared nor rewritten by seeds 1 and 2
    cfg0, _ = quality.dataset_config(quality.parse_args(args), "ml-latest-small", str(data), 0, [])
    assert json.loads(first)["fingerprint"] == stage_fingerprints(cfg0)["prepare"]
    # --collect-only reports a method that has no results yet as not run, not as a failure.
    assert quality.main(["--datasets", f"ml-latest-small={data}", "--methods", "pop,random", "--seeds", "0",
                         "--out", str(out), "--collect-only"]) == 0
    table = (out / "results.md").read_text()
    assert "Not run yet (`--collect-only` found no results): random IDs seed 0" in table
    assert "Failed runs" not in table
    # --previous: a collect on a machine without those run folders takes finished runs from an earlier
    # results.json, says so in the table, and still lists what never ran.
    earlier = out / "results.json"
    elsewhere = tmp_path / "elsewhere"
    assert quality.main(["--datasets", f"ml-latest-small={data}", "--methods", "pop,random", "--seeds", "0",
                         "--out", str(elsewhere), "--collect-only", "--previous", str(earlier)]) == 0
    merged = json.loads((elsewhere / "results.json").read_text())["datasets"]["ml-latest-small"]
    before = json.loads(earlier.read_text())["datasets"]["ml-latest-small"]
    assert merged["runs"]["pop"]["0"]["test"] == before["runs"]["pop"]["0"]["test"]
    assert merged["runs"]["pop"]["0"]["from_previous"] is True and merged["num_users"] == before["num_users"]
    table = (elsewhere / "results.md").read_text()
    assert f"Taken from the earlier results file `{earlier}`" in table and "Pop seed 0" in table
    assert "Not run yet (`--collect-only` found no results): random IDs seed 0" in table
    assert quality.main([*args, "--previous", str(earlier)]) == 2  # only meaningful with --collect-only
    # A SASRec-only run prepares the data but never embeds it: a collect there scores Pop on the prepared
    # splits and takes dense, which needs the embeddings, from --previous instead of reporting it failed.
    assert not (out / "runs" / "ml-latest-small" / "base" / "embed" / "embeddings.parquet").exists()
    with_dense = json.loads(earlier.read_text())
    runs = with_dense["datasets"]["ml-latest-small"]["runs"]
    runs["dense"] = {"0": {**runs["pop"]["0"], "wall_s": 1.0}}
    (tmp_path / "with_dense.json").write_text(json.dumps(with_dense))
    assert quality.main(["--datasets", f"ml-latest-small={data}", "--methods", "pop,dense", "--seeds", "0",
                         "--out", str(out), "--collect-only", "--previous", str(tmp_path / "with_dense.json")]) == 0
    collected = json.loads((out / "results.json").read_text())["datasets"]["ml-latest-small"]["runs"]
    assert collected["dense"]["0"]["from_previous"] is True and collected["dense"]["0"]["wall_s"] == 1.0
    assert "from_previous" not in collected["pop"]["0"] and collected["pop"]["0"]["test"] == before["runs"]["pop"]["0"]["test"]
    assert "Failed runs" not in (out / "results.md").read_text()
