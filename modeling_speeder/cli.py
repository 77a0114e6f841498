"""The `speeder` command line (also `python -m modeling_speeder`)."""

import argparse
import json
import os
import sys
import time
from dataclasses import fields, replace

from .arguments import (
    NON_NEGATIVE_INT,
    NUM_NEGATIVES,
    POSITIVE_INT,
    BuildArguments,
    DemoArguments,
    TrainArguments,
    add_arguments,
    settings_from,
)


def _feature_dims(text: str) -> dict[str, int]:
    """'text=512,image=512' -> {'text': 512, 'image': 512}."""
    dims = {}
    for part in text.split(","):
        modality, _, width = part.partition("=")
        if modality.strip() not in ("text", "image") or not width.strip().isdigit() or int(width) < 1:
            raise argparse.ArgumentTypeError(f"expected modality=width pairs such as text=512,image=512, got {part!r}")
        dims[modality.strip()] = int(width)
    return dims


def quickstart(args):
    """Build a tiny Speeder over a synthetic catalog, save it, reload it through AutoModel, recommend."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from transformers import AutoModel, AutoProcessor, LlamaConfig

    from .conversion.build import build_speeder, make_word_tokenizer
    from .processing.processing_speeder import DEFAULT_PROMPT_BRIDGE, DEFAULT_PROMPT_PREFIX

    torch.manual_seed(args.seed)
    start = time.perf_counter()
    n = args.num_items
    item_ids = [f"item-{i:04d}" for i in range(n)]
    # Synthetic catalog: items in 8 "genres"; text/image features carry the genre, half the items lack an image.
    genre = torch.arange(n) % 8
    centers = torch.randn(8, 32)
    features = {"text": centers[genre] + 0.3 * torch.randn(n, 32), "image": centers[genre][:, :16] + 0.5 * torch.randn(n, 16)}
    presence = {"image": torch.rand(n) > 0.5}
    tokenizer = make_word_tokenizer([DEFAULT_PROMPT_PREFIX, DEFAULT_PROMPT_BRIDGE])
    backbone = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2, vocab_size=64)
    model, processor = build_speeder(backbone, tokenizer, item_ids, features, presence, learned_id_dim=16,
                                     expert_hidden_size=64, max_history=10)
    model.save_pretrained(args.output)
    processor.save_pretrained(args.output)
    print(f"built and saved a tiny Speeder ({sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, "
          f"{n} items) to {args.output}")

    loaded = AutoModel.from_pretrained(args.output)
    loaded_processor = AutoProcessor.from_pretrained(args.output)
    print(f"reloaded through AutoModel: {type(loaded).__name__}, AutoProcessor: {type(loaded_processor).__name__}")
    histories = [[item_ids[i] for i in range(g, 40, 8)] for g in range(3)]
    candidates = [[item_ids[(7 * u + j) % n] for j in range(20)] for u in range(3)]
    for user, (hist, recs, cand_recs) in enumerate(
        zip(histories, loaded.recommend(histories, top_k=5), loaded.recommend(histories, candidates, top_k=3))
    ):
        print(f"user {user}: history {hist}")
        print("  catalog top-5:   " + ", ".join(f"{i} ({s:.3f})" for i, s in zip(recs["item_ids"], recs["scores"])))
        print("  candidate top-3: " + ", ".join(f"{i} ({s:.3f})" for i, s in zip(cand_recs["item_ids"], cand_recs["scores"])))
    print(f"done in {time.perf_counter() - start:.1f}s (random weights: the rankings show the API, not quality)")


DEMO_SELECTION_ROWS = {"beauty": 5000}  # validation users scored per epoch for selection (all elsewhere)


def demo(args):
    """The main job: convert a real dataset, train SASRec and Speeder to convergence (both selected on validation),
    evaluate once on test against SASRec and popularity."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from pathlib import Path

    from transformers import set_seed

    from . import recipes

    output = Path(args.output)
    dataset = args.dataset
    if dataset == "auto":
        dataset = "scientific" if recipes.find_shared_dataset("scientific") else "ml-100k"
    # Model selection scores every validation user after each epoch; on Beauty (22k users) the first 5,000 of them keep
    # the demo's budget (the reported validation and test figures still cover every user).
    selection_rows = args.selection_rows or DEMO_SELECTION_ROWS.get(dataset)
    print(f"[1/4] converting {dataset} to the canonical form")
    stats = recipes.prepare_dataset(dataset, output / "data")
    print(json.dumps({k: v for k, v in stats.items() if k != "source"}))
    print("[2/4] training SASRec on every training target, selected on validation; its item embeddings become "
          "Speeder's collaborative (id) features")
    from . import __version__
    from .conversion.datasets import load_canonical

    splits, items, _, _ = load_canonical(output / "data")
    settings = replace(settings_from(args, DemoArguments), selection_rows=selection_rows)
    set_seed(args.seed)
    # Trained once per dataset and settings: a rerun loads it from outputs/.../sasrec (selection stays on validation).
    key = {"data": (output / "data" / "stats.json").read_text(encoding="utf-8"), "speeder": __version__,
           "epochs": args.sasrec_epochs, "seed": args.seed, "selection_rows": selection_rows, "eval_rows": args.eval_rows}
    sasrec, sasrec_model, cached = recipes.cached_sasrec_baseline(
        output / "sasrec", key, splits, items["item_id"], epochs=args.sasrec_epochs, eval_rows=args.eval_rows,
        seed=args.seed, selection_rows=selection_rows)
    print(f"SASRec: best epoch {sasrec['training']['best_epoch']} of {len(sasrec['training']['epochs'])}, "
          f"{sasrec['train_seconds']}s" + (f"; cached: loaded from {output / 'sasrec'}, trained by an earlier run with "
                                          "the same data and settings (delete that folder to train it again)"
                                          if cached else f"; kept in {output / 'sasrec'} for the next run"))
    print("[3/4] building a small Speeder and training it with transformers.Trainer through the MPO stages, "
          "selected on validation")
    set_seed(args.seed)
    model, processor, splits = recipes.build_for_dataset(output / "data", sasrec=sasrec_model,
                                                         build=settings_from(args, BuildArguments), seed=args.seed)
    report = recipes.train(model, processor, splits, output, settings, teacher=sasrec_model)
    print(f"[4/4] Speeder: {report['steps']} steps ({report['epochs']} epochs) in {report['train_seconds']}s, best "
          f"checkpoint {Path(report['best_checkpoint'] or '-').name}")
    report["sasrec"] = sasrec
    report["popularity"] = recipes.popularity_report(splits, processor.item_ids, eval_rows=args.eval_rows)
    report["dataset"] = recipes.dataset_summary(output / "data", name=dataset)
    recipes.write_report(output, report)
    print("Test split, 20 stored candidates (target + 19 seeded negatives); full = whole catalog, history excluded; "
          "cold = targets with at most 5 training interactions:")
    recipes.print_metrics_table({"Speeder": report["test"], "SASRec": sasrec["test"], "popularity": report["popularity"]["test"]})
    print(f"model, processor, report.json and plots in {output}; the checkpoint is {output / 'model'}")


