"""Converters to the canonical form: small fixtures built here, error cases, determinism, atomic writes."""

import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch

from modeling_speeder.conversion.datasets import (
    convert_recbole,
    convert_unisrec,
    leave_one_out,
    load_canonical,
    write_canonical,
)

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def write(path: Path, text: str):
    path.write_text(text, encoding="utf-8")
    return path


@pytest.fixture
def recbole_dir(tmp_path):
    rows = ["user_id:token\titem_id:token\trating:float\ttimestamp:float"]
    for u in range(1, 6):
        # item order by timestamp; items 'b' and 'c' tie at t=20 and must keep row order (b first)
        for item, t in [("a", 10), ("b", 20), ("c", 20), ("d", 30), (f"x{u}", 40)]:
            rows.append(f"{u}\t{item}\t4\t{t}")
    write(tmp_path / "toy.inter", "\n".join(rows) + "\n")
    names = ["a", "b", "c", "d"] + [f"x{u}" for u in range(1, 6)] + [f"n{j}" for j in range(30)]
    items = ["item_id:token\tmovie_title:token_seq\tclass:token_seq"] + [f"{i}\tTitle {i}\tDrama" for i in names]
    write(tmp_path / "toy.item", "\n".join(items) + "\n")
    return tmp_path


def test_recbole_leave_one_out_and_stable_ties(recbole_dir):
    splits, items = convert_recbole(recbole_dir, "toy", num_negatives=19, seed=0)
    test = splits["test"].filter(lambda r: r["user_id"] == "1")[0]
    assert test["history"] == ["a", "b", "c", "d"] and test["target"] == "x1"
    valid = splits["validation"].filter(lambda r: r["user_id"] == "1")[0]
    assert valid["history"] == ["a", "b", "c"] and valid["target"] == "d"
    train = splits["train"].filter(lambda r: r["user_id"] == "1")
    assert [(r["history"], r["target"]) for r in train] == [(["a"], "b"), (["a", "b"], "c")]
    for row in splits["test"]:
        cands = row["candidates"]
        assert len(cands) == 20 and len(set(cands)) == 20 and row["target"] in cands
        assert not set(cands) - {row["target"]} & set(row["history"])
    assert items["title"][items["item_id"].index("a")] == "Title a"


def test_conversion_is_deterministic(recbole_dir, tmp_path):
    digests = []
    for out in ("one", "two"):
        splits, items = convert_recbole(recbole_dir, "toy")
        write_canonical(tmp_path / out, splits, items, {"text": torch.ones(len(items["item_id"]), 3)})
        digests.append({p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted((tmp_path / out).iterdir())})
    assert digests[0] == digests[1]
    splits, items, features, _ = load_canonical(tmp_path / "one")
    assert len(splits["train"]) == 10 and features["text"].shape == (len(items), 3)
    assert splits["train"].features["candidates"] == splits["test"].features["candidates"]


def test_failed_write_keeps_previous_output(recbole_dir, tmp_path):
    splits, items = convert_recbole(recbole_dir, "toy")
    write_canonical(tmp_path / "out", splits, items)
    before = (tmp_path / "out" / "test.parquet").read_bytes()
    bad = torch.ones(len(items["item_id"]), 2)
    bad[3, 1] = float("nan")
    with pytest.raises(ValueError, match=r"NaN or inf in rows \[3\]"):
        write_canonical(tmp_path / "out", splits, items, {"text": bad})
    with pytest.raises(ValueError, match="has 2 rows but the item table has"):
        write_canonical(tmp_path / "out", splits, items, {"text": torch.ones(2, 2)})
    assert (tmp_path / "out" / "test.parquet").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".out")) == []


