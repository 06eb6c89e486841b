"""Training, evaluation and export of lorabot's LoRA adapters (``lorabot train | eval | export``).

Importing this package is cheap; torch and transformers are imported by the modules that need them.
"""
