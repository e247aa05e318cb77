"""Tokenizers behind one interface (``Tokenizer``): byte, char, word (Transformer-XL style), sentencepiece, and a
Hugging Face tokenizer.json (``hf``, for imported models)."""
from .base import Tokenizer
from .byte import ByteTokenizer
from .char import CharTokenizer
from .word import WordTokenizer

__all__ = ["Tokenizer", "ByteTokenizer", "CharTokenizer", "WordTokenizer", "SentencePieceTokenizer", "HFTokenizer"]


def __getattr__(name):  # sentencepiece is imported only when asked for
    if name == "SentencePieceTokenizer":
        from .sentencepiece import SentencePieceTokenizer
        return SentencePieceTokenizer
    if name == "HFTokenizer":  # so is the tokenizers library (Hugging Face)
        from .hf import HFTokenizer
        return HFTokenizer
    raise AttributeError(name)
