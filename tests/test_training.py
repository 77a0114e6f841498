"""Metrics, MPO schedule, Trainer integration and the PEFT round trip."""

import argparse
import json
import logging

import numpy as np
import pytest
import torch
from datasets import Dataset

from conftest import CANDIDATES, HISTORIES, ITEM_IDS, TARGETS, make_tiny
from modeling_speeder.processing.collator import SpeederDataCollator
from modeling_speeder.training import (
    DEFAULT_MPO_SCHEDULE,
    MPOStage,
    SpeederMPOCallback,
    compute_metrics,
    ranking_metrics,
)


def test_ranking_metrics_hand_computed():
    scores = [[0.9, 0.1, 0.5],   # target 0 ranked 1st
              [0.9, 0.1, 0.5],   # target 2 ranked 2nd
              [0.2, 0.2, 0.2]]   # a tie counts against the target: ranked 3rd
    m = ranking_metrics(scores, [0, 2, 1], ks=(1, 2))
    assert m["hr@1"] == pytest.approx(1 / 3)
    assert m["hr@2"] == pytest.approx(2 / 3)
    assert m["ndcg@2"] == pytest.approx((1 + 1 / np.log2(3)) / 3)
    assert m["mrr"] == pytest.approx((1 + 1 / 2 + 1 / 3) / 3)
    assert m["valid_ratio"] == 1.0 and m["vhr@1"] == pytest.approx(1 / 3)
    m = ranking_metrics(scores, [0, 2, 1], valid=[False, True, True])
    assert m["valid_ratio"] == pytest.approx(2 / 3) and m["vhr@1"] == 0.0


def test_compute_metrics_takes_trainer_tuples():
    class EvalPred:
        predictions = (np.array([[1.0, 0.0]]),)
        label_ids = (np.array([0]), np.array([7]))
    assert compute_metrics(EvalPred())["hr@1"] == 1.0


def test_mpo_stage_plan_transitions_and_resume():
    model, _ = make_tiny("llama")  # modalities text, image, id
    callback = SpeederMPOCallback()
    plan = callback.plan(model, 100)
    assert [(s["start"], s["end"], s["modalities"]) for s in plan] == [
        (0, 34, ["text"]), (34, 67, ["text", "image"]), (67, 100, ["text", "image", "id"])]
    callback._trainable = {n for n, _ in model.named_parameters()}
    callback._apply(model, 0, 100)
    assert model.model.modality_keep_prob.tolist() == [1.0, 0.0, 0.0]
    callback._apply(model, 40, 100)  # stage 2, ramp over half of 33 steps: 7 steps in
    assert model.model.modality_keep_prob[1].item() == pytest.approx(7 / 16.5)
    callback._apply(model, 99, 100)
    assert model.model.modality_keep_prob.tolist() == [1.0, 1.0, 1.0]
    resumed = SpeederMPOCallback()
    resumed._trainable = callback._trainable
    resumed._apply(model, 50, 100)  # a run resumed at step 50 starts in stage 2
    assert resumed.transitions == [(50, 1)]


def test_mpo_stages_in_epochs_long_ramp():
    """Trained in epochs, the last MPO stage runs until early stopping, and its ramp spans its share of the whole
    budget (measured best: it acts as modality dropout on `id`)."""
    from modeling_speeder.recipes import mpo_stages_in_steps

    model, _ = make_tiny("llama")  # modalities text, image, id
    trainable = {n for n, _ in model.named_parameters()}
    default = SpeederMPOCallback(mpo_stages_in_steps(DEFAULT_MPO_SCHEDULE, stage_steps=10))
    default._trainable = trainable
    assert [(s["start"], s["end"]) for s in default.plan(model, 3000)] == [(0, 10), (10, 20), (20, 3000)]
    default._apply(model, 1000, 3000)  # ramp over half of 2980 steps
    assert model.model.modality_keep_prob[2].item() == pytest.approx(981 / 1490)

    assert model.model.active_modalities.all()  # inference uses every modality
    fixed = mpo_stages_in_steps(DEFAULT_MPO_SCHEDULE, stage_steps=None)
    assert fixed == list(DEFAULT_MPO_SCHEDULE) and fixed[0].steps is None  # a max_steps budget keeps the shares


