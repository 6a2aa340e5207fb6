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


def run_inspect(recipe, samples: int = 3, as_json: bool = False, split: str = "train", out=None, colour: Optional[bool] = None) -> int:
    """Print ``samples`` samples of the recipe's prepared data (building the cache if needed)."""
    from affinage.data.prepare import prepare

    out = out or sys.stdout
    tokenizer = _tokenizer(recipe)
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
