"""Preference data (``task: dpo`` / ``task: kto``): records → prompt/completion token ids → cache.

Accepted records (one JSON object per line, or parquet/datasets rows):

- paired, explicit prompt: ``{"prompt": str | [messages], "chosen": str | [messages] | message,
  "rejected": ...}``, optional ``"system": str`` (TRL's standard and conversational formats);
- paired, implicit prompt: ``{"chosen": [messages], "rejected": [messages]}`` sharing the prompt
  turns, each ending with its assistant reply (TRL's implicit-prompt format);
- ShareGPT (LLaMA-Factory): ``{"conversations": [{"from", "value"}], "chosen": {"from": "gpt",
  "value"}, "rejected": {...}, "system": ...}``;
- unpaired (KTO): ``{"prompt", "completion", "label": bool}``, or ``{"messages"|"conversations":
  [... ending with the assistant reply], "label"|"kto_tag": bool}``.

The canonical record is ``{"prompt": [messages ending with a user turn], "chosen": str,
"rejected": str}`` or ``{"prompt": [...], "completion": str, "label": bool}``. Each completion is
rendered with the chat template as the assistant reply closing ``prompt + [reply]`` and its tokens are
the reply's span as ``affinage.data.templates.find_assistant_spans`` finds it for SFT (content plus
end-of-turn marker): the prompt tokens, earlier assistant turns included, never carry loss.

Truncation (``preference.truncation``): a pair longer than ``data.max_length`` keeps the END of its
prompt (at least ``max_prompt_length`` tokens, more if the completions leave room), then the
completions are cut at the end; or it is dropped. Both are counted in ``data_stats.json``.

The cache folder (same root and key machinery as SFT data, ``affinage.data.cache``) holds per split
flat ``uint32`` arrays with ``int64`` offsets, ready for TRL's preference collators, which take
``prompt_ids``/``chosen_ids``/``rejected_ids`` (DPO) and ``prompt_ids``/``completion_ids``/``label``
(KTO): TRL does not tokenize again (``affinage.train.preference``).

One cohesive thing (over 400 lines): the data path of preference records, from reading to the
cache (it reuses ``templates``, ``spool`` filters and ``mixture``; what is specific to pairs stays here).
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np

from affinage.data.cache import cache_root, find_or_build, key_of, verify_cache
from affinage.data.mixture import heldout_counts, source_names, weighted_indices
from affinage.data.errors import DataError, SkipCounter
from affinage.data.filters import ExactDedup, LengthFilter, NearDedup
from affinage.data.formats import nfc
from affinage.data.readers import read_source
from affinage.hashing import FileHasher

PREFERENCE_FORMAT_VERSION = 1
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system",
                  "model": "assistant", "bot": "assistant"}
PAIRED = ("prompt", "chosen", "rejected")
UNPAIRED = ("prompt", "completion")


# =================================================================================== formats
def detect_preference_format(data: dict, where: str) -> str:
    if "chosen" in data and "rejected" in data:
        return "preference"
    if "label" in data or "kto_tag" in data:
        return "unpaired"
    raise DataError(
        f"{where}: not a preference record (keys: {sorted(data)[:12]}): expected 'chosen' and 'rejected' (paired, for "
        "dpo or kto) or 'completion'/'messages' with a boolean 'label' (unpaired, kto)",
        where=where, reason="not a preference record",
    )


def _message(m: Any, where: str, what: str) -> dict:
    if not isinstance(m, dict):
        raise DataError(f"{where}: {what} is a {type(m).__name__}, expected an object with role/content (or from/value)",
                        where=where, reason="message not an object")
    if "role" in m:
        role, content = m["role"], m.get("content")
    elif "from" in m:
        role, content = SHAREGPT_ROLES.get(str(m["from"]).lower()), m.get("value")
        if role is None:
            raise DataError(f"{where}: {what}: ShareGPT speaker {m['from']!r} is not one of {sorted(SHAREGPT_ROLES)}",
                            where=where, reason="bad role")
    else:
        raise DataError(f"{where}: {what} has neither role/content nor from/value keys ({sorted(m)[:8]})",
                        where=where, reason="bad message")
    if role not in ("system", "user", "assistant"):
        raise DataError(f"{where}: {what}: role {role!r} is not system, user or assistant", where=where, reason="bad role")
    if not isinstance(content, str):
        raise DataError(f"{where}: {what}: content is {'missing' if content is None else type(content).__name__}, expected a string",
                        where=where, reason="content not a string")
    return {"role": role, "content": nfc(content)}


def _messages(value: Any, where: str, what: str) -> list[dict]:
    if isinstance(value, str):
        return [{"role": "user", "content": nfc(value)}]
    if isinstance(value, dict):
        return [_message(value, where, what)]
    if not isinstance(value, list) or not value:
        raise DataError(f"{where}: {what} must be a string or a non-empty list of messages", where=where, reason=f"bad {what}")
    return [_message(m, where, f"{what}[{i}]") for i, m in enumerate(value)]


def _reply(value: Any, where: str, what: str) -> str:
    """One assistant reply: a string, a message, or a one-message list."""
    if isinstance(value, str):
        text = value
    else:
        msgs = _messages(value, where, what)
        if len(msgs) != 1 or msgs[0]["role"] != "assistant":
            raise DataError(
                f"{where}: {what} must be one assistant reply (a string, or a single assistant message); got "
                f"{len(msgs)} message(s) with roles {[m['role'] for m in msgs]}. Put the earlier turns in 'prompt'",
                where=where, reason=f"{what} not one assistant reply",
            )
        text = msgs[0]["content"]
    if not text.strip():
        raise DataError(f"{where}: {what} is empty", where=where, reason=f"empty {what}")
    return nfc(text)


def _check_prompt(prompt: list[dict], where: str) -> list[dict]:
    first = 1 if prompt and prompt[0]["role"] == "system" else 0
    if first >= len(prompt) or prompt[first]["role"] != "user":
        raise DataError(f"{where}: the prompt must start with a user turn (after an optional system message)",
                        where=where, reason="prompt does not start with user")
    if prompt[-1]["role"] != "user":
        raise DataError(f"{where}: the prompt must end with a user turn (the reply to compare comes next)",
                        where=where, reason="prompt does not end with user")
    if any(m["role"] == "system" for m in prompt[1:]):
        raise DataError(f"{where}: a system message is only allowed first", where=where, reason="system not first")
    return prompt


def _with_system(prompt: list[dict], data: dict, where: str) -> list[dict]:
    system = data.get("system")
    if system is None or (isinstance(system, str) and not system.strip()):
        return prompt
    if not isinstance(system, str):
        raise DataError(f"{where}: 'system' must be a string", where=where, reason="system not a string")
    if prompt and prompt[0]["role"] == "system":
        raise DataError(f"{where}: both a 'system' field and a system message in the prompt; keep one", where=where,
                        reason="two system prompts")
    return [{"role": "system", "content": nfc(system)}] + prompt


def _implicit(chosen: list[dict], rejected: list[dict], where: str) -> tuple[list[dict], str, str]:
    n = 0
    while n < min(len(chosen), len(rejected)) - 1 and chosen[n] == rejected[n]:
        n += 1
    if chosen[:n] != rejected[:n] or len(chosen) != n + 1 or len(rejected) != n + 1:
        raise DataError(
            f"{where}: with no 'prompt', 'chosen' and 'rejected' must be conversations sharing every turn but the last "
            "assistant reply", where=where, reason="implicit prompt mismatch")
    for m, what in ((chosen[-1], "chosen"), (rejected[-1], "rejected")):
        if m["role"] != "assistant" or not m["content"].strip():
            raise DataError(f"{where}: the last message of {what} must be a non-empty assistant reply", where=where,
                            reason=f"{what} not ending with assistant")
    return chosen[:n], chosen[-1]["content"], rejected[-1]["content"]


def to_preference(data: dict, fmt: str, where: str) -> dict:
    """The canonical preference record of one raw record (``fmt``: preference, unpaired or auto)."""
    if fmt == "auto":
        fmt = detect_preference_format(data, where)
    if fmt == "preference":
        for key in ("chosen", "rejected"):
            if key not in data:
                raise DataError(f"{where}: paired preference record without {key!r} (keys: {sorted(data)[:12]})",
                                where=where, reason=f"missing {key!r}")
        if "prompt" in data or "conversations" in data or "messages" in data:
            key = next(k for k in ("prompt", "conversations", "messages") if k in data)
            prompt = _messages(data[key], where, key)
            chosen, rejected = _reply(data["chosen"], where, "chosen"), _reply(data["rejected"], where, "rejected")
        else:
            prompt, chosen, rejected = _implicit(_messages(data["chosen"], where, "chosen"),
                                                 _messages(data["rejected"], where, "rejected"), where)
        if chosen == rejected:
            raise DataError(f"{where}: chosen and rejected are the same text (no preference to learn)", where=where,
                            reason="identical chosen and rejected")
        return {"prompt": _check_prompt(_with_system(prompt, data, where), where), "chosen": chosen, "rejected": rejected}
    if fmt == "unpaired":
        raw = data.get("label", data.get("kto_tag"))
        if isinstance(raw, bool):
            label = raw
        elif raw in (0, 1) and not isinstance(raw, float):
            label = bool(raw)
        else:
            raise DataError(f"{where}: 'label' must be true or false (desirable or not), got {raw!r}", where=where,
                            reason="bad label")
        if "completion" in data:
            if "prompt" not in data:
                raise DataError(f"{where}: unpaired record with 'completion' but no 'prompt'", where=where, reason="missing 'prompt'")
            prompt = _messages(data["prompt"], where, "prompt")
            completion = _reply(data["completion"], where, "completion")
        else:
            key = next((k for k in ("messages", "conversations") if k in data), None)
            if key is None:
                raise DataError(f"{where}: unpaired record needs 'prompt' + 'completion' or a 'messages' conversation "
                                "ending with the assistant reply", where=where, reason="no completion")
            msgs = _messages(data[key], where, key)
            if msgs[-1]["role"] != "assistant":
                raise DataError(f"{where}: the last message of {key!r} must be the assistant reply that 'label' judges",
                                where=where, reason="no final assistant turn")
            prompt, completion = msgs[:-1], _reply(msgs[-1], where, key + "[-1]")
        return {"prompt": _check_prompt(_with_system(prompt, data, where), where), "completion": completion, "label": label}
    raise DataError(f"{where}: format {fmt!r} is not a preference format; use format: preference, unpaired or auto",
                    where=where, reason="not a preference format")


def record_text(record: dict) -> str:
    """What filters, dedup and decontamination look at: prompt turns and completion(s)."""
    parts = [m["content"] for m in record["prompt"]]
    parts += [record[k] for k in ("chosen", "rejected", "completion") if k in record]
    return "\n".join(parts)


def as_chat(record: dict) -> dict:
    """The record as one chat (for decontamination: every text it holds)."""
    return {"messages": record["prompt"] + [{"role": "assistant", "content": record[k]} for k in ("chosen", "rejected", "completion") if k in record]}


# ================================================================================ tokenization
def tokenize_completion(tokenizer, prompt: list[dict], completion: str, chat_template: Optional[str] = None) -> tuple[list[int], list[int]]:
    """(prompt ids, completion ids) of ``prompt + [assistant completion]`` rendered by the chat template.

    ``affinage.data.templates.tokenize_chat`` renders and masks the conversation exactly as for SFT;
    the completion is its last loss-bearing run (the reply and its end-of-turn marker), everything
    before it is prompt (earlier assistant turns included), text after it (a trailing newline) is
    left out.
    """
    from affinage.data.templates import tokenize_chat

    messages = list(prompt) + [{"role": "assistant", "content": completion}]
    sample = tokenize_chat(tokenizer, messages, 1 << 40, chat_template)
    mask = sample.loss_mask
    end = max((i for i, m in enumerate(mask) if m), default=-1) + 1
    if end == 0:
        raise DataError("the completion has no token of its own after rendering (empty reply?)")
    start = end
    while start > 0 and mask[start - 1]:
        start -= 1
    return list(sample.input_ids[:start]), list(sample.input_ids[start:end])


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


@dataclass
class Truncation:
    max_length: int
    max_prompt_length: int
    policy: str  # keep_prompt_end | drop

    def apply(self, prompt: list[int], completions: list[list[int]]) -> Optional[tuple[list[int], list[list[int]], bool, bool]]:
        """(prompt, completions, prompt_cut, completion_cut), or None when the pair is dropped."""
        longest = max(len(c) for c in completions)
        if len(prompt) + longest <= self.max_length:
            return prompt, completions, False, False
        if self.policy == "drop":
            return None
        keep = min(len(prompt), max(self.max_prompt_length, self.max_length - longest))
        prompt_cut = keep < len(prompt)
        prompt = prompt[len(prompt) - keep :]
        room = self.max_length - len(prompt)
        cut = any(len(c) > room for c in completions)
        return prompt, [c[:room] for c in completions], prompt_cut, cut


def tokenize_record(tokenizer, record: dict, trunc: Truncation, chat_template: Optional[str] = None) -> tuple[Optional[dict], dict]:
    """Token ids of one canonical record (None when dropped) and what happened to it (for the stats)."""
    events = {"prompt_truncated": False, "completion_truncated": False, "dropped_too_long": False,
              "prompt_boundary_adjusted": False, "identical_after_truncation": False}
    keys = [k for k in ("chosen", "rejected", "completion") if k in record]
    parts = [tokenize_completion(tokenizer, record["prompt"], record[k], chat_template) for k in keys]
    prompt = parts[0][0]
    comps = [c for _, c in parts]
    if len(parts) == 2 and parts[0][0] != parts[1][0]:
        # a BPE merge across the boundary made the prompts differ: the common prefix is the prompt (like TRL)
        n = _common_prefix(parts[0][0], parts[1][0])
        prompt = parts[0][0][:n]
        comps = [p[n:] + c for p, c in parts]
        events["prompt_boundary_adjusted"] = True
    out = trunc.apply(prompt, comps)
    if out is None:
        events["dropped_too_long"] = True
        return None, events
    prompt, comps, events["prompt_truncated"], events["completion_truncated"] = out
    if len(comps) == 2 and comps[0] == comps[1]:
        events["identical_after_truncation"] = True
        return None, events
    ids = {"prompt_ids": prompt}
    for k, c in zip(keys, comps):
        ids[f"{k}_ids"] = c
    if "label" in record:
        ids["label"] = bool(record["label"])
    return ids, events


# ======================================================================================== store
KINDS = {"paired": ("prompt", "chosen", "rejected"), "unpaired": ("prompt", "completion")}


class PreferenceSplit:
    """One split: ``split[i]`` is ``{"prompt_ids", "chosen_ids", "rejected_ids"}`` (paired) or
    ``{"prompt_ids", "completion_ids", "label"}`` (unpaired), lists of ints."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.meta = json.loads((self.folder / "split.json").read_text(encoding="utf-8"))
        self.kind = self.meta["kind"]
        self.arrays = {}
        for part in KINDS[self.kind]:
            self.arrays[part] = (np.load(self.folder / f"{part}_ids.npy", mmap_mode="r"),
                                 np.asarray(np.load(self.folder / f"{part}_offsets.npy")))
        self.label = np.load(self.folder / "label.npy") if self.kind == "unpaired" else None
        self.source = np.load(self.folder / "source.npy")

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, i: int) -> dict:
        if not -len(self) <= i < len(self):
            raise IndexError(i)
        i %= len(self)
        out = {}
        for part, (ids, off) in self.arrays.items():
            out[f"{part}_ids"] = [int(x) for x in ids[off[i] : off[i + 1]]]
        if self.label is not None:
            out["label"] = bool(self.label[i])
        return out

    @property
    def num_tokens(self) -> int:
        return int(sum(off[-1] for _, off in self.arrays.values()))

    def columns(self) -> dict[str, list]:
        """Column lists for ``datasets.Dataset.from_dict`` (TRL's trainers take a ``Dataset``)."""
        rows = [self[i] for i in range(len(self))]
        return {k: [r[k] for r in rows] for k in (rows[0] if rows else {})}

    def to_dataset(self):
        from datasets import Dataset

        return Dataset.from_dict(self.columns())


