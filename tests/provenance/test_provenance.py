"""Provenance manifest, model card, AI Act summary draft, compute check and energy, on a run trained here."""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import pytest
import yaml

from affinage.provenance import regenerate, write_run_provenance
from affinage.provenance import compute, energy
from affinage.provenance.language import detect
from affinage.provenance.environment import training_time
from affinage.provenance.secrets import REDACTED, scrub
from affinage.recipe.loader import load_recipe_dict, write_resolved
from affinage.run import RunDir
from affinage.train.trainer import train
from testlib import DEMO_DATA, needs_shared, shared_dir

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "eval"))
from eval_helpers import legal_file, one_torch_thread, write_jsonl  # noqa: E402, F401 (autouse fixture)

HF_SECRET = "hf_SENTINELxxSENTINELxxSENTINELxx42"
WANDB_SECRET = "wandb-sentinel-0f1e2d3c4b5a69788796"


@pytest.fixture(scope="module")
def full_run(tmp_path_factory, tiny_llama_dir):
    """A short full fine-tune of the tiny Llama on law text (shared corpus when present) plus a source
    without any licence, and one whose licence comes from a sidecar file; secrets set in the environment."""
    mp = pytest.MonkeyPatch()
    mp.setenv("HF_TOKEN", HF_SECRET)
    mp.setenv("WANDB_API_KEY", WANDB_SECRET)
    root = tmp_path_factory.mktemp("prov")
    nolicence = write_jsonl(root / "notes.jsonl", [{"text": "Le préfet représente l'État dans le département."}] * 12)
    sidecar_src = write_jsonl(root / "faq.jsonl", [{"text": "Le maire est élu par le conseil municipal."}] * 12)
    (root / "faq.jsonl.provenance.yaml").write_text(
        "licence: CC-BY-4.0\norigin: written for the tests\ncategory: crawled\ndomains: [example.org]\n"
        "opt_out: robots.txt honoured\ncollected: 2026-10\n", encoding="utf-8")
    recipe = load_recipe_dict({
        "name": "prov-full", "task": "cpt", "seed": 1, "description": "Provenance test run.",
        "model": {"name_or_path": str(tiny_llama_dir), "dtype": "float32"},
        "method": {"kind": "full"},
        "data": {"sources": [{"path": str(legal_file()), "format": "text", "max_records": 24, "name": "legal"},
                             {"path": str(nolicence), "format": "text"},
                             {"path": str(sidecar_src), "format": "text", "name": "faq"}],
                 "max_length": 96},
        "training": {"global_batch_size": 4, "micro_batch_size": 4, "duration": "3 steps", "learning_rate": 1e-3,
                     "report_to": ["none"]},
        "card": {"license": "apache-2.0", "intended_use": "Tests only.",
                 "sources": {"legal": {"category": "public", "description": "French legal codes"}}},
        "output": {"dir": str(root / "run")},
    })
    run = RunDir.create(recipe.run_dir())
    write_resolved(recipe, run.recipe)
    result = train(recipe, run)
    written = write_run_provenance(recipe, run, result)
    yield recipe, run, written
    mp.undo()