CONVERTERS = ("movielens-100k", "recbole", "unisrec", "s3rec", "lcrec", "amazon2023", "csv")


def convert(args):
    """Raw data -> the canonical dataset folder (splits with seeded candidates, items, features where given)."""
    from pathlib import Path

    from .conversion import datasets as ds

    needs = {"recbole": ("input",), "unisrec": ("input", "name"), "s3rec": ("input", "name"), "lcrec": ("input", "name"),
             "amazon2023": ("input", "meta"), "csv": ("input",)}.get(args.format, ())
    missing = [f"--{flag}" for flag in needs if not getattr(args, flag)]
    if missing:
        raise ValueError(f"--format {args.format} needs {' and '.join(missing)}")
    start = time.perf_counter()
    summary = []  # each filter step's kept and dropped users, items and interactions (stats.json "filters")
    split = dict(num_negatives=args.negatives, seed=args.seed, summary=summary)
    features = {}
    if args.format in ("movielens-100k", "recbole"):
        directory = ds.movielens_100k_path() if args.format == "movielens-100k" else Path(args.input)
        splits, items = ds.convert_recbole(directory, args.name or "ml-100k", **split)
    elif args.format == "unisrec":
        splits, items, features = ds.convert_unisrec(args.input, args.name, feature_dims=args.feature_dims, **split)
    elif args.format == "s3rec":
        splits, items = ds.convert_s3rec(args.input, args.name, **split)
    elif args.format == "lcrec":
        splits, items = ds.convert_lcrec(args.input, args.name, **split)
    elif args.format == "amazon2023":
        splits, items = ds.convert_amazon2023(args.input, args.meta, k_core=args.k_core, **split)
    else:
        splits, items = ds.convert_csv(args.input, args.items, user_column=args.user_column, item_column=args.item_column,
                                       time_column=args.time_column, delimiter=_delimiter(args),
                                       sequences_per_line=args.sequences_per_line,
                                       interacted_items_only=args.interacted_items_only, **split)
    stats = ds.write_canonical(args.output, splits, items, features, source=f"{args.format}:{args.input or ''}",
                               overwrite=args.overwrite, inputs=[p for p in (args.input, args.meta, args.items) if p],
                               summary=summary)
    stats["seconds"] = round(time.perf_counter() - start, 1)
    print(json.dumps({k: v for k, v in stats.items() if k != "filters"}, indent=2))
    print("What each step kept and dropped:")
    for line in summary:
        kept, dropped = line.get("kept", {}), line.get("dropped", {})
        print(f"- {line['step']}: kept {', '.join(f'{v:,} {k}' for k, v in kept.items()) or '-'}"
              + (f"; dropped {', '.join(f'{v:,} {k}' for k, v in dropped.items())}" if dropped else "")
              + (f"; catalog {line['catalog_items']:,} items" if "catalog_items" in line else ""))