@pytest.mark.parametrize("stage, message", [
    ({"modalities": []}, "needs modalities among"), ({"modalities": ["txt"]}, "needs modalities among"),
    ({"modalities": ["text"], "share": 1.5}, "share must be in \\[0, 1\\], got 1.5"),
    ({"modalities": ["text"], "ramp": -0.1}, "ramp must be in"), ({"modalities": ["text"], "steps": 0}, "steps must be"),
])
def test_mpo_stage_rejects_bad_values(stage, message):
    with pytest.raises(ValueError, match=message):
        SpeederMPOCallback([stage])


def test_mpo_schedule_is_a_training_setting_not_config(tmp_path):
    """The schedule is how a run trains, so TrainArguments owns it (Python only) and the config holds none; a config
    saved when it held `mpo_stages` loads with the field dropped."""
    from modeling_speeder import SpeederConfig, recipes
    from modeling_speeder.arguments import TrainArguments, add_arguments

    model, _ = make_tiny("llama")
    assert "mpo_stages" not in model.config.to_dict()
    saved = {**model.config.to_dict(), "mpo_stages": [{"modalities": ["text"], "share": 1.0}]}
    assert not hasattr(SpeederConfig.from_dict(saved), "mpo_stages")
    parser = argparse.ArgumentParser()
    add_arguments(parser, TrainArguments)
    assert "--mpo-schedule" not in parser.format_help()
    stages = (MPOStage(("text",), share=0.5), {"modalities": ["text", "id"], "share": 0.5, "trainable": ["heads"]})
    _, callback = recipes.trainer_arguments(model, tmp_path, TrainArguments(mpo_schedule=stages, mpo_stage_epochs=2),
                                            list(range(64)), {})  # 2 steps an epoch: the first stage lasts 4
    assert callback.stages == [MPOStage(("text",), share=0.5, steps=4), MPOStage(("text", "id"), 0.5, 0.0, ("heads",))]
    _, default = recipes.trainer_arguments(model, tmp_path, TrainArguments(), list(range(64)), {})
    assert [stage.modalities for stage in default.stages] == [stage.modalities for stage in DEFAULT_MPO_SCHEDULE]


def test_mpo_trainable_groups_and_skipped_stage(caplog):
    model, _ = make_tiny("llama", learned_id_dim=0)  # no id modality: the third stage is skipped
    stages = [{"modalities": ["text"], "share": 0.5, "trainable": ["experts", "gate", "heads"]},
              {"modalities": ["text", "image"], "share": 0.3, "ramp": 0.0},
              {"modalities": ["text", "image", "id"], "share": 0.2}]
    callback = SpeederMPOCallback(stages)
    with caplog.at_level(logging.WARNING):
        plan = callback.plan(model, 10)
    assert len(plan) == 2 and "adds ['id']" in caplog.text and plan[-1]["end"] == 10
    callback._trainable = {n for n, p in model.named_parameters()}
    callback._apply(model, 0, 10)
    assert not any(p.requires_grad for p in model.backbone.parameters())
    assert model.mrc.gate.weight.requires_grad and not model.model.recency_embedding.weight.requires_grad
    callback._apply(model, 6, 10)
    assert all(p.requires_grad for p in model.parameters())


def test_parameter_groups_cover_the_model_and_survive_peft():
    """The model owns its parameter groups: every path names a parameter, every parameter has a group, and under
    LoRA (PEFT renames the saved modules' copies) an MPO stage still trains exactly its groups."""
    from modeling_speeder.recipes import apply_lora

    # Every optional part on, so that every path must name a parameter.
    model, _ = make_tiny("llama", catalog_item_bias=True)
    names = [n for n, _ in model.named_parameters()]
    assert [n for n in names if model.parameter_group(n) is None] == []
    for group, paths in model.parameter_groups.items():
        for path in paths:
            assert any(n == path or n.startswith(path + ".") for n in names), f"{group}: {path} names no parameter"
    peft_model = apply_lora(model, r=4)
    trainable = {n for n, p in peft_model.named_parameters() if p.requires_grad}
    assert {model.parameter_group(n) for n in trainable} == set(model.parameter_groups)
    callback = SpeederMPOCallback([{"modalities": ["text"], "share": 1.0, "trainable": ["experts"]}])
    callback._trainable = trainable
    callback._apply(peft_model, 0, 10)
    now = {n for n, p in peft_model.named_parameters() if p.requires_grad}
    assert now and all(model.parameter_group(n) == "experts" for n in now)
    assert any("modules_to_save" in n and "experts" in n for n in now), "the trained copy under PEFT"
    with pytest.raises(ValueError, match="unknown groups \\['expert'\\]"):
        SpeederMPOCallback([{"modalities": ["text"], "share": 1.0, "trainable": ["expert"]}])._apply(model, 0, 10)


