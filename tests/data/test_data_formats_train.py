"""Each chat format trains end to end on the tiny model: ShareGPT, OpenAI tools, reasoning traces.

Tools and reasoning are rendered by the template's own support (templates written here, in the
style of Qwen2.5's tools and Qwen3's thinking), and the prepared cache train reads is checked:
tool outputs carry no loss, tool calls and the reasoning do.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from affinage.data.prepare import prepare
from affinage.inspect_data import iter_samples
from affinage.model.load import load_tokenizer
from affinage.recipe.loader import load_recipe
from affinage.run import RunDir
from affinage.train.trainer import train

# ChatML with tools (<tool_call> JSON, tool results in a user turn) and thinking (<think> before the reply).
TEMPLATE = (
    "{%- if tools %}{{- '<|im_start|>system\\nOutils :' }}{%- for t in tools %}{{- '\\n' + t | tojson }}{%- endfor %}{{- '<|im_end|>\\n' }}{%- endif %}"
    "{%- for m in messages %}"
    "{%- if m.role == 'assistant' %}{{- '<|im_start|>assistant\\n' }}"
    "{%- if m.reasoning_content %}{{- '<think>\\n' + m.reasoning_content + '\\n</think>\\n\\n' }}{%- endif %}"
    "{{- m.content }}"
    "{%- for c in m.tool_calls or [] %}{{- '<tool_call>\\n{\"name\": \"' + c.function.name + '\", \"arguments\": ' + c.function.arguments | tojson + '}\\n</tool_call>' }}{%- endfor %}"
    "{{- '<|im_end|>\\n' }}"
    "{%- elif m.role == 'tool' %}{{- '<|im_start|>user\\n<tool_response>\\n' + m.content + '\\n</tool_response><|im_end|>\\n' }}"
    "{%- else %}{{- '<|im_start|>' + m.role + '\\n' + m.content + '<|im_end|>\\n' }}{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

CITIES = ["Lyon", "Rennes", "Lille", "Nantes", "Brest", "Dijon", "Tours", "Nice"]


def records(kind: str) -> list[dict]:
    out = []
    for i, city in enumerate(CITIES * 2):
        deg = 10 + i
        if kind == "sharegpt":
            out.append({"conversations": [{"from": "human", "value": f"Quelle est la préfecture proche de {city} ?"},
                                          {"from": "gpt", "value": f"La préfecture de {city} est en centre-ville."}]})
        elif kind == "tools":
            out.append({
                "tools": [{"type": "function", "function": {"name": "meteo", "parameters": {"type": "object"}}}],
                "messages": [
                    {"role": "user", "content": f"Quel temps à {city} ?"},
                    {"role": "assistant", "content": "", "tool_calls": [{"type": "function", "function": {"name": "meteo", "arguments": {"ville": city}}}]},
                    {"role": "tool", "content": f"RESULTAT {deg} degres"},
                    {"role": "assistant", "content": f"Il fait {deg} degrés à {city}."},
                ]})
        else:
            out.append({"messages": [
                {"role": "user", "content": f"Combien font {i} plus {i} ?"},
                {"role": "assistant", "reasoning_content": f"Je double {i}.", "content": f"{i} plus {i} font {2 * i}."}]})
    return out


def run_format(tmp_path: Path, model_dir: Path, kind: str, fmt: str):
    data = tmp_path / f"{kind}.jsonl"
    data.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records(kind)), encoding="utf-8")
    (tmp_path / "t.jinja").write_text(TEMPLATE, encoding="utf-8")
    (tmp_path / "recipe.yaml").write_text(f"""
name: fmt-{kind}
task: sft
seed: 3
model: {{name_or_path: {model_dir}, dtype: float32, chat_template: {tmp_path / 't.jinja'}}}
method: {{kind: full}}
data:
  sources: [{{path: {data}, format: {fmt}}}]
  max_length: 320
  num_proc: 1
  cache_dir: {tmp_path / 'cache'}
training: {{global_batch_size: 4, micro_batch_size: 4, duration: 6 steps, learning_rate: 3e-3, lr_scheduler: constant, report_to: [none]}}
output: {{dir: {tmp_path / 'run'}}}
""", encoding="utf-8")
    recipe = load_recipe(tmp_path / "recipe.yaml")
    run = RunDir.create(recipe.run_dir())
    result = train(recipe, run)
    losses = [m["loss"] for m in run.read_metrics() if "loss" in m]
    tok = load_tokenizer(recipe.model)
    tok.chat_template = TEMPLATE
    cache = prepare(recipe, tok)
    assert cache.hit  # inspect and train read the same cache
    samples = list(iter_samples(recipe, cache, tok))
    return result, losses, samples


def loss_text(s) -> str:
    return "".join(seg["text"] for seg in s.segments if seg["loss"])


def test_sharegpt_trains(tmp_path, tiny_llama_dir):
    result, losses, samples = run_format(tmp_path, tiny_llama_dir, "sharegpt", "auto")
    assert result.completed and result.steps == 6 and all(np.isfinite(losses))
    assert len(samples) == 16
    for s in samples:
        assert "La préfecture de" in loss_text(s) and "<|im_end|>" in loss_text(s)
        assert "Quelle est" not in loss_text(s) and "<|im_start|>" not in loss_text(s)


def test_openai_tools_train_and_tool_outputs_carry_no_loss(tmp_path, tiny_llama_dir):
    result, losses, samples = run_format(tmp_path, tiny_llama_dir, "tools", "chat")
    assert result.completed and all(np.isfinite(losses))
    for s in samples:
        lt = loss_text(s)
        assert '"name": "meteo"' in lt and "<tool_call>" in lt  # the call is learnt
        assert "RESULTAT" not in lt and "Outils" not in lt  # the tool's output and definitions are prompt
        assert "RESULTAT" in "".join(seg["text"] for seg in s.segments)
        assert "degrés à" in lt


def test_reasoning_trains_with_the_thinking_in_the_loss(tmp_path, tiny_llama_dir):
    result, losses, samples = run_format(tmp_path, tiny_llama_dir, "reasoning", "auto")
    assert result.completed and all(np.isfinite(losses))
    for s in samples:
        lt = loss_text(s)
        assert lt.startswith("<think>\nJe double") and "</think>" in lt and " font " in lt