def features(args):
    """Extract item features with frozen encoders into <data>/features.safetensors (resumable batches)."""
    from pathlib import Path

    from .conversion import datasets as ds
    from .conversion import features as fx
    from .processing.processing_speeder import catalog_fingerprint

    data = Path(args.data)
    splits, items, _, _ = ds.load_canonical(data)
    cache = data / ".feature_cache"
    new, presence, timings = {}, {}, {}
    if args.text:
        start = time.perf_counter()
        texts = [t or title for t, title in zip(items["text"], items["title"])]
        new["text"], presence["text"] = fx.encode_texts(texts, args.text_encoder, cache_dir=cache / "text")
        timings["text"] = round(time.perf_counter() - start, 1)
    if args.image_encoder:
        if "image" not in items.column_names:
            raise ValueError(f"{data / 'items.parquet'} has no image column to encode")
        start = time.perf_counter()
        new["image"], presence["image"] = fx.encode_images(items["image"], args.image_encoder, cache_dir=cache / "image")
        timings["image"] = round(time.perf_counter() - start, 1)
    if args.collaborative:
        start = time.perf_counter()
        index = {item: row for row, item in enumerate(items["item_id"])}
        sequences = [[index[i] for i in h] for h in splits["validation"]["history"]]  # training sequences only
        validation = (sequences, [index[t] for t in splits["validation"]["target"]])  # selection, as RecBole does
        new["id"], presence["id"], sasrec = fx.collaborative_features(sequences, len(index), epochs=args.sasrec_epochs,
                                                                      validation=validation)
        sasrec.config.catalog_fingerprint = catalog_fingerprint(items["item_id"])
        sasrec.save_pretrained(data / "sasrec")
        timings["id"] = round(time.perf_counter() - start, 1)
    if not new:
        raise SystemExit("Nothing to extract: pass --text, --image-encoder and/or --collaborative")
    ds.save_features(data, new, presence)
    print(json.dumps({m: {"shape": list(x.shape), "present": int(presence[m].sum()), "seconds": timings[m]}
                      for m, x in new.items()}, indent=2))



def build(args):
    """Base LLM + dataset folder (items, features) -> a Speeder checkpoint and processor."""
    from .conversion.build import load_backbone
    from .recipes import build_for_dataset

    start = time.perf_counter()
    backbone, tokenizer = load_backbone(args.backbone)
    model, processor, _ = build_for_dataset(args.data, backbone, tokenizer, build=settings_from(args, BuildArguments),
                                            seed=args.seed)
    model.save_pretrained(args.output)
    processor.save_pretrained(args.output)
    print(json.dumps({"output": args.output, "backbone": args.backbone, "items": model.config.num_items,
                      "modalities": list(model.mrc.modalities), "parameters": sum(p.numel() for p in model.parameters()),
                      "seconds": round(time.perf_counter() - start, 1)}, indent=2))


def _load_config(args, parser, given: set[str]) -> set[str]:
    """Set the values of a YAML or JSON --config file on `args`, for every option not `given` on the command line;
    returns the options the file sets. A key is an option's name (`lr`, `no-mpo`) or its field's (`learning_rate`)."""
    import yaml

    with open(args.config, encoding="utf-8") as f:
        values = yaml.safe_load(f) or {}  # YAML is a superset of JSON
    if not isinstance(values, dict):
        raise SystemExit(f"{args.config}: expected a mapping of option: value, got a {type(values).__name__}")
    actions = [action for action in parser._actions if action.dest not in ("help", "config")]
    by_flag = {flag: action for action in actions for flag in action.option_strings}
    by_dest = {action.dest: action for action in actions if "--" + action.dest.replace("_", "-") not in by_flag}
    from_file = set()
    no_flag = {f.name for cls in (BuildArguments, TrainArguments) for f in fields(cls) if not f.metadata["cli"]}
    for key, value in values.items():
        flag = by_flag.get("--" + str(key).replace("_", "-"))
        action = flag or by_dest.get(str(key))
        if action is None and key in no_flag and key in vars(args):  # checked by the settings' own class
            setattr(args, key, value)
            from_file.add(key)
            continue
        if action is None:
            raise SystemExit(f"{args.config}: unknown option {key!r}")
        if action.nargs == 0:  # a flag: "false" in quotes would read as true
            if not isinstance(value, bool):
                raise SystemExit(f"{args.config}: {key}: expected true or false, got {value!r}")
            value = (action.const if value else action.default) if flag else value  # `no_mpo: true` or `mpo: false`
        elif value is not None:  # the command line's own checks (ranges, choices)
            try:
                value = action.type(str(value)) if action.type is not None else value
            except (argparse.ArgumentTypeError, ValueError) as err:
                raise SystemExit(f"{args.config}: {key}: {err}") from err
            if action.choices is not None and value not in action.choices:
                raise SystemExit(f"{args.config}: {key}: {value!r} is not one of {list(action.choices)}")
        if action.dest not in given:  # the command line wins, also where it repeats a default
            setattr(args, action.dest, value)
            from_file.add(action.dest)
    return from_file


