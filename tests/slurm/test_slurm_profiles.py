"""Cluster profiles: the shipped ones load, requests are checked before submission, errors list choices."""

from __future__ import annotations

import pytest

from affinage.resources import resource_path
from affinage.slurm.profiles import ProfileError, format_time, load_profile, parse_time, profile_names


def test_shipped_profiles_load():
    names = profile_names()
    assert {"jean-zay-h100", "jean-zay-a100", "jean-zay-v100", "lumi-g", "local"} <= set(names)
    for name in names:
        profile = load_profile(name)
        assert "HOME" not in profile.storage.cache and not profile.storage.cache.startswith("~")


@pytest.mark.parametrize(
    "name, gpus, cpus, account, constraint, qos",
    [
        ("jean-zay-h100", 4, 24, "abc@h100", "h100", {"qos_gpu_h100-dev": "02:00:00", "qos_gpu_h100-t3": "20:00:00", "qos_gpu_h100-t4": "100:00:00"}),
        ("jean-zay-a100", 8, 8, "abc@a100", "a100", {"qos_gpu_a100-dev": "02:00:00", "qos_gpu_a100-t3": "20:00:00"}),
        ("jean-zay-v100", 4, 10, "abc@v100", None, {"qos_gpu-dev": "02:00:00", "qos_gpu-t3": "20:00:00", "qos_gpu-t4": "100:00:00"}),
    ],
)
def test_jean_zay_facts(name, gpus, cpus, account, constraint, qos):
    p = load_profile(name)
    assert (p.gpus_per_node, p.cpus_per_process, p.constraint) == (gpus, cpus, constraint)
    assert {k: v.max_time for k, v in p.queues.choices.items()} == qos
    assert p.memory_per_node is None and p.memory_per_gpu is None  # memory comes with the CPUs
    assert p.hint_nomultithread and p.project_env == "IDRPROJ"
    a = p.allocate(nodes=2, account="abc")
    options = a.sbatch_options()
    assert f"--account={account}" in options and "--hint=nomultithread" in options
    assert f"--gres=gpu:{gpus}" in options and f"--cpus-per-task={gpus * cpus}" in options
    assert not any(o.startswith("--mem") for o in options)
    assert a.world_size == 2 * gpus


def test_time_longer_than_qos_lists_choices():
    p = load_profile("jean-zay-h100")
    with pytest.raises(ProfileError) as e:
        p.allocate(time="30:00:00", account="abc")
    text = str(e.value)
    assert "qos_gpu_h100-t3 allows (max 20:00:00)" in text
    assert "qos_gpu_h100-dev (max 02:00:00), qos_gpu_h100-t3 (max 20:00:00), qos_gpu_h100-t4 (max 100:00:00)" in text
    assert "use --qos qos_gpu_h100-t4" in text
    with pytest.raises(ProfileError, match="longer than qos_gpu_h100-dev allows"):
        p.allocate(time="02:00:01", qos="dev", account="abc")
    assert "--time=100:00:00" in p.allocate(time="4-04:00:00", qos="t4", account="abc").sbatch_options()


def test_qos_of_another_gpu_kind_is_refused_with_choices():
    with pytest.raises(ProfileError) as e:
        load_profile("jean-zay-a100").allocate(qos="qos_gpu_h100-t4", account="abc")
    text = str(e.value)
    assert "jean-zay-a100 has no qos 'qos_gpu_h100-t4' (qos_gpu_h100-t4 belongs to jean-zay-h100)" in text
    assert "Valid choices: qos_gpu_a100-dev (max 02:00:00), qos_gpu_a100-t3 (max 20:00:00)" in text
    with pytest.raises(ProfileError, match="no qos 't4'"):
        load_profile("jean-zay-a100").allocate(qos="t4", account="abc")


def test_qos_suffix_and_default():
    p = load_profile("jean-zay-v100")
    assert p.allocate(account="abc").qos == "qos_gpu-t3"
    assert p.allocate(qos="dev", account="abc").qos == "qos_gpu-dev"
    assert "--time=02:00:00" in p.allocate(qos="dev", account="abc").sbatch_options()  # default: the QoS maximum


