"""Bridges to other tools: NeMo `.nemo` checkpoints (`nemo`), transformers' Parakeet models (`parakeet`),
and the Hugging Face Hub (`hub`: model cards and pushes)."""
