"""Readers: every supported source type, file:line errors, skip accounting."""

from __future__ import annotations

import json
import re

import pytest

from affinage.data.errors import DataError, SkipCounter
from affinage.data.readers import read_source
from affinage.recipe.schema import SourceSpec
from data_helpers import write_jsonl

RECORDS = [{"text": f"Article {i} : la loi s'applique à tous, même à l'été {i}.", "id": i} for i in range(5)]


def read(path, on_bad_record="error", skips=None, **kw):
    return list(read_source(SourceSpec(path=str(path), **kw), on_bad_record, skips))


def test_jsonl_with_locations_and_blank_lines(tmp_path):
    p = tmp_path / "a.jsonl"
    p.write_text(
        "\ufeff" + json.dumps(RECORDS[0], ensure_ascii=False) + "\n\n" + json.dumps(RECORDS[1], ensure_ascii=False) + "\n",
        encoding="utf-8",
    )
    out = read(p)
    assert [r.data for r in out] == RECORDS[:2]
    assert [r.line for r in out] == [1, 3]
    assert out[1].where == f"{p}:3"


def test_json_array_and_json_lines_in_dot_json(tmp_path):
    arr = tmp_path / "arr.json"
    arr.write_text(json.dumps(RECORDS, ensure_ascii=False, indent=2), encoding="utf-8")
    out = read(arr)
    assert [r.data for r in out] == RECORDS
    assert out[3].where == f"{arr} (row 3)"
    lines = write_jsonl(tmp_path / "lines.json", RECORDS)
    assert [r.data for r in read(lines)] == RECORDS


def test_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    p = tmp_path / "d.parquet"
    pq.write_table(pa.Table.from_pylist(RECORDS), p)
    out = read(p)
    assert [r.data for r in out] == RECORDS
    assert [r.row for r in out] == list(range(5))


def test_parquet_chat_column_of_structs(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"messages": [{"role": "user", "content": "Où ?"}, {"role": "assistant", "content": "Là."}]}]
    p = tmp_path / "chat.parquet"
    pq.write_table(pa.Table.from_pylist(rows), p)
    assert read(p)[0].data == rows[0]


def test_save_to_disk_dataset_and_datasetdict(tmp_path):
    import datasets

    ds = datasets.Dataset.from_list(RECORDS)
    ds.save_to_disk(str(tmp_path / "ds"))
    out = read(tmp_path / "ds")
    assert [r.data for r in out] == RECORDS
    assert out[2].where.endswith("(row 2)")

    datasets.DatasetDict({"train": ds, "test": ds.select([0])}).save_to_disk(str(tmp_path / "dd"))
    assert len(read(tmp_path / "dd")) == 5
    datasets.DatasetDict({"a": ds, "b": ds}).save_to_disk(str(tmp_path / "ab"))
    with pytest.raises(DataError, match=r"splits \['a', 'b'\] and no 'train' split"):
        read(tmp_path / "ab")


def test_txt_folder_sorted_one_record_per_file(tmp_path):
    folder = tmp_path / "txt"
    (folder / "sub").mkdir(parents=True)
    (folder / "b.txt").write_text("Deuxième texte.", encoding="utf-8")
    (folder / "a.txt").write_text("Premier texte, déjà lu.", encoding="utf-8")
    (folder / "sub" / "c.txt").write_text("Troisième.", encoding="utf-8")
    (folder / "notes.md").write_text("ignored", encoding="utf-8")
    out = read(folder)
    assert [r.data for r in out] == [{"text": "Premier texte, déjà lu."}, {"text": "Deuxième texte."}, {"text": "Troisième."}]
    assert out[0].where == str(folder / "a.txt")
    custom = read(folder, text_field="body")
    assert custom[0].data == {"body": "Premier texte, déjà lu."}


def test_malformed_lines_raise_with_file_and_line(tmp_path):
    p = tmp_path / "bad.jsonl"
    p.write_text('{"text": "ok"}\n{"text": "ok"}\n{"text": "cassé\n[1, 2]\n', encoding="utf-8")
    with pytest.raises(DataError, match=re.escape(f"{p}:3:") + r" not valid JSON .*on_bad_record: skip"):
        read(p)
    p.write_text('{"text": "ok"}\n[1, 2]\n', encoding="utf-8")
    with pytest.raises(DataError, match=re.escape(f"{p}:2:") + r" a JSON list where a JSON object"):
        read(p)


def test_skip_mode_counts_and_goes_on(tmp_path):
    p = tmp_path / "bad.jsonl"
    raw = b'{"text": "un"}\n{"text": \n"deux"\n\xff\xfe\n{"text": "trois"}\n'
    p.write_bytes(raw)
    skips = SkipCounter()
    out = read(p, "skip", skips)
    assert [r.data["text"] for r in out] == ["un", "trois"]
    assert [r.line for r in out] == [1, 5]
    assert skips.count == 3
    assert skips.reasons == {"bad JSON": 1, "not a JSON object": 1, "not UTF-8": 1}
    assert skips.examples[0].startswith(f"{p}:2: not valid JSON")
    assert skips.as_dict()["count"] == 3


def test_missing_path_names_path_and_hints(tmp_path, monkeypatch):
    write_jsonl(tmp_path / "corpus.jsonl", RECORDS)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataError, match=r"data source not found: 'corpus.json'.*relative paths are resolved from.*Did you mean: .*corpus.jsonl"):
        read("corpus.json")
    with pytest.raises(DataError, match=r"nowhere/x.jsonl.*does not exist either"):
        read(tmp_path / "nowhere" / "x.jsonl")


def test_unsupported_and_empty_folder(tmp_path):
    (tmp_path / "d.csv").write_text("a,b\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"unsupported data file type '.csv'"):
        read(tmp_path / "d.csv")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"no .txt files"):
        read(tmp_path / "empty")


def test_broken_json_array_is_fatal_even_in_skip_mode(tmp_path):
    p = tmp_path / "arr.json"
    p.write_text('[{"text": "a"},\n {"text": }]', encoding="utf-8")
    with pytest.raises(DataError, match=re.escape(f"{p}:2:") + r" the file starts with '\[' but is not a valid JSON array"):
        read(p, "skip")


def test_env_vars_are_expanded(tmp_path, monkeypatch):
    write_jsonl(tmp_path / "c.jsonl", RECORDS)
    monkeypatch.setenv("AFFINAGE_TEST_DIR", str(tmp_path))
    assert len(read("$AFFINAGE_TEST_DIR/c.jsonl")) == 5