def test_collator_draws_fresh_seeded_negatives():
    _, processor = make_tiny("llama")
    rows = [{"history": ["item1", "item2"], "target": "item3", "candidates": []}]
    first = SpeederDataCollator(processor, num_negatives=9, seed=1)
    a, b = first(rows), first(rows)
    again = SpeederDataCollator(processor, num_negatives=9, seed=1)(rows)
    assert torch.equal(a["candidate_item_index"], again["candidate_item_index"]), "seeded"
    assert not torch.equal(a["candidate_item_index"], b["candidate_item_index"]), "fresh on every draw"
    cands = a["candidate_item_index"][0].tolist()
    assert len(set(cands)) == 10 and 3 in cands and not {1, 2} & set(cands)
    assert cands[a["labels"][0]] == 3
    stored = SpeederDataCollator(processor)([{"history": ["item1"], "target": "item3", "candidates": ["item4", "item3"]}])
    assert stored["candidate_item_index"].tolist() == [[4, 3]] and stored["labels"].tolist() == [1]


def toy_rows(n_users=24, seed=0):
    """Users who always move to the next item id: learnable from features/ids in a few dozen steps."""
    rng = np.random.default_rng(seed)
    rows = {"user_id": [], "history": [], "target": [], "candidates": []}
    for u in range(n_users):
        start = int(rng.integers(0, 30))
        seq = [ITEM_IDS[start + j] for j in range(6)]
        rows["user_id"].append(str(u)), rows["history"].append(seq[:-1]), rows["target"].append(seq[-1])
        rows["candidates"].append([])
    return Dataset.from_dict(rows)


def mpo_callback(trainer) -> SpeederMPOCallback:
    return next(c for c in trainer.callback_handler.callbacks if isinstance(c, SpeederMPOCallback))


def make_trainer(model, processor, tmp_path, max_steps, **kwargs):
    from transformers import Trainer, TrainingArguments

    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=8, max_steps=max_steps,
                             learning_rate=3e-3, save_steps=max_steps // 2, logging_steps=1, report_to=[],
                             remove_unused_columns=False, label_names=["labels", "catalog_labels"], use_cpu=True,
                             disable_tqdm=True, seed=0, **kwargs)
    return Trainer(model=model, args=args, train_dataset=toy_rows(),
                   data_collator=SpeederDataCollator(processor, num_negatives=5),
                   processing_class=processor, callbacks=[SpeederMPOCallback()])


def test_trainer_torch_compile_path_trains(tmp_path):
    """TrainingArguments(torch_compile=True): the Trainer compiles the model and trains through the MPO stages (the
    per-example ramp masks and stage changes do not break the compiled forward)."""
    torch._dynamo.reset()
    model, processor = make_tiny("llama")
    model.train()
    trainer = make_trainer(model, processor, tmp_path, max_steps=6, torch_compile=True, torch_compile_backend="aot_eager")
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 6 and all(np.isfinite(losses))
    assert [s for _, s in mpo_callback(trainer).transitions] == [0, 1, 2]


def test_trainer_trains_and_resumes_in_the_right_stage(tmp_path):
    model, processor = make_tiny("llama")
    model.train()
    trainer = make_trainer(model, processor, tmp_path, max_steps=12)
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert np.mean(losses[-4:]) < np.mean(losses[:4]), losses
    assert [s for _, s in mpo_callback(trainer).transitions] == [0, 1, 2]
    assert any("mpo_stage" in h for h in trainer.state.log_history)
    # Resume from the mid-run checkpoint (step 6, stage 1) in a fresh trainer: it starts in stage 1, not 0.
    model2, processor2 = make_tiny("llama")
    model2.train()
    resumed = make_trainer(model2, processor2, tmp_path, max_steps=12)
    resumed.train(resume_from_checkpoint=str(tmp_path / "checkpoint-6"))
    transitions = mpo_callback(resumed).transitions
    assert transitions[0] == (6, 1) and resumed.state.global_step == 12


