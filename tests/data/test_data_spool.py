"""The spool of kept records (``data.spool``): records come back as written, in order, one at a time."""

from __future__ import annotations

from affinage.data.spool import read_spool, write_spool


def test_spool_round_trip_keeps_records_and_order(tmp_path):
    records = [
        ("a.jsonl:1", {"text": "Le tribunal a rendu sa décision. \u00a0😀\n"}),
        ("b.jsonl:7", {"messages": [{"role": "user", "content": "Où ?"},
                                    {"role": "assistant", "content": "", "tool_calls": [{"type": "function", "function": {"name": "f", "arguments": {"x": [1, 2.5, None]}}}]}],
                       "tools": [{"type": "function", "function": {"name": "f"}}]}),
        ("c.jsonl:2", {"text": "\ue000 sentinel-like private-use text \ue001"}),
    ]
    path = tmp_path / "spool.bin"
    with open(path, "wb") as fh:
        for where, rec in records:
            write_spool(fh, where, rec)
    got = read_spool(path)
    assert next(got) == records[0]  # a generator: the file is read record by record, not loaded whole
    assert list(got) == records[1:]
    path.write_bytes(b"")
    assert list(read_spool(path)) == []
