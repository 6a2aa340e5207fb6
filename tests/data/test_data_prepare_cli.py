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


def test_prepare_console_counts_skipped_records_as_data_stats_does(tmp_path, tiny_llama_dir, capsys):
    """on_bad_record: skip — the console line gives the records seen, skipped, read and kept, the numbers of data_stats.json."""
    good = [json.dumps({"text": f"Paragraphe {i} : la Loire traverse Orléans, Blois et Tours avant Nantes."}, ensure_ascii=False)
            for i in range(20)]
    bad = ["{pas du JSON", "[1, 2]", '{"text": ', "42"]
    lines = good[:5] + bad[:2] + good[5:12] + bad[2:] + good[12:]
    src = tmp_path / "mixte.jsonl"
    src.write_text("\n".join(lines) + "\n", encoding="utf-8")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"""
name: prep-skip
task: cpt
model: {{name_or_path: {tiny_llama_dir}}}
data:
  sources: [{{path: {src}}}]
  on_bad_record: skip
  max_length: 64
  cache_dir: {tmp_path / 'cache'}
  num_proc: 1
training: {{global_batch_size: 2, duration: 1 steps}}
output: {{dir: {tmp_path / 'run'}}}
""", encoding="utf-8")
    assert main(["prepare", str(recipe)]) == 0
    out = capsys.readouterr().out
    st = json.loads((tmp_path / "run" / "data_stats.json").read_text())["sources"]["mixte.jsonl"]
    assert st["records_read"] == 20 and st["skipped"]["count"] == 4 and st["documents_kept"] == 20
    line = next(ln for ln in out.splitlines() if ln.startswith("mixte.jsonl"))
    assert line.startswith("mixte.jsonl     24 records: 4 skipped as bad (")
    assert "), 20 read, 20 kept" in line
    for reason, n in st["skipped"]["reasons"].items():
        assert f"{reason} {n}" in line
