"""The prepared-data cache verifies itself on every hit; killed builds leave nothing behind; one builder per key."""

from __future__ import annotations

import json
import multiprocessing as mp
import os

import numpy as np
import pytest

from affinage.data.cache import INTEGRITY, CorruptCacheError, build_lock, remove_orphans
from affinage.data.prepare import prepare
from test_data_prepare_cache import sft_recipe


def _flip(path, offset):
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("file,damage", [
    ("train/input_ids.npy", "flip"),
    ("train/loss_mask.npy", "zero"),
    ("train/seq_offsets.npy", "flip"),
    ("train/row_seq.npy", "truncate"),
    ("meta.json", "flip"),
])
def test_corrupt_cache_is_refused_then_rebuilt(tmp_path, trained_tokenizer, file, damage):
    recipe = sft_recipe(tmp_path)
    built = prepare(recipe, trained_tokenizer)
    assert (built.path / INTEGRITY).is_file()
    reference = np.asarray(built.train.input_ids).copy()
    assert prepare(recipe, trained_tokenizer).hit  # verified hit
    target = built.path / file
    size = target.stat().st_size
    if damage == "flip":
        _flip(target, size - 3)
    elif damage == "zero":
        data = bytearray(target.read_bytes())
        data[-16:] = b"\0" * 16
        target.write_bytes(bytes(data))
    else:
        target.write_bytes(target.read_bytes()[:-8])
    with pytest.raises(CorruptCacheError) as e:
        prepare(recipe, trained_tokenizer)
    assert str(e.value).startswith(f"the prepared-data cache {built.path} is corrupt: {file}")
    assert "rerun the same command to rebuild it" in str(e.value)
    again = prepare(recipe, trained_tokenizer)  # the rerun rebuilds the same data
    assert not again.hit and np.array_equal(np.asarray(again.train.input_ids), reference)


def test_orphans_of_killed_builds_are_removed(tmp_path):
    root = tmp_path / "cache"
    root.mkdir()
    key, other = "a" * 32, "b" * 32
    (root / f".{key}.x1y2").mkdir()  # left by a killed prepare of this key
    (root / f".{other}.z9").mkdir()  # of another key, its builder dead (lock free, this host)
    (root / f".{other}.lock").write_text(json.dumps({"host": os.uname().nodename, "pid": 1}))
    with build_lock(root, key):
        pass
    assert sorted(p.name for p in root.iterdir() if p.is_dir()) == []


def _hold(root, key, ready, release):
    with build_lock(root, key):
        ready.set()
        release.wait(30)


def test_orphan_of_a_live_build_is_kept(tmp_path):
    root = tmp_path / "cache"
    key = "c" * 32
    ctx = mp.get_context("fork")
    ready, release = ctx.Event(), ctx.Event()
    p = ctx.Process(target=_hold, args=(root, key, ready, release))
    p.start()
    try:
        assert ready.wait(20)
        (root / f".{key}.live").mkdir()
        assert remove_orphans(root) == []
        assert (root / f".{key}.live").is_dir()
    finally:
        release.set()
        p.join(20)


def _prepare(recipe, tok_json, out):
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(tok_json), bos_token="<s>", eos_token="</s>",
                                  pad_token="<pad>", unk_token="<unk>")
    cache = prepare(recipe, tok, progress=False)
    out.put((cache.hit, str(cache.path)))


def test_two_prepares_one_builds_the_other_reuses(tmp_path, trained_tokenizer_json):
    recipe = sft_recipe(tmp_path, n=400)
    ctx = mp.get_context("fork")
    out = ctx.Queue()
    procs = [ctx.Process(target=_prepare, args=(recipe, trained_tokenizer_json, out)) for _ in range(2)]
    for p in procs:
        p.start()
    results = [out.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(30)
    assert sorted(hit for hit, _ in results) == [False, True]  # exactly one built
    assert len({path for _, path in results}) == 1
    root = tmp_path / "cache"
    assert not [p for p in root.iterdir() if p.is_dir() and p.name.startswith(".")]  # no temporary folder left
