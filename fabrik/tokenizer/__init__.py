"""Tokenization: text <-> token ids, chat templates, and streaming detokenization with stop strings."""

from fabrik.tokenizer.chat_template import ChatTemplate, ChatTemplateError
from fabrik.tokenizer.detokenizer import IncrementalDetokenizer
from fabrik.tokenizer.tokenizer import ChatPrompt, Tokenizer, TokenLimitExceeded

__all__ = ["ChatPrompt", "ChatTemplate", "ChatTemplateError", "IncrementalDetokenizer", "Tokenizer",
           "TokenLimitExceeded"]
