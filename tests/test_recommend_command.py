"""`speeder recommend`: the batch job over a file of histories (JSONL, a CSV of interactions, a dataset folder), one
JSON line per user, ranked exactly as `recommend()` ranks, written atomically."""

import json

import pytest

from conftest import CANDIDATES, HISTORIES, make_tiny
from modeling_speeder.cli import run


@pytest.fixture
def checkpoint(tmp_path):
    model, processor = make_tiny("llama")
    model.save_pretrained(tmp_path / "ckpt")
    processor.save_pretrained(tmp_path / "ckpt")
    return tmp_path / "ckpt", model, processor


def read_lines(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def same_ranking(got, expected):
    assert [g["item_ids"] for g in got] == [e["item_ids"] for e in expected]
    for g, e in zip(got, expected):
        assert g["scores"] == pytest.approx(e["scores"], abs=1e-5)


def test_jsonl_whole_catalog_and_candidates_match_recommend(checkpoint, tmp_path):
    """Candidate lists of different sizes (4, 1 and 3 items) in one batch rank as each user's list alone does."""
    folder, model, processor = checkpoint
    candidates = [CANDIDATES[0], CANDIDATES[1][:1], CANDIDATES[2][:3]]
    source = tmp_path / "histories.jsonl"
    source.write_text("".join(json.dumps({"user_id": f"u{i}", "history": h, "candidates": c}) + "\n"
                              for i, (h, c) in enumerate(zip(HISTORIES, candidates))))
    run(["recommend", "--model", str(folder), "--input", str(source), "--output", str(tmp_path / "recs.jsonl"),
         "--top-k", "5", "--batch-size", "2"])
    got = read_lines(tmp_path / "recs.jsonl")
    assert [g["user_id"] for g in got] == ["u0", "u1", "u2"]
    same_ranking(got, model.recommend(HISTORIES, top_k=5, processor=processor))
    assert all(not set(g["item_ids"]) & set(h) for g, h in zip(got, HISTORIES)), "history items are excluded"
    run(["recommend", "--model", str(folder), "--input", str(source), "--output", str(tmp_path / "cands.jsonl"),
         "--top-k", "2", "--candidates"])
    got = read_lines(tmp_path / "cands.jsonl")
    same_ranking(got, [model.recommend([h], candidates=[c], top_k=2, processor=processor)[0]
                       for h, c in zip(HISTORIES, candidates)])
    assert [len(g["item_ids"]) for g in got] == [2, 1, 2]
    assert all(set(g["item_ids"]) <= set(c) for g, c in zip(got, candidates))


def test_csv_interactions_are_grouped_per_user_in_time_order(checkpoint, tmp_path):
    folder, model, processor = checkpoint
    source = tmp_path / "events.csv"
    # u1's events out of order in the file: the timestamp decides.
    source.write_text("user_id,item_id,timestamp\nu1,item6,20\nu0,item1,1\nu1,item5,10\nu0,item2,2\n")
    run(["recommend", "--model", str(folder), "--input", str(source), "--output", str(tmp_path / "recs.jsonl"),
         "--include-history"])
    got = read_lines(tmp_path / "recs.jsonl")
    assert [g["user_id"] for g in got] == ["u1", "u0"]
    same_ranking(got, model.recommend([["item5", "item6"], ["item1", "item2"]], processor=processor,
                                      exclude_history=False))


def test_a_failed_run_leaves_the_previous_output_and_no_temporary(checkpoint, tmp_path):
    folder, _, _ = checkpoint
    output = tmp_path / "recs.jsonl"
    output.write_text("previous\n")
    source = tmp_path / "bad.jsonl"
    source.write_text(json.dumps({"history": ["item1"]}) + "\n" + json.dumps({"history": ["no-such-item"]}) + "\n")
    with pytest.raises(ValueError, match="no-such-item"):
        run(["recommend", "--model", str(folder), "--input", str(source), "--output", str(output)])
    assert output.read_text() == "previous\n" and not [p for p in tmp_path.iterdir() if "partial" in p.name]
    for name, text, message in (("h.txt", "x", "expected an existing .jsonl or .csv file"),
                                ("h.csv", "user,item\n", r"has no \['user_id', 'item_id'\] column"),
                                ("h.jsonl", json.dumps({"items": ["item1"]}) + "\n", "no history field")):
        (tmp_path / name).write_text(text)
        with pytest.raises(ValueError, match=message):
            run(["recommend", "--model", str(folder), "--input", str(tmp_path / name), "--output", str(output)])
    with pytest.raises(ValueError, match="no candidates field"):
        run(["recommend", "--model", str(folder), "--input", str(source), "--output", str(output), "--candidates"])