def _given_on_command_line(argv, command: str) -> set[str]:
    """The options `argv` sets explicitly: parsed again with every default of `command` replaced by a marker."""
    parser, commands = build_parser()
    unset = object()
    commands[command].set_defaults(**{a.dest: unset for a in commands[command]._actions if a.dest != "help"})
    return {dest for dest, value in vars(parser.parse_args(argv)).items() if value is not unset}


def _distillation_teacher(args):
    """The SASRec to distil from: --teacher, else the one `speeder features --collaborative` saved in <data>/sasrec;
    None without one (then training goes on without distillation, and says so) or with --distillation-weight 0."""
    from pathlib import Path

    if not args.distillation_weight:
        return None
    path = Path(args.teacher) if args.teacher else Path(args.data) / "sasrec"
    if not (path / "config.json").is_file():
        if args.teacher:
            raise ValueError(f"--teacher {path}: no saved SASRec there (expected config.json and model.safetensors, "
                             "as `speeder features --collaborative` writes to <data>/sasrec)")
        print(f"No SASRec in {path} (`speeder features --collaborative` writes it): training without distillation",
              file=sys.stderr)
        return None
    from .sasrec import SASRecModel

    model_type = json.loads((path / "config.json").read_text(encoding="utf-8")).get("model_type")
    if model_type != SASRecModel.config_class.model_type:
        raise ValueError(f"--teacher {path}: a {model_type!r} checkpoint, not a SASRec "
                         f"({SASRecModel.config_class.model_type!r}, as `speeder features --collaborative` writes)")
    return SASRecModel.from_pretrained(path, use_safetensors=True)


def train_command(args):
    """Train a Speeder on a canonical dataset with transformers.Trainer (MPO, optional LoRA), then evaluate."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from pathlib import Path

    from transformers import set_seed

    from . import recipes
    from .conversion.build import load_backbone
    from .conversion.datasets import load_canonical

    settings = settings_from(args, TrainArguments)  # its checks before anything is loaded
    set_seed(args.seed)  # the model's initial weights too, not only the Trainer's data order: a rerun is the same run
    if args.model:  # a built checkpoint has its architecture: options that would only shape a new build are an error
        given = getattr(args, "given", set())  # set explicitly, on the command line or in --config
        ignored = [f.metadata["flag"] or "--" + f.name.replace("_", "-") for f in fields(BuildArguments) if f.name in given]
        ignored += ["--backbone"] if "backbone" in given else []
        if ignored:
            raise ValueError(f"--model {args.model} is already built, so {', '.join(ignored)} would be ignored: drop "
                             "them, or build a new model (leave out --model, or `speeder build`)")
        splits, _, _, _ = load_canonical(args.data)
        model, processor = load_checkpoint(args.model)
    else:
        backbone, tokenizer = load_backbone(args.backbone)
        model, processor, splits = recipes.build_for_dataset(args.data, backbone, tokenizer, seed=args.seed,
                                                             build=settings_from(args, BuildArguments))
    if args.attn_implementation:
        model.set_attn_implementation(args.attn_implementation)
    teacher = _distillation_teacher(args) if settings.head == "catalog-dense" else None
    report = recipes.train(model, processor, splits, Path(args.output), settings, teacher=teacher,
                           dataset=recipes.dataset_summary(args.data))  # for the model card (`speeder card --report`)
    if report.get("diverged_at_step") is not None:
        print(f"WARNING: the training loss became non-finite at step {report['diverged_at_step']}: training stopped and "
              "the metrics below are those of a diverged model. Lower --lr.", file=sys.stderr)
    if "test" in report:
        print(f"trained {report['steps']} steps in {report['train_seconds']}s ({report['examples_per_second']} examples/s)")
        rows = {"validation": report["validation"], f"test ({report['test']['head']} head)": report["test"]}
        if "catalog_head" in report["test"]:
            rows["test, catalog head"] = report["test"]["catalog_head"]
        recipes.print_metrics_table(rows)


def evaluate_command(args):
    """Evaluate a saved checkpoint on a canonical dataset split: report.json and PNG plots."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from pathlib import Path

    from . import recipes
    from .conversion.datasets import load_canonical

    splits, _, _, _ = load_canonical(args.data)
    model, processor = load_checkpoint(args.model)
    model.check_processor(processor)
    from .evaluation import training_item_counts

    counts = training_item_counts(splits, {item: row for row, item in enumerate(processor.item_ids)})
    metrics = recipes.evaluate_split(model, processor, recipes.select(splits[args.split], args.eval_rows), counts)
    recipes.write_report(Path(args.output), {args.split: metrics, "dataset": recipes.dataset_summary(args.data)})
    recipes.print_metrics_table({args.split: metrics})
    print(f"full-catalog HR@10 {metrics['full_hr@10']:.4f}, NDCG@10 {metrics['full_ndcg@10']:.4f}; report in {args.output}")