def _write_split(folder: Path, kind: str, samples: list[dict], sources: list[int]) -> dict:
    folder.mkdir(parents=True, exist_ok=True)
    counts = {}
    for part in KINDS[kind]:
        seqs = [s[f"{part}_ids"] for s in samples]
        off = np.zeros(len(seqs) + 1, np.int64)
        off[1:] = np.cumsum([len(x) for x in seqs]) if seqs else []
        flat = np.fromiter((t for x in seqs for t in x), dtype=np.uint32, count=int(off[-1]))
        np.save(folder / f"{part}_ids.npy", flat)
        np.save(folder / f"{part}_offsets.npy", off)
        counts[f"{part}_tokens"] = int(off[-1])
    if kind == "unpaired":
        np.save(folder / "label.npy", np.asarray([s["label"] for s in samples], dtype=np.uint8))
        counts["desirable"] = int(sum(s["label"] for s in samples))
        counts["undesirable"] = len(samples) - counts["desirable"]
    np.save(folder / "source.npy", np.asarray(sources, dtype=np.int32))
    (folder / "split.json").write_text(json.dumps({"kind": kind, "samples": len(samples), **counts}), encoding="utf-8")
    return {"samples": len(samples), **counts}


@dataclass
class PreferenceCache:
    """A prepared preference folder (same cache root and key machinery as SFT data)."""

    path: Path
    key: str
    meta: dict
    stats: dict
    train: PreferenceSplit
    heldout: Optional[PreferenceSplit]
    hit: bool = False
    seconds: float = 0.0

    @classmethod
    def open(cls, path: Path, hit: bool = False, seconds: float = 0.0) -> "PreferenceCache":
        path = Path(path)
        verify_cache(path)  # sizes and checksums recorded at publish, as for SFT/CPT rows
        meta = json.loads((path / "meta.json").read_text(encoding="utf-8"))
        if meta.get("preference_format") != PREFERENCE_FORMAT_VERSION:
            raise DataError(f"{path}: preference cache format {meta.get('preference_format')} is not {PREFERENCE_FORMAT_VERSION}; delete it")
        stats = json.loads((path / "stats.json").read_text(encoding="utf-8"))
        held = PreferenceSplit(path / "heldout") if (path / "heldout" / "split.json").is_file() else None
        return cls(path, meta["key"], meta, stats, PreferenceSplit(path / "train"), held if held is not None and len(held) else None, hit, seconds)