def test_account_pattern_env_and_refusals(monkeypatch):
    p = load_profile("jean-zay-h100")
    assert p.resolve_account("abc@h100") == "abc@h100"
    monkeypatch.setenv("IDRPROJ", "xyz")
    assert p.resolve_account(None) == "xyz@h100"
    monkeypatch.delenv("IDRPROJ")
    with pytest.raises(ProfileError, match=r"needs an account: pass --account PROJECT \(charged as \{project\}@h100\)"):
        p.resolve_account(None)
    with pytest.raises(ProfileError, match="does not fit jean-zay-h100"):
        p.resolve_account("abc@a100")
    for bad in ("$(touch /tmp/x)", "abc`id`", "abc def", "abc\n#SBATCH --x", "a'b"):
        with pytest.raises(ProfileError, match="cannot go into an #SBATCH line"):
            p.resolve_account(bad)
    assert load_profile("lumi-g").resolve_account("465000123") == "project_465000123"
    assert load_profile("lumi-g").resolve_account("project_465000123") == "project_465000123"


def test_nodes_and_gpus_limits():
    lumi = load_profile("lumi-g")
    with pytest.raises(ProfileError, match="small-g allows at most 4 nodes"):
        lumi.allocate(nodes=5, qos="small-g", account="1")
    options = lumi.allocate(nodes=2, qos="dev-g", account="1").sbatch_options()
    assert "--partition=dev-g" in options and "--gpus-per-node=8" in options and "--mem-per-gpu=60G" in options
    with pytest.raises(ProfileError, match="4 GPUs per node"):
        load_profile("jean-zay-h100").allocate(gpus_per_node=8, account="abc")
    one = load_profile("jean-zay-h100").allocate(gpus_per_node=1, account="abc").sbatch_options()
    assert "--gres=gpu:1" in one and "--cpus-per-task=24" in one


def test_cpu_jobs_use_the_cpu_partition():
    options = load_profile("jean-zay-h100").allocate_cpu("abc").sbatch_options()
    assert options[:2] == ["--account=abc@h100", "--partition=prepost"]
    assert not any("gres" in o or "constraint" in o for o in options)


def test_time_parsing():
    assert parse_time("20:00:00") == 72000 and parse_time("1-00:00:00") == 86400
    assert format_time(parse_time("4-04:00:00")) == "100:00:00"
    for bad in ("20h", "1:2:3", "20:60:00", "$(x)"):
        with pytest.raises(ProfileError, match="write HH:MM:SS"):
            parse_time(bad)


def local_profile_text() -> str:
    return resource_path("clusters", "local").read_text(encoding="utf-8")


def test_profile_errors_name_file_and_key(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text(local_profile_text() + "gpu_per_node: 2\n")
    with pytest.raises(ProfileError) as e:
        load_profile(path)
    # the same translator as recipes: the key, a did-you-mean and the valid keys
    assert f"{path}: gpu_per_node: unknown key 'gpu_per_node'. Did you mean 'gpus_per_node'?" in str(e.value)

    path.write_text(local_profile_text().replace("cache: ${TMPDIR:-/tmp}/affinage-cache", "cache: $HOME/.cache"))
    with pytest.raises(ProfileError, match=r"mine.yaml: storage.cache: .*under \$HOME"):
        load_profile(path)

    path.write_text(local_profile_text().replace("default: debug", "default: nope"))
    with pytest.raises(ProfileError, match=r"mine.yaml: queues: .*default 'nope' is not one of choices: debug"):
        load_profile(path)

    path.write_text(local_profile_text() + "env: {X: $(touch /tmp/x)}\n")
    with pytest.raises(ProfileError, match=r"mine.yaml: env: .*no newlines, backticks or \$\( \)"):
        load_profile(path)

    with pytest.raises(ProfileError, match="no cluster profile 'jean-zay-h200'. Valid choices: jean-zay-a100"):
        load_profile("jean-zay-h200")


def test_command_env_keeps_an_explicit_slurm_conf(monkeypatch):
    local = load_profile("local")
    monkeypatch.delenv("SLURM_CONF", raising=False)
    assert local.command_env()["SLURM_CONF"] == "/tmp/affinage-slurm/etc/slurm.conf"
    monkeypatch.setenv("SLURM_CONF", "/elsewhere/slurm.conf")
    assert local.command_env()["SLURM_CONF"] == "/elsewhere/slurm.conf"
