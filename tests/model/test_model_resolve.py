"""Offline model resolution: local folders, the HF cache layout, mirror folders, and the not-found message."""

from __future__ import annotations

import json
import socket

import pytest

from affinage.model.errors import ModelFolderError, ModelNotFoundError
from affinage.model.resolve import forget_resolved, resolve_model_path


def _model_folder(path, files=("config.json",)):
    path.mkdir(parents=True, exist_ok=True)
    for f in files:
        (path / f).write_text("{}")
    return path


def _hf_cache(root, repo="org/name", commit="abc", refs={"main": "abc"}):
    repo_dir = root / ("models--" + repo.replace("/", "--"))
    snap = _model_folder(repo_dir / "snapshots" / commit)
    for ref, target in refs.items():
        (repo_dir / "refs" / ref).parent.mkdir(parents=True, exist_ok=True)
        (repo_dir / "refs" / ref).write_text(target + "\n")
    return snap


@pytest.fixture
def clean_env(monkeypatch, tmp_path):
    """An empty HF cache and no $DSDIR, whatever the machine has."""
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_HOME", "DSDIR"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.chdir(tmp_path)
    forget_resolved()
    return monkeypatch


@pytest.fixture
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("resolution tried to open a network connection")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def test_local_folder_with_env_var_and_tilde(clean_env, tmp_path):
    folder = _model_folder(tmp_path / "models" / "org" / "name")
    clean_env.setenv("MYMODELS", str(tmp_path / "models"))
    assert resolve_model_path("$MYMODELS/org/name") == folder.resolve()
    assert resolve_model_path(str(folder)) == folder.resolve()


def test_local_folder_without_config_is_an_error_unless_tokenizer(clean_env, tmp_path):
    folder = _model_folder(tmp_path / "tok", files=("tokenizer.json",))
    with pytest.raises(ModelFolderError, match="no config.json"):
        resolve_model_path(str(folder))
    assert resolve_model_path(str(folder), kind="tokenizer") == folder.resolve()
    empty = _model_folder(tmp_path / "empty", files=())
    with pytest.raises(ModelFolderError, match="no tokenizer file"):
        resolve_model_path(str(empty), kind="tokenizer")


def test_hf_cache_main_ref(clean_env, tmp_path, no_network):
    cache = tmp_path / "hub"
    snap = _hf_cache(cache)
    clean_env.setenv("HF_HUB_CACHE", str(cache))
    assert resolve_model_path("org/name") == snap.resolve()


def test_hf_cache_via_hf_home_and_revisions(clean_env, tmp_path):
    clean_env.delenv("HF_HUB_CACHE")
    clean_env.setenv("HF_HOME", str(tmp_path / "hfhome"))
    cache = tmp_path / "hfhome" / "hub"
    commit = "0123456789abcdef0123456789abcdef01234567"
    _hf_cache(cache, commit="abc", refs={"main": "abc"})
    tagged = _hf_cache(cache, commit=commit, refs={"v1.0": commit})
    assert resolve_model_path("org/name").name == "abc"
    assert resolve_model_path("org/name", revision="v1.0") == tagged.resolve()
    assert resolve_model_path("org/name", revision=commit) == tagged.resolve()
    with pytest.raises(ModelNotFoundError) as err:
        resolve_model_path("org/name", revision="v2")
    assert "no revision 'v2'" in str(err.value) and "v1.0" in str(err.value)


def test_hf_cache_without_refs_main(clean_env, tmp_path):
    cache = tmp_path / "hub"
    clean_env.setenv("HF_HUB_CACHE", str(cache))
    only = _hf_cache(cache, commit="c1", refs={})
    assert resolve_model_path("org/name") == only.resolve()  # a single snapshot is unambiguous
    _hf_cache(cache, commit="c2", refs={})
    forget_resolved()  # the cache changed under this process (resolution is remembered per process)
    with pytest.raises(ModelNotFoundError, match="set model.revision"):
        resolve_model_path("org/name")


def test_hf_cache_incomplete_download_is_reported(clean_env, tmp_path):
    cache = tmp_path / "hub"
    clean_env.setenv("HF_HUB_CACHE", str(cache))
    snap = cache / "models--org--name" / "snapshots" / "abc"
    snap.mkdir(parents=True)
    (snap / "config.json").symlink_to("../../blobs/missing")  # blob never downloaded
    (cache / "models--org--name" / "refs").mkdir()
    (cache / "models--org--name" / "refs" / "main").write_text("abc")
    with pytest.raises(ModelNotFoundError, match="incomplete download"):
        resolve_model_path("org/name")


