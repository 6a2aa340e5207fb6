"""Shipped files are package data read through affinage.resources; nothing in src/ walks above the package."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from affinage.resources import ResourceError, list_resources, resource_dir, resource_path, source_checkout
from testlib import REPO

SRC = REPO / "src" / "affinage"


def test_each_kind_lists_its_shipped_files():
    assert {"jean-zay-h100", "jean-zay-a100", "jean-zay-v100", "lumi-g", "local"} <= set(list_resources("clusters"))
    assert list_resources("deepspeed") == ["zero2", "zero3", "zero3_offload"]
    assert list_resources("accelerate") == ["fsdp2"]
    assert list_resources("slurm") == ["job.sbatch"]
    assert resource_path("clusters", "local") == resource_path("clusters", "local.yaml") == resource_dir("clusters") / "local.yaml"
    assert resource_path("slurm", "job.sbatch.j2").read_text().startswith("#!")


def test_unknown_or_escaping_names_are_refused_with_the_choices():
    with pytest.raises(ResourceError, match=r"no shipped clusters file 'jean-zay'. Valid choices: jean-zay-a100, "):
        resource_path("clusters", "jean-zay")
    with pytest.raises(ResourceError):
        resource_path("deepspeed", "../clusters/local.yaml")
    with pytest.raises(ValueError, match="unknown resource kind"):
        resource_dir("models")


@pytest.mark.skipif(not (REPO / ".git").exists(), reason="needs a git checkout")
def test_one_copy_the_repository_folders_are_links_into_the_package():
    links = {"configs/clusters": "clusters", "configs/deepspeed": "deepspeed", "configs/accelerate": "accelerate",
             "slurm/job.sbatch.j2": "slurm/job.sbatch.j2"}
    for link, target in links.items():
        assert (REPO / link).is_symlink(), link
        assert not Path(Path(REPO / link).readlink()).is_absolute()  # relative: works in any clone
        assert (REPO / link).resolve() == (SRC / "resources" / target).resolve()
    assert (SRC / "resources" / "recipes").resolve() == (REPO / "recipes").resolve()
    staged = subprocess.run(["git", "-C", str(REPO), "ls-files", "-s", *links, "src/affinage/resources/recipes"],
                            capture_output=True, text=True, check=True).stdout.splitlines()
    assert len(staged) == 5 and all(line.startswith("120000 ") for line in staged), staged  # git stores links
    assert source_checkout() == REPO.resolve()


# Ways a module could find files by its own location instead of asking affinage.resources.
_WALKS = {
    "parents[N] of a path": re.compile(r"\.parents\b|\.parent\.parent\b"),
    "__file__": re.compile(r"\b__file__\b"),
    "the configs/ folder": re.compile(r"""["']configs["'/]"""),
    "the recipes/ folder joined to a path": re.compile(r"""(/\s*|Path\(\s*)["']recipes["']|["']recipes/"""),
    "'..' joined to a path": re.compile(r"""/\s*["']\.\.["']|Path\(\s*["']\.\.["']\s*\)"""),
}


# The one look above the package: resources.source_checkout, for the git commit of a src checkout
# (provenance), and only when the package sits in <root>/src/ beside <root>/.git.
_ALLOWED = {("resources/__init__.py", "root = package.parent.parent")}


def test_nothing_under_src_reads_a_path_above_the_package():
    found = []
    for path in sorted(SRC.rglob("*.py")):
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if (path.relative_to(SRC).as_posix(), line.strip()) in _ALLOWED:
                continue
            for what, pattern in _WALKS.items():
                if pattern.search(line):
                    found.append(f"{path.relative_to(REPO)}:{number}: {what}: {line.strip()}")
    assert not found, "read shipped files with affinage.resources instead:\n" + "\n".join(found)


def test_importlib_resources_has_one_home():
    users = [p.relative_to(SRC).as_posix() for p in SRC.rglob("*.py") if "importlib.resources" in p.read_text(encoding="utf-8")]
    assert users == ["resources/__init__.py"]


def test_a_name_is_the_shipped_file_a_path_is_the_users_own(tmp_path):
    from affinage.distributed.configs import config_path, default_config_path
    from affinage.recipe.loader import load_recipe_dict
    from affinage.slurm.profiles import load_profile

    assert load_profile("local").name == "local"
    own = tmp_path / "my-cluster.yaml"  # any name: only a shipped profile must match its file name
    own.write_text(resource_path("clusters", "local").read_text().replace("name: local", "name: my-lab")
                   .replace("cpus: 1", "cpus: 3"))
    assert load_profile(own).name == "my-lab" and load_profile(str(own)).cpu_jobs.cpus == 3
    assert default_config_path("zero3") == resource_dir("deepspeed") / "zero3.json"
    base = {"name": "x", "task": "cpt", "model": {"name_or_path": "m"}, "data": {"sources": [{"path": "d.jsonl"}]},
            "training": {"global_batch_size": 2, "micro_batch_size": 1, "duration": "1 steps"}}
    assert config_path(load_recipe_dict({**base, "distributed": {"strategy": "zero3"}})) == default_config_path("zero3")
    mine = tmp_path / "z3.json"
    recipe = load_recipe_dict({**base, "distributed": {"strategy": "zero3", "config": str(mine)}})
    assert config_path(recipe) == mine
