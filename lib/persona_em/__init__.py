"""persona_em: does the diversity of a constitution's questions make a trained persona robust to emergent
misalignment? The library behind notebooks/01-05; one concept per module."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

__version__ = "0.1.0"
