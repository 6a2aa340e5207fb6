"""The cultural-effect demo: its evaluation sets, and its two stages + eval producing report, card and summary."""

from __future__ import annotations

import json
import re


from affinage.evaluate import evaluate as run_eval  # eval, then report and card, as `affinage eval`
from affinage.eval.sets import read_mcq, read_prompts, read_texts
from affinage.provenance import write_run_provenance
from affinage.recipe.loader import load_recipe, write_resolved
from affinage.run import RunDir
from affinage.train.trainer import train
from testlib import DEMO_DATA, REPO
from eval_helpers import one_torch_thread  # noqa: F401 (autouse)

BASE = REPO / "recipes" / "demo" / "full" / "base-general.yaml"
ADAPT = REPO / "recipes" / "demo" / "full" / "adapt-droit.yaml"


def _grams(text: str, n: int = 6) -> set:
    w = re.findall(r"\w+", text.lower())
    return {tuple(w[i : i + n]) for i in range(len(w) - n + 1)}


def test_demo_eval_sets_are_readable_and_held_out(monkeypatch):
    monkeypatch.chdir(REPO)
    spec = load_recipe(ADAPT).eval
    assert [s.role for s in spec.perplexity] == ["domain", "forgetting"]
    trained = set()
    for f in ("droit", "culture_generale", "histoire"):
        for line in (DEMO_DATA / f"{f}.jsonl").read_text(encoding="utf-8").splitlines():
            trained |= _grams(json.loads(line)["text"])
    for s in spec.perplexity:
        texts = read_texts(s.path)
        assert len(texts) >= 20
        for t in texts:  # written apart from the training text: few shared 6-word sequences
            g = _grams(t)
            assert len(g & trained) / len(g) < 0.25, t[:80]
    for s in spec.mcq:
        items = read_mcq(s.path)
        assert len(items) >= 20 and all(len(i.choices) == 4 for i in items)
        assert len({i.answer for i in items}) == 4  # the right answer is not always in the same place
    assert len(read_prompts(spec.generation.prompts, spec.generation.path)) == 8
    assert load_recipe(BASE).data.sources[0].name == "culture_generale"
    assert not any("droit" in s.path for s in load_recipe(BASE).data.sources)  # the base never sees law


def test_demo_stages_write_report_card_and_summary(tmp_path, monkeypatch):
    """Both demo recipes, shortened to a few steps, then eval: the files a reader gets."""
    monkeypatch.chdir(REPO)
    base = load_recipe(BASE, overrides=["training.duration=4 steps", "training.eval_every=2",
                                        f"output.dir={tmp_path / 'base'}"])
    run = RunDir.create(base.run_dir())
    write_resolved(base, run.recipe)
    write_run_provenance(base, run, train(base, run))
    adapt = load_recipe(ADAPT, overrides=["training.duration=4 steps", f"model.name_or_path={run.final}",
                                          f"output.dir={tmp_path / 'adapt'}"])
    arun = RunDir.create(adapt.run_dir())
    write_resolved(adapt, arun.recipe)
    write_run_provenance(adapt, arun, train(adapt, arun))
    res = run_eval(arun.root, limit=4, progress=False)
    assert [e["name"] for e in res["perplexity"]] == ["droit-heldout", "general-heldout"]
    for f in ("report.md", "provenance.json", "ai_act_summary.md", "final/README.md", "eval/perplexity.png"):
        assert (arun.root / f).is_file(), f
    m = json.loads((arun.root / "provenance.json").read_text())
    assert m["base_model"]["lineage"]["run"] == "demo-base-general"
    assert {s["name"] for s in m["sources"]} == {"droit", "culture_generale"} and not m["totals"]["sources_without_licence"]
    summary = (arun.root / "ai_act_summary.md").read_text()
    assert "### 2.1 Publicly available datasets\n\nYes:" in summary and "demo-base-general" in summary
