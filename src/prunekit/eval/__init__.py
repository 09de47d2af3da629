"""Evaluation of (pruned) models: perplexity with its protocol (text, split, windows, stride).

`perplexity(model, evaluation_data(tokenizer, "default"))` returns a `PerplexityResult` whose
string form carries the protocol, so numbers measured differently are never compared by accident.
"""
from .perplexity import PerplexityResult, perplexity

__all__ = ["PerplexityResult", "perplexity"]
