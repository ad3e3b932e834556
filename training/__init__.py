"""Offline QLoRA fine-tuning and evaluation of NLI adapters (the ``nli-train`` command)."""
