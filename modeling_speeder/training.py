"""Training with `transformers.Trainer`: ranking metrics and MPO (Modality-aware Progressive Optimization)."""

import json
import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from transformers import Trainer, TrainerCallback
from transformers.trainer_utils import EvalLoopOutput

from .atomic_files import write_text_atomically
from .configuration_speeder import MODALITIES
from .evaluation import ranking_metrics

logger = logging.getLogger(__name__)

# `evaluate.load(EVALUATE_MODULE)` gives the same metrics as an `evaluate` module, loaded by path (no hub).
EVALUATE_MODULE = str(Path(__file__).parent / "metrics" / "speeder_ranking")

def last_complete_checkpoint(folder) -> str | None:
    """The newest `checkpoint-N` folder in `folder` that a resume can use: the Trainer writes `trainer_state.json`
    last, so a checkpoint killed mid-write lacks it (or its weights). Skipped ones are logged with the reason."""
    from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

    folder = Path(folder)
    found = sorted(((int(p.name.rsplit("-", 1)[1]), p) for p in folder.glob(f"{PREFIX_CHECKPOINT_DIR}-*")
                    if p.is_dir() and p.name.rsplit("-", 1)[1].isdigit()), reverse=True)
    for _, path in found:
        problem = checkpoint_problem(path)
        if problem is None:
            return str(path)
        logger.warning("Not resuming from %s: %s; trying the one before", path, problem)
    return None


def checkpoint_problem(path: Path) -> str | None:
    """Why a Trainer checkpoint cannot be resumed from, or None: a missing `trainer_state.json` (written last, so a
    checkpoint killed mid-write lacks it), weights that are missing or not readable safetensors (truncated, damaged),
    or an optimizer or scheduler file that is not a readable torch archive."""
    import zipfile

    from safetensors import SafetensorError, safe_open

    if not (path / "trainer_state.json").exists():
        return "it is incomplete (no trainer_state.json), probably killed while being written"
    weights = sorted(path.glob("*.safetensors"))
    if not weights:
        return "it has no model weights (*.safetensors)"
    for file in weights:
        try:
            with safe_open(file, "pt"):  # checks the header against the file's length, reads no tensor
                pass
        except (SafetensorError, OSError) as error:
            return f"{file.name} is damaged or truncated ({error})"
    for name in ("optimizer.pt", "scheduler.pt"):
        file = path / name
        if file.exists() and not zipfile.is_zipfile(file):
            return f"{name} is damaged or truncated (not a torch archive)"
    return None


def compute_metrics(eval_pred) -> dict:
    """For `Trainer(compute_metrics=...)`: predictions are the candidate scores, the first label the targets."""
    scores = eval_pred.predictions[0] if isinstance(eval_pred.predictions, tuple) else eval_pred.predictions
    labels = eval_pred.label_ids[0] if isinstance(eval_pred.label_ids, tuple) else eval_pred.label_ids
    return ranking_metrics(scores, labels)