def test_resumed_run_trains_exactly_as_the_uninterrupted_one(tmp_path, caplog):
    """A run resumed from a checkpoint, mid-epoch or at an epoch boundary, ends with the uninterrupted run's weights:
    the checkpoint holds the collator's draw stream (fresh negatives every batch, MPO ramp masks) beside the torch
    RNG states. Without that file the resumed run draws other negatives and ends elsewhere (and says so)."""
    from transformers import TrainingArguments

    from modeling_speeder.training import SpeederTrainer

    def run(output, resume_from=None):
        model, processor = make_tiny("llama")
        model.train()
        args = TrainingArguments(output_dir=str(output), per_device_train_batch_size=8, max_steps=8, save_steps=2,
                                 learning_rate=3e-3, logging_steps=1, report_to=[], remove_unused_columns=False,
                                 label_names=["labels", "catalog_labels"], use_cpu=True, disable_tqdm=True, seed=0)
        collator = SpeederDataCollator(processor, num_negatives=5, seed=0)
        trainer = SpeederTrainer(model=model, args=args, train_dataset=toy_rows(), data_collator=collator,
                                 processing_class=processor, callbacks=[SpeederMPOCallback()])
        trainer.train(resume_from_checkpoint=resume_from)
        assert trainer.state.global_step == 8
        return {k: v.detach().clone() for k, v in model.state_dict().items()}

    uninterrupted = run(tmp_path / "a")
    # 24 rows in batches of 8: step 4 is inside the second epoch, step 6 ends the second epoch.
    for step in (4, 6):
        checkpoint = tmp_path / "a" / f"checkpoint-{step}"
        assert json.loads((checkpoint / SpeederTrainer.COLLATOR_RNG_FILE).read_text())["training_batches"] == step
        resumed = run(tmp_path / f"b{step}", resume_from=str(checkpoint))
        assert all(torch.equal(resumed[k], uninterrupted[k]) for k in uninterrupted), f"resumed at step {step}"
    (tmp_path / "a" / "checkpoint-4" / SpeederTrainer.COLLATOR_RNG_FILE).unlink()
    with caplog.at_level(logging.WARNING, logger="modeling_speeder.training"):
        fresh_draws = run(tmp_path / "c", resume_from=str(tmp_path / "a" / "checkpoint-4"))
    assert "the resumed run draws new negatives" in caplog.text
    assert not all(torch.equal(fresh_draws[k], uninterrupted[k]) for k in uninterrupted)


