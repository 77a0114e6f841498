"""Adversarial inputs: no code runs from a checkpoint unasked, pickles are refused, a folder that
is not a Speeder checkpoint fails before allocating anything, a diverged model never looks perfect, top_k and
candidate arguments are validated."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModel, LlamaConfig, LlamaForCausalLM

from conftest import CANDIDATES, HISTORIES, make_tiny


def _saved(tmp_path, **kwargs):
    model, processor = make_tiny("llama", **kwargs)
    model.save_pretrained(tmp_path / "ckpt")
    processor.save_pretrained(tmp_path / "ckpt")
    return model, processor, tmp_path / "ckpt"


def test_recommend_never_runs_code_from_the_checkpoint(tmp_path):
    model, processor, ckpt = _saved(tmp_path)
    marker = tmp_path / "pwned"
    (ckpt / "evil_tok.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\nclass T: pass\n")
    for name in ("tokenizer_config.json", "processor_config.json"):
        path = ckpt / name
        if path.exists():
            config = json.loads(path.read_text())
            config["auto_map"] = {**config.get("auto_map", {}), "AutoTokenizer": [None, "evil_tok.T"]}
            path.write_text(json.dumps(config))
    loaded = AutoModel.from_pretrained(ckpt)
    try:
        loaded.recommend(HISTORIES, top_k=3)
    except Exception:  # refusing the tampered tokenizer is fine; running its code is not
        pass
    assert not marker.exists(), "code from the checkpoint folder ran with the package installed and no trust flag"


def test_pickle_weights_are_refused(tmp_path):
    model, _, ckpt = _saved(tmp_path)
    weights = next(ckpt.glob("*.safetensors"))
    torch.save(model.state_dict(), ckpt / "pytorch_model.bin")
    weights.unlink()
    with pytest.raises((OSError, ValueError), match="safetensors|model.safetensors"):
        AutoModel.from_pretrained(ckpt)
    with pytest.raises(ValueError, match="safetensors weights only"):
        AutoModel.from_pretrained(ckpt, use_safetensors=False)


def test_a_folder_that_is_not_a_speeder_checkpoint_fails_before_allocating(tmp_path):
    from modeling_speeder import SpeederForSequentialRecommendation

    llm = LlamaForCausalLM(LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                                       vocab_size=32))
    llm.save_pretrained(tmp_path / "llm")
    with pytest.raises(ValueError, match="not a Speeder config .model_type 'llama'"):
        SpeederForSequentialRecommendation.from_pretrained(tmp_path / "llm")
    (tmp_path / "empty").mkdir()
    with pytest.raises(OSError, match="has no config.json"):
        SpeederForSequentialRecommendation.from_pretrained(tmp_path / "empty")
    _, _, ckpt = _saved(tmp_path)
    config = json.loads((ckpt / "config.json").read_text())
    del config["text_config"]
    (ckpt / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="no text_config"):
        SpeederForSequentialRecommendation.from_pretrained(ckpt)
    with pytest.raises(ValueError, match="no text_config"):  # AutoModel passes the config it loaded itself
        AutoModel.from_pretrained(ckpt)


def test_top_k_beyond_the_unseen_catalog_returns_fewer_items():
    model, processor = make_tiny("llama", catalog_loss_weight=1.0)
    history = [f"item{i}" for i in range(35)]
    ranked = model.recommend([history], top_k=40, processor=processor)[0]
    assert len(ranked["item_ids"]) == 5 and not set(history) & set(ranked["item_ids"])
    assert all(np.isfinite(ranked["scores"]))
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="top_k must be a positive integer"):
            model.recommend(HISTORIES, top_k=bad, processor=processor)
    with pytest.raises(ValueError, match="2 candidate lists for 3 histories"):
        model.recommend(HISTORIES, candidates=CANDIDATES[:2], processor=processor)


def test_catalog_item_bias_is_in_every_catalog_score():
    model, processor = make_tiny("llama", catalog_loss_weight=1.0, catalog_item_bias=True)
    with torch.no_grad():
        model.catalog_item_bias.weight.copy_(torch.linspace(-3, 3, 40)[:, None])
        out = model(**processor(histories=HISTORIES), return_catalog_scores=True)
        expected = model.query_proj(out.query_hidden_state) @ model.model.item_representations().T + torch.linspace(-3, 3, 40)
        torch.testing.assert_close(out.catalog_scores, expected)
    ranked = model.recommend(HISTORIES, top_k=5, processor=processor, chunk_size=7, exclude_history=False)
    for result, row in zip(ranked, out.catalog_scores):
        torch.testing.assert_close(torch.tensor(result["scores"]), row.topk(5).values)


def test_a_diverged_run_stops_and_never_reports_perfect_metrics(tmp_path):
    from test_distributed_and_resume import tiny_dataset

    from modeling_speeder.recipes import build_for_dataset, train

    tiny_dataset(tmp_path / "data")
    model, processor, splits = build_for_dataset(tmp_path / "data", expert_hidden_size=16, learned_id_dim=8)
    with torch.no_grad():  # a diverged model: every weight of the backbone is NaN
        for p in model.backbone.parameters():
            p.fill_(float("nan"))
    report = train(model, processor, splits, tmp_path / "run", max_steps=6, save_steps=2, batch_size=4, patience=0,
                   logging_steps=1)
    assert report["diverged_at_step"] is not None and report["steps"] < 6, "training stops at a non-finite loss"
    assert report["test"]["hr@1"] < 0.5 and np.isfinite(report["test"]["mrr"])
    assert report["test"]["nonfinite_scores"] > 0, "the report flags the non-finite scores"


def test_processor_save_is_atomic(tmp_path, monkeypatch):
    """A save that fails part-way (full disk, kill) leaves the previous processor files whole: the catalog lives there."""
    from transformers.processing_utils import ProcessorMixin

    model, processor, ckpt = _saved(tmp_path)
    before = (ckpt / "processor_config.json").read_bytes()

    def failing_save(self, save_directory, *args, **kwargs):
        (Path(save_directory) / "processor_config.json").write_text('{"item_ids": ["trunc')
        raise OSError("No space left on device")

    monkeypatch.setattr(ProcessorMixin, "save_pretrained", failing_save)
    with pytest.raises(OSError, match="No space left"):
        processor.save_pretrained(ckpt)
    assert (ckpt / "processor_config.json").read_bytes() == before
    assert not [p for p in ckpt.iterdir() if p.name.startswith(".processor-saving-")], "no temporary left behind"



def test_text_writes_are_atomic(tmp_path):
    """report.json, the model card and the collator's draw state go through one writer: a write that fails part-way
    leaves the previous file whole and no temporary beside it."""
    from modeling_speeder.atomic_files import write_text_atomically

    path = tmp_path / "report.json"
    write_text_atomically(path, '{"hr@1": 0.5}\n')
    with pytest.raises(UnicodeEncodeError):
        write_text_atomically(path, '{"hr@1": "\ud800"}')  # a lone surrogate fails mid-write
    assert path.read_text() == '{"hr@1": 0.5}\n'
    assert [p.name for p in tmp_path.iterdir()] == ["report.json"], "no temporary left behind"

@pytest.mark.parametrize("argv,message", [
    (["train", "--data", "d", "--steps", "-3"], "--steps: expected a value >= 1, got '-3'"),
    (["train", "--data", "d", "--steps", "0"], "--steps: expected a value >= 1, got '0'"),
    (["convert", "--format", "csv", "--negatives", "0", "--output", "o"], "--negatives: expected a value >= 1"),
    (["train", "--data", "d", "--eval-rows", "0"], "--eval-rows: expected a value >= 1"),
    (["train", "--data", "d", "--lr", "-1"], "--lr: expected a value > 0"),
    (["train", "--data", "d", "--item-dropout", "1.5"], "--item-dropout: expected a value >= 0 and < 1"),
    (["demo", "--epochs", "abc"], "--epochs: expected a number, got 'abc'"),
])
def test_cli_numbers_out_of_range_are_refused_with_the_value(argv, message, capsys):
    from modeling_speeder.cli import run as cli

    with pytest.raises(SystemExit):
        cli(argv)
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("yaml_text, message", [
    ("steps: -3\n", "steps: expected a value >= 1, got '-3'"),
    ("lr: 0\n", "lr: expected a value > 0, got '0'"),
    ("head: catalog\n", "head: 'catalog' is not one of"),
    ("no_mpo: 'false'\n", "no_mpo: expected true or false, got 'false'"),  # a quoted false read as true
    ("- lr\n- 0.1\n", "expected a mapping of option: value, got a list"),
    ("run: 5\n", "unknown option 'run'"),
])
def test_config_file_values_get_the_command_line_checks(tmp_path, yaml_text, message):
    from modeling_speeder.cli import run as cli

    (tmp_path / "c.yaml").write_text(yaml_text)
    with pytest.raises(SystemExit, match=message):
        cli(["train", "--data", "d", "--config", str(tmp_path / "c.yaml")])


def test_the_command_line_wins_over_the_config_file_also_where_it_repeats_a_default(tmp_path, monkeypatch):
    """`--lr 0.001` (the default) with `lr: 0.5` in the file trained at 0.5."""
    from modeling_speeder import cli

    ran = {}
    monkeypatch.setattr(cli, "train_command", lambda args: ran.update(vars(args)))  # build_parser reads it
    (tmp_path / "c.yaml").write_text("lr: 0.5\nbatch_size: 8\nno_mpo: true\n")
    cli.run(["train", "--data", "d", "--lr", "0.001", "--config", str(tmp_path / "c.yaml")])
    assert ran["learning_rate"] == 0.001 and ran["batch_size"] == 8 and ran["mpo"] is False


@pytest.mark.parametrize(
    "setting, value",
    [("tokens_per_item", 1), ("max_history", 4), ("item_level_position_ids", False), ("item_token_id", 5)],
)
def test_a_processor_with_other_layout_settings_is_refused(setting, value):
    """The config owns K, the history length, the position mode and the placeholder ids: a processor stating other
    values (K = 1 for a K = 2 model would embed the wrong items with no other error) is refused by name."""
    model, processor = make_tiny("llama", tokens_per_item=2)
    setattr(processor, setting, value)
    with pytest.raises(ValueError, match=f"{setting}={value!r}.*{setting}="):
        model.recommend(HISTORIES, top_k=3, processor=processor)
    with pytest.raises(ValueError, match=setting):
        model.recommend(HISTORIES, candidates=CANDIDATES, processor=processor)


@pytest.mark.parametrize("damage", ["nan_row", "nan_in_an_absent_row", "empty_presence_row", "missing_tensor"])
def test_a_damaged_feature_bank_is_refused_on_load(tmp_path, damage):
    """The feature bank is the catalog: a NaN row or an item with no modality would be everyone's top-1, and a
    missing tensor would load as uninitialised memory. Loading says which."""
    from safetensors.torch import load_file, save_file

    _, _, ckpt = _saved(tmp_path)
    weights_file = ckpt / "model.safetensors"
    state = load_file(weights_file)
    if damage == "nan_row":
        state["model.mrc.features_text"][3] = float("nan")
    elif damage == "nan_in_an_absent_row":  # NaN times a zero presence is NaN: the item was everyone's top-1
        absent = (~state["model.mrc.presence"][:, 1]).nonzero().flatten()[0]
        state["model.mrc.features_image"][absent] = float("nan")
    elif damage == "empty_presence_row":
        state["model.mrc.presence"][7] = False
    else:
        del state["model.mrc.features_image"]
    save_file(state, weights_file, metadata={"format": "pt"})
    expected = {"nan_row": r"NaN or inf in rows \[3\]", "nan_in_an_absent_row": "'image' hold NaN or inf in rows",
                "empty_presence_row": r"Items \[7\] have no modality",
                "missing_tensor": "lacks its feature bank tensors.*features_image"}[damage]
    with pytest.raises((ValueError, OSError), match=expected):
        AutoModel.from_pretrained(ckpt)


def test_cli_user_errors_are_one_line_and_debug_shows_the_traceback(tmp_path, capsys):
    """`speeder` reports a user error as one line naming what was expected and exits 2; --debug re-raises."""
    from modeling_speeder.cli import main

    missing = str(tmp_path / "no-such-dataset")
    assert main(["train", "--data", missing, "--output", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("speeder train: error:") and "no-such-dataset" in err and "\n" not in err
    with pytest.raises((OSError, ValueError)):
        main(["train", "--data", missing, "--output", str(tmp_path / "o"), "--debug"])


def test_a_mistyped_model_path_says_so(tmp_path):
    from modeling_speeder.cli import load_checkpoint

    with pytest.raises(FileNotFoundError, match="ckpt-typo: no such checkpoint folder"):
        load_checkpoint(str(tmp_path / "ckpt-typo"))
    with pytest.raises(FileNotFoundError, match="no such checkpoint folder"):
        load_checkpoint("outputs/demo/modle")


def test_checkpoint_saves_keep_user_files_links_modes_and_take_turns(tmp_path):
    """The folder swap keeps a user's file that merely looks like weights, saves through a symlink (the link stays),
    keeps the folder's mode, refuses a read-only folder, removes temporaries a killed save left, and serialises
    concurrent writers (each save complete, the folder loadable)."""
    import os
    import threading

    model, processor, ckpt = _saved(tmp_path)
    (ckpt / "model_notes.safetensors.md").write_text("my notes")
    killed = tmp_path / ".ckpt.saving-abc123"
    killed.mkdir()
    (killed / "model.safetensors").write_bytes(b"half")
    ckpt.chmod(0o750)
    model.save_pretrained(ckpt)
    assert (ckpt / "model_notes.safetensors.md").read_text() == "my notes"
    assert not killed.exists(), "a killed save's temporary is cleaned up"
    assert ckpt.stat().st_mode & 0o777 == 0o750
    link = tmp_path / "latest"
    link.symlink_to(ckpt, target_is_directory=True)
    model.save_pretrained(link)
    assert link.is_symlink() and (link / "model.safetensors").exists()
    ckpt.chmod(0o550)
    try:
        with pytest.raises(PermissionError, match="read-only"):
            model.save_pretrained(ckpt)
    finally:
        ckpt.chmod(0o750)
    errors = []

    def save():
        try:
            model.save_pretrained(ckpt)
        except Exception as err:  # noqa: BLE001 (collected for the assertion)
            errors.append(err)

    threads = [threading.Thread(target=save) for _ in range(4)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert errors == []
    assert AutoModel.from_pretrained(ckpt).recommend(HISTORIES, top_k=3, processor=processor)
    assert not [p for p in os.listdir(tmp_path) if ".saving-" in p or ".previous-" in p]
    model.save_pretrained(tmp_path / "another")  # a Trainer saves many checkpoints in one folder: one lock file
    assert sorted(p for p in os.listdir(tmp_path) if p.endswith(".lock")) == [".speeder-save.lock"]


def test_cli_help_and_argument_errors_do_not_import_torch():
    """`speeder --help` and argument errors answer before torch and transformers are imported (they took 9 s)."""
    import subprocess
    import sys

    for argv, code in ((["--help"], 0), (["train", "--help"], 0), (["train", "--steps", "-3"], 2)):
        run = subprocess.run([sys.executable, "-X", "importtime", "-m", "modeling_speeder", *argv], capture_output=True,
                             text=True)
        assert run.returncode == code, run.stderr[-2000:]
        imported = {line.rsplit("|", 1)[-1].strip() for line in run.stderr.splitlines() if line.startswith("import time:")}
        assert "torch" not in imported and "transformers" not in imported, argv


def test_cli_defaults_are_the_settings_dataclasses_defaults():
    """The command line is generated from the typed settings: each option's default is its field's, and the protocol
    constants and selection metrics have one home that imports no torch."""
    import dataclasses

    from modeling_speeder.arguments import NUM_NEGATIVES, SELECTION_METRICS, BuildArguments, DemoArguments, TrainArguments
    from modeling_speeder.cli import build_parser
    from modeling_speeder.conversion.hub import SELECTION_DESCRIPTIONS

    parser, commands = build_parser()
    assert parser.parse_args(["convert", "--format", "csv", "--output", "o"]).negatives == NUM_NEGATIVES
    for command, classes in (("train", (TrainArguments, BuildArguments)), ("demo", (DemoArguments, BuildArguments)),
                             ("build", (BuildArguments,))):
        for cls in classes:
            for field in dataclasses.fields(cls):
                assert commands[command].get_default(field.name) == getattr(cls(), field.name), (command, field.name)
    assert set(SELECTION_DESCRIPTIONS) == set(SELECTION_METRICS)  # the model card names each one
    assert DemoArguments().epochs == 40 and TrainArguments().epochs == 30

def test_concurrent_reader_always_finds_a_complete_checkpoint(tmp_path):
    """On Linux a save exchanges the new folder with the old one in one step (renameat2 RENAME_EXCHANGE): a reader
    polling the folder while it is saved again and again never finds it missing or without its weights (it
    found the folder missing 25 times in 15 s with the two-rename swap)."""
    import sys
    import threading

    from modeling_speeder.atomic_files import _exchange_paths

    probe_a, probe_b = tmp_path / "a", tmp_path / "b"
    probe_a.mkdir(), probe_b.mkdir()
    if not sys.platform.startswith("linux") or not _exchange_paths(probe_a, probe_b):
        pytest.skip("this platform or file system has no atomic exchange: the documented two-rename window applies")
    model, _, ckpt = _saved(tmp_path)
    saves_done, misses, reads = threading.Event(), [], [0]

    def read():
        while not saves_done.is_set():  # progress-based: as long as the writer is saving, however slow the machine
            if not (ckpt / "config.json").exists() or not (ckpt / "model.safetensors").exists():
                misses.append(reads[0])
            reads[0] += 1

    reader = threading.Thread(target=read)
    reader.start()
    try:
        for _ in range(8):
            model.save_pretrained(ckpt)
    finally:
        saves_done.set()
        reader.join()
    assert reads[0] > 0 and misses == [], f"the checkpoint was missing in {len(misses)} of {reads[0]} reads"


def test_recommend_refuses_malformed_histories_sizes_and_non_finite_scores():
    """A string history would be read as one-character ids, a non-positive batch or chunk size returned nothing, and a
    NaN weight or feature made NaN scores come back as rankings."""
    from conftest import HISTORIES, make_tiny

    model, processor = make_tiny("llama")
    for histories, message in (("item1", "histories must be a list"), (["item1"], "each history must be a list"),
                               ([None], "each history must be a list"), ([HISTORIES[0], "item2"], "each history")):
        with pytest.raises(ValueError, match=message):
            model.recommend(histories, processor=processor)
    for name in ("batch_size", "chunk_size", "top_k"):
        for value in (0, -1, 2.5):
            with pytest.raises(ValueError, match=f"{name} must be a positive integer, got {value}"):
                model.recommend(HISTORIES, processor=processor, **{name: value})
    with pytest.raises(ValueError, match="each candidate list must be a list"):
        model.recommend(HISTORIES[:1], candidates=["item1"], processor=processor)
    with torch.no_grad():
        model.query_proj.weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match="scored NaN or \\+inf for histories 0..2"):
        model.recommend(HISTORIES, processor=processor)


@pytest.mark.parametrize("argv, message", [
    (["convert", "--format", "unisrec", "--input", "x", "--output", "o"], "--format unisrec needs --name"),
    (["convert", "--format", "csv", "--output", "o"], "--format csv needs --input"),
    (["convert", "--format", "amazon2023", "--input", "r.jsonl", "--output", "o"], "--format amazon2023 needs --meta"),
    (["convert", "--format", "csv", "--input", "i.csv", "--delimiter", "", "--output", "o"], "--delimiter is empty"),
])
def test_convert_says_which_argument_a_format_needs(argv, message, capsys):
    from modeling_speeder.cli import main

    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_infinite_numbers_are_refused_on_the_command_line(capsys):
    from modeling_speeder.cli import run as cli

    with pytest.raises(SystemExit):
        cli(["demo", "--epochs", "inf"])
    assert "--epochs: expected a finite number, got 'inf'" in capsys.readouterr().err


def test_a_card_report_that_is_not_a_json_object_is_one_line(tmp_path, capsys):
    from modeling_speeder.cli import main

    model, processor = make_tiny("llama")
    model.save_pretrained(tmp_path / "m")
    processor.save_pretrained(tmp_path / "m")
    (tmp_path / "r.json").write_text("[1, 2]")
    assert main(["card", "--model", str(tmp_path / "m"), "--repo", "org/x", "--report", str(tmp_path / "r.json")]) == 2
    assert "expected a JSON object (a report.json or stats.json), got a list" in capsys.readouterr().err


def test_a_save_keeps_links_and_refuses_the_current_folder_with_a_clear_error(tmp_path, monkeypatch):
    """A symbolic link inside a checkpoint became a copy of its target on the next save; saving to `.` failed with
    'Device or resource busy'."""
    model, processor = make_tiny("llama")
    model.save_pretrained(tmp_path / "ckpt")
    (tmp_path / "notes.txt").write_text("mine")
    (tmp_path / "ckpt" / "notes.txt").symlink_to(tmp_path / "notes.txt")
    model.save_pretrained(tmp_path / "ckpt")
    assert (tmp_path / "ckpt" / "notes.txt").is_symlink() and (tmp_path / "notes.txt").read_text() == "mine"
    monkeypatch.chdir(tmp_path / "ckpt")
    with pytest.raises(OSError, match="Cannot replace . as a whole .the current folder.*save into a folder inside it"):
        model.save_pretrained(".")


def test_a_processor_save_waits_for_a_model_save_to_the_same_folder_and_clears_killed_saves(tmp_path):
    """Processor and model saves racing on one checkpoint reverted each other's files; killed processor saves left
    `.processor-saving-*` folders that no later save removed. Both now take the same lock."""
    import subprocess
    import sys
    import threading

    from transformers import AutoProcessor

    model, processor = make_tiny("llama")
    final = tmp_path / "ckpt"
    model.save_pretrained(final)
    (final / ".processor-saving-killed").mkdir()
    holder = subprocess.Popen(  # another process in the middle of a model save: it holds the folder's save lock
        [sys.executable, "-c", "import sys; from filelock import FileLock; lock = FileLock(sys.argv[1]); lock.acquire(); "
         "print('held', flush=True); sys.stdin.readline(); lock.release()", str(tmp_path / ".speeder-save.lock")],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        saving = threading.Thread(target=processor.save_pretrained, args=(final,))
        saving.start()
        saving.join(1.0)
        assert saving.is_alive(), "the processor save must wait for the model save's lock"
        assert not (final / "processor_config.json").exists()
    finally:
        holder.communicate("\n")
    saving.join()
    assert (final / "processor_config.json").exists() and not list(final.glob(".processor-saving-*"))
    assert AutoProcessor.from_pretrained(final).item_ids == processor.item_ids


def test_a_build_onto_a_full_disk_is_one_line(tmp_path, monkeypatch, capsys):
    """safetensors reports a full disk as its own SafetensorError, which reached the user as a raw traceback."""
    import transformers.modeling_utils
    from safetensors import SafetensorError
    from test_distributed_and_resume import tiny_dataset

    from modeling_speeder.cli import main

    def full_disk(*args, **kwargs):
        raise SafetensorError("Error while serializing: IoError(Os { code: 28, kind: StorageFull })")

    tiny_dataset(tmp_path / "data")
    monkeypatch.setattr(transformers.modeling_utils, "safe_save_file", full_disk)
    assert main(["build", "--data", str(tmp_path / "data"), "--backbone", "tiny-llama", "--output",
                 str(tmp_path / "ckpt")]) == 2
    assert "speeder build: error: Error while serializing: IoError(Os { code: 28" in capsys.readouterr().err
    assert not (tmp_path / "ckpt").exists() and not list(tmp_path.glob(".ckpt.*"))


def test_build_flags_with_a_built_model_are_an_error_not_ignored(tmp_path, capsys):
    """With --model, `speeder train` silently ignored the flags that shape a new build (--max-history 7 trained the
    checkpoint's own history length)."""
    from test_distributed_and_resume import tiny_dataset

    from modeling_speeder.cli import main
    tiny_dataset(tmp_path / "data")
    assert main(["train", "--data", str(tmp_path / "data"), "--model", str(tmp_path / "m"), "--max-history", "7",
                 "--no-item-bias", "--output", str(tmp_path / "run")]) == 2
    assert "is already built, so --max-history, --no-item-bias would be ignored" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()

