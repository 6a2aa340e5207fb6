"""Greedy completions of a few prompts, so a reader sees what the models write (not a metric).

Greedy decoding is deterministic; the seed is fixed anyway so that a model with sampling set in
its ``generation_config`` cannot make the report change between two runs. A chat (SFT) run's
prompts go through its chat template as one user turn with the generation prompt, as the model was
trained; otherwise each prompt starts with BOS like training documents. Prompts are generated one
at a time (no padding to reason about).
"""

from __future__ import annotations

from typing import Sequence

import torch

from affinage.eval.scoring import encode, model_device, prefix_id


@torch.no_grad()
def generate(model, tokenizer, prompts: Sequence[str], *, max_new_tokens: int = 48, seed: int = 1234,
             max_length: int | None = None, chat: bool = False) -> list[str]:
    """The text each prompt is continued with (prompt not repeated, special tokens dropped).

    ``chat``: render each prompt with the tokenizer's chat template (a user turn, then the
    assistant's generation prompt) instead of BOS + text."""
    device = model_device(model)
    model.eval()
    prefix = prefix_id(tokenizer)
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    outputs = []
    for prompt in prompts:
        if chat:
            text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True)
            ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])  # the template holds its own BOS, if any
        else:
            ids = ([prefix] if prefix is not None else []) + encode(tokenizer, prompt)
        if max_length:
            ids = ids[-max(1, max_length - max_new_tokens):]
        x = torch.tensor([ids], dtype=torch.long, device=device)
        torch.manual_seed(seed)
        y = model.generate(
            input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=max_new_tokens, do_sample=False,
            num_beams=1, pad_token_id=pad, eos_token_id=eos, use_cache=True,
        )
        outputs.append(tokenizer.decode(y[0, x.shape[1]:].tolist(), skip_special_tokens=True))
    return outputs