def test_a_damaged_newest_checkpoint_falls_back_and_a_foreign_draw_state_is_refused(tmp_path, caplog):
    """A truncated model.safetensors or a garbage optimizer.pt in the newest checkpoint gave a raw traceback and no
    fallback; a draw-state file from a run with another seed was accepted (the run was no longer exact), and a corrupt
    one failed without naming the file."""
    from transformers import TrainingArguments

    from modeling_speeder.training import SpeederTrainer, last_complete_checkpoint

    def trainer_for(output, seed=0):
        model, processor = make_tiny("llama")
        args = TrainingArguments(output_dir=str(output), per_device_train_batch_size=8, max_steps=4, save_steps=2,
                                 report_to=[], remove_unused_columns=False, use_cpu=True, disable_tqdm=True,
                                 label_names=["labels", "catalog_labels"], seed=seed)
        return SpeederTrainer(model=model.train(), args=args, train_dataset=toy_rows(), processing_class=processor,
                              data_collator=SpeederDataCollator(processor, num_negatives=5, seed=seed))

    trainer_for(tmp_path / "run").train()
    newest = tmp_path / "run" / "checkpoint-4"
    assert last_complete_checkpoint(tmp_path / "run") == str(newest)
    weights = (newest / "model.safetensors").read_bytes()
    (newest / "model.safetensors").write_bytes(weights[: len(weights) // 2])
    with caplog.at_level(logging.WARNING, logger="modeling_speeder.training"):
        assert last_complete_checkpoint(tmp_path / "run") == str(tmp_path / "run" / "checkpoint-2")
    assert "model.safetensors is damaged or truncated" in caplog.text
    (newest / "model.safetensors").write_bytes(weights)
    (newest / "optimizer.pt").write_bytes(b"not a torch archive")
    assert last_complete_checkpoint(tmp_path / "run") == str(tmp_path / "run" / "checkpoint-2")
    checkpoint = tmp_path / "run" / "checkpoint-2"
    with pytest.raises(ValueError, match="seed 0; this run has seed 1"):
        trainer_for(tmp_path / "other", seed=1).train(resume_from_checkpoint=str(checkpoint))
    (checkpoint / SpeederTrainer.COLLATOR_RNG_FILE).write_text("{not json")
    with pytest.raises(ValueError, match=f"{SpeederTrainer.COLLATOR_RNG_FILE} is damaged"):
        trainer_for(tmp_path / "other").train(resume_from_checkpoint=str(checkpoint))


def test_peft_lora_save_reload_merge(tmp_path):
    from peft import LoraConfig, PeftModel, get_peft_model

    model, processor = make_tiny("qwen3")
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                      modules_to_save=["mrc", "recency_embedding", "candidate_head", "query_proj"])
    peft_model = get_peft_model(model, lora)
    trainable = {n for n, p in peft_model.named_parameters() if p.requires_grad}
    assert any("lora_A" in n for n in trainable) and any("mrc" in n for n in trainable)
    assert not any("mlp" in n and "lora" not in n for n in trainable), "backbone weights stay frozen"
    peft_model.train()
    inputs = processor(histories=HISTORIES, candidates=CANDIDATES, targets=["item21", "item26", "item27"])
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):
        peft_model(**inputs).loss.backward()
        optimizer.step(), optimizer.zero_grad()
    peft_model.eval()
    eval_inputs = processor(histories=HISTORIES, candidates=CANDIDATES)
    with torch.no_grad():
        trained = peft_model(**eval_inputs).candidate_scores
    peft_model.save_pretrained(tmp_path / "adapter")
    base, _ = make_tiny("qwen3")
    reloaded = PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**eval_inputs).candidate_scores, trained, rtol=0, atol=1e-5)
    merged = reloaded.merge_and_unload()
    merged.save_pretrained(tmp_path / "merged")
    processor.save_pretrained(tmp_path / "merged")
    from transformers import AutoModel

    plain = AutoModel.from_pretrained(tmp_path / "merged").eval()
    with torch.no_grad():
        torch.testing.assert_close(plain(**eval_inputs).candidate_scores, trained, rtol=0, atol=1e-5)


def test_evaluate_module_loads_by_path():
    import evaluate

    from modeling_speeder.training import EVALUATE_MODULE

    metric = evaluate.load(EVALUATE_MODULE)
    scores = [[0.9, 0.1, 0.5], [0.9, 0.1, 0.5], [0.2, 0.2, 0.2]]
    assert metric.compute(predictions=scores, references=[0, 2, 1]) == ranking_metrics(scores, [0, 2, 1])


def test_evaluate_split_full_catalog_and_buckets():
    from modeling_speeder.recipes import evaluate_split

    model, processor = make_tiny("llama")
    data = Dataset.from_dict({"history": HISTORIES, "target": ["item21", "item26", "item27"], "candidates": CANDIDATES})
    report = evaluate_split(model, processor, data)
    with torch.no_grad():
        out = model(**processor(histories=HISTORIES, candidates=CANDIDATES), return_catalog_scores=True)
    expected = ranking_metrics(out.candidate_scores.numpy(), [1, 3, 0])
    assert {k: report[k] for k in expected} == pytest.approx(expected)
    ranks = []
    for b, (history, target) in enumerate(zip(HISTORIES, [21, 26, 27])):
        scores = out.catalog_scores[b].clone()
        excluded = [processor.item_index(i) for i in history if processor.item_index(i) != target]
        scores[excluded] = float("-inf")
        ranks.append(int((scores > scores[target]).sum()))
    assert report["full_hr@10"] == pytest.approx(np.mean([r < 10 for r in ranks]))
    assert report["full_ndcg@10"] == pytest.approx(np.mean([(r < 10) / np.log2(r + 2) for r in ranks]))
    assert report["by_history_length"]["1-5"]["users"] == 3


