"""Typed settings of the recipes and the `speeder` commands, as transformers' `TrainingArguments` owns the Trainer's:
each dataclass owns its settings' defaults and checks, the command line is generated from the fields
(`add_arguments`), and `recipes` takes the same objects, so the Python API and the command line give the same run.

Torch-free, so that `speeder --help` and argument errors answer before torch is imported. transformers'
`HfArgumentParser` generates parsers from dataclasses too, but types each option by its annotation only: the range
checks below (a batch size of 0, a dropout of 1.5, `--epochs inf`) would then surface later, as tracebacks.
"""

import argparse
from dataclasses import dataclass, field, fields


def number(kind, low, low_inclusive=True, high=None):
    """An argparse type: `kind` (int or float) in [low, high) (or (low, high) when not low_inclusive), with an error that
    names the value and what was expected."""
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'}, got {text!r}") from None
        if value != value or value in (float("inf"), float("-inf")):
            raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
        if value < low or (value == low and not low_inclusive) or (high is not None and value >= high):
            bound = f"{'>=' if low_inclusive else '>'} {low}" + (f" and < {high}" if high is not None else "")
            raise argparse.ArgumentTypeError(f"expected a value {bound}, got {text!r}")
        return value

    return parse


# The evaluation protocol (`evaluation` imports torch; the command line reads these before it is imported).
NUM_NEGATIVES = 19  # protocol P: the target plus 19 seeded negatives, 20 candidates
COLD_ITEM_MAX_COUNT = 5  # a target item with at most this many training interactions is "cold"

POSITIVE_INT, NON_NEGATIVE_INT = number(int, 1), number(int, 0)
POSITIVE_FLOAT, NON_NEGATIVE_FLOAT, SHARE = number(float, 0, False), number(float, 0), number(float, 0, high=1)
SELECTION_METRICS = ("ndcg@10", "full_ndcg@10", "full_hr@10")
HEADS = ("catalog-dense", "candidate")


def setting(default, help: str, check=None, choices=None, flag: str | None = None, research: bool = False,
            cli: bool = True):
    """A field with its command-line form: `check` parses and range-checks a value (also one given in Python or in a
    config file), `flag` replaces `--field-name`, and `research` keeps an ablation knob out of everyday `--help`
    (`--help-all` shows it); `cli=False`: no flag, set in Python or a --config file. A boolean that defaults to True
    is switched off by its flag."""
    return field(default=default, metadata={"help": help, "check": check, "choices": choices, "flag": flag,
                                            "research": research, "cli": cli})


class Settings:
    def __post_init__(self):
        """Every value passes the check its command-line option applies, whichever way it was given."""
        for f in fields(self):
            value, check, choices = getattr(self, f.name), f.metadata["check"], f.metadata["choices"]
            if check is not None and value is not None:
                if isinstance(value, bool) or not isinstance(value, (int, float)):
                    raise ValueError(f"{f.name}: expected a number, got {value!r}")
                try:
                    setattr(self, f.name, check(str(value)))
                except argparse.ArgumentTypeError as err:
                    raise ValueError(f"{f.name}: {err}") from None
            if choices is not None and value not in choices:
                raise ValueError(f"{f.name}: expected one of {list(choices)}, got {value!r}")


