"""Reproducible build of an ONNX Runtime GenAI package (AWQ 4-bit base + LoRA adapter).

Each stage lives in its own module with one pure entry point ``build(...)``; ``dodo.py`` only wires
them. Heavy libraries (torch, transformers, onnxruntime) are imported inside stage modules only, so
loading the task graph stays fast.
"""