def test_train_and_evaluate_cli_from_yaml(tmp_path):
    from test_distributed_and_resume import tiny_dataset

    from modeling_speeder.cli import run as cli

    tiny_dataset(tmp_path / "data")
    (tmp_path / "train.yaml").write_text(
        f"data: {tmp_path / 'data'}\noutput: {tmp_path / 'run'}\nsteps: 6\nbatch-size: 4\nlora-r: 2\n"
        "expert-hidden-size: 16\nlearned-id-dim: 8\nno-recency: true\npatience: 0\n"
        "mpo_schedule:\n- {modalities: [text], share: 0.5}\n"  # a setting with no flag, as the training arguments own it
        "- {modalities: [text, id], share: 0.5, ramp: 0.0, trainable: [experts, gate, heads]}\n")
    cli(["train", "--config", str(tmp_path / "train.yaml")])
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert report["steps"] == 6 and (tmp_path / "run" / "adapter" / "adapter_config.json").exists()
    assert [(s["modalities"], s["start"], s["end"], s["trainable"]) for s in report["mpo_schedule"]] == [
        (["text"], 0, 3, ["experts", "gate", "spae", "heads", "backbone"]), (["text", "id"], 3, 6, ["experts", "gate", "heads"])]
    # The report knows its dataset, so `speeder card --report` states it (the walkthrough's card said "? users").
    assert report["dataset"]["users"] == 20 and report["dataset"]["items"] == 40 and report["dataset"]["name"] == "data"
    from modeling_speeder.conversion.hub import render_model_card

    assert "data: 20 users, 40 items" in str(render_model_card(tmp_path / "run" / "model", "org/x", report))
    assert (tmp_path / "run" / "training_curve.png").exists() and (tmp_path / "run" / "metrics_by_history_length.png").exists()
    config = json.loads((tmp_path / "run" / "model" / "config.json").read_text())
    assert config["use_recency_embeddings"] is False
    cli(["evaluate", "--model", str(tmp_path / "run" / "model"), "--data", str(tmp_path / "data"),
         "--output", str(tmp_path / "eval")])
    evaluation = json.loads((tmp_path / "eval" / "report.json").read_text())
    assert evaluation["test"]["hr@1"] == pytest.approx(report["test"]["hr@1"])
    with pytest.raises(SystemExit):
        (tmp_path / "bad.yaml").write_text("no-such-option: 1\n")
        cli(["train", "--config", str(tmp_path / "bad.yaml")])
    for stage, message in (("{modalities: [txt]}", "needs modalities among"), ("{modalities: [text], size: 1}", "mapping of")):
        (tmp_path / "bad.yaml").write_text(f"data: {tmp_path / 'data'}\nmpo_schedule:\n- {stage}\n")
        with pytest.raises(ValueError, match=f"mpo_schedule: .*{message}"):
            cli(["train", "--config", str(tmp_path / "bad.yaml")])


def test_dense_catalog_training_labels_and_loss():
    """Every history item's hidden state queries the item after it, and the query token (the state inference
    reads) the target; the loss is the catalog cross-entropy over exactly those positions, in one forward pass."""
    model, processor = make_tiny("llama", catalog_loss_weight=1.0, candidate_loss_weight=0.0, tokens_per_item=2)
    inputs = processor(histories=HISTORIES, targets=["item21", "item26", "item27"], dense=True)
    labels = inputs["dense_catalog_labels"]
    assert labels[0][labels[0] >= 0].tolist() == [2, 3, 4, 21]
    assert labels[1][labels[1] >= 0].tolist() == [6, 26]
    for row in range(len(HISTORIES)):
        positions = (labels[row] >= 0).nonzero().flatten()
        assert positions[-1] == inputs["query_index"][row], "the target is predicted by the query token"
        assert (inputs["item_token_index"][row, positions[:-1]] % 2 == 1).all(), "the last of each item's K tokens"
    out = model(**inputs, output_hidden_states=True)
    last = out.hidden_states[-1]
    keep = labels >= 0
    catalog_scores = model.query_proj(last[keep]) @ model.model.item_representations().T
    expected = torch.nn.functional.cross_entropy(catalog_scores, labels[keep])
    torch.testing.assert_close(out.loss, expected)
    out.loss.backward()
    assert model.query_proj.weight.grad.abs().sum() > 0 and model.candidate_head.weight.grad is None