def add_items_command(args):
    """Extend a checkpoint's catalog with new items from a JSONL, CSV or Parquet file (an `item_id` column, `title`
    and/or `text`, optionally `image`), encoded by the encoders of `speeder features`; saved as one atomic folder."""
    from pathlib import Path

    from datasets import Dataset

    from .conversion import features as fx
    from .conversion.build import add_items, save_checkpoint

    model, processor = load_checkpoint(args.model)
    source = Path(args.items)
    readers = {".jsonl": Dataset.from_json, ".json": Dataset.from_json, ".csv": Dataset.from_csv,
               ".parquet": Dataset.from_parquet}
    if source.suffix not in readers or not source.is_file():
        raise ValueError(f"--items {source}: expected an existing .jsonl, .csv or .parquet file of new items")
    items = readers[source.suffix](str(source))
    if "item_id" not in items.column_names:
        raise ValueError(f"--items {source} has no item_id column (columns: {items.column_names})")
    features, presence = {}, {}
    if "text" in model.mrc.modalities and {"title", "text"} & set(items.column_names):
        column = lambda name: items[name] if name in items.column_names else [None] * len(items)  # noqa: E731
        texts = [t or title for t, title in zip(column("text"), column("title"))]
        features["text"], presence["text"] = fx.encode_texts(texts, args.text_encoder)
    if "image" in model.mrc.modalities and args.image_encoder and "image" in items.column_names:
        features["image"], presence["image"] = fx.encode_images(items["image"], args.image_encoder)
    if not features:
        raise ValueError(f"--items {source}: nothing to encode for this model's modalities {list(model.mrc.modalities)} "
                         "(a title or text column, or an image column with --image-encoder)")
    added = add_items(model, processor, [str(i) for i in items["item_id"]], features, presence)
    save_checkpoint(model, processor, args.output or args.model, carry_from=args.model)
    print(json.dumps({"added": added, "items": model.config.num_items, "output": str(args.output or args.model),
                      "modalities": {m: int(mask.sum()) for m, mask in presence.items()}}))


def recommend_command(args):
    """Top-k recommendations for every history of a file (`datasets.read_histories`), one JSON line per user
    ({"user_id", "item_ids", "scores"}), through `recommend()`. Rows are read 4,096 at a time, so memory stays bounded
    by that chunk and the catalog's item cache; the file is written beside `--output` and renamed into place."""
    from tqdm.auto import tqdm

    from .atomic_files import write_atomically
    from .conversion.datasets import read_histories

    model, processor = load_checkpoint(args.model)
    rows = read_histories(args.input, args.split, user_column=args.user_column, item_column=args.item_column,
                          time_column=args.time_column, delimiter=_delimiter(args))
    if args.candidates and "candidates" not in rows.column_names:
        raise ValueError("--candidates: the input has no candidates field")

    def write(partial):
        with open(partial, "w", encoding="utf-8") as f, tqdm(total=len(rows), unit="user", desc="recommend") as bar:
            for start in range(0, len(rows), 4096):
                chunk = rows[start : start + 4096]
                ranked = model.recommend(chunk["history"], chunk["candidates"] if args.candidates else None,
                                         top_k=args.top_k, processor=processor, batch_size=args.batch_size,
                                         exclude_history=not args.include_history)
                f.writelines(json.dumps({"user_id": user, **result}) + "\n" for user, result in zip(chunk["user_id"], ranked))
                bar.update(len(ranked))

    write_atomically(args.output, write)
    print(json.dumps({"users": len(rows), "top_k": args.top_k, "output": args.output}))


def load_checkpoint(path: str):
    """(model, processor) from a checkpoint folder or hub id, with an error that says what was looked for: a path
    that does not exist here is reported as such, not as an invalid hub id."""
    from pathlib import Path

    from transformers import AutoModel, AutoProcessor

    local = Path(path)
    looks_local = local.exists() or path.startswith((".", "/", "~")) or path.count("/") != 1
    if looks_local and not local.is_dir():
        raise FileNotFoundError(f"--model {path}: no such checkpoint folder"
                                f"{' (it is a file)' if local.exists() else ''}; expected a folder written by "
                                "`speeder train` / `speeder build` (or a hub id like org/name)")
    model = AutoModel.from_pretrained(path)
    return model, AutoProcessor.from_pretrained(path)


