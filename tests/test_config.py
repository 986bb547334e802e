"""Typed config: YAML + dotted overrides, and errors that name the key for typos and wrong types."""

from __future__ import annotations

from pathlib import Path

import pytest

from cost_dist.config import Config, ConfigError

REPO = Path(__file__).resolve().parents[1]


def test_defaults_and_yaml_roundtrip(tmp_path):
    cfg = Config.load()
    assert cfg.data.dataset == "synthetic" and cfg.data.max_len == 20 and cfg.evaluate.ks == [5, 10, 20, 40]
    p = tmp_path / "c.yaml"
    p.write_text(cfg.to_yaml())
    assert Config.load(p) == cfg


def test_overrides_are_typed():
    cfg = Config.load(REPO / "tests" / "tiny.yaml", [
        "tokenizer.codebook_size=32", "evaluate.ks=5,10", "data.columns.text_fields=[title, brand]",
        "data.path=/data/x", "tokenizer.tau=0.2", "data.keep_unused_items=true", "resources.tokenizer.resources.GPU_A=0.5",
        "data.text_template=null",
    ])
    assert cfg.name == "tiny"  # from the file
    assert cfg.data.synthetic.num_items == 300
    assert cfg.tokenizer.codebook_size == 32
    assert cfg.evaluate.ks == [5, 10]
    assert cfg.data.columns.text_fields == ["title", "brand"]
    assert cfg.data.path == "/data/x" and cfg.tokenizer.tau == 0.2 and cfg.data.keep_unused_items is True
    assert cfg.resources.tokenizer.resources == {"GPU_A": 0.5}
    assert cfg.data.text_template is None


@pytest.mark.parametrize("override, message", [
    ("tokenizer.codebok_size=3", "unknown config key 'tokenizer.codebok_size'"),
    ("nosuch.key=1", "unknown config key 'nosuch.key'"),
    ("tokenizer.codebook_size=abc", "config key 'tokenizer.codebook_size' must be an integer"),
    ("tokenizer.codebook_size=1.5", "must be an integer"),
    ("data.unescape_html=maybe", "config key 'data.unescape_html' must be true or false"),
    ("evaluate.ks=[5, x]", "config key 'evaluate.ks[1]' must be an integer"),
    ("tokenizer.alpha=fast", "config key 'tokenizer.alpha' must be a number"),
    ("no_equals_sign", "must look like section.key=value"),
    ("data.dataset.x=1", "'dataset' is not a section"),
])
def test_bad_overrides_name_the_key(override, message):
    with pytest.raises(ConfigError, match=None) as info:
        Config.load(None, [override])
    assert message in str(info.value)


def test_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        Config.load(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("data: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        Config.load(bad)
    listy = tmp_path / "list.yaml"
    listy.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="mapping at the top level"):
        Config.load(listy)
    typo = tmp_path / "typo.yaml"
    typo.write_text("data:\n  synthetic:\n    num_itemz: 5\n")
    with pytest.raises(ConfigError, match=r"unknown config key 'data.synthetic.num_itemz'"):
        Config.load(typo)
    wrong = tmp_path / "wrong.yaml"
    wrong.write_text("data: 5\n")
    with pytest.raises(ConfigError, match=r"data must be a mapping"):
        Config.load(wrong)


def test_section_hash_tracks_only_its_sections():
    a = Config.load()
    b = Config.load(None, ["embed.batch_size=7"])
    c = Config.load(None, ["data.kcore=5"])
    assert a.section_hash("data", "seed") == b.section_hash("data", "seed")
    assert a.section_hash("data", "seed") != c.section_hash("data", "seed")
    assert a.section_hash("data.max_len") == c.section_hash("data.max_len")