def test_dense_loss_normaliser_weighs_every_label_the_same():
    """Length-grouped batches hold very different label counts: with `dense_loss_normalizer` (rows x the dataset's
    mean labels per row, from the collator) the loss is the summed cross-entropy over that constant."""
    model, processor = make_tiny("llama", catalog_loss_weight=1.0, candidate_loss_weight=0.0)
    inputs = processor(histories=HISTORIES, targets=TARGETS, dense=True)
    count = (inputs["dense_catalog_labels"] >= 0).sum().float()
    mean = model(**inputs).loss
    torch.testing.assert_close(model(**inputs, dense_loss_normalizer=count).loss, mean)
    torch.testing.assert_close(model(**inputs, dense_loss_normalizer=2 * count).loss, mean / 2)
    collator = SpeederDataCollator(processor, dense=True, dense_labels_per_row=2.5)
    batch = collator([{"history": h, "target": t, "candidates": [], "first_labeled": 0} for h, t in zip(HISTORIES, TARGETS)])
    assert batch["dense_loss_normalizer"].item() == 7.5


def test_dense_head_trains_through_the_cli(tmp_path):
    from test_distributed_and_resume import tiny_dataset

    from modeling_speeder.cli import run as cli

    tiny_dataset(tmp_path / "data")
    cli(["train", "--data", str(tmp_path / "data"), "--output", str(tmp_path / "run"), "--steps", "4", "--batch-size", "4",
         "--head", "catalog-dense", "--expert-hidden-size", "16", "--learned-id-dim", "8"])
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    # The candidate head never trained: the protocol's metrics come from the catalog head (candidates not in the prompt).
    assert report["head"] == "catalog-dense" and report["test"]["head"] == "catalog"
    assert {"hr@1", "ndcg@10", "full_hr@10"} <= set(report["test"]) and "catalog_head" not in report["test"]
    config = json.loads((tmp_path / "run" / "model" / "config.json").read_text())
    assert config["candidate_ranking_head"] == "catalog"


def test_catalog_only_model_ranks_candidates_with_its_catalog_head():
    model, processor = make_tiny("llama", catalog_loss_weight=1.0, candidate_loss_weight=0.0)
    assert model.ranks_candidates_with_catalog_head
    ranked = model.recommend(HISTORIES, candidates=CANDIDATES, top_k=4, processor=processor)
    inputs = processor(histories=HISTORIES)
    with torch.no_grad():
        catalog = model(**inputs, return_catalog_scores=True).catalog_scores
    for result, cands, row in zip(ranked, CANDIDATES, catalog):
        expected = sorted(cands, key=lambda item: -float(row[processor.item_index(item)]))
        assert result["item_ids"] == expected
        torch.testing.assert_close(torch.tensor(result["scores"]), row[[processor.item_index(i) for i in expected]])
    model.config.candidate_ranking_head = "candidate"  # an explicit config field, not inferred from loss weights
    assert not model.ranks_candidates_with_catalog_head