def test_converter_errors(tmp_path):
    write(tmp_path / "e.inter", "")
    with pytest.raises(ValueError, match="e.inter is empty"):
        convert_recbole(tmp_path, "e")
    write(tmp_path / "m.inter", "user_id:token\titem_id:token\n1\ta\n")
    with pytest.raises(ValueError, match="has no 'timestamp' column"):
        convert_recbole(tmp_path, "m")
    write(tmp_path / "r.inter", "user_id:token\titem_id:token\ttimestamp:float\n1\ta\t1\n1\tb\n")
    with pytest.raises(ValueError, match="r.inter, line 3: 2 fields, header has 3"):
        convert_recbole(tmp_path, "r")
    with pytest.raises(FileNotFoundError, match="nothing.inter does not exist"):
        convert_recbole(tmp_path, "nothing")
    with pytest.raises(ValueError, match=r"missing from the item table: \['zz'\]"):
        leave_one_out({"u": ["a", "b", "zz"]}, ["a", "b", "c"])
    splits = leave_one_out({"u": ["a", "b", "c", "d"]}, ["a", "b", "c", "d", "e"], num_negatives=1)
    with pytest.raises(ValueError, match=r"Duplicate item ids in the item table: \['a'\]"):
        write_canonical(tmp_path / "d", splits, {"item_id": ["a", "a"], "title": ["", ""], "text": ["", ""]})
    with pytest.raises(ValueError, match="train split would be empty: 2 users, 2 with at least 3"):
        leave_one_out({"u": ["a", "b", "c"], "v": ["c", "d", "e"]}, list("abcdefgh"), num_negatives=2)
    with pytest.raises(ValueError, match="all but 1 of the 5 catalog items: too few to draw 2 negatives.*--negatives"):
        leave_one_out({"u": ["a", "b", "c", "d"]}, ["a", "b", "c", "d", "e"], num_negatives=2)


def test_unisrec_fixture(tmp_path):
    asins = [f"A{i}" for i in range(30)]
    write(tmp_path / "T.item2index", "".join(f"{a}\t{i}\n" for i, a in enumerate(asins)))
    write(tmp_path / "T.text", "item_id:token\ttext:token_seq\n" + "".join(f"{a}\tName {a}. Cat. Brand.\n" for a in asins))
    write(tmp_path / "T.test.inter", "user_id:token\titem_id_list:token_seq\titem_id:token\n0\t0 1 2\t3\n1\t4 5 6 7\t8\n")
    np.arange(30 * 4, dtype="<f4").tofile(tmp_path / "T.feat1CLS")
    with pytest.raises(ValueError, match=r"T.feat1CLS: the text encoder's width is needed.*--feature-dims text=4"):
        convert_unisrec(tmp_path, "T")  # a headerless file is never taken at the width its size suggests
    splits, items, features = convert_unisrec(tmp_path, "T", feature_dims={"text": 4})
    assert splits["test"][1]["history"] == ["A4", "A5", "A6", "A7"] and splits["test"][1]["target"] == "A8"
    assert items["title"][0] == "Name A0" and features["text"].shape == (30, 4) and "image" not in features
    assert torch.equal(features["text"][2], torch.tensor([8.0, 9.0, 10.0, 11.0]))
    np.arange(31, dtype="<f4").tofile(tmp_path / "T.feat3CLS")
    with pytest.raises(ValueError, match="do not divide into 30 item rows"):
        convert_unisrec(tmp_path, "T", feature_dims={"text": 4, "image": 4})
    np.arange(30 * 2, dtype="<f4").tofile(tmp_path / "T.feat3CLS")  # a 4-wide file truncated to exactly half
    with pytest.raises(ValueError, match="rows of 2, but the image encoder's width is 4: the file is truncated"):
        convert_unisrec(tmp_path, "T", feature_dims={"text": 4, "image": 4})


@pytest.mark.skipif(not (SHARED / "amazon-scientific-mm").exists(), reason="../shared/data/amazon-scientific-mm is absent")
def test_real_scientific_statistics(tmp_path):
    splits, items, features = convert_unisrec(SHARED / "amazon-scientific-mm", "Scientific",
                                              feature_dims={"text": 512, "image": 512})
    stats = write_canonical(tmp_path / "sci", splits, items, features)
    assert (stats["users"], stats["items"], stats["interactions"]) == (2928, 1585, 19712)
    assert stats["history_length"]["min"] == 5 and stats["history_length"]["max"] == 36
    assert stats["rows"]["train"] == 10928  # the export's own train.inter has the same prefixes
