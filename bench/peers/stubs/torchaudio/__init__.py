"""Stand-in for torchaudio in the LLaMA-Factory venv (bench only).

LLaMA-Factory 0.9.5 imports torchaudio at module level (``data/mm_plugin.py``) for audio inputs; no
torchaudio wheel exists for torch 2.13 (newest: 2.11.1, whose library fails to load with 2.13), and
text fine-tuning never calls it. bench_sft.py puts this folder on the peer's PYTHONPATH.
"""


def __getattr__(name):
    raise ImportError(f"torchaudio.{name}: torchaudio is not installed in the bench's LLaMA-Factory venv (text only)")