def test_packed_dense_training_matches_padded_through_the_cli(tmp_path, monkeypatch):
    """The Trainer runs packed (padding-free) batches like padded ones: same losses step by step, same metrics."""
    from test_distributed_and_resume import tiny_dataset

    from modeling_speeder.cli import run as cli

    tiny_dataset(tmp_path / "data")
    reports, layouts_seen = {}, set()
    collate = SpeederDataCollator.__call__

    def recording_collate(self, rows):
        batch = collate(self, rows)
        if "candidate_item_index" not in batch:  # training batches; validation batches are always padded
            layouts_seen.add("packed" if "cu_seq_lens_q" in batch else "padded")
        return batch

    monkeypatch.setattr(SpeederDataCollator, "__call__", recording_collate)
    for layout in ("padded", "packed"):
        layouts_seen.clear()
        cli(["train", "--data", str(tmp_path / "data"), "--output", str(tmp_path / layout), "--steps", "4",
             "--batch-size", "4", "--head", "catalog-dense", "--expert-hidden-size", "16", "--learned-id-dim", "8",
             "--attn-implementation", "eager"] + (["--packed"] if layout == "packed" else []))
        reports[layout] = json.loads((tmp_path / layout / "report.json").read_text())
        assert layouts_seen == {layout}, "the Trainer must get the layout asked for"
    losses = {k: [e["loss"] for e in r["log_history"] if "loss" in e] for k, r in reports.items()}
    assert len(losses["packed"]) == 4
    assert losses["packed"] == pytest.approx(losses["padded"], rel=1e-4)
    assert reports["packed"]["test"]["ndcg@10"] == pytest.approx(reports["padded"]["test"]["ndcg@10"], abs=1e-6)
    with pytest.raises(ValueError, match="packed=True needs head='catalog-dense'"):
        cli(["train", "--data", str(tmp_path / "data"), "--output", str(tmp_path / "bad"), "--steps", "1", "--packed",
             "--head", "candidate"])


def test_mpo_ramp_mask_is_drawn_by_the_collator_not_the_model():
    """The forward draws no random numbers (compile / CUDA graphs); during a ramp the collator draws one modality mask
    row per example from the callback's current keep probabilities."""
    model, processor = make_tiny("llama")
    model.set_active_modalities({"text": 1.0, "image": 0.5, "id": 1.0})
    model.train()
    inputs = processor(histories=HISTORIES, candidates=CANDIDATES, targets=TARGETS)
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs).candidate_scores, model(**inputs).candidate_scores, rtol=0, atol=0)
    keep = model.model.modality_keep_prob.clone()
    rows = [{"history": h, "target": t, "candidates": []} for h, t in zip(HISTORIES * 100, TARGETS * 100)]
    batch = SpeederDataCollator(processor, num_negatives=3, modality_keep_probabilities=lambda: keep)(rows)
    mask = batch["modality_mask"]
    assert mask.shape == (300, 3) and mask[:, 0].all() and mask[:, 2].all() and 0.35 < mask[:, 1].float().mean() < 0.65
    assert "modality_mask" not in SpeederDataCollator(processor, num_negatives=3,
                                                      modality_keep_probabilities=lambda: torch.ones(3))(rows[:3])


def test_the_python_api_and_the_command_line_give_the_same_run(tmp_path):
    """`speeder train` and `recipes.build_for_dataset` + `recipes.train` with the same arguments build the same model
    and train it to the same weights (they disagreed on the history length: 50 on the command line, 20 in Python)."""
    from safetensors.torch import load_file
    from test_distributed_and_resume import tiny_dataset
    from transformers import set_seed

    from modeling_speeder.cli import run as cli
    from modeling_speeder.recipes import build_for_dataset, train

    tiny_dataset(tmp_path / "data")
    cli(["train", "--data", str(tmp_path / "data"), "--output", str(tmp_path / "cli"), "--steps", "3", "--batch-size",
         "4", "--expert-hidden-size", "16", "--learned-id-dim", "8", "--eval-rows", "4"])
    set_seed(0)
    model, processor, splits = build_for_dataset(tmp_path / "data", expert_hidden_size=16, learned_id_dim=8, seed=0)
    train(model, processor, splits, tmp_path / "python", max_steps=3, batch_size=4, seed=0, eval_rows=4)
    from_cli = load_file(tmp_path / "cli" / "model" / "model.safetensors")
    from_python = load_file(tmp_path / "python" / "model" / "model.safetensors")
    assert from_cli.keys() == from_python.keys()
    assert all(torch.equal(from_cli[k], from_python[k]) for k in from_cli), "the same arguments must give the same run"
    for name in ("max_history", "item_dropout", "catalog_id_dropout", "catalog_item_bias", "learned_id_dim"):
        assert getattr(model.config, name) == json.loads((tmp_path / "cli" / "model" / "config.json").read_text())[name]

