"""Tokenizers behind one interface (``Tokenizer``): byte, char, word (Transformer-XL style), sentencepiece."""
from .base import Tokenizer
from .byte import ByteTokenizer
from .char import CharTokenizer
from .word import WordTokenizer

__all__ = ["Tokenizer", "ByteTokenizer", "CharTokenizer", "WordTokenizer", "SentencePieceTokenizer"]


def __getattr__(name):  # sentencepiece is imported only when asked for
    if name == "SentencePieceTokenizer":
        from .sentencepiece import SentencePieceTokenizer
        return SentencePieceTokenizer
    raise AttributeError(name)
