"""Thin chat-platform transports: they convert platform updates to ``bot.messages.Incoming``, call
``bot.core.Core`` and render its ``Reply`` back. No conversation behaviour lives here.

Import the submodules (``bot.transports.telegram_chat``, ``bot.transports.discord_chat``) directly: each
pulls in only its own platform library, and none of them imports torch.
"""