@dataclass
class BuildArguments(Settings):
    """What shapes a new Speeder (`speeder build`, `speeder train` without --model, `recipes.build_for_dataset`)."""

    tokens_per_item: int = setting(1, "K soft tokens per item (MRC)", POSITIVE_INT)
    max_history: int = setting(50, "most recent history items in the prompt (SASRec keeps 50 too)", POSITIVE_INT)
    learned_id_dim: int = setting(64, "a learned id table of this size when the data has no id features (0: none)",
                                  NON_NEGATIVE_INT)
    expert_hidden_size: int = setting(256, "hidden width of each modality expert", POSITIVE_INT)
    # As SASRec's embedding dropout: without it the small model overfits (bench/earlier-runs.md).
    item_dropout: float = setting(0.2, "dropout on item tokens while training", SHARE)
    # On the new-item protocol (Scientific validation) 0.3 beat 0 and 0.6 on new and known items alike (BENCHMARKS.md).
    catalog_id_dropout: float = setting(0.3, "share of the catalog head's item vectors computed without their id "
                                             "modality while training, as an item added later (speeder add-items) is "
                                             "scored", SHARE)
    # The popularity prior a free item embedding carries in its norm: the largest single gain measured.
    catalog_item_bias: bool = setting(True, "no per-item bias on catalog-head scores", flag="--no-item-bias")
    use_recency_embeddings: bool = setting(True, "ablation: no SPAE recency embeddings", flag="--no-recency",
                                           research=True)
    item_level_position_ids: bool = setting(True, "ablation: plain token position ids", flag="--no-item-positions",
                                            research=True)
    modalities: str | None = setting(None, "ablation: comma-separated subset of text,image,id", research=True)
    catalog_loss_weight: float = setting(0.0, "with --head candidate: weight of a joint full-catalog loss",
                                         NON_NEGATIVE_FLOAT, research=True)

    def __post_init__(self):
        super().__post_init__()
        unknown = set((self.modalities or "text").split(",")) - {"text", "image", "id"}
        if unknown:
            raise ValueError(f"modalities: expected a comma-separated subset of text,image,id, got {self.modalities!r}")

    def config_kwargs(self) -> dict:
        """The SpeederConfig fields these settings give (`learned_id_dim` and `modalities` depend on the data)."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("learned_id_dim", "modalities")}


@dataclass
class TrainArguments(Settings):
    """How `recipes.train` trains and selects (`speeder train`, `speeder demo`); any `transformers.TrainingArguments`
    field may be given to `recipes.train` beside these."""

    epochs: float = setting(30, "most epochs; early stopping on validation ends sooner (the learning rate decays "
                                "linearly over them)", POSITIVE_FLOAT)
    max_steps: int | None = setting(None, "a fixed budget of optimiser steps instead of --epochs", POSITIVE_INT,
                                    flag="--steps")
    patience: int = setting(3, "evaluations without validation gain before stopping (0: never)", NON_NEGATIVE_INT)
    # Whole-catalog NDCG@10 can creep up by about 0.001 an epoch for many epochs, far below its standard error.
    early_stopping_threshold: float = setting(0.001, "the least validation gain that counts as an improvement",
                                              NON_NEGATIVE_FLOAT, research=True)
    # Selected on the whole catalog the demos gain there (Beauty test full NDCG@10 0.032 -> 0.047) for 0.00-0.02 of
    # validation NDCG@10 on the candidates (bench/earlier-runs.md, "Selecting on the whole catalog").
    selection_metric: str = setting("full_ndcg@10", "validation metric that picks the checkpoint and stops training: "
                                    "NDCG@10 or HR@10 on the whole catalog with the history excluded (as SASRec is "
                                    "selected), or NDCG@10 on the stored candidates", choices=SELECTION_METRICS)
    selection_rows: int | None = setting(None, "validation users scored for selection (None: all)", POSITIVE_INT)
    eval_rows: int | None = setting(None, "evaluate on the first N users only (None: all)", POSITIVE_INT)
    batch_size: int = setting(32, "training rows per step", POSITIVE_INT)
    gradient_accumulation_steps: int = setting(1, "gradient accumulation steps", POSITIVE_INT, flag="--grad-accum")
    learning_rate: float = setting(1e-3, "peak learning rate (linear decay)", POSITIVE_FLOAT, flag="--lr")
    weight_decay: float = setting(0.01, "AdamW weight decay", NON_NEGATIVE_FLOAT, research=True)
    warmup_ratio: float = setting(0.05, "share of the steps with a rising learning rate", SHARE, research=True)
    save_steps: int | None = setting(None, "evaluate and checkpoint every N steps (None: every epoch)", POSITIVE_INT)
    lora_r: int = setting(0, "LoRA rank on the backbone (0: full fine-tuning)", NON_NEGATIVE_INT)
    head: str = setting("catalog-dense", "catalog-dense: the catalog head, every training target of every user per "
                        "epoch; candidate: 20 candidates in the prompt, one prefix per example", choices=HEADS)
    packed: bool = setting(False, "with --head catalog-dense: padding-free batches (FlashAttention varlen, flex)")
    catalog_negatives: int | None = setting(None, "catalog head: sampled softmax over the batch's positives plus this "
                                            "many drawn items (logQ-corrected); 0: the full softmax; None: by "
                                            "catalog size (recipes.default_catalog_negatives)", NON_NEGATIVE_INT)
    distillation_weight: float = setting(1.0, "weight of the distillation loss from a SASRec teacher's next-item "
                                         "distributions (KL at every training prefix; 0: none)", NON_NEGATIVE_FLOAT)
    # Cold items are left out: the teacher's low probability for them says more about their few interactions than
    # about the user (bench/earlier-runs.md: better on both validation metrics, two seeds).
    distillation_min_count: int = setting(COLD_ITEM_MAX_COUNT + 1, "items with fewer training interactions are left "
                                          "out of the distilled distributions (0: every item)", NON_NEGATIVE_INT,
                                          research=True)
    mpo: bool = setting(True, "ablation: all modalities from step 0", flag="--no-mpo", research=True)
    mpo_stage_epochs: float = setting(1.0, "epochs of each MPO stage before the last", POSITIVE_FLOAT, research=True)
    # A sequence of `training.MPOStage` (or dicts of their fields: a --config file's list); None: the default schedule.
    mpo_schedule: tuple | None = setting(None, "the MPO stages", cli=False)
    resume: bool = setting(False, "continue from the last complete checkpoint in <output>/trainer")
    seed: int = setting(0, "seeds weights, data order and negatives", NON_NEGATIVE_INT)

    def __post_init__(self):
        super().__post_init__()
        if self.mpo_schedule is not None:  # torch is imported only for a schedule that was given
            from .training import as_mpo_stages

            try:
                self.mpo_schedule = tuple(as_mpo_stages(self.mpo_schedule))
            except (ValueError, TypeError) as err:
                raise ValueError(f"mpo_schedule: {err}") from None


@dataclass
class DemoArguments(TrainArguments):
    """`speeder demo`: the recipe on a known dataset, SASRec and popularity beside it."""

    dataset: str = setting("auto", "auto: scientific when ../shared/data has it, else MovieLens-100k from the recbole "
                           "wheel", choices=("auto", "ml-100k", "scientific", "beauty"))
    epochs: float = setting(40, "most Speeder epochs; early stopping on validation ends sooner", POSITIVE_FLOAT)
    sasrec_epochs: int = setting(200, "most SASRec epochs; early stopping ends sooner", POSITIVE_INT)


def add_arguments(parser: argparse.ArgumentParser, settings_class, show_research: bool = True):
    """One option per field of `settings_class`, with its default, check and help."""
    for f in fields(settings_class):
        meta = f.metadata
        if not meta["cli"]:  # no flag: the default on the namespace, for Python and a --config file to set
            parser.set_defaults(**{f.name: f.default})
            continue
        flag = meta["flag"] or "--" + f.name.replace("_", "-")
        shown = meta["help"] if show_research or not meta["research"] else argparse.SUPPRESS
        if isinstance(f.default, bool):  # a switch; "%(default).0s" prints nothing, so --help shows no "(default: True)"
            parser.add_argument(flag, dest=f.name, action="store_false" if f.default else "store_true",
                                help=shown if shown == argparse.SUPPRESS else shown + "%(default).0s")
        else:
            parser.add_argument(flag, dest=f.name, default=f.default, type=meta["check"], choices=meta["choices"],
                                help=shown)


def settings_from(namespace: argparse.Namespace, settings_class):
    """The `settings_class` object of a parsed command line."""
    return settings_class(**{f.name: getattr(namespace, f.name) for f in fields(settings_class)})


__all__ = ["COLD_ITEM_MAX_COUNT", "NUM_NEGATIVES", "BuildArguments", "DemoArguments", "TrainArguments", "add_arguments",
           "settings_from"]