class SpeederTrainer(Trainer):
    """`transformers.Trainer` with three additions.

    - With `extra_metrics(model)` (a dict; the recipe passes the validation users' ranking of the stored candidates
      and of the whole catalog, history excluded, from one pass), evaluations report those metrics instead of running
      the Trainer's own loop over the same users; they are logged, and read by checkpoint selection
      (`metric_for_best_model`) and early stopping, so a run can be selected on full-catalog NDCG@10, as the SASRec
      baseline is. `Trainer.predict` is left as it is.
    - Distillation: with a `teacher` (a `SASRecModel` trained on the training split) and dense batches from
      `SpeederDataCollator(distillation=True)`, the loss adds `distillation_weight` x the KL divergence from the
      teacher's next-item distribution to the catalog head's, at every labelled prefix (temperature 1: 2 measured
      worse, bench/earlier-runs.md), normalised as the dense loss is. The teacher's soft targets carry what
      it learned about every item, not only which one came next. `distillation_items` ((N,) bool) restricts both
      distributions to those catalog items (renormalised): the recipe leaves out items the teacher barely saw in
      training, whose low probability says more about their few interactions than about the user.
    - Exact resumption: each checkpoint also holds the draw stream of a `SpeederDataCollator` (fresh negatives, MPO
      ramp masks) as it stood before the first batch not yet trained on (`COLLATOR_RNG_FILE`), beside the Trainer's
      torch RNG states; a resumed run restores it, so it draws, and trains, as the uninterrupted run would have.
    """

    COLLATOR_RNG_FILE = "collator_rng_state.json"

    def __init__(self, *args, extra_metrics=None, teacher=None, distillation_weight: float = 0.0, distillation_items=None,
                 **kwargs):
        super().__init__(*args, **kwargs)
        if distillation_weight < 0:
            raise ValueError(f"distillation_weight must be >= 0, got {distillation_weight!r}")
        self.extra_metrics = extra_metrics
        self._training_batches = 0  # micro-batches trained on, in this run and the one it resumes
        self.teacher = teacher.to(self.args.device).eval() if teacher is not None else None
        self.distillation_weight = distillation_weight
        self.distillation_items = None  # (N,) bool on the device
        if distillation_items is not None:
            num_items = unwrap_speeder(self.model).config.num_items
            if distillation_items.dtype != torch.bool or distillation_items.shape != (num_items,) or not distillation_items.any():
                raise ValueError(f"distillation_items must be a non-empty ({num_items},) bool mask of catalog items, got "
                                 f"{distillation_items.dtype} of shape {tuple(distillation_items.shape)} with "
                                 f"{int(distillation_items.sum())} items")
            self.distillation_items = distillation_items.to(self.args.device)

    def train(self, resume_from_checkpoint=None, **kwargs):
        checkpoint = resume_from_checkpoint
        if checkpoint is True:  # as Trainer reads it: the newest checkpoint in output_dir
            from transformers.trainer_utils import get_last_checkpoint

            checkpoint = get_last_checkpoint(self.args.output_dir)
        if checkpoint and hasattr(self.data_collator, "restore_rng_state"):
            path = Path(checkpoint) / self.COLLATOR_RNG_FILE
            if path.exists():
                try:
                    saved = json.loads(path.read_text())
                    state, batches, seed = saved["state"], int(saved["training_batches"]), saved.get("seed")
                except (ValueError, KeyError, TypeError) as error:
                    raise ValueError(f"{path} is damaged ({error!r}): resume from an earlier checkpoint, or delete the "
                                     "file to resume with new draws") from None
                if seed is not None and seed != self.data_collator.seed:
                    raise ValueError(f"{path} holds the draw stream of a run with seed {seed}; this run has seed "
                                     f"{self.data_collator.seed}: resume with the seed the checkpoint was trained with")
                self.data_collator.restore_rng_state(state, batches)
                self._training_batches = batches
            else:
                logger.warning("%s has no %s: the resumed run draws new negatives and ramp masks, not those the "
                               "uninterrupted run would have", checkpoint, self.COLLATOR_RNG_FILE)
        return super().train(resume_from_checkpoint=resume_from_checkpoint, **kwargs)

    def training_step(self, model, inputs, num_items_in_batch=None):
        self._training_batches += 1
        return super().training_step(model, inputs, num_items_in_batch)

    def _save_rng_state(self, output_dir):
        super()._save_rng_state(output_dir)
        if hasattr(self.data_collator, "rng_state") and self.args.should_save:
            try:
                state = self.data_collator.rng_state(self._training_batches)
            except ValueError as error:  # the loader ran further ahead than the collator remembers: resume inexactly
                logger.warning("%s: %s is not written", error, self.COLLATOR_RNG_FILE)
                return
            saved = {"training_batches": self._training_batches, "state": state, "seed": self.data_collator.seed}
            # Written before trainer_state.json, the file that marks a checkpoint complete (last_complete_checkpoint).
            write_text_atomically(Path(output_dir) / self.COLLATOR_RNG_FILE, json.dumps(saved))

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        item_rows = inputs.pop("distillation_item_rows", None)
        positions = inputs.pop("distillation_positions", None)
        if self.teacher is None or not self.distillation_weight or item_rows is None or not model.training:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        loss, outputs = super().compute_loss(model, inputs, True, num_items_in_batch)
        student = outputs.dense_catalog_scores  # (n, N), or (B * T, N) under torch.compile
        labels = inputs["dense_catalog_labels"]
        # Every position scored (compiled layout; told by shape, not by counting positions): keep the labelled ones.
        # This boolean index syncs once per step, in that layout only.
        if student.shape[0] == labels.numel():
            student = student[labels.flatten() >= 0]
        # Under a sampled softmax both distributions cover the step's sampled set only (`catalog_item_rows`),
        # renormalised: if the student matched the teacher over the catalog, it matches it over any subset, so the
        # restricted divergence keeps the full one's minimum, and needs no logQ correction.
        catalog_rows = inputs.get("catalog_item_rows")
        teacher = self.teacher.next_item_logits(item_rows, positions, catalog_rows).to(student.device)
        kept = self.distillation_items
        if kept is not None and catalog_rows is not None:
            kept = kept[catalog_rows]  # (U,)
        divergence = restricted_kl_divergence(student.float(), teacher.float(), kept)
        normalizer = inputs.get("dense_loss_normalizer")
        divergence = divergence / (normalizer if normalizer is not None else student.shape[0])
        loss = loss + self.distillation_weight * divergence
        return (loss, outputs) if return_outputs else loss

    def evaluation_loop(self, dataloader, description, prediction_loss_only=None, ignore_keys=None,
                        metric_key_prefix="eval"):
        if self.extra_metrics is not None and description == "Evaluation":
            # The selection metrics come from one pass over the validation users (candidates and whole catalog
            # together), not from the Trainer's loop and then a second pass over the same users.
            self.model.eval()
            metrics = {f"{metric_key_prefix}_{k}": v for k, v in self.extra_metrics(self.model).items()}
            return EvalLoopOutput(predictions=None, label_ids=None, metrics=metrics, num_samples=len(dataloader.dataset))
        # Items are encoded once per evaluation (chunked), not once per batch: eval() keeps the cache until training
        # resumes.
        unwrap_speeder(self.model).cache_item_tokens()
        return super().evaluation_loop(dataloader, description, prediction_loss_only, ignore_keys, metric_key_prefix)


