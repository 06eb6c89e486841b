"""lorabot: one small language model, specialised per task with swappable LoRA adapters.

Importing this package must stay cheap: torch and transformers are imported only where the model is
actually needed (bot.engine.loading, bot.engine.scheduler, training).
"""

__version__ = "0.1.0"