def _card(args):
    from pathlib import Path

    from .conversion.hub import render_model_card

    def read_object(flag: str, path: str | None) -> dict | None:
        if path is None:
            return None
        value = json.loads(Path(path).read_text(encoding="utf-8"))
        if not isinstance(value, dict):
            raise ValueError(f"--{flag} {path}: expected a JSON object (a report.json or stats.json), got a "
                             f"{type(value).__name__}")
        return value

    report, stats = read_object("report", args.report), read_object("dataset-stats", args.dataset_stats)
    return render_model_card(args.model, args.repo, report, dataset_name=args.dataset_name, dataset_stats=stats,
                             license=args.license)


def card_command(args):
    """Render the model card of a checkpoint (from the model_card.md template), by default to <model>/README.md.
    An existing file that `speeder card` did not write is never overwritten unless --overwrite."""
    from pathlib import Path

    from .atomic_files import write_text_atomically
    from .conversion.hub import CARD_MARKER

    output = Path(args.output) if args.output else Path(args.model) / "README.md"
    if output.exists() and CARD_MARKER not in output.read_text(encoding="utf-8", errors="replace") and not args.overwrite:
        raise SystemExit(f"speeder card: error: {output} exists and was not written by `speeder card`; "
                         "choose another --output or pass --overwrite")
    card = _card(args)
    text = str(card).rstrip("\n") + "\n\n" + CARD_MARKER + "\n"
    write_text_atomically(output, text)  # a reader sees the old card or the new one
    print(f"model card written to {output}")


def push_command(args):
    """Push a checkpoint folder and its model card to the Hub in one commit."""
    from .conversion.hub import push_checkpoint

    card = _card(args)
    try:
        info = push_checkpoint(args.model, args.repo, card=card, max_shard_size=args.max_shard_size,
                               private=args.private or None)
    except (ValueError, FileNotFoundError):
        raise
    except Exception as err:  # httpx / huggingface_hub network and authentication errors
        raise OSError(f"could not push {args.model} to the Hub repository {args.repo}: {type(err).__name__}: {err}. "
                      "Check the network (HF_HUB_OFFLINE must be unset) and your token (`hf auth login`)") from err
    print(f"pushed: {getattr(info, 'commit_url', info)}")