def restricted_kl_divergence(student: torch.Tensor, teacher: torch.Tensor, kept: torch.Tensor | None = None):
    """Summed KL(teacher || student) of row-wise softmax distributions over the columns `kept` ((C,) bool; None: all),
    renormalised over them. student, teacher: (n, C) logits. Masks instead of indexing, so no host synchronisation."""
    if kept is not None:
        student, teacher = student.masked_fill(~kept, float("-inf")), teacher.masked_fill(~kept, float("-inf"))
    log_teacher, log_student = F.log_softmax(teacher, -1), F.log_softmax(student, -1)
    difference = log_teacher - log_student  # NaN (-inf minus -inf) at the left-out columns: masked before the product
    return (log_teacher.exp() * (difference if kept is None else torch.where(kept, difference, 0.0))).sum()


def unwrap_speeder(model):
    """The Speeder model inside a PEFT wrapper and / or DDP's `.module`."""
    model = model.get_base_model() if hasattr(model, "get_base_model") else model
    return model.module if hasattr(model, "module") else model


class StopOnNonFiniteLoss(TrainerCallback):
    """Stops training at the first logged NaN or infinite loss: a diverged model must never go on to be evaluated
    as if it had trained (NaN scores would otherwise surface only as an implausible report)."""

    def __init__(self):
        self.diverged_at = None

    def on_log(self, args, state, control, logs=None, **kwargs):
        loss = (logs or {}).get("loss")
        if loss is not None and not np.isfinite(float(loss)):
            self.diverged_at = state.global_step
            logger.error("Training loss is %s at step %d: stopping (lower the learning rate)", loss, state.global_step)
            control.should_training_stop = True


@dataclass(frozen=True)
class MPOStage:
    """One stage of the MPO schedule (DESIGN.md section 6)."""

    modalities: tuple[str, ...]  # what the gate may use; a stage adding only modalities the model lacks is skipped
    share: float = 0.0  # of the run's steps, among the stages without `steps`
    ramp: float = 0.0  # share of the stage over which newly added modalities go from 0 to 1 of the examples
    trainable: tuple[str, ...] | None = None  # the model's `parameter_groups` that train; None: all
    steps: int | None = None  # an absolute length instead of a share

    def __post_init__(self):
        object.__setattr__(self, "modalities", tuple(self.modalities))
        if self.trainable is not None:
            object.__setattr__(self, "trainable", tuple(self.trainable))
        if not self.modalities or set(self.modalities) - set(MODALITIES):
            raise ValueError(f"An MPO stage needs modalities among {MODALITIES}, got {list(self.modalities)}")
        for name in ("share", "ramp"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"An MPO stage's {name} must be in [0, 1], got {getattr(self, name)!r}")
        if self.steps is not None and self.steps < 1:
            raise ValueError(f"An MPO stage's steps must be >= 1, got {self.steps!r}")


def as_mpo_stages(stages: Sequence[MPOStage | dict]) -> list[MPOStage]:
    """Stages given as `MPOStage`s or as dicts of their fields (a YAML or JSON schedule), checked."""
    names = [f.name for f in fields(MPOStage)]
    for stage in stages:
        if not isinstance(stage, MPOStage) and (not isinstance(stage, dict) or set(stage) - set(names)):
            raise ValueError(f"An MPO stage is an MPOStage or a mapping of some of {names}, got {stage!r}")
    return [stage if isinstance(stage, MPOStage) else MPOStage(**stage) for stage in stages]


# Text first, then image ramped in, then collaborative ramped in; every group trains throughout.
DEFAULT_MPO_SCHEDULE = (
    MPOStage(("text",), share=0.34),
    MPOStage(("text", "image"), share=0.33, ramp=0.5),
    MPOStage(("text", "image", "id"), share=0.33, ramp=0.5),
)


