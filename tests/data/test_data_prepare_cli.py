"""`affinage prepare RECIPE`: builds the cache once, then finds it; statistics land in the run directory."""

from __future__ import annotations

import json

from affinage.cli import main


def test_prepare_command_builds_then_hits(tmp_path, tiny_llama_dir, demo_data, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"""
name: prep
task: sft
model: {{name_or_path: {tiny_llama_dir}}}
data:
  sources: [{{path: {demo_data / 'qa_culture.jsonl'}, max_records: 20}}]
  max_length: 256
  cache_dir: {tmp_path / 'cache'}
  num_proc: 1
training: {{global_batch_size: 2, duration: 1 steps}}
output: {{dir: {tmp_path / 'run'}}}
""", encoding="utf-8")
    assert main(["prepare", str(recipe)]) == 0
    first = capsys.readouterr().out
    assert "built in" in first and "packing" in first
    stats = json.loads((tmp_path / "run" / "data_stats.json").read_text())
    assert stats["sources"]["qa_culture.jsonl"]["records_read"] == 20 and stats["cache"].startswith(str(tmp_path / "cache"))
    assert main(["prepare", str(recipe)]) == 0
    assert "hit in" in capsys.readouterr().out
    # a changed setting is a different cache entry
    assert main(["prepare", str(recipe), "--set", "data.max_length=200"]) == 0
    assert "built in" in capsys.readouterr().out
    assert len([p for p in (tmp_path / "cache").iterdir() if p.is_dir() and not p.name.startswith(".")]) == 2
