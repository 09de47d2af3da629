"""Evaluation of (pruned) models, every number reported with the protocol that produced it.

* `perplexity(model, evaluation_data(tokenizer, "default"))` returns a `PerplexityResult` whose
  string form carries the protocol (text, split, windows, stride), so numbers measured
  differently are never compared by accident.
* `reference(dense, tokenizer, suites, protocol)` measures the dense model once (a `Reference`,
  saved with `.save(DIR)`); `evaluate(model, tokenizer, suites, protocol, reference=...)` runs the
  suites of `SUITES` on a pruned model: perplexity, fidelity to the dense model (token KL, top-1
  agreement, divergent-token metrics, arXiv 2311.01544), knowledge retention (LLM-KICK style,
  arXiv 2310.01382) and zero-shot tasks through lm-evaluation-harness; see `prunekit.eval.suites`.
"""
from .perplexity import PerplexityResult, perplexity
from .suites import SUITES, EvalProtocol, Reference, drift_warnings, evaluate, parse_suites, reference

__all__ = ["PerplexityResult", "perplexity", "SUITES", "EvalProtocol", "Reference", "drift_warnings", "evaluate",
           "parse_suites", "reference"]