def test_manifest_hashes_licences_and_counts(full_run):
    recipe, run, written = full_run
    m = json.loads(written["manifest"].read_text(encoding="utf-8"))
    by = {s["name"]: s for s in m["sources"]}
    assert by["legal"]["sha256"] == hashlib.sha256(legal_file().read_bytes()).hexdigest()
    assert by["legal"]["records"]["read"] == 24 and by["legal"]["tokens"]["train"] > 0
    assert by["legal"]["sample"]["language_share"]["fr"] > 0.9
    assert by["notes.jsonl"]["licence"] is None and any("no licence" in f for f in by["notes.jsonl"]["flags"])
    # the shared legal codes carry a licence in each record; the demo's law file (fresh clone) does not
    assert m["totals"]["sources_without_licence"] == (["notes.jsonl"] if shared_dir() else ["legal", "notes.jsonl"])
    faq = by["faq"]
    assert faq["licence"] == "CC-BY-4.0" and faq["licence_from"].startswith("sidecar") and faq["category"] == "crawled"
    assert faq["domains"] == ["example.org"] and faq["opt_out"] == "robots.txt honoured"
    base = m["base_model"]
    for f in base["files"]:
        assert f["sha256"] == hashlib.sha256((Path(base["resolved_path"]) / f["name"]).read_bytes()).hexdigest()
    assert {f["name"] for f in base["files"]} >= {"config.json", "model.safetensors", "tokenizer.json"}
    assert base["parameters"] == compute.config_parameters(Path(base["resolved_path"]))
    assert m["recipe"]["sha256"] == hashlib.sha256(run.recipe.read_bytes()).hexdigest()
    assert m["recipe"]["resolved"]["name"] == "prov-full"
    assert m["software"]["affinage"] and m["software"]["libraries"]["torch"]
    assert m["hardware"]["recorded_by"] == "training process" and m["hardware"]["device_kind"] == "cpu"
    c = m["compute"]
    assert c["flops"] == 6 * c["parameters"] * c["tokens_trained"] and c["train_seconds"] > 0
    assert m["energy"]["kwh"] > 0 and m["outputs"]["final"]["files"]


@needs_shared
def test_shared_corpus_hashes_match_its_sha256sums_and_record_licences_are_read(full_run):
    _, run, written = full_run
    sums = dict(line.split()[::-1] for line in (shared_dir() / "data" / "SHA256SUMS").read_text().splitlines() if line.strip())
    m = json.loads(written["manifest"].read_text(encoding="utf-8"))
    legal = next(s for s in m["sources"] if s["name"] == "legal")
    assert legal["sha256"] == sums["fr_legal_codes.jsonl"]
    assert legal["sample"]["record_licences"]  # the records carry their own licence field


def test_no_secret_from_the_environment_in_any_written_file(full_run, monkeypatch):
    recipe, run, _ = full_run
    monkeypatch.setenv("HF_TOKEN", HF_SECRET)
    monkeypatch.setenv("WANDB_API_KEY", WANDB_SECRET)
    regenerate(run.root)
    files = [p for p in run.root.rglob("*") if p.is_file()]
    assert len(files) > 10
    for p in files:
        data = p.read_bytes()
        assert HF_SECRET.encode() not in data and WANDB_SECRET.encode() not in data, p
    assert scrub(f"token={HF_SECRET} key {WANDB_SECRET}") == f"token={REDACTED} key {REDACTED}"
    assert scrub("hf_" + "a" * 34) == REDACTED  # token-shaped, even when no variable holds it


def test_model_card_has_hugging_face_metadata_and_the_sections(full_run):
    _, run, written = full_run
    text = (run.final / "README.md").read_text(encoding="utf-8")
    front = yaml.safe_load(text.split("---")[1])
    assert front["license"] == "apache-2.0" and front["language"] == ["fr"] and front["library_name"] == "transformers"
    assert "base_model" not in front  # a local folder is not a Hub id
    assert front["co2_eq_emissions"]["emissions"] > 0 and front["co2_eq_emissions"]["geographical_location"] == "France"
    for heading in ("## Intended use", "## Training data", "## Training procedure", "## Evaluation",
                    "## Environmental impact", "## Limitations", "## Provenance and EU AI Act"):
        assert heading in text
    assert "Tests only." in text and "**none declared**" in text and "CC-BY-4.0" in text


def test_ai_act_summary_follows_the_template_and_marks_what_to_complete(full_run):
    _, run, written = full_run
    text = written["ai_act_summary"].read_text(encoding="utf-8")
    for heading in ("## 1. General information", "### 1.1 Provider identification", "### 1.2 Model identification",
                    "### 1.3 Modalities, overall training data size and other characteristics", "## 2. List of data sources",
                    "### 2.1 Publicly available datasets", "### 2.3 Data crawled and scraped from online sources",
                    "### 2.5 Synthetic data", "## 3. Data processing aspects",
                    "### 3.1 Respect of reservation of rights from the text and data mining exception or limitation",
                    "### 3.2 Removal of illegal content", "## Compute check (not part of the template)"):
        assert heading in text, heading
    assert text.count("[TO COMPLETE") >= 4
    assert "Less than 1 billion tokens" in text and "French" in text
    assert "example.org" in text and "robots.txt honoured" in text  # the sidecar's crawl facts
    assert "### Not yet categorised" in text and "notes.jsonl" in text
    assert "modification (fine-tuning) of" in text