# ======================================================================================= prepare
def preference_key_inputs(recipe, base_inputs: dict) -> dict:
    """The SFT cache key's inputs (sources, tokenizer, template, data settings) plus the preference settings."""
    inputs = dict(base_inputs)
    p = recipe.preference
    inputs["preference_format"] = PREFERENCE_FORMAT_VERSION
    inputs["preference"] = {"max_prompt_length": p.prompt_budget(recipe.data.max_length), "truncation": p.truncation,
                            "unpair_train": recipe.task == "kto"}
    return inputs


def prepare_preference(recipe, tokenizer=None, *, key_inputs, root=None, progress=None, force: bool = False) -> PreferenceCache:
    """The recipe's prepared preference data: found in the cache or built (one builder per key).

    ``key_inputs(recipe, tokenizer, hasher)``: ``affinage.data.prepare.cache_key_inputs`` (passed in by
    ``prepare``, the one entry point, so that this module does not import it back).
    """
    t0 = time.perf_counter()
    root = Path(root) if root is not None else cache_root(recipe.data)
    root.mkdir(parents=True, exist_ok=True)
    hasher = FileHasher(root)
    inputs = preference_key_inputs(recipe, key_inputs(recipe, tokenizer, hasher))
    key = "pref-" + key_of(inputs)

    def build(tmp: Path) -> None:
        tok = tokenizer
        if tok is None:
            from affinage.model.load import load_tokenizer

            tok = load_tokenizer(recipe.model)
        _build(recipe, tok, tmp, inputs, key)

    return find_or_build(root, key, force=force, hasher=hasher, build=build,
                         open_cache=lambda folder, hit: PreferenceCache.open(folder, hit=hit, seconds=time.perf_counter() - t0))


