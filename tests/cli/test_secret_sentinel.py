"""A secret given on the command line or held in the environment reaches no file of the run
directory or its slurm/ folder: recipe.yaml, job scripts and their --set comments, summaries,
metrics, TensorBoard files, checkpoints, provenance, card, report."""

from __future__ import annotations

from pathlib import Path


from affinage.cli import main

SENTINEL = "hf_" + "Sentinel0123456789abcdefXYZ"  # shaped like a Hugging Face token
ENV_SECRET = "s3cr3t-value-of-wandb"  # held by a credential variable, not token-shaped


def write_recipe(tmp_path: Path, model_dir: Path, data: Path, report: str) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(f"""
name: sentinel
task: sft
model: {{name_or_path: {model_dir}, dtype: float32}}
method: {{kind: lora, lora: {{r: 4, alpha: 8, dropout: 0.0}}}}
data: {{sources: [{{path: {data}, format: chat, max_records: 8}}], max_length: 96}}
training: {{global_batch_size: 4, micro_batch_size: 2, duration: 2 steps, save_every: 1, report_to: {report}}}
output: {{dir: {tmp_path / 'run'}}}
""", encoding="utf-8")
    return path


def files_holding(root: Path, needle: str) -> list[str]:
    return [str(p.relative_to(root)) for p in sorted(root.rglob("*")) if p.is_file() and needle.encode() in p.read_bytes()]


def test_secret_sentinel_appears_in_no_file_of_the_run(tmp_path, tiny_llama_dir, demo_data, monkeypatch, capsys):
    monkeypatch.setenv("WANDB_API_KEY", ENV_SECRET)
    try:
        import tensorboard  # noqa: F401

        report = "[tensorboard]"
    except ImportError:
        report = "[none]"
    path = write_recipe(tmp_path, tiny_llama_dir, demo_data / "qa_culture.jsonl", report)
    run_dir = tmp_path / "run"
    secret_sets = ["--set", f"description=token {SENTINEL}", "--set", f"card.provider=ACME {ENV_SECRET}"]
    assert main(["train", str(path), "--run-dir", str(run_dir), *secret_sets]) == 0
    assert main(["card", str(run_dir)]) == 0
    assert main(["submit", str(path), "--cluster", "local", "--run-dir", str(run_dir), "--dry-run",
                 "--pipeline", "train,eval", *secret_sets]) == 0
    assert (run_dir / "slurm").is_dir() and list((run_dir / "slurm").glob("*.sbatch"))
    assert "[redacted]" in (run_dir / "recipe.yaml").read_text()
    assert "[redacted]" in next((run_dir / "slurm").glob("*.sbatch")).read_text()
    for needle in (SENTINEL, ENV_SECRET):
        assert files_holding(run_dir, needle) == [], needle
    out = capsys.readouterr()
    assert SENTINEL not in out.out and ENV_SECRET not in out.out
