"""Tokenization: text <-> token ids, chat templates, and streaming detokenization with stop strings."""

from fabrik.tokenizer.chat_template import ChatTemplate, ChatTemplateError
from fabrik.tokenizer.detokenizer import IncrementalDetokenizer
from fabrik.tokenizer.tokenizer import Tokenizer

__all__ = ["ChatTemplate", "ChatTemplateError", "IncrementalDetokenizer", "Tokenizer"]
