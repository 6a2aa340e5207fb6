"""affinage installed the way a cluster user installs it: a wheel in a fresh venv, run from elsewhere.

The wheel is built from a copy of the sources (so a stale ``build/`` of the checkout cannot hide a
missing file), installed non-editable into a new venv, and every command runs from a folder outside
the checkout with ``PYTHONPATH`` cleared: ``recipes list``, ``recipes copy``, ``plan``, ``smoke``,
``submit --dry-run`` on a shipped cluster profile, and the demo training, shortened with ``--set``.
The heavy libraries (torch, transformers, ...) come from the running interpreter's site-packages,
added to the new venv as plain path lines: the editable affinage installed there is a ``.pth``
file of that folder, which a path line does not process, so only the wheel provides ``affinage``.
"""

from __future__ import annotations

import json
import os
import shutil
import site
import subprocess
import sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import pytest

from testlib import REPO

# what a build needs from the checkout: pyproject names README.md; resources/recipes links to recipes/
SOURCES = ("pyproject.toml", "README.md", "src", "recipes")


def _setuptools_ok() -> bool:
    try:
        return int(version("setuptools").split(".")[0]) >= 77
    except (PackageNotFoundError, ValueError):
        return False


pytestmark = pytest.mark.skipif(
    not _setuptools_ok(), reason="building the wheel offline needs setuptools>=77 here (pip install -e '.[dev]')"
)


def _run(cmd: list, cwd: Path, env: dict, timeout: int = 300) -> str:
    proc = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(map(str, cmd))} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """A fresh venv holding only the wheel of affinage (heavy libraries reused); its bin folder and env."""
    root = tmp_path_factory.mktemp("wheel")
    src = root / "src-copy"
    src.mkdir()
    for name in SOURCES:
        if (REPO / name).is_dir():
            shutil.copytree(REPO / name, src / name, symlinks=True,
                            ignore=shutil.ignore_patterns("__pycache__", "*.egg-info", "runs"))
        else:
            shutil.copy2(REPO / name, src / name)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    wheels = root / "wheels"
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q",
          "-w", wheels, src], cwd=root, env=env)
    (wheel,) = wheels.glob("affinage-*.whl")
    venv = root / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", venv], cwd=root, env=env)
    py = venv / "bin" / "python"
    own = Path(_run([py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], cwd=root, env=env).strip())
    (own / "shared-libraries.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    _run([sys.executable, "-m", "pip", "--python", py, "install", "--no-deps", "--no-index", "-q", wheel], cwd=root, env=env)
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    env["VIRTUAL_ENV"] = str(venv)
    return {"bin": venv / "bin", "env": env, "wheel": wheel, "venv": venv}


def test_the_wheel_ships_resources_recipes_and_demo_data(installed):
    import zipfile

    names = set(zipfile.ZipFile(installed["wheel"]).namelist())
    for member in ("affinage/resources/clusters/jean-zay-h100.yaml", "affinage/resources/deepspeed/zero3.json",
                   "affinage/resources/accelerate/fsdp2.yaml", "affinage/resources/slurm/job.sbatch.j2",
                   "affinage/resources/recipes/demo/full/cpt.yaml", "affinage/resources/recipes/_base/lora-7b.yaml",
                   "affinage/resources/recipes/demo/data/histoire.jsonl", "affinage/resources/recipes/demo/eval/droit_qcm.jsonl",
                   "affinage/resources/recipes/demo/model/config.json", "affinage/resources/recipes/demo/model/tokenizer.json"):
        assert member in names, member
    assert not any(n.startswith(("configs/", "recipes/", "slurm/")) for n in names)  # no files outside the package


@pytest.mark.slow  # .ci/run runs the same commands from the installed wheel on every CI run
def test_installed_commands_run_from_outside_the_checkout(installed, tmp_path):
    work = tmp_path / "elsewhere"
    work.mkdir()
    assert not work.resolve().is_relative_to(REPO.resolve())
    env, affinage = installed["env"], installed["bin"] / "affinage"

    where = _run([installed["bin"] / "python", "-c", "import affinage; print(affinage.__file__)"], cwd=work, env=env)
    assert Path(where.strip()).is_relative_to(installed["venv"]), f"affinage imported from {where} (not the wheel)"

    listing = _run([affinage, "recipes", "list"], cwd=work, env=env)
    assert "demo/full/cpt" in listing and "lucie-7b/lora/sft-piaf" in listing and "_base" not in listing

    _run([affinage, "recipes", "copy", "demo/full/cpt", "recipes"], cwd=work, env=env)
    recipe = Path("recipes/demo/full/cpt.yaml")
    assert (work / recipe).is_file() and (work / "recipes/demo/model/tokenizer.json").is_file()

    plan = json.loads(_run([affinage, "plan", recipe, "--json"], cwd=work, env=env))
    assert plan["params_total"] > 0 and Path(plan["model_path"]).is_relative_to(work)  # the copy, not the package

    smoke = _run([affinage, "smoke", recipe, "--steps", "2", "--run-dir", "smoke"], cwd=work, env=env)
    assert "steps           2/2" in smoke

    _run([affinage, "submit", recipe, "--cluster", "jean-zay-h100", "--account", "abc", "--gpus-per-node", "2",
          "--pipeline", "prepare,train,eval", "--run-dir", "sub", "--dry-run"], cwd=work, env=env)
    script = (work / "sub" / "slurm" / "train.sbatch").read_text()  # rendered from the shipped template
    assert "#SBATCH --account=abc@h100" in script and "#SBATCH --constraint=h100" in script
    assert "-m affinage.cli train" in script and (work / "sub" / "slurm" / "eval.sbatch").is_file()

    out = _run([affinage, "train", recipe, "--set", "training.duration=3 steps", "--set", "training.eval_every=3",
                "--set", "training.logging_steps=1", "--run-dir", "demo"], cwd=work, env=env)
    assert "steps           3/3" in out
    provenance = json.loads((work / "demo" / "provenance.json").read_text())
    assert provenance["software"]["git"]["commit"] is None  # installed from a wheel: no checkout looked for
    assert (work / "demo" / "final" / "config.json").is_file()
