"""SpeederProcessor: the item catalog, prompt layout, MRC placeholder tokenization and SPAE position ids.

Copied next to saved checkpoints as remote code: it imports only installed libraries.
"""

import glob
import hashlib
import os
import shutil
import tempfile
from collections import Counter
from collections.abc import Sequence

import torch
from tokenizers import AddedToken
from transformers import BatchEncoding
from transformers.processing_utils import ProcessorMixin

DEFAULT_PROMPT_PREFIX = "A user interacted with these items, oldest first:"
DEFAULT_PROMPT_BRIDGE = ". The item they interact with next is"
# What each token is (`mm_token_type_ids`, as transformers' multimodal processors name their map): the id is the index.
TOKEN_TYPES = ("text", "history_item", "candidate")
TEXT, HISTORY_ITEM, CANDIDATE = range(len(TOKEN_TYPES))


def catalog_fingerprint(item_ids: Sequence[str]) -> str:
    """Short hash of an ordered catalog; the model's config stores it to catch a mismatched processor."""
    return hashlib.sha256("\n".join(item_ids).encode("utf-8")).hexdigest()[:16]


class SpeederProcessor(ProcessorMixin):
    r"""
    Turns item-id histories (and candidates, and targets when training) into model inputs.

    Prompt layout (left-padded by default; `padding_side="right"` pads after it):

        [prompt_prefix] [item_1 x K] ... [item_L x K] [prompt_bridge] [query] [cand_1 x K] ... [cand_C x K]

    Position ids (SPAE, relative order): text tokens advance by one, the K tokens of an item share one id and
    successive items advance by one, so RoPE distances between items are item distances whatever K and the text.
    All candidates share the id after the query (they are an unordered set).

    Besides the tokens, the output states the layout, so the model never re-derives it: `mm_token_type_ids` (B, T)
    what each token is (0 text, padding included, 1 history item, 2 candidate: `TOKEN_TYPES`); `recency_index` (B, T)
    each history item token's recency (0 = the latest), -1 elsewhere; `query_index` (B,) the query
    token of each row, (S,) per sequence when packed; with candidates in the prompt, `candidate_token_index` (B, C) the
    last token of each candidate and `candidate_segment_ids` (B, T) 0 for the shared prompt and c + 1 for the tokens
    of candidate c; `last_item_index` (B, T) the catalog row of the latest history item at or before each token (-1
    before the first), the item whose content the catalog head's content affinity compares each scored item with.

    Args:
        tokenizer: the backbone's tokenizer; the item and query tokens are added to it when missing.
        item_ids: external item ids, in catalog order (row i of the model's feature bank).
        max_history: histories are truncated to their most recent `max_history` items.
        tokens_per_item: K soft tokens per item; must match the model.
        item_level_position_ids: SPAE relative positions; False gives plain token positions.
        prompt_prefix / prompt_bridge: the text around the history.
        padding_side: "left" (the default: the query and candidates end every row) or "right"; `__call__` may
            override it per batch, as a tokenizer's.
    """

    def __init__(
        self,
        tokenizer=None,
        item_ids: Sequence[str] | None = None,
        max_history: int = 20,
        tokens_per_item: int = 1,
        item_level_position_ids: bool = True,
        prompt_prefix: str = DEFAULT_PROMPT_PREFIX,
        prompt_bridge: str = DEFAULT_PROMPT_BRIDGE,
        item_token: str = "<|item|>",
        query_token: str = "<|query|>",
        padding_side: str = "left",
        chat_template=None,
        **kwargs,
    ):
        super().__init__(tokenizer, chat_template=chat_template)
        self.item_ids = [str(i) for i in (item_ids or [])]
        self._index = {item: row for row, item in enumerate(self.item_ids)}
        if len(self._index) != len(self.item_ids):
            dupes = [item for item, count in Counter(self.item_ids).items() if count > 1]
            raise ValueError(f"Duplicate item ids in the catalog: {dupes[:10]}")
        if max_history < 1 or tokens_per_item < 1:
            raise ValueError(f"max_history and tokens_per_item must be >= 1, got {max_history}, {tokens_per_item}")
        self.max_history, self.tokens_per_item = max_history, tokens_per_item
        self.item_level_position_ids = item_level_position_ids
        self.padding_side = self._checked_padding_side(padding_side)
        self.prompt_prefix, self.prompt_bridge = prompt_prefix, prompt_bridge
        self.item_token, self.query_token = item_token, query_token
        missing = [t for t in (item_token, query_token) if t not in tokenizer.get_vocab()]
        if missing:
            tokenizer.add_tokens([AddedToken(t, special=True, normalized=False) for t in missing], special_tokens=True)
        self.item_token_id = tokenizer.convert_tokens_to_ids(item_token)
        self.query_token_id = tokenizer.convert_tokens_to_ids(query_token)
        self.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id or 0
        self._prefix_ids = tokenizer(prompt_prefix, add_special_tokens=True).input_ids if prompt_prefix else []
        self._bridge_ids = tokenizer(prompt_bridge, add_special_tokens=False).input_ids if prompt_bridge else []

    # ----- catalog -----

    @property
    def num_items(self) -> int:
        return len(self.item_ids)

    @property
    def catalog_fingerprint(self) -> str:
        return catalog_fingerprint(self.item_ids)

    def item_index(self, item_id) -> int:
        try:
            return self._index[str(item_id)]
        except KeyError:
            raise ValueError(f"Unknown item id {item_id!r}: not in this catalog of {self.num_items} items") from None

    def check_new_item_ids(self, item_ids: Sequence[str]) -> list[str]:
        """The ids as strings; raises for an empty list, a repeated id or an id already in the catalog."""
        new = [str(i) for i in item_ids]
        taken = sorted({i for i in new if i in self._index} | {i for i, c in Counter(new).items() if c > 1})
        if not new or taken:
            raise ValueError(f"New item ids must be new and distinct; got {len(new)} ids"
                             f"{f', of which already in the catalog or repeated: {taken[:10]}' if taken else ''}")
        return new

    def add_items(self, item_ids: Sequence[str]):
        """Append new catalog ids (rows N ..), checked by `check_new_item_ids`."""
        new = self.check_new_item_ids(item_ids)
        self._index.update((item, self.num_items + j) for j, item in enumerate(new))
        self.item_ids.extend(new)

    def item_ids_of(self, rows: Sequence[int]) -> list[str]:
        return [self.item_ids[r] for r in rows]

    # ----- prompt building -----

    def _row(self, history: list[int], candidates: list[int]):
        """One prompt: token ids, SPAE position ids, item token indices, recency indices, the latest history item at
        each token and token types (lists of length T), and the index of its query token."""
        k, level = self.tokens_per_item, self.item_level_position_ids
        ids, pos, item_idx, recency, latest, types = [], [], [], [], [], []

        def text(tokens):
            start = pos[-1] + 1 if pos else 0
            ids.extend(tokens), pos.extend(range(start, start + len(tokens)))
            item_idx.extend([-1] * len(tokens)), recency.extend([-1] * len(tokens))
            latest.extend([latest[-1] if latest else -1] * len(tokens)), types.extend([TEXT] * len(tokens))

        def item(row, r, position, kind):
            ids.extend([self.item_token_id] * k)
            pos.extend([position] * k if level else range(position, position + k))
            item_idx.extend(row * k + j for j in range(k)), recency.extend([r] * k), types.extend([kind] * k)
            latest.extend([row if kind == HISTORY_ITEM else latest[-1]] * k)  # a candidate is not history

        text(self._prefix_ids)
        for j, row in enumerate(history):
            item(row, len(history) - 1 - j, pos[-1] + 1 if pos else 0, HISTORY_ITEM)
        text(self._bridge_ids)
        text([self.query_token_id])
        query, shared = len(ids) - 1, pos[-1] + 1
        for row in candidates:  # an unordered set: no recency, one shared position id
            item(row, -1, shared, CANDIDATE)
        return (ids, pos, item_idx, recency, latest, types), query

    def __call__(
        self,
        histories: Sequence[Sequence[str]],
        candidates: Sequence[Sequence[str]] | None = None,
        targets: Sequence[str] | None = None,
        dense: bool = False,
        packed: bool = False,
        candidates_in_prompt: bool = True,
        dense_labels_from: Sequence[int] | None = None,
        teacher_inputs: bool = False,
        padding_side: str | None = None,
        return_tensors: str | None = "pt",
        **kwargs,
    ) -> BatchEncoding:
        """
        histories: per user, item ids oldest first; truncated to the most recent `max_history`.
        candidates: per user, a set of item ids to score, or None for catalog-head inputs only. The sets may differ
            in size: a shorter one is padded to the batch's largest, its padded slots stated as catalog row -1 in
            `candidate_item_index` (the model scores them -inf; in the prompt they repeat the set's first item, and
            each candidate sees only the shared prompt and itself, so they change no other score).
        targets: per user, the next item; gives `labels` (its place among the candidates) and `catalog_labels`.
        dense: also emit `dense_catalog_labels` (B, T): at the last token of each history item but the last, the
            catalog index of the next history item; at the query token, the target; -100 elsewhere. One causal pass
            then trains the catalog head on every prefix of the sequence (SASRec-style), the last one at the query
            token that inference reads.
        packed: padding-free layout for catalog-head inputs (no candidates): the prompts back to back in one row,
            plus their boundaries `cu_seq_lens_q` / `cu_seq_lens_k` (S + 1,) and `max_length_q` / `max_length_k`
            (SPAE position ids repeat values, so boundaries cannot be inferred from position-id resets).
        candidates_in_prompt: False leaves the candidates out of the prompt and only states them
            (`candidate_item_index`): a model whose `candidate_ranking_head` is "catalog" scores them by dot products
            with the query state, so the prompt is the same whatever the candidates.
        dense_labels_from: with `dense`, per row the first history position (0-based, before truncation) whose
            next-item label counts; earlier items are context only (overlapping training windows, each target
            predicted once).
        teacher_inputs: with `dense`, also `distillation_item_rows` (B, L), each row's truncated history as catalog
            rows, oldest first, -1 after its end, and `distillation_positions` (B, L), True at the history positions
            that have a label, in the order of the model's `dense_catalog_scores`: a sequential teacher's inputs.
        padding_side: "left" or "right" for this batch; None: the processor's `padding_side`.
        """
        self._check_batch(histories, candidates, targets, packed, dense, dense_labels_from, teacher_inputs, kwargs)
        largest = 0 if candidates is None else max((len(c) for c in candidates if isinstance(c, Sequence)), default=0)
        users = [self._encode_user(b, history, None if candidates is None else candidates[b],
                                   None if targets is None else targets[b], candidates_in_prompt, largest)
                 for b, history in enumerate(histories)]
        for b, user in enumerate(users if dense else []):
            # Positions dropped by truncation shift the first labelled one.
            dropped = len(histories[b]) - len(user["history"])
            first = 0 if dense_labels_from is None else max(0, dense_labels_from[b] - dropped)
            user["dense_labels"], user["first_labeled"] = self._dense_labels(user, first), first
        right = self._checked_padding_side(padding_side or self.padding_side) == "right"
        data = self._collate(users, packed, candidates is not None, candidates_in_prompt, right)
        if teacher_inputs:
            longest = max(len(u["history"]) for u in users)
            data["distillation_item_rows"] = [u["history"] + [-1] * (longest - len(u["history"])) for u in users]
            data["distillation_positions"] = [[u["first_labeled"] <= j < len(u["history"]) for j in range(longest)]
                                              for u in users]
        return self._as_tensors(data, return_tensors)

    def _check_batch(self, histories, candidates, targets, packed: bool, dense: bool, dense_labels_from,
                     teacher_inputs: bool, unexpected: dict):
        if unexpected:
            raise TypeError(f"SpeederProcessor got unexpected arguments {sorted(unexpected)}")
        if packed and candidates is not None:
            raise ValueError("packed=True builds catalog-head inputs only: candidates need the padded layout")
        if isinstance(histories, str) or not len(histories) or isinstance(histories[0], str):
            raise ValueError("histories must be a non-empty list of histories, each a list of item ids")
        if candidates is not None and len(candidates) != len(histories):
            raise ValueError(f"{len(candidates)} candidate lists for {len(histories)} histories")
        if targets is not None and len(targets) != len(histories):
            raise ValueError(f"{len(targets)} targets for {len(histories)} histories")
        if dense_labels_from is not None and (not dense or len(dense_labels_from) != len(histories)):
            raise ValueError(f"dense_labels_from needs dense=True and one value per history, got {dense_labels_from!r}")
        if teacher_inputs and not dense:
            raise ValueError("teacher_inputs=True needs dense=True: the teacher scores the dense labels' prefixes")

    def _encode_user(self, b: int, history, candidates, target, candidates_in_prompt: bool, num_candidates: int) -> dict:
        """One user's catalog rows, prompt (`_row`) and labels, the candidates padded to `num_candidates` (see
        `__call__`); raises on an unknown, repeated or missing item."""
        if isinstance(history, str) or not len(history):
            raise ValueError(f"History {b} is empty or not a list of item ids: {history!r}")
        hist = [self.item_index(i) for i in history][-self.max_history :]
        cands = []
        if candidates is not None:
            if isinstance(candidates, str) or not len(candidates):
                raise ValueError(f"Candidate list {b} is empty or not a list of item ids: {candidates!r}")
            cands = [self.item_index(i) for i in candidates]
            if len(set(cands)) != len(cands):
                dupes = [item for item, count in Counter(map(str, candidates)).items() if count > 1]
                raise ValueError(f"Candidate list {b} has duplicate items {dupes}")
        padding = num_candidates - len(cands) if cands else 0
        row, query = self._row(hist, cands + cands[:1] * padding if candidates_in_prompt else [])
        user = {"history": hist, "candidates": cands + [-1] * padding, "row": row, "query": query, "target": -100}
        if target is not None:
            user["target"] = self.item_index(target)
            if candidates is not None:
                if user["target"] not in cands:
                    raise ValueError(f"Target {target!r} of row {b} is not among its candidates")
                user["label"] = cands.index(user["target"])
        return user

    def _dense_labels(self, user: dict, first: int) -> list[int]:
        """Per token of the user's prompt: the catalog row of the item that followed, at the last token of each history
        item from the `first` on (the item after the whole history, the target, at the query token, the state
        inference reads, so the served position is trained too); -100 elsewhere."""
        (ids, *_, types), hist = user["row"], user["history"]
        item_tokens = [t for t, kind in enumerate(types) if kind == HISTORY_ITEM]
        predictor = [item_tokens[(j + 1) * self.tokens_per_item - 1] for j in range(len(hist) - 1)] + [user["query"]]
        labels = [-100] * len(ids)
        for j, next_row in enumerate(hist[1:] + [user["target"]]):
            if j >= first:
                labels[predictor[j]] = next_row
        return labels

    def _collate(self, users: list[dict], packed: bool, with_candidates: bool, candidates_in_prompt: bool,
                 right: bool) -> dict:
        """The users' prompts as one batch, padded on the left (on the `right`), or back to back in one row when
        `packed`, with the layout stated explicitly: each row's query token, and each candidate's last token and
        segment."""
        rows, lengths = [u["row"] for u in users], [len(u["row"][0]) for u in users]
        dense = "dense_labels" in users[0]
        if packed:  # the sequences back to back: each one's offset is the length before it
            offsets = [sum(lengths[:s]) for s in range(len(lengths))]
            rows = [tuple([value for r in rows for value in r[i]] for i in range(len(rows[0])))]
            dense_labels = [[value for u in users for value in u["dense_labels"]]] if dense else []
        else:
            dense_labels = [u["dense_labels"] for u in users] if dense else []
        length = max(len(r[0]) for r in rows)
        if not packed:  # left padding shifts each row by its padding
            offsets = [0 if right else length - n for n in lengths]

        def pad(seq, value):
            return list(seq) + [value] * (length - len(seq)) if right else [value] * (length - len(seq)) + list(seq)

        data = {"input_ids": [pad(r[0], self.pad_token_id) for r in rows],
                "attention_mask": [pad([1] * len(r[0]), 0) for r in rows], "position_ids": [pad(r[1], 0) for r in rows],
                "item_token_index": [pad(r[2], -1) for r in rows], "recency_index": [pad(r[3], -1) for r in rows],
                "last_item_index": [pad(r[4], -1) for r in rows], "mm_token_type_ids": [pad(r[5], TEXT) for r in rows],
                "query_index": [offset + u["query"] for offset, u in zip(offsets, users)]}
        k = self.tokens_per_item
        if with_candidates:
            data["candidate_item_index"] = [u["candidates"] for u in users]
            if candidates_in_prompt:
                data["candidate_token_index"] = [[q + (c + 1) * k for c in range(len(u["candidates"]))]
                                                 for q, u in zip(data["query_index"], users)]
                # 0 for the shared prompt and for right padding, which the attention mask hides anyway.
                data["candidate_segment_ids"] = [
                    [0] * (q + 1) + [c + 1 for c in range(len(u["candidates"])) for _ in range(k)]
                    + [0] * (length - q - 1 - len(u["candidates"]) * k) for q, u in zip(data["query_index"], users)]
        if "label" in users[0]:
            data["labels"] = [u["label"] for u in users]
        if users[0]["target"] != -100:
            data["catalog_labels"] = [u["target"] for u in users]
        if dense:
            data["dense_catalog_labels"] = [pad(r, -100) for r in dense_labels]
        if packed:
            data["cu_seq_lens"] = offsets + [sum(lengths)]
        return data

    @staticmethod
    def _as_tensors(data: dict, return_tensors: str | None) -> BatchEncoding:
        boundaries = data.pop("cu_seq_lens", None)
        if return_tensors == "pt":
            data = {key: torch.tensor(value, dtype=torch.bool if key == "distillation_positions" else torch.long)
                    for key, value in data.items()}
        elif return_tensors is not None:
            raise ValueError(f"return_tensors must be 'pt' or None, got {return_tensors!r}")
        if boundaries is not None:  # as Transformers' DataCollatorWithFlattening names them
            longest = max(b - a for a, b in zip(boundaries, boundaries[1:]))
            if return_tensors == "pt":
                boundaries = torch.tensor(boundaries, dtype=torch.int32)
            data.update(cu_seq_lens_q=boundaries, cu_seq_lens_k=boundaries, max_length_q=longest, max_length_k=longest)
        return BatchEncoding(data)

    def save_pretrained(self, save_directory, *args, **kwargs):
        """ProcessorMixin.save_pretrained, atomic per file: everything is written to a temporary folder beside
        `save_directory`, then each file is moved into place with an atomic rename, so a killed or failed save leaves
        every earlier file whole (the catalog lives in processor_config.json: a truncated one would lose it)."""
        if kwargs.get("push_to_hub"):
            return super().save_pretrained(save_directory, *args, **kwargs)
        from filelock import FileLock

        target = os.path.abspath(save_directory)
        os.makedirs(target, exist_ok=True)
        # The lock a model save to the same folder takes (`atomic_files.exclusive_writer`), so neither reverts the
        # other's files; while it is held, folders that killed processor saves left behind are removed.
        with FileLock(os.path.join(os.path.dirname(target), ".speeder-save.lock"), is_singleton=True):
            for stale in glob.glob(os.path.join(glob.escape(target), ".processor-saving-*")):
                shutil.rmtree(stale, ignore_errors=True)
            return self._save_files_atomically(target, *args, **kwargs)

    def _save_files_atomically(self, target: str, *args, **kwargs):
        tmp = tempfile.mkdtemp(prefix=".processor-saving-", dir=target)
        try:
            saved = super().save_pretrained(tmp, *args, **kwargs)
            umask = os.umask(0)
            os.umask(umask)
            for root, _, files in os.walk(tmp):
                relative = os.path.relpath(root, tmp)
                os.makedirs(os.path.join(target, relative), exist_ok=True)
                for name in files:
                    source = os.path.join(root, name)
                    with open(source, "rb") as f:
                        os.fsync(f.fileno())
                    os.chmod(source, 0o666 & ~umask)
                    os.replace(source, os.path.join(target, relative, name))
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return [os.path.join(target, os.path.relpath(f, tmp)) for f in saved] if isinstance(saved, list) else saved

    @staticmethod
    def _checked_padding_side(side: str) -> str:
        if side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {side!r}")
        return side

    @property
    def model_input_names(self):
        return ["input_ids", "attention_mask", "position_ids", "item_token_index", "recency_index", "last_item_index",
                "mm_token_type_ids", "query_index",
                "candidate_item_index", "candidate_token_index", "candidate_segment_ids"]


__all__ = ["DEFAULT_PROMPT_BRIDGE", "DEFAULT_PROMPT_PREFIX", "TOKEN_TYPES", "SpeederProcessor", "catalog_fingerprint"]
