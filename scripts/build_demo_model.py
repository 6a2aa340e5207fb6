"""Rebuild recipes/demo/model/: the demo's tiny Llama config and a tokenizer trained on the demo corpus.

No weights are shipped: demo recipes use ``model.init: random`` (a seeded random init from this
config), so the folder stays small and the run is reproducible. Run from the repository root:

    python scripts/build_demo_model.py
"""

from __future__ import annotations

import json
from pathlib import Path

from transformers import LlamaConfig

from affinage.data.templates import NAMED_TEMPLATES
from affinage.model.tiny import train_tokenizer

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "recipes" / "demo" / "data"
OUT = ROOT / "recipes" / "demo" / "model"


def demo_texts() -> list[str]:
    texts = []
    for path in sorted(DATA.glob("*.jsonl")):
        for line in path.read_text(encoding="utf-8").splitlines():
            rec = json.loads(line)
            if "messages" in rec:
                texts += [m["content"] for m in rec["messages"]]
            else:
                texts += [str(v) for k, v in rec.items() if isinstance(v, str)]
    return texts


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    tokenizer = train_tokenizer(demo_texts(), vocab_size=2048, chat_template=NAMED_TEMPLATES["chatml"])
    tokenizer.save_pretrained(str(OUT))
    tc_path = OUT / "tokenizer_config.json"
    tc = json.loads(tc_path.read_text(encoding="utf-8"))
    tc["tokenizer_class"] = "PreTrainedTokenizerFast"
    tc_path.write_text(json.dumps(tc, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=128,
        intermediate_size=384,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        architectures=["LlamaForCausalLM"],
    )
    config.save_pretrained(str(OUT))
    print(f"wrote {OUT}: vocab {len(tokenizer)}, {sum(f.stat().st_size for f in OUT.iterdir()) // 1024} KiB")


if __name__ == "__main__":
    main()
