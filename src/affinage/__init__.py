"""affinage: cultural fine-tuning of open LLMs (French language, law, history and culture)."""

__version__ = "0.1.0"
