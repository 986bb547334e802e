"""Loaders on tiny files each test writes in the source's own format, and every kind of bad input."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from cost_dist.config import ColumnMapping, DataConfig
from cost_dist.data.prepare import prepare_dataset
from cost_dist.errors import DataError


def write(path: Path, text: str | bytes, gz: bool = False) -> Path:
    data = text.encode("utf-8") if isinstance(text, str) else text
    if gz:
        path = path.with_name(path.name + ".gz")
        path.write_bytes(gzip.compress(data))
    else:
        path.write_bytes(data)
    return path


def generic_cfg(inter: Path, items: Path, **kw) -> DataConfig:
    columns = kw.pop("columns", ColumnMapping(text_fields=["title", "category"]))
    return DataConfig(dataset="generic", interactions=str(inter), items=str(items), columns=columns, **kw)


ITEMS_JSONL = "\n".join(json.dumps(r) for r in [
    {"item_id": "a", "title": "Tea &amp; Biscuits", "category": "Food"},
    {"item_id": "b", "title": "Green Tea.", "category": "Food"},
    {"item_id": "c", "title": "Kettle", "category": None},
    {"item_id": "d", "title": "Mug", "category": "Kitchen"},
    {"item_id": "z", "title": "Never bought", "category": "Misc"},
]) + "\n"

# u1's second and third rows tie at t=20: file order (b before c) must be kept.
INTER_CSV = """user_id,item_id,timestamp
u2,d,5
u1,a,10
u1,b,20
u1,c,20
u2,a,1
u2,b,3
u1,d,30
"""


@pytest.fixture
def generic_files(tmp_path):
    return write(tmp_path / "inter.csv", INTER_CSV), write(tmp_path / "items.jsonl", ITEMS_JSONL)


# ---- canonical output ---------------------------------------------------------------------------


def test_generic_csv_and_jsonl(generic_files):
    inter, items = generic_files
    data = prepare_dataset(generic_cfg(inter, items))
    assert data.interactions.schema == pa.schema([("user_id", pa.string()), ("item_id", pa.string()), ("timestamp", pa.int64())])
    assert data.interactions.to_pydict() == {
        "user_id": ["u1"] * 4 + ["u2"] * 3,
        "item_id": ["a", "b", "c", "d", "a", "b", "d"],
        "timestamp": [10, 20, 20, 30, 1, 3, 5],
    }
    assert data.sequences.to_pylist() == [{"user_id": "u1", "item_ids": ["a", "b", "c", "d"]},
                                          {"user_id": "u2", "item_ids": ["a", "b", "d"]}]
    texts = dict(zip(data.items.column("item_id").to_pylist(), data.items.column("text").to_pylist()))
    # HTML unescaped; a value ending its sentence swallows the template's period; null renders empty.
    assert texts["a"] == "Title: Tea & Biscuits. Category: Food."
    assert texts["b"] == "Title: Green Tea. Category: Food."
    assert texts["c"] == "Title: Kettle. Category: ."
    assert "z" not in texts  # unused item dropped, and counted
    assert data.stats["dropped"] == {"unused_items": 1}
    assert data.stats["empty_text_values"] == {"category": 1}
    assert data.stats["num_users"] == 2 and data.stats["num_items"] == 4 and data.stats["num_interactions"] == 7


def test_generic_parquet_column_mapping_dates_and_string_ids(tmp_path):
    inter = tmp_path / "events.parquet"
    pq.write_table(pa.table({
        "uid": [7, 7, 7, 8, 8, 8],
        "sku": ["007", "008", "009", "007", "008", "009"],
        "when": ["2021-01-03", "2021-01-01", "2021-01-02 12:00:00", "2020-05-05", "2020-05-06", "2020-05-07"],
    }), inter)
    items = tmp_path / "catalog.csv"
    write(items, 'sku,name,year\n007,"Bond, James",1962\n008,Q,1963\n009,M,1964\n')
    cfg = generic_cfg(inter, items, text_template="{name} ({year})",
                      columns=ColumnMapping(user_id="uid", item_id="sku", timestamp="when", text_fields=["name", "year"]))
    data = prepare_dataset(cfg)
    assert data.sequences.to_pylist()[0] == {"user_id": "7", "item_ids": ["008", "009", "007"]}
    assert data.items.column("text").to_pylist() == ["Bond, James (1962)", "Q (1963)", "M (1964)"]
    assert data.items.schema.field("year").type == pa.string()
    assert data.interactions.column("timestamp").to_pylist()[:3] == [1609459200, 1609588800, 1609632000]


def test_generic_without_time_column_uses_row_order(tmp_path):
    inter = write(tmp_path / "inter.tsv", "user\titem\nx\tb\ny\ta\nx\ta\nx\tc\ny\tb\ny\tc\n")
    items = write(tmp_path / "items.jsonl", "\n".join(json.dumps({"item": i, "title": i.upper()}) for i in "abc"))
    cfg = generic_cfg(inter, items, columns=ColumnMapping(user_id="user", item_id="item", timestamp="", text_fields=["title"]))
    data = prepare_dataset(cfg)
    assert data.sequences.to_pylist() == [{"user_id": "x", "item_ids": ["b", "a", "c"]}, {"user_id": "y", "item_ids": ["a", "b", "c"]}]
    assert data.stats["order_only"] is True


# ---- dataset formats ----------------------------------------------------------------------------


def _users(n_users=3, n_items=4):
    """Every user sees every item, times increasing: enough for leave-one-out."""
    return [(f"{u}", f"{i}", 1000 * u + 10 * i) for u in range(1, n_users + 1) for i in range(1, n_items + 1)]


def test_ml100k_recbole_atomic(tmp_path):
    rows = "".join(f"{u}\t{i}\t4\t{t}\n" for u, i, t in _users())
    write(tmp_path / "ml-100k.inter", "user_id:token\titem_id:token\trating:float\ttimestamp:float\n" + rows, gz=True)
    write(tmp_path / "ml-100k.item", "item_id:token\tmovie_title:token_seq\trelease_year:token\tclass:token_seq\n"
          '1\tToy Story\t1995\tAnimation Comedy\n2\tGoldenEye\t1995\tAction\n3\t"Quoted" Film\t1996\tDrama\n4\tHeat\t1995\tCrime\n')
    data = prepare_dataset(DataConfig(dataset="ml-100k", path=str(tmp_path)))
    assert data.stats["num_users"] == 3 and data.stats["num_items"] == 4 and data.stats["num_interactions"] == 12
    items = {r["item_id"]: r for r in data.items.to_pylist()}
    assert items["1"]["text"] == "Title: Toy Story. Year: 1995. Genres: Animation Comedy."
    assert items["3"]["title"] == '"Quoted" Film'
    assert data.sequences.column("item_ids").to_pylist()[0] == ["1", "2", "3", "4"]


def test_movielens_csv_layout(tmp_path):
    write(tmp_path / "ratings.csv", "userId,movieId,rating,timestamp\n" + "".join(f"{u},{i},3.5,{t}\n" for u, i, t in _users()), gz=True)
    write(tmp_path / "movies.csv", 'movieId,title,genres\n1,"American President, The (1995)",Comedy|Drama|Romance\n'
          "2,Heat (1995),Action|Crime\n3,Up (2009),(no genres listed)\n4,Jaws (1975),Horror\n5,Unrated (2000),Drama\n")
    data = prepare_dataset(DataConfig(dataset="ml-latest-small", path=str(tmp_path)))
    items = {r["item_id"]: r for r in data.items.to_pylist()}
    assert items["1"]["text"] == "Title: American President, The (1995). Genres: Comedy, Drama, Romance."
    assert data.stats["num_items"] == 4 and data.stats["dropped"] == {"unused_items": 1}
    assert data.stats["raw"] == {"interaction_rows": 12, "item_rows": 5}


def test_amazon_2014_reviews_and_python_literal_metadata(tmp_path):
    reviews = [{"reviewerID": f"R{u}", "asin": f"B0{i}", "overall": 5.0, "unixReviewTime": t} for u, i, t in _users()]
    write(tmp_path / "reviews_Beauty_5.json", "\n".join(json.dumps(r) for r in reviews), gz=True)
    meta = [
        "{'asin': 'B01', 'title': 'Lipstick &amp; Gloss', 'brand': 'Acme', 'categories': [['Beauty', 'Makeup'], ['Beauty', 'Lips']]}",
        json.dumps({"asin": "B02", "title": "Shampoo", "description": "For hair."}),
        "{'asin': 'B03', 'title': 'Soap'}",
        "{'asin': 'B04', 'title': 'Brush', 'categories': [['Beauty', 'Tools']]}",
        "not a record",
    ]
    write(tmp_path / "meta_Beauty.json", "\n".join(meta), gz=True)
    data = prepare_dataset(DataConfig(dataset="amazon-2014", path=str(tmp_path)))
    items = {r["item_id"]: r for r in data.items.to_pylist()}
    assert items["B01"]["categories"] == "Beauty, Makeup, Lips"
    assert items["B01"]["text"].startswith("Title: Lipstick & Gloss. Brand: Acme. Categories: Beauty, Makeup, Lips.")
    assert data.stats["dropped"] == {"bad_json": 1}
    assert data.sequences.to_pylist()[0] == {"user_id": "R1", "item_ids": ["B01", "B02", "B03", "B04"]}


def test_amazon_p5_sequences_layout(tmp_path):
    write(tmp_path / "sequential_data.txt", "1 1 2 3\n2 3 2 1 4\n", gz=True)
    maps = {"user2id": {"RA": "1", "RB": "2"}, "id2user": {"1": "RA", "2": "RB"},
            "item2id": {}, "id2item": {"1": "X1", "2": "X2", "3": "X3", "4": "X4"}}
    write(tmp_path / "datamaps.json", json.dumps(maps), gz=True)
    data = prepare_dataset(DataConfig(dataset="amazon-2014", path=str(tmp_path)))
    assert data.sequences.to_pylist() == [{"user_id": "RA", "item_ids": ["X1", "X2", "X3"]},
                                          {"user_id": "RB", "item_ids": ["X3", "X2", "X1", "X4"]}]
    assert data.stats["order_only"] and data.stats["items_without_text"] == 4
    assert data.items.column("text").to_pylist()[0] == "Item: X1."


def test_amazon_lcrec_layout(tmp_path):
    write(tmp_path / "Sci.inter.json", json.dumps({"0": [2, 0, 1], "1": [0, 1, 2, 3]}), gz=True)
    write(tmp_path / "Sci.item.json", json.dumps({
        "0": {"title": "Caliper", "description": "Measures &quot;exactly&quot;", "brand": "Mitutoyo", "categories": "Industrial & Scientific,Tools"},
        "1": {"title": "Gloves", "brand": "Ansell", "categories": "Industrial & Scientific,Safety"},
        "2": {"title": "Beaker", "description": "Glass", "brand": "Pyrex", "categories": "Lab"},
        "3": {"title": "Tape", "description": "", "brand": "3M", "categories": ""},
    }), gz=True)
    data = prepare_dataset(DataConfig(dataset="amazon-lcrec", path=str(tmp_path)))
    assert data.sequences.to_pylist() == [{"user_id": "0", "item_ids": ["2", "0", "1"]},
                                          {"user_id": "1", "item_ids": ["0", "1", "2", "3"]}]
    assert data.interactions.column("timestamp").to_pylist() == [0, 1, 2, 0, 1, 2, 3]
    items = {r["item_id"]: r for r in data.items.to_pylist()}
    assert items["0"]["text"].endswith('Description: Measures "exactly".')
    assert items["1"]["description"] is None and data.stats["empty_text_values"] == {"description": 2, "categories": 1}


def test_mind_news_and_behaviors(tmp_path):
    news = "".join(f"N{i}\tsports\tgolf\tTitle {i}\tAbstract {i}\thttp://x/{i}\t[]\t[]\n" for i in range(1, 7))
    write(tmp_path / "news.tsv", news)
    behaviors = (
        "1\tU1\t11/11/2019 9:00:00 AM\tN1 N2\tN3-1 N4-0\n"
        "2\tU1\t11/12/2019 10:00:00 AM\tN1 N2\tN5-1 N6-1\n"
        "3\tU2\t11/13/2019 1:30:00 PM\t\tN3-1 N9-1\n"
    )
    write(tmp_path / "behaviors.tsv", behaviors)
    data = prepare_dataset(DataConfig(dataset="mind", path=str(tmp_path)))
    # U1: history first (just before the first impression), then clicks; U2 has 1 known click -> dropped.
    assert data.sequences.to_pylist() == [{"user_id": "U1", "item_ids": ["N1", "N2", "N3", "N5", "N6"]}]
    ts = data.interactions.column("timestamp").to_pylist()
    t1 = 1573462800  # 2019-11-11 09:00:00 UTC
    assert ts == [t1 - 2, t1 - 1, t1, t1 + 90000, t1 + 90000]
    assert data.stats["dropped"]["unknown_items"] == 1 and data.stats["dropped"]["short_users"] == 1
    assert data.stats["raw"]["impression_clicks"] == 5


# ---- bad input ----------------------------------------------------------------------------------


def test_missing_column_names_file_and_column(tmp_path, generic_files):
    _, items = generic_files
    inter = write(tmp_path / "bad.csv", "user,item_id,timestamp\nu1,a,1\n")
    with pytest.raises(DataError, match=r"bad.csv.*missing column\(s\) 'user_id'.*found: user, item_id, timestamp"):
        prepare_dataset(generic_cfg(inter, items))
    inter2, _ = generic_files
    with pytest.raises(DataError, match=r"items.jsonl.*missing column\(s\) 'brand'"):
        prepare_dataset(generic_cfg(inter2, items, columns=ColumnMapping(text_fields=["title", "brand"])))


def test_duplicate_item_ids_drop_or_error(tmp_path, generic_files):
    inter, _ = generic_files
    items = write(tmp_path / "dupes.jsonl", ITEMS_JSONL + json.dumps({"item_id": "a", "title": "Second A", "category": "X"}) + "\n")
    data = prepare_dataset(generic_cfg(inter, items))
    assert data.stats["dropped"]["duplicate_item_ids"] == 1
    assert "Second A" not in " ".join(data.items.column("text").to_pylist())  # first row wins
    with pytest.raises(DataError, match=r"1 duplicate item id row.*'a'"):
        prepare_dataset(generic_cfg(inter, items, on_bad_rows="error"))


def test_unknown_items_drop_or_error(tmp_path, generic_files):
    _, items = generic_files
    inter = write(tmp_path / "inter.csv", INTER_CSV + "u1,ghost,40\nu2,ghost,41\n")
    data = prepare_dataset(generic_cfg(inter, items))
    assert data.stats["dropped"]["unknown_items"] == 2
    assert "ghost" not in data.interactions.column("item_id").to_pylist()
    with pytest.raises(DataError, match=r"2 interaction\(s\) name 1 item id\(s\) that are not in the items file.*'ghost'"):
        prepare_dataset(generic_cfg(inter, items, on_bad_rows="error"))


def test_empty_input(tmp_path, generic_files):
    inter, items = generic_files
    empty = write(tmp_path / "empty.csv", "user_id,item_id,timestamp\n")
    with pytest.raises(DataError, match=r"empty.csv is empty"):
        prepare_dataset(generic_cfg(empty, items))
    empty_items = write(tmp_path / "none.jsonl", "")
    with pytest.raises(DataError, match=r"none.jsonl"):
        prepare_dataset(generic_cfg(inter, empty_items))
    missing = tmp_path / "absent.csv"
    with pytest.raises(DataError, match=r"interactions file not found: .*absent.csv"):
        prepare_dataset(generic_cfg(missing, items))


def test_null_ids_and_bad_timestamps_are_counted(tmp_path, generic_files):
    _, items = generic_files
    inter = write(tmp_path / "inter.csv", INTER_CSV + ",a,50\nu1,,51\nu2,c,yesterday-ish\nu2,c,\n")
    data = prepare_dataset(generic_cfg(inter, items))
    assert data.stats["dropped"] == {"null_user_ids": 1, "null_item_ids": 1, "bad_timestamps": 2, "unused_items": 1}
    with pytest.raises(DataError, match=r"empty 'user_id'"):
        prepare_dataset(generic_cfg(inter, items, on_bad_rows="error"))


def test_non_utf8_text_csv_and_jsonl(tmp_path, generic_files):
    inter, _ = generic_files
    items_csv = write(tmp_path / "items.csv", b"item_id,title,category\na,Tea,Food\nb,Caf\xe9 latin-1,Food\nc,Kettle,K\nd,Mug,K\n")
    data = prepare_dataset(generic_cfg(inter, items_csv))
    assert data.stats["dropped"]["non_utf8"] == 1
    assert "b" not in data.items.column("item_id").to_pylist()
    assert data.stats["dropped"]["unknown_items"] == 2  # u1 and u2 bought b
    with pytest.raises(DataError, match=r"items.csv: 1 row\(s\) with non-UTF-8 bytes in column 'title' \(e.g. 'row 2'\)"):
        prepare_dataset(generic_cfg(inter, items_csv, on_bad_rows="error"))
    items_jsonl = write(tmp_path / "items2.jsonl", ITEMS_JSONL.encode() + b'{"item_id": "e", "title": "\xff\xfe"}\n')
    data = prepare_dataset(generic_cfg(inter, items_jsonl))
    assert data.stats["dropped"]["non_utf8"] == 1
    with pytest.raises(DataError, match=r"items2.jsonl: 1 line\(s\) are not valid UTF-8 \(e.g. 'line 6'\)"):
        prepare_dataset(generic_cfg(inter, items_jsonl, on_bad_rows="error"))


def test_short_users_drop_or_error(tmp_path, generic_files):
    _, items = generic_files
    inter = write(tmp_path / "inter.csv", INTER_CSV + "u3,a,1\nu3,b,2\n")
    data = prepare_dataset(generic_cfg(inter, items))
    assert data.stats["dropped"]["short_users"] == 1 and data.stats["dropped"]["short_user_interactions"] == 2
    assert "u3" not in data.sequences.column("user_id").to_pylist()
    with pytest.raises(DataError, match=r"1 user\(s\) have fewer than 3 interactions.*'u3'"):
        prepare_dataset(generic_cfg(inter, items, on_bad_rows="error"))
    with pytest.raises(DataError, match=r"min_user_interactions must be >= 3"):
        prepare_dataset(generic_cfg(inter, items, min_user_interactions=2))
    only_short = write(tmp_path / "short.csv", "user_id,item_id,timestamp\nu1,a,1\nu1,b,2\n")
    with pytest.raises(DataError, match=r"no interactions left"):
        prepare_dataset(generic_cfg(only_short, items))


def test_kcore(tmp_path, generic_files):
    _, items = generic_files
    # Item d is seen by 2 users only, c by 1: the 2-core keeps everything, the 3-core removes c/d users' rows.
    rows = INTER_CSV + "u3,a,1\nu3,b,2\nu3,d,3\n"
    inter = write(tmp_path / "inter.csv", rows)
    data = prepare_dataset(generic_cfg(inter, items, kcore=3))
    assert set(data.interactions.column("item_id").to_pylist()) <= {"a", "b", "d"}
    assert data.stats["dropped"]["kcore"] >= 1
    counts = {}
    for i in data.interactions.column("item_id").to_pylist():
        counts[i] = counts.get(i, 0) + 1
    assert min(counts.values()) >= 3


def test_bad_template_and_unknown_dataset(generic_files):
    inter, items = generic_files
    with pytest.raises(DataError, match=r"uses field\(s\) brand"):
        prepare_dataset(generic_cfg(inter, items, text_template="Brand: {brand}"))
    with pytest.raises(DataError, match=r"unknown dataset 'netflix'"):
        prepare_dataset(DataConfig(dataset="netflix"))
    with pytest.raises(DataError, match=r"needs --path"):
        prepare_dataset(DataConfig(dataset="ml-100k"))


def test_items_without_any_text_drop_or_error(tmp_path, generic_files):
    inter, _ = generic_files
    rows = ITEMS_JSONL.replace('"title": "Mug", "category": "Kitchen"', '"title": null, "category": "  "')
    items = write(tmp_path / "notext.jsonl", rows)
    data = prepare_dataset(generic_cfg(inter, items))
    # d has neither title nor category: dropped, and so are the 2 interactions naming it.
    assert data.stats["dropped"]["items_without_text"] == 1 and data.stats["dropped"]["unknown_items"] == 2
    with pytest.raises(DataError, match=r"1 item\(s\) with no text \(every one of title, category is empty\).*'d'"):
        prepare_dataset(generic_cfg(inter, items, on_bad_rows="error"))


def test_repeat_interactions_are_kept_and_counted(tmp_path, generic_files):
    _, items = generic_files
    inter = write(tmp_path / "inter.csv", INTER_CSV + "u1,a,40\n")
    data = prepare_dataset(generic_cfg(inter, items))
    assert data.sequences.column("item_ids").to_pylist()[0] == ["a", "b", "c", "d", "a"]
    assert data.stats["repeat_interactions"] == 1


def test_malformed_files_are_one_line_errors(tmp_path, generic_files):
    inter, items = generic_files
    ragged = write(tmp_path / "ragged.csv", "user_id,item_id,timestamp\nu1,a,1\nu1,b,2,extra\n")
    with pytest.raises(DataError, match=r"ragged.csv cannot be read as csv") as info:
        prepare_dataset(generic_cfg(ragged, items))
    assert "\n" not in str(info.value)
    unknown = write(tmp_path / "inter.txt", "whatever")
    with pytest.raises(DataError, match=r"cannot tell the file format"):
        prepare_dataset(generic_cfg(unknown, items))
    broken_gz = write(tmp_path / "inter.csv.gz", b"not gzip at all")
    with pytest.raises(DataError, match=r"inter.csv.gz cannot be read"):
        prepare_dataset(generic_cfg(broken_gz, items))