def main(argv=None) -> int:
    """The `speeder` command: a user error (a missing file, a bad value, a folder that is not a checkpoint) is one line,
    `speeder <command>: error: ...`, and exit status 2; `--debug` shows the traceback instead."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]
    from safetensors import SafetensorError  # no torch: safetensors' own error, as a full disk raises it

    try:
        run(argv)
    except (ValueError, OSError, KeyError, SafetensorError) as err:
        if debug:
            raise
        command = next((a for a in argv if not a.startswith("-")), "")
        message = str(err.args[0]) if isinstance(err, KeyError) and err.args else str(err)
        print(f"speeder {command}: error: {message} (--debug shows the traceback)", file=sys.stderr)
        return 2
    return 0


def build_parser(show_research: bool = False):
    """(the `speeder` parser, its subcommand parsers by name); `show_research`: ablation knobs in --help too."""
    parser = argparse.ArgumentParser(prog="speeder", description="Speeder: fast multimodal-LLM sequential recommendation",
                                     epilog="--debug (anywhere) shows the full traceback of an error; "
                                            "<command> --help-all also lists the ablation and research options")
    commands = parser.add_subparsers(dest="command", required=True)
    _add_data_commands(commands)
    _add_model_commands(commands, show_research)
    _add_sharing_commands(commands, show_research)
    for command in commands.choices.values():  # every command's --help shows the defaults
        command.formatter_class = argparse.ArgumentDefaultsHelpFormatter
    return parser, commands.choices


def _add_data_commands(commands):
    """quickstart, convert, features."""
    p = commands.add_parser("quickstart", help="build a tiny model, save, reload with AutoModel, and recommend")
    p.add_argument("--output", default="outputs/quickstart", help="folder for the tiny checkpoint")
    p.add_argument("--num-items", type=POSITIVE_INT, default=200, help="items in the synthetic catalog")
    p.add_argument("--seed", type=NON_NEGATIVE_INT, default=0, help="seeds weights, data order and negatives")
    p.set_defaults(run=quickstart)
    p = commands.add_parser("convert", help="raw data -> canonical dataset folder")
    p.add_argument("--format", required=True, choices=CONVERTERS, help="the raw data's format")
    p.add_argument("--input", help="folder (recbole, unisrec, s3rec, lcrec) or file (amazon2023 reviews, csv)")
    p.add_argument("--name", help="file stem inside the folder, e.g. Scientific, Beauty, ml-100k")
    p.add_argument("--meta", help="amazon2023: the meta JSONL file")
    p.add_argument("--items", help="csv: an optional items CSV")
    _add_csv_columns(p)
    p.add_argument("--sequences-per-line", action="store_true",
                   help="csv: a headerless file of one user per line, 'user<delimiter>item item ...' oldest first")
    p.add_argument("--interacted-items-only", action="store_true",
                   help="csv: keep only the items of --items that someone interacted with (default: all, as negatives)")
    p.add_argument("--feature-dims", type=_feature_dims, default=None,
                   help="unisrec: the encoders' widths, e.g. text=512,image=512 (CLIP): needed for each feat*CLS file, which "
                        "has no header to check its size against")
    p.add_argument("--k-core", type=POSITIVE_INT, default=5,
                   help="amazon2023: keep users and items with at least this many interactions")
    p.add_argument("--negatives", type=POSITIVE_INT, default=NUM_NEGATIVES,
                   help="stored negatives per validation / test row (candidates = 1 + this)")
    p.add_argument("--seed", type=NON_NEGATIVE_INT, default=0, help="seeds weights, data order and negatives")
    p.add_argument("--output", required=True, help="the folder to write")
    p.add_argument("--overwrite", action="store_true",
                   help="replace --output even if it is not a dataset folder written by speeder (never one holding the input)")
    p.set_defaults(run=convert)
    p = commands.add_parser("features", help="item features with frozen encoders -> <data>/features.safetensors")
    p.add_argument("--data", required=True, help="a canonical dataset folder (`speeder convert`)")
    p.add_argument("--text", action="store_true", help="text features (default encoder: all-MiniLM-L6-v2, offline)")
    p.add_argument("--text-encoder", default=None, help="hub id or local path of any Transformers text encoder")
    p.add_argument("--image-encoder", default=None, help="hub id or local path of a CLIP / SigLIP / vision model")
    p.add_argument("--collaborative", action="store_true", help="train SASRec; its item embeddings become 'id'")
    p.add_argument("--sasrec-epochs", type=POSITIVE_INT, default=200, help="most SASRec epochs; early stopping on validation")
    p.set_defaults(run=features)


def _delimiter(args) -> str:
    if not args.delimiter:
        raise ValueError("--delimiter is empty: expected one character, such as , or \\t")
    return args.delimiter.replace("\\t", "\t")


def _add_csv_columns(p):
    p.add_argument("--user-column", default="user_id", help="csv: the user column")
    p.add_argument("--item-column", default="item_id", help="csv: the item column (also in --items)")
    p.add_argument("--time-column", default=None,
                   help="csv: the time column (default: 'timestamp' when the file has one, else the file's order)")
    p.add_argument("--delimiter", default=",", help="csv: the field delimiter (\\t or a tab for TSV)")


def _add_model_commands(commands, show_research: bool):
    """build, train, add-items, recommend, evaluate."""
    p = commands.add_parser("build", help="base LLM + dataset -> Speeder checkpoint and processor")
    p.add_argument("--data", required=True, help="a canonical dataset folder (`speeder convert`)")
    p.add_argument("--backbone", required=True,
                   help="tiny-<llama|qwen2|qwen3|mistral|gemma>, smollm2, a .gguf file, a folder or a hub id")
    p.add_argument("--output", required=True, help="the folder to write")
    add_arguments(p, BuildArguments, show_research)
    p.add_argument("--seed", type=NON_NEGATIVE_INT, default=0, help="seeds the new weights; stored in the config as build_seed")
    p.set_defaults(run=build)
    p = commands.add_parser("train", help="train with transformers.Trainer through MPO, then evaluate")
    p.add_argument("--config", help="YAML or JSON file with any of these options")
    p.add_argument("--data", required=False, help="a canonical dataset folder (`speeder convert`)")
    p.add_argument("--model", help="a checkpoint folder from `speeder build`; else one is built from --backbone")
    p.add_argument("--backbone", default="tiny-llama",
                   help="tiny-<family>, smollm2, a .gguf file, a folder or a hub id (not with --model)")
    p.add_argument("--output", default="outputs/train",
                   help="folder for the checkpoint, report.json, plots and trainer checkpoints")
    add_arguments(p, TrainArguments, show_research)
    add_arguments(p, BuildArguments, show_research)
    p.add_argument("--teacher", default=None,
                   help="a saved SASRec folder to distil from (default: <data>/sasrec, from `speeder features --collaborative`)")
    p.add_argument("--attn-implementation", default=None,
                   help="backbone attention: eager, sdpa (default), flex_attention, flash_attention_2, a hub kernel")
    p.set_defaults(run=train_command)
    p = commands.add_parser("add-items", help="add new items to a trained checkpoint's catalog, without retraining")
    p.add_argument("--model", required=True, help="a checkpoint folder (model + processor)")
    p.add_argument("--items", required=True, help="JSONL, CSV or Parquet: item_id, title and/or text, optional image")
    p.add_argument("--output", default=None, help="the folder to write (default: replace --model, atomically)")
    p.add_argument("--text-encoder", default=None, help="the text encoder of the catalog's features (all-MiniLM-L6-v2)")
    p.add_argument("--image-encoder", default=None, help="the image encoder of the catalog's features, if any")
    p.set_defaults(run=add_items_command)

    p = commands.add_parser("recommend", help="top-k recommendations for a file of histories -> JSONL, one line per user")
    p.add_argument("--model", required=True, help="a checkpoint folder (model + processor) or hub id")
    p.add_argument("--input", required=True, help="JSONL (user_id, history, optional candidates), a CSV of interactions "
                                                  "(user_id, item_id, optional timestamp) or a dataset folder")
    p.add_argument("--split", default="test", choices=["train", "validation", "test"], help="with a dataset folder")
    _add_csv_columns(p)
    p.add_argument("--output", required=True, help="the JSONL file to write (atomically)")
    p.add_argument("--top-k", type=POSITIVE_INT, default=10, help="recommendations per user")
    p.add_argument("--candidates", action="store_true", help="rank each row's candidates instead of the whole catalog")
    p.add_argument("--include-history", action="store_true", help="may recommend items of the user's history")
    p.add_argument("--batch-size", type=POSITIVE_INT, default=64, help="histories per forward pass")
    p.set_defaults(run=recommend_command)

    p = commands.add_parser("evaluate", help="evaluate a checkpoint: report.json and PNG plots")
    p.add_argument("--config", help="YAML or JSON file with any of these options")
    p.add_argument("--model", required=False, help="a checkpoint folder (model + processor)")
    p.add_argument("--data", required=False, help="a canonical dataset folder (`speeder convert`)")
    p.add_argument("--split", default="test", choices=["validation", "test"], help="the split to score")
    p.add_argument("--output", default="outputs/evaluate", help="folder for report.json and plots")
    p.add_argument("--eval-rows", type=POSITIVE_INT, default=None, help="evaluate on the first N users only (all)")
    p.set_defaults(run=evaluate_command)


def _add_sharing_commands(commands, show_research: bool):
    """push, card, and the demo."""
    for name, run, help_text in (("push", push_command, "push a checkpoint and its model card to the Hub (one commit)"),
                                 ("card", card_command, "render a checkpoint's model card")):
        p = commands.add_parser(name, help=help_text)
        p.add_argument("--model", required=True, help="a saved checkpoint folder (model + processor)")
        p.add_argument("--repo", required=True, help="hub repo id, e.g. org/speeder")
        p.add_argument("--report", help="report.json from `speeder train` or `speeder evaluate` (model-index results)")
        p.add_argument("--dataset-name", help="dataset name for the card (default: from --report)")
        p.add_argument("--dataset-stats", help="stats.json of the dataset folder")
        p.add_argument("--license", default="apache-2.0", help="license tag of the card")
        if name == "push":
            p.add_argument("--max-shard-size", default="2GB", help="largest safetensors shard")
            p.add_argument("--private", action="store_true", help="create the repository as private")
        else:
            p.add_argument("--output", default=None, help="card file (default: <model>/README.md)")
            p.add_argument("--overwrite", action="store_true", help="replace a file `speeder card` did not write")
        p.set_defaults(run=run)
    p = commands.add_parser("demo", help="convert a real dataset, train SASRec and Speeder to convergence, evaluate (no network)")
    p.add_argument("--output", default="outputs/demo", help="folder for data, checkpoint, report.json and plots")
    add_arguments(p, DemoArguments, show_research)  # --selection-rows defaults to 5,000 on beauty (DEMO_SELECTION_ROWS)
    add_arguments(p, BuildArguments, show_research)
    p.set_defaults(run=demo)


def run(argv=None):
    """Parse `argv` and run the command; errors propagate (for callers and tests)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    show_research = "--help-all" in argv
    parser, commands = build_parser(show_research)
    args = parser.parse_args([("--help" if a == "--help-all" else a) for a in argv])
    given = _given_on_command_line(argv, args.command) if args.command == "train" or getattr(args, "config", None) else set()
    if getattr(args, "config", None):
        given |= _load_config(args, commands[args.command], given)
    required = {"train": ("data",), "evaluate": ("data", "model")}.get(args.command, ())
    missing = [flag for flag in required if getattr(args, flag) is None]
    if missing:
        parser.error(f"{args.command} needs --{' and --'.join(missing)} (on the command line or in --config)")
    from . import register

    register()  # torch and transformers only now that the arguments are known to be valid
    args.given = given  # what `speeder train --model` checks
    args.run(args)


if __name__ == "__main__":
    sys.exit(main())
