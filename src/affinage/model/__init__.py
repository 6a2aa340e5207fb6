"""Models, offline: find them (``resolve``), load them as the recipe says (``load``), build tiny
ones of the same architecture for smoke runs and tests (``tiny``), merge trained adapters
(``merge``). Submodules import torch/transformers lazily; import them directly.
"""
