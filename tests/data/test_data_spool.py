"""The spool of kept records (``data.spool``): records come back as written, in order, one at a time."""

from __future__ import annotations

import pickle

import pytest

from affinage.data.errors import DataError
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



class _Payload:
    """What a tampered spool would carry: unpickling it calls ``open(path, "w")`` (a side effect to check)."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_a_spool_holding_an_object_is_refused_without_running_it(tmp_path):
    path = tmp_path / "spool.bin"
    marker = tmp_path / "ran"
    path.write_bytes(pickle.dumps(("a.jsonl:1", {"text": "ok"})) + pickle.dumps(("b.jsonl:1", _Payload(str(marker)))))
    got = read_spool(path)
    assert next(got) == ("a.jsonl:1", {"text": "ok"})
    with pytest.raises(DataError, match="holds an object of class io.open.*delete it and run prepare again"):
        next(got)
    assert not marker.exists()