class SpeederMPOCallback(TrainerCallback):
    """Runs an MPO schedule (`MPOStage`s, or dicts of their fields; default `DEFAULT_MPO_SCHEDULE`).

    The stage follows from `global_step`, so a resumed run continues in the right stage; an unknown trainable group
    is an error; under PEFT only parameters that were trainable at the start are ever switched on. Stages that add a
    modality the model has no features for are skipped with a warning.
    """

    def __init__(self, stages: Sequence[MPOStage | dict] = DEFAULT_MPO_SCHEDULE):
        self.stages = as_mpo_stages(stages)
        self.current = None
        self.transitions = []  # (global_step, stage index) each time the stage changes
        self._trainable = None
        self._plan = None  # (max_steps, stages): the plan, computed (and its warnings logged) once per run
        self._keep = None  # (M,) keep probabilities of the current step, read by the data collator

    def plan(self, model, max_steps: int) -> list[dict]:
        """The stages kept for this model, each with absolute `start` and `end` steps and its trainable groups."""
        speeder = unwrap_speeder(model)
        have, kept, previous = set(speeder.mrc.modalities), [], set()
        for i, stage in enumerate(self.stages):
            wanted = set(stage.modalities)
            if (wanted - previous) and not (wanted - previous) & have:
                logger.warning("MPO stage %d adds %s, for which this model has no features: skipped", i,
                               sorted(wanted - previous))
                continue
            kept.append(dict(asdict(stage), index=i, modalities=[m for m in stage.modalities if m in have],
                             new=sorted((wanted - previous) & have), trainable=list(stage.trainable or
                                                                                     speeder.parameter_groups)))
            previous = wanted
        if not kept:
            raise ValueError(f"No MPO stage uses this model's modalities {sorted(have)}")
        total_share = sum(s["share"] for s in kept if s["steps"] is None) or 1.0
        fixed = sum(s["steps"] for s in kept if s["steps"] is not None)
        start = 0
        for s in kept:
            length = s["steps"] if s["steps"] is not None else round(max(max_steps - fixed, 0) * s["share"] / total_share)
            s["start"], s["end"] = start, start + length
            start += length
        kept[-1]["end"] = max(kept[-1]["end"], max_steps)
        kept[0]["new"] = []  # the first stage's modalities are on from the start
        return kept

    def _apply(self, model, step: int, max_steps: int):
        speeder = unwrap_speeder(model)
        if self._plan is None or self._plan[0] != max_steps:
            self._plan = (max_steps, self.plan(model, max_steps))
        plan = self._plan[1]
        stage = next((s for s in plan if s["start"] <= step < s["end"]), plan[-1])
        ramp_steps = stage["ramp"] * (stage["end"] - stage["start"])
        progress = 1.0 if ramp_steps <= 0 else min(1.0, (step - stage["start"] + 1) / ramp_steps)
        speeder.set_active_modalities({m: progress if m in stage["new"] else 1.0 for m in stage["modalities"]})
        self._keep = speeder.model.modality_keep_prob.detach().cpu().clone()
        if self.current != stage["index"]:
            self.current = stage["index"]
            self.transitions.append((step, stage["index"]))
            logger.info("MPO stage %d from step %d: modalities %s, trainable %s", stage["index"], step,
                        stage["modalities"], stage["trainable"])
            groups = set(stage["trainable"])
            unknown = groups - set(speeder.parameter_groups)
            if unknown:
                raise ValueError(f"MPO stage {stage['index']} trains unknown groups {sorted(unknown)}; the model has "
                                 f"{sorted(speeder.parameter_groups)}")
            for name, param in model.named_parameters():
                if name in self._trainable:
                    param.requires_grad_(speeder.parameter_group(name) in groups)

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self._trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        self._apply(model, state.global_step, state.max_steps)

    def keep_probabilities(self):
        """(M,) the current stage's keep probability per modality, for the data collator's per-example ramp masks."""
        return self._keep

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        self._apply(model, state.global_step, state.max_steps)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is not None and self.current is not None:
            logs["mpo_stage"] = self.current  # shown by the printer / reporting callbacks
            if state.log_history:  # Trainer stored a copy of the logs already: reports and plots read this one
                state.log_history[-1]["mpo_stage"] = self.current


__all__ = [
    "DEFAULT_MPO_SCHEDULE",
    "EVALUATE_MODULE",
    "MPOStage",
    "SpeederMPOCallback",
    "SpeederTrainer",
    "StopOnNonFiniteLoss",
    "as_mpo_stages",
    "compute_metrics",
    "last_complete_checkpoint",
    "ranking_metrics",
    "restricted_kl_divergence",
    "unwrap_speeder",
]