def test_compute_check_and_flops():
    flop, formula = compute.training_flops(7_000_000_000, 1_000_000_000, "lora", gradient_checkpointing=True)
    assert flop == 6 * 7e9 * 1e9 and formula.startswith("6·N·D")
    assert compute.training_flops(10, 100, "full")[0] == 6000
    qwen = compute.compute_check(1e21, "Qwen/Qwen2.5-7B-Instruct")
    assert qwen["base_flops"] == pytest.approx(6 * 7.61e9 * 18e12) and qwen["threshold"] == pytest.approx(qwen["base_flops"] / 3)
    assert qwen["likely_provider"] is False and qwen["ratio"] == pytest.approx(1e21 / qwen["threshold"])
    mistral = compute.compute_check(4e22, "mistralai/Mistral-7B-v0.3")
    assert mistral["threshold"] == pytest.approx(1e23 / 3) and mistral["likely_provider"] is True
    declared = compute.compute_check(4e22, "mistralai/Mistral-7B-v0.3", declared=3e23)
    assert declared["threshold"] == pytest.approx(1e23) and declared["likely_provider"] is False
    small = compute.compute_check(2e22, "Qwen/Qwen2.5-0.5B")  # base 5.3e22 < 1e23: not presumed GPAI
    assert small["threshold"] == pytest.approx(1e23 - 6 * 0.49e9 * 18e12) and small["likely_provider"] is False
    assert compute.compute_check(6e22, "Qwen/Qwen2.5-0.5B")["likely_provider"] is True
    scratch = compute.compute_check(2e12, "demo/model", init="random")
    assert scratch["threshold"] == 1e23 and "not presumed" in scratch["verdict"]


def test_energy_estimate_and_training_time():
    e = energy.estimate(device_seconds=3600, devices=2, device_kind="gpu", device_name="NVIDIA H100 80GB HBM3")
    assert e["power_w"] == 700 and e["device_hours"] == 2
    assert e["kwh"] == pytest.approx(2 * 0.7 * 1.2) and e["co2e_g"] == pytest.approx(2 * 0.7 * 1.2 * 60)
    v = energy.estimate(device_seconds=1800, devices=4, device_kind="gpu", device_name="Tesla V100-SXM2-32GB",
                        pue=1.0, grid_gco2_per_kwh=100)
    assert v["kwh"] == pytest.approx(2 * 0.3) and v["co2e_g"] == pytest.approx(60)
    rows = [{"train_runtime": 1.0}, {"train_runtime": 5.0}, {"loss": 2}, {"train_runtime": 0.5}, {"train_runtime": 3.0}]
    assert training_time(rows) == (8.0, 2)  # two sessions (a resume restarts the clock)


def test_language_estimate():
    assert detect("Le président de la République est élu au suffrage universel direct pour cinq ans.") == "fr"
    assert detect("The president of the Republic is elected by direct universal suffrage for five years.") == "en"
    assert detect("12 34 56") == "und"


def test_card_command_rebuilds_from_the_run_directory(full_run, capsys):
    from affinage.cli import main

    _, run, _ = full_run
    (run.root / "ai_act_summary.md").unlink()
    assert main(["card", str(run.root)]) == 0
    assert (run.root / "ai_act_summary.md").is_file() and "manifest" in capsys.readouterr().out
    m = json.loads((run.root / "provenance.json").read_text())
    assert m["hardware"]["recorded_by"] == "training process"  # kept from the training-time manifest
    assert main(["card", str(DEMO_DATA)]) == 2