@dataclass
class _Source:
    name: str
    spec: Any
    records: list = field(default_factory=list)  # (where, canonical record)
    read: int = 0
    skips: SkipCounter = field(default_factory=SkipCounter)
    dropped: dict = field(default_factory=dict)
    counts: dict = field(default_factory=dict)
    fmt: Optional[str] = None


def _drop(st: _Source, reason: str) -> None:
    st.dropped[reason] = st.dropped.get(reason, 0) + 1


def _build(recipe, tokenizer, out: Path, inputs: dict, key: str) -> None:
    from affinage.data.templates import resolve_chat_template

    data, p, seed = recipe.data, recipe.preference, recipe.seed
    t_start = time.perf_counter()
    resolve_chat_template(tokenizer, recipe.model.chat_template, recipe.model.name_or_path)
    f = data.filters
    length = LengthFilter(f.min_chars, f.max_chars)
    exact = ExactDedup() if f.exact_dedup else None
    near = NearDedup(f.near_dedup_threshold, f.near_dedup_num_perm, f.near_dedup_ngram) if f.near_dedup else None
    decon = None
    if data.decontamination is not None:
        from affinage.data.decontam import build_eval_index

        decon = build_eval_index(data.decontamination)

    # ---- read, convert, filter
    sources: list[_Source] = []
    for spec, name in zip(data.sources, source_names(data.sources)):
        st = _Source(name, spec)
        sources.append(st)
        fmt = spec.format
        if fmt in ("text", "chat", "alpaca"):
            raise DataError(
                f"data source {name!r} ({spec.path}) has format: {fmt}, but task: {recipe.task} trains on preference data; "
                "use format: preference (chosen/rejected) or unpaired (completion + label), or auto"
            )
        for raw in read_source(spec, data.on_bad_record, st.skips):
            try:
                record = to_preference(raw.data, fmt, raw.where)
            except DataError as e:
                if data.on_bad_record != "skip":
                    raise
                st.skips.add_error(e)
                continue
            st.fmt = st.fmt or ("preference" if "chosen" in record else "unpaired")
            st.read += 1
            doc = record_text(record)
            reason = length.reason(doc)
            if reason is None and exact is not None and exact.is_duplicate(doc):
                reason = "exact_duplicate"
            if reason is None and near is not None and near.is_duplicate(doc):
                reason = "near_duplicate"
            if reason is None and decon is not None and decon.check(as_chat(record)) is not None:
                reason = "contaminated" if data.decontamination.action == "drop" else None
                st.counts["contaminated_reported"] = st.counts.get("contaminated_reported", 0) + 1
            if reason is not None:
                _drop(st, reason)
                continue
            st.records.append((raw.where, record))
            if spec.max_records and st.read >= spec.max_records:
                break
        if st.read == 0:
            raise DataError(f"data source {name!r} ({spec.path}) gave no usable preference record"
                            + (f" ({st.skips.count} skipped, e.g. {st.skips.examples[:3]})" if st.skips.count else " (it is empty)"))
    if recipe.task == "dpo":
        for st in sources:
            if st.fmt == "unpaired":
                raise DataError(f"data source {st.name!r} ({st.spec.path}) is unpaired (completion + label): DPO needs "
                                "chosen/rejected pairs; use task: kto for unpaired data")

    # ---- split, weight, tokenize
    trunc = Truncation(data.max_length, p.prompt_budget(data.max_length), p.truncation)
    unpair = recipe.task == "kto"
    hcounts = heldout_counts([len(s.records) for s in sources], data.heldout_fraction, data.heldout_max)
    splits: dict[str, list] = {"train": [], "heldout": []}
    heldout_kind = "unpaired" if all(s.fmt == "unpaired" for s in sources) else "paired"
    t_tok = time.perf_counter()
    tokens = 0
    for si, (st, k) in enumerate(zip(sources, hcounts)):
        n = len(st.records)
        held = set(random.Random(f"{seed}/heldout/{st.name}").sample(range(n), k)) if n else set()
        train_idx = [i for i in range(n) if i not in held]
        uses = np.bincount(np.asarray(weighted_indices(len(train_idx), st.spec.weight, random.Random(f"{seed}/weight/{st.name}")),
                                      dtype=np.int64), minlength=len(train_idx)) if train_idx else []
        use_of = {i: int(u) for i, u in zip(train_idx, uses)}
        c = {s: {"records": 0, "samples": 0, "prompt_truncated": 0, "completion_truncated": 0, "dropped_too_long": 0,
                 "identical_after_truncation": 0, "prompt_boundary_adjusted": 0, "tokens": 0} for s in ("train", "heldout")}
        for i, (where, record) in enumerate(st.records):
            split = "heldout" if i in held else "train"
            times = 1 if split == "heldout" else use_of[i]
            if times == 0:
                continue
            c[split]["records"] += 1
            try:
                ids, ev = tokenize_record(tokenizer, record, trunc)
            except DataError as e:
                e = DataError(f"{where}: {e}", where=where, reason="chat template error")
                if data.on_bad_record != "skip":
                    raise e from None
                st.skips.add_error(e)
                continue
            for name_, on in ev.items():
                c[split][name_] += int(on) * times
            if ids is None:
                continue
            n_tok = sum(len(v) for kk, v in ids.items() if kk.endswith("_ids"))
            tokens += n_tok
            if unpair and split == "train" and "chosen_ids" in ids:
                samples = [{"prompt_ids": ids["prompt_ids"], "completion_ids": ids["chosen_ids"], "label": True},
                           {"prompt_ids": ids["prompt_ids"], "completion_ids": ids["rejected_ids"], "label": False}]
            elif split == "heldout" and heldout_kind == "paired" and "completion_ids" in ids:
                continue  # unpaired held-out records of a mixed set cannot be scored as pairs
            else:
                samples = [ids]
            for _ in range(times):
                for s in samples:
                    splits[split].append((s, si))
                    c[split]["samples"] += 1
                    c[split]["tokens"] += sum(len(v) for kk, v in s.items() if kk.endswith("_ids"))
        st.counts.update(c)
    t_tok = time.perf_counter() - t_tok
    if not splits["train"]:
        raise DataError("the preference training set is empty after reading, filtering and truncation; see data_stats.json "
                        "(raise data.max_length, or use preference.truncation: keep_prompt_end)")
    rng = np.random.default_rng(int.from_bytes(key.encode()[:8], "little") ^ seed)
    order = rng.permutation(len(splits["train"])) if data.shuffle else np.arange(len(splits["train"]))
    train = [splits["train"][j] for j in order]
    train_kind = "unpaired" if unpair or heldout_kind == "unpaired" else "paired"
    out.mkdir(parents=True, exist_ok=True)
    split_stats = {"train": _write_split(out / "train", train_kind, [s for s, _ in train], [i for _, i in train])}
    if splits["heldout"]:
        split_stats["heldout"] = _write_split(out / "heldout", heldout_kind, [s for s, _ in splits["heldout"]],
                                              [i for _, i in splits["heldout"]])
    stats = _stats(recipe, sources, split_stats, trunc, tokens, {"total": time.perf_counter() - t_start, "tokenize": t_tok})
    from affinage.run import atomic_write_json

    atomic_write_json(out / "stats.json", stats)
    atomic_write_json(out / "meta.json", {"preference_format": PREFERENCE_FORMAT_VERSION, "key": key, "inputs": inputs,
                                          "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "splits": split_stats,
                                          "pad_token_id": tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id})


