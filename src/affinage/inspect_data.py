"""``affinage inspect``: what the model will be trained on, read from the cache ``train`` reads.

Each sample (a segment of a packed row) is decoded and shown with its loss-bearing parts marked:
colour on a terminal, ``[[...]]`` otherwise, or ``--json`` (one object per line whose ``segments``
cover the whole rendering). Masking bugs (a role header trained on, a reply left out) show at a glance,
as with axolotl's ``preprocess --debug``.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from typing import Iterator, Optional

from affinage.errors import UserError

LOSS_ON = "\x1b[30;42m"  # black on green
LOSS_OFF = "\x1b[0m"


@dataclass
class InspectedSample:
    index: int
    row: int
    tokens: int
    loss_tokens: int
    at_max_length: bool
    segments: list[dict]

    def as_dict(self) -> dict:
        return {"sample": self.index, "row": self.row, "tokens": self.tokens, "loss_tokens": self.loss_tokens,
                "truncated": self.at_max_length, "segments": self.segments}


def _tokenizer(recipe):
    from affinage.model.load import load_tokenizer

    try:
        return load_tokenizer(recipe.model)
    except UserError as e:
        raise type(e)(
            f"{e} — inspect needs only the tokenizer: point the recipe at a local one with "
            "--set model.tokenizer=PATH (for example a folder of ../shared/tokenizers)"
        ) from None


def iter_samples(recipe, cache, tokenizer, split: str = "train") -> Iterator[InspectedSample]:
    """Samples of the cache split in row order, decoded into loss/no-loss segments."""
    from affinage.data.templates import loss_segments

    part = cache.train if split == "train" else cache.heldout
    if part is None:
        raise UserError(f"the prepared data has no {split} split (set data.heldout_fraction to keep one)")
    n = 0
    max_length = recipe.data.max_length
    for r in range(len(part)):
        row = part[r]
        start = 0
        for length in row["seq_lens"].tolist():
            ids = row["input_ids"][start : start + length]
            mask = row["loss_mask"][start : start + length]
            start += length
            yield InspectedSample(n, r, int(length), int(mask.sum()), int(length) >= max_length,
                                  loss_segments(tokenizer, ids.tolist(), mask.tolist()))
            n += 1


def format_sample(s: InspectedSample, colour: bool) -> str:
    head = (f"── sample {s.index} (row {s.row}) · {s.tokens} tokens, {s.loss_tokens} with loss"
            + (" · at max_length: cut (sft) or a piece of a longer document (cpt)" if s.at_max_length else ""))
    body = "".join((LOSS_ON + seg["text"] + LOSS_OFF if colour else "[[" + seg["text"] + "]]") if seg["loss"] else seg["text"]
                   for seg in s.segments)
    return head + "\n" + body


def iter_pairs(cache, tokenizer, split: str = "train") -> Iterator[dict]:
    """dpo/kto caches: each example's prompt (no loss) followed by each completion (loss), decoded."""
    from affinage.data.templates import loss_segments

    part = cache.train if split == "train" else cache.heldout
    if part is None:
        raise UserError(f"the prepared data has no {split} split (set data.heldout_fraction to keep one)")
    for i in range(len(part)):
        ex = part[i]
        p = ex["prompt_ids"]
        item = {"example": i, "prompt_tokens": len(p)}
        for key in ("chosen", "rejected", "completion"):
            if f"{key}_ids" in ex:
                c = ex[f"{key}_ids"]
                item[key] = {"tokens": len(c), "segments": loss_segments(tokenizer, p + c, [False] * len(p) + [True] * len(c))}
        if "label" in ex:
            item["label"] = ex["label"]
        yield item


def format_pair(item: dict, colour: bool) -> str:
    parts = [f"── example {item['example']} · prompt {item['prompt_tokens']} tokens"
             + (f" · label {'desirable' if item['label'] else 'undesirable'}" if "label" in item else "")]
    for key in ("chosen", "rejected", "completion"):
        if key in item:
            body = "".join((LOSS_ON + g["text"] + LOSS_OFF if colour else "[[" + g["text"] + "]]") if g["loss"] else g["text"]
                           for g in item[key]["segments"])
            parts.append(f"·· {key} ({item[key]['tokens']} tokens with loss)\n{body}")
    return "\n".join(parts)


def run_inspect(recipe, samples: int = 3, as_json: bool = False, split: str = "train", out=None, colour: Optional[bool] = None) -> int:
    """Print ``samples`` samples of the recipe's prepared data (building the cache if needed)."""
    from affinage.data.prepare import prepare

    out = out or sys.stdout
    tokenizer = _tokenizer(recipe)
    if recipe.task in ("dpo", "kto"):  # pairs: the prompt never carries loss, each completion does
        cache = prepare(recipe, tokenizer, progress=False)
        colour = (hasattr(out, "isatty") and out.isatty()) if colour is None else colour
        for n, item in zip(range(samples), iter_pairs(cache, tokenizer, split)):
            out.write((json.dumps(item, ensure_ascii=False) if as_json else format_pair(item, colour) + "\n") + "\n")
        if not as_json:
            t = cache.stats["totals"][split]
            out.write(f"── {cache.path} ({'hit' if cache.hit else 'built'}) · {split}: {t.get('samples', 0)} examples, "
                      f"{t.get('tokens', 0):,} tokens, {t.get('prompt_truncated', 0)} prompts and "
                      f"{t.get('completion_truncated', 0)} completions truncated\n")
        return 0
    if recipe.task == "sft":
        from affinage.data.templates import resolve_chat_template

        resolve_chat_template(tokenizer, recipe.model.chat_template, recipe.model.name_or_path)
    cache = prepare(recipe, tokenizer, progress=False)
    if colour is None:
        colour = hasattr(out, "isatty") and out.isatty()
    shown = 0
    for s in iter_samples(recipe, cache, tokenizer, split):
        if shown >= samples:
            break
        if as_json:
            out.write(json.dumps(s.as_dict(), ensure_ascii=False) + "\n")
        else:
            out.write(format_sample(s, colour) + "\n\n")
        shown += 1
    if not as_json:
        totals = cache.stats["totals"][split]
        legend = "loss-bearing text in green" if colour else "loss-bearing text in [[ ]]"
        out.write(f"── {cache.path} ({'hit' if cache.hit else 'built'}) · {split}: {totals['samples']} samples, "
                  f"{totals['tokens']:,} tokens, {totals['loss_tokens']:,} with loss, {totals['truncated']} truncated · {legend}\n")
    return 0
