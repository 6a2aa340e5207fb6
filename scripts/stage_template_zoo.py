#!/usr/bin/env python3
"""Stage the chat-template zoo the tests read, from a package registry, outside the repository.

The zoo's templates are other projects' files: they are not committed here. ``tests/data/templates/
zoo/SOURCES.json`` names each one (repository, path, commit, licence, sha256). Those also shipped in
a PyPI wheel (axolotl's template collection: byte-identical, checked by sha256) are fetched with
``pip download`` and extracted into ``$AFFINAGE_TEMPLATE_ZOO`` (default ``~/.cache/affinage/
template-zoo``); the others need a copy in ``../shared/templates/zoo``. Nothing is installed.

    python scripts/stage_template_zoo.py [--dest DIR]

Exit 0 with a line per family staged or already there; 1 when the registry cannot be reached
(the zoo tests then skip the families they lack, saying why).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

SOURCES = Path(__file__).resolve().parents[1] / "tests" / "data" / "templates" / "zoo" / "SOURCES.json"
WHEELS = {  # repository of SOURCES.json -> (PyPI requirement, folder of the templates inside the wheel)
    "github:axolotl-ai-cloud/axolotl": ("axolotl==0.19.0", "axolotl/utils/chat_templates/templates/"),
}


def default_dest() -> Path:
    return Path(os.environ.get("AFFINAGE_TEMPLATE_ZOO") or "~/.cache/affinage/template-zoo").expanduser()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dest", type=Path, default=default_dest())
    args = ap.parse_args(argv)
    sources = json.loads(SOURCES.read_text(encoding="utf-8"))["templates"]
    args.dest.mkdir(parents=True, exist_ok=True)
    for repository, (requirement, inside) in WHEELS.items():
        wanted = {fam: src for fam, src in sources.items() if src["repository"] == repository}
        todo = {f: s for f, s in wanted.items() if not _ok(args.dest / f"{f}.jinja", s["sha256"])}
        if not todo:
            print(f"{len(wanted)} templates from {requirement} already staged in {args.dest}")
            continue
        with tempfile.TemporaryDirectory() as tmp:
            got = subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                                  requirement, "-d", tmp], capture_output=True, text=True)
            wheels = list(Path(tmp).glob("*.whl"))
            if got.returncode != 0 or not wheels:
                print(f"could not download {requirement}: {got.stderr.strip()[-300:]}", file=sys.stderr)
                return 1
            with zipfile.ZipFile(wheels[0]) as whl:
                for fam, src in todo.items():
                    data = whl.read(inside + Path(src["path"]).name)
                    if hashlib.sha256(data).hexdigest() != src["sha256"]:
                        print(f"{fam}: {requirement} holds another version of {src['path']} (sha256 differs); not staged",
                              file=sys.stderr)
                        continue
                    (args.dest / f"{fam}.jinja").write_bytes(data)
                    print(f"staged {fam:<18} from {requirement} ({src['licence']})")
    return 0


def _ok(path: Path, sha256: str) -> bool:
    return path.is_file() and hashlib.sha256(path.read_bytes()).hexdigest() == sha256


if __name__ == "__main__":
    sys.exit(main())