def _filters(data, st: _Source) -> dict:
    """Per filter: documents dropped (the SFT stats' shape, read by provenance); enabled filters listed at 0."""
    f = data.filters
    on = {"too_short_chars": f.min_chars > 0, "too_long_chars": f.max_chars is not None, "exact_duplicate": f.exact_dedup,
          "near_duplicate": f.near_dedup, "contaminated": data.decontamination is not None and data.decontamination.action == "drop"}
    return {k: {"dropped": st.dropped.get(k, 0)} for k in on if on[k] or k in st.dropped}


def _stats(recipe, sources: list[_Source], split_stats: dict, trunc: Truncation, tokens: int, seconds: dict) -> dict:
    per = {}
    for st in sources:
        per[st.name] = {"path": st.spec.path, "kind": "preference", "format": st.fmt, "weight": st.spec.weight,
                        "licence": st.spec.licence, "origin": st.spec.origin, "records_read": st.read,
                        "skipped": st.skips.as_dict(), "filters": _filters(recipe.data, st),
                        "documents_kept": len(st.records), "train": st.counts["train"], "heldout": st.counts["heldout"]}
        if "contaminated_reported" in st.counts:
            per[st.name]["contamination"] = {"documents": st.counts["contaminated_reported"],
                                             "action": recipe.data.decontamination.action}
    totals = {}
    for part in ("train", "heldout"):
        agg: dict[str, int] = {}
        for s in per.values():
            for k, v in s[part].items():
                agg[k] = agg.get(k, 0) + v
        totals[part] = agg
    return {
        "task": recipe.task, "kind": "preference", "seed": recipe.seed, "max_length": trunc.max_length,
        "truncation": {"policy": trunc.policy, "max_prompt_length": trunc.max_prompt_length,
                       "rule": "keep the end of the prompt (at least max_prompt_length tokens), then cut the completions' ends"
                       if trunc.policy == "keep_prompt_end" else "pairs longer than max_length are dropped"},
        "sources": per, "totals": totals, "splits": split_stats,
        "tokenization": {"tokens": tokens, "tokens_per_second": round(tokens / seconds["tokenize"], 1) if seconds["tokenize"] else None},
        "seconds": {k: round(v, 3) for k, v in seconds.items()},
    }


def format_preference_summary(cache: PreferenceCache) -> str:
    s = cache.stats
    lines = ["", "── affinage prepare (preference) " + "─" * 27,
             f"cache           {cache.path}  ({'hit' if cache.hit else 'built'} in {cache.seconds:.2f} s)"]
    for name, src in s["sources"].items():
        drops = ", ".join(f"{k} {v['dropped']}" for k, v in src["filters"].items()) or "no filter"
        t = src["train"]
        lines.append(f"{name:<15} {src['records_read']} read, {src['documents_kept']} kept ({drops}); {t['samples']} train "
                     f"samples, {src['heldout']['samples']} held out; truncated: {t['prompt_truncated']} prompts, "
                     f"{t['completion_truncated']} completions, {t['dropped_too_long']} dropped")
    tr = s["truncation"]
    lines.append(f"truncation      {tr['policy']}, max_length {s['max_length']}, max_prompt_length {tr['max_prompt_length']}")
    return "\n".join(lines)