def test_mirror_with_env_var(clean_env, tmp_path):
    folder = _model_folder(tmp_path / "dsdir" / "HuggingFace_Models" / "mistralai" / "Mistral-7B-v0.3")
    clean_env.setenv("DSDIR", str(tmp_path / "dsdir"))
    # the schema's default mirror is Jean Zay's $DSDIR layout
    from affinage.model.resolve import DEFAULT_MIRRORS

    assert resolve_model_path("mistralai/Mistral-7B-v0.3", mirrors=DEFAULT_MIRRORS) == folder.resolve()


def test_unset_env_var_mirror_is_skipped(clean_env, tmp_path):
    folder = _model_folder(tmp_path / "second" / "org" / "name")
    found = resolve_model_path("org/name", mirrors=["$DSDIR/HuggingFace_Models", str(tmp_path / "second")])
    assert found == folder.resolve()


def test_not_found_lists_every_place_and_how_to_stage(clean_env, tmp_path, no_network):
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    with pytest.raises(ModelNotFoundError) as err:
        resolve_model_path("OpenLLM-France/Lucie-7B", mirrors=["$DSDIR/HuggingFace_Models", str(mirror)])
    msg = str(err.value)
    places = err.value.places
    assert len(places) == 4, places
    assert "local folder" in places[0] and "does not exist" in places[0]
    assert "HF cache" in places[1] and str(tmp_path / "empty-cache") in places[1] and "$HF_HUB_CACHE" in places[1]
    assert "$DSDIR" in places[2] and "skipped" in places[2] and "not set" in places[2]
    assert str(mirror / "OpenLLM-France" / "Lucie-7B") in places[3]
    for p in places:
        assert p in msg
    assert "hf download OpenLLM-France/Lucie-7B --local-dir $WORK/models/OpenLLM-France/Lucie-7B" in msg
    assert "huggingface-cli download" in msg
    assert "model.name_or_path" in msg and "model.mirrors" in msg
    assert isinstance(err.value, FileNotFoundError)


def test_not_found_path_is_not_searched_as_an_id(clean_env, tmp_path):
    with pytest.raises(ModelNotFoundError) as err:
        resolve_model_path(str(tmp_path / "nowhere" / "model"))
    assert "not a Hugging Face id" in str(err.value)
    assert len(err.value.places) == 2


def test_error_message_for_tokenizer_kind(clean_env):
    with pytest.raises(ModelNotFoundError, match="^Tokenizer 'org/tok'"):
        resolve_model_path("org/tok", mirrors=[], kind="tokenizer")


def test_cache_snapshot_must_hold_a_model(clean_env, tmp_path):
    cache = tmp_path / "hub"
    clean_env.setenv("HF_HUB_CACHE", str(cache))
    snap = _hf_cache(cache)
    (snap / "config.json").unlink()
    (snap / "tokenizer.json").write_text(json.dumps({}))
    with pytest.raises(ModelNotFoundError, match="no config.json"):
        resolve_model_path("org/name")
    assert resolve_model_path("org/name", kind="tokenizer") == snap.resolve()


def test_hf_cache_resolution_agrees_with_huggingface_hub(clean_env, tmp_path, no_network):
    """Where huggingface_hub finds a snapshot offline, we find the same folder (ours adds diagnostics)."""
    from huggingface_hub import snapshot_download

    cache = tmp_path / "hub"
    clean_env.setenv("HF_HUB_CACHE", str(cache))
    commit = "0123456789abcdef0123456789abcdef01234567"
    _hf_cache(cache, commit="1111111111111111111111111111111111111111", refs={"main": "1111111111111111111111111111111111111111"})
    _hf_cache(cache, commit=commit, refs={"v1.0": commit})
    for ref in (cache / "models--org--name" / "refs").iterdir():  # huggingface_hub writes refs without a newline
        ref.write_text(ref.read_text().strip())
    for revision in (None, "v1.0", commit):
        theirs = snapshot_download("org/name", revision=revision, cache_dir=str(cache), local_files_only=True)
        assert resolve_model_path("org/name", revision=revision) == type(resolve_model_path("org/name"))(theirs).resolve()


def test_a_model_is_resolved_once_per_process(clean_env, tmp_path, monkeypatch):
    import affinage.model.resolve as resolve

    folder = _model_folder(tmp_path / "m")
    calls = []
    real = resolve._resolve
    monkeypatch.setattr(resolve, "_resolve", lambda *a: calls.append(a) or real(*a))
    assert resolve_model_path(str(folder)) == resolve_model_path(str(folder)) == folder.resolve()
    assert len(calls) == 1
    import shutil

    shutil.rmtree(folder)  # a remembered folder that has gone is looked up again (and now fails)
    with pytest.raises(ModelNotFoundError):
        resolve_model_path(str(folder))
    assert len(calls) == 2
