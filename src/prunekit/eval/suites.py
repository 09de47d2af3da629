"""Evaluation suites of a pruned model, each number reported with the protocol that produced it.

Suites:

* ``perplexity``: `prunekit.eval.perplexity` on the held-out split of ``protocol.data``;
* ``fidelity``: token KL, top-1 agreement and the Divergent Token Metrics (arXiv 2311.01544)
  against the dense model on the same text (`prunekit.eval.fidelity`); needs a dense reference;
* ``knowledge``: factual questions in the spirit of LLM-KICK (arXiv 2310.01382), exact match and
  multiple-choice rank, with retention relative to the dense model (`prunekit.eval.knowledge`);
* ``lm-eval``: zero-shot tasks through upstream lm-evaluation-harness (`prunekit.eval.zeroshot`);
* ``long-context``: needle, key-value and document-QA retrieval at depths 10-90% of prompts of
  ``protocol.contexts`` tokens built from the held-out split of ``protocol.data``, exact match
  (`prunekit.eval.long_context`); the suite that inference-time pruning (`prunekit.inference`,
  ``evaluate(..., token_pruning=..., kv_pruning=...)``) is judged by. Slow (prompts of thousands of
  tokens), so not part of ``all``.

The dense model's side of every comparison is a `Reference`, computed once by `reference(...)`
and reused for any number of pruned models (a sweep evaluates many models against one dense
model); it saves to a directory (safetensors + JSON) and refuses to load under another protocol,
because numbers measured differently must not be compared.

`evaluate(...)` also checks the dense baseline against the value recorded at pruning time (the
``dense_perplexity`` of the model directory's ``prunekit.json``): the same protocol must give the
same number, and a difference means the evaluation setup drifted (another text, tokenizer or
library version) -- the warning says so before anyone compares the pruned numbers.
"""
from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch

from ..io.atomic import clean_stale_staging, staging_dir
from ..io.export import swap_into_place

SUITES = ("perplexity", "fidelity", "knowledge", "lm-eval", "long-context")
ALL_OFFLINE = ("perplexity", "fidelity", "knowledge")       # `--suite all`: lm-eval needs the network,
                                                             # long-context takes long
DRIFT_TOLERANCE = 1e-3                                       # relative; perplexity is deterministic
REFERENCE_JSON = "reference.json"
REFERENCE_TENSORS = "reference.safetensors"
REFERENCE_FORMAT = 1
log = logging.getLogger(__name__)


@contextmanager
def _timed(what: str):
    """Log how long a stage took (visible with `prunekit -v`)."""
    started = time.perf_counter()
    yield
    log.info("%s: %.1f s", what, time.perf_counter() - started)


@dataclass(frozen=True)
class EvalProtocol:
    """Everything that fixes the numbers of the suites; two runs with equal protocols are comparable."""
    data: str = "default"              # evaluation text source, its held-out split (prunekit.data.evaluation_data)
    seqlen: int = 512
    stride: int | None = None
    max_tokens: int | None = None
    fidelity_tokens: int = 4096        # KL/top-1 over the first windows of the same text covering this many tokens
    prompts: int = 16                  # divergent-token metrics: prompts cut from the eval text
    prompt_tokens: int = 32
    new_tokens: int = 32               # dense greedy continuation length
    knowledge_shots: int = 3           # fixed few-shot prefix (examples NOT among the scored questions)
    lm_eval_tasks: tuple[str, ...] = ("arc_easy", "hellaswag", "piqa", "winogrande", "boolq", "mmlu")
    lm_eval_limit: int | None = None
    batch_size: int = 8
    knowledge_data: str | None = None  # a knowledge .jsonl; None = the bundled question set
    lm_eval_include: str | None = None  # a directory of local lm-eval task configs
    contexts: tuple[int, ...] = (2048, 4096, 8192)   # long-context: prompt budgets in tokens
    long_context_samples: int = 10     # long-context: prompts per task and context (depths cycle every 5)

    def __post_init__(self):
        if not isinstance(self.data, str) or not self.data:
            raise ValueError(f"data must be a text source (default, a file, wikitext2, ...), got {self.data!r}")
        _positive("seqlen", self.seqlen, minimum=2)
        if self.stride is not None and (not _is_int(self.stride) or not 1 <= self.stride <= self.seqlen):
            raise ValueError(f"stride must be an integer in [1, seqlen={self.seqlen}] or None, got {self.stride!r}")
        if self.max_tokens is not None:
            _positive("max_tokens", self.max_tokens, minimum=2)
        _positive("fidelity_tokens", self.fidelity_tokens)
        _positive("prompts", self.prompts)
        _positive("prompt_tokens", self.prompt_tokens)
        _positive("new_tokens", self.new_tokens)
        from .knowledge import FEW_SHOT
        if not _is_int(self.knowledge_shots) or not 0 <= self.knowledge_shots <= len(FEW_SHOT):
            raise ValueError(f"knowledge_shots must be an integer in [0, {len(FEW_SHOT)}] (the fixed few-shot "
                             f"examples), got {self.knowledge_shots!r}")
        _positive("batch_size", self.batch_size)
        if self.lm_eval_limit is not None:
            _positive("lm_eval_limit", self.lm_eval_limit)
        tasks = self.lm_eval_tasks
        if isinstance(tasks, str):
            tasks = tuple(t.strip() for t in tasks.split(",") if t.strip())
        if not isinstance(tasks, (tuple, list)) or not tasks or not all(isinstance(t, str) and t for t in tasks):
            raise ValueError(f"lm_eval_tasks must be task names such as ('arc_easy', 'piqa'), "
                             f"got {self.lm_eval_tasks!r}")
        object.__setattr__(self, "lm_eval_tasks", tuple(tasks))
        from .long_context import parse_contexts
        object.__setattr__(self, "contexts", parse_contexts(self.contexts))
        _positive("long_context_samples", self.long_context_samples)
        for name in ("knowledge_data", "lm_eval_include"):
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, os.fspath(value))

    def to_dict(self) -> dict:
        out = asdict(self)
        out["lm_eval_tasks"] = list(self.lm_eval_tasks)
        out["contexts"] = list(self.contexts)
        return out

    @classmethod
    def from_dict(cls, data: dict) -> "EvalProtocol":
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown evaluation protocol fields {sorted(unknown)}; known: {sorted(known)}")
        values = dict(data)
        if "lm_eval_tasks" in values:
            values["lm_eval_tasks"] = tuple(values["lm_eval_tasks"])
        if "contexts" in values:
            values["contexts"] = tuple(values["contexts"])
        return cls(**values)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _positive(name: str, value, minimum: int = 1) -> None:
    if not _is_int(value) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


def parse_suites(suites) -> tuple[str, ...]:
    """"perplexity,fidelity" / ["fidelity"] / "all" -> the suite names in canonical order."""
    if isinstance(suites, str):
        suites = [s.strip() for s in suites.split(",") if s.strip()]
    names = []
    for name in suites:
        if name == "all":
            names.extend(ALL_OFFLINE)
        elif name in SUITES:
            names.append(name)
        else:
            raise ValueError(f"unknown suite {name!r}; choose from {', '.join(SUITES)} (or all = "
                             f"{','.join(ALL_OFFLINE)})")
    if not names:
        raise ValueError(f"no suite given; choose from {', '.join(SUITES)}")
    return tuple(s for s in SUITES if s in names)


# ----------------------------------------------------------------------------------------------
# The dense reference
# ----------------------------------------------------------------------------------------------

@dataclass(eq=False)
class Reference:
    """What the dense model contributes, computed once and reused for many evaluated models."""
    protocol: EvalProtocol
    suites: tuple[str, ...]
    vocab_size: int
    text: dict = field(default_factory=dict)          # protocol of the evaluation text (source, sha256, ...)
    perplexity: dict | None = None                    # PerplexityResult.to_dict() of the dense model
    logprobs: torch.Tensor | None = None              # (fidelity_tokens, V) float32 dense log-probs
    prompts: torch.Tensor | None = None               # (prompts, prompt_tokens) token ids
    continuations: torch.Tensor | None = None         # (prompts, new_tokens) dense greedy continuations
    knowledge: list | None = None                     # per-question dense results
    lm_eval: dict | None = None                       # dense lm-eval results

    def save(self, directory) -> None:
        """Write reference.safetensors + reference.json into `directory`, atomically (temp dir + rename)."""
        from safetensors.torch import save_file
        directory = Path(directory)
        directory.parent.mkdir(parents=True, exist_ok=True)
        clean_stale_staging(directory)
        staging = staging_dir(directory)    # marked: what a killed run leaves is removed by the next one
        try:
            tensors = {name: getattr(self, name).contiguous() for name in ("logprobs", "prompts", "continuations")
                       if getattr(self, name) is not None}
            if tensors:
                save_file(tensors, str(staging / REFERENCE_TENSORS))
            meta = {"format": REFERENCE_FORMAT, "protocol": self.protocol.to_dict(), "suites": list(self.suites),
                    "vocab_size": self.vocab_size, "text": self.text, "perplexity": self.perplexity,
                    "knowledge": self.knowledge, "lm_eval": self.lm_eval}
            (staging / REFERENCE_JSON).write_text(json.dumps(meta, indent=1, default=str))
            if directory.exists() and not (directory / REFERENCE_JSON).is_file():
                raise FileExistsError(f"{directory} exists and is not a prunekit reference; choose another "
                                      "directory (nothing there was changed)")
            swap_into_place(staging, directory)
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    @classmethod
    def load(cls, directory, protocol: EvalProtocol | None = None, suites=None) -> "Reference":
        """Read a saved reference; with `protocol`/`suites`, refuse (ValueError) one made differently."""
        directory = Path(directory)
        meta_path = directory / REFERENCE_JSON
        if not meta_path.is_file():
            raise FileNotFoundError(f"no prunekit reference in {directory} (expected {REFERENCE_JSON}); "
                                    "create one with prunekit.eval.reference(...).save(DIR)")
        meta = json.loads(meta_path.read_text())
        if meta.get("format") != REFERENCE_FORMAT:
            raise ValueError(f"{directory}: reference format {meta.get('format')!r}, this prunekit reads "
                             f"{REFERENCE_FORMAT}; recompute the reference")
        tensors = {}
        if (directory / REFERENCE_TENSORS).is_file():
            from safetensors.torch import load_file
            tensors = load_file(str(directory / REFERENCE_TENSORS))
        ref = cls(protocol=EvalProtocol.from_dict(meta["protocol"]), suites=tuple(meta["suites"]),
                  vocab_size=int(meta["vocab_size"]), text=meta.get("text") or {}, perplexity=meta.get("perplexity"),
                  logprobs=tensors.get("logprobs"), prompts=tensors.get("prompts"),
                  continuations=tensors.get("continuations"), knowledge=meta.get("knowledge"),
                  lm_eval=meta.get("lm_eval"))
        ref.check(protocol, suites)
        return ref

    def check(self, protocol: EvalProtocol | None = None, suites=None) -> None:
        """ValueError unless this reference was made under `protocol` and covers `suites`."""
        if protocol is not None and protocol != self.protocol:
            mine, theirs = self.protocol.to_dict(), protocol.to_dict()
            diff = ", ".join(f"{k}: reference {mine[k]!r} vs requested {theirs[k]!r}"
                             for k in mine if mine[k] != theirs[k])
            raise ValueError(f"the dense reference was computed under another evaluation protocol ({diff}); "
                             "recompute it with the same settings")
        if suites is not None:
            needed = [s for s in parse_suites(suites) if s in ("fidelity", "knowledge", "lm-eval", "perplexity")]
            missing = [s for s in needed if s not in self.suites]
            if missing:
                raise ValueError(f"the dense reference covers suites {list(self.suites)}, not {missing}; "
                                 "recompute it with those suites")


def vocab_size(model) -> int:
    from .perplexity import vocab_size as vocab
    return vocab(model)


def _fidelity_batch(protocol: EvalProtocol, vocab: int) -> int:
    """Windows per forward in the fidelity pass: at most batch_size, and float32 logits under ~512 MB.

    Depends only on the protocol and the vocabulary, so the dense and the evaluated model run the
    same batch shapes (and a model compared with itself agrees exactly).
    """
    from .perplexity import LOGITS_BUDGET_BYTES
    return max(1, min(protocol.batch_size, LOGITS_BUDGET_BYTES // (protocol.seqlen * vocab * 4)))


def _eval_text(tokenizer, protocol: EvalProtocol):
    from ..data import evaluation_data
    return evaluation_data(tokenizer, protocol.data, max_tokens=protocol.max_tokens)


def _prompts(text_ids: torch.Tensor, protocol: EvalProtocol) -> torch.Tensor:
    from .fidelity import prompt_starts
    length = protocol.prompt_tokens + protocol.new_tokens     # the continuation must fit in the model's context
    starts = prompt_starts(int(text_ids.numel()), protocol.prompts, length)
    return torch.stack([text_ids[s:s + protocol.prompt_tokens] for s in starts])


def _run_perplexity(model, text, protocol: EvalProtocol, device):
    from .perplexity import perplexity
    return perplexity(model, text, seqlen=protocol.seqlen, stride=protocol.stride, device=device)


class _OnDevice:
    """Move a model to `device` for the measurement and back afterwards; eval mode inside."""

    def __init__(self, model, device):
        self.model, self.device = model, torch.device(device)

    def __enter__(self):
        self.home = next(self.model.parameters()).device
        self.training = self.model.training
        dispatched = len(set((getattr(self.model, "hf_device_map", None) or {}).values())) > 1
        self.moved = not dispatched and self.home != self.device
        if self.moved:
            self.model.to(self.device)
        self.model.eval()
        return self.device if not dispatched else self.home

    def __exit__(self, *exc):
        if self.moved:
            self.model.to(self.home)
        self.model.train(self.training)


def reference(dense_model, tokenizer, suites, protocol: EvalProtocol = EvalProtocol(), *,
              device="cpu", trust_remote_code: bool = False) -> Reference:
    """Measure the dense model once: everything `evaluate` compares a pruned model against."""
    from .fidelity import dense_logprobs, fidelity_windows, greedy_continuations
    suites = parse_suites(suites)
    vocab = vocab_size(dense_model)
    ref = Reference(protocol=protocol, suites=suites, vocab_size=vocab)
    text = None
    if "perplexity" in suites or "fidelity" in suites:
        text = _eval_text(tokenizer, protocol)
        ref.text = dict(text.protocol)
    if "perplexity" in suites:
        with _timed("dense perplexity"):
            ref.perplexity = _run_perplexity(dense_model, text, protocol, device).to_dict()
    with _OnDevice(dense_model, device) as run_on:
        if "fidelity" in suites:
            started = time.perf_counter()
            windows = fidelity_windows(text.ids, protocol.seqlen, protocol.fidelity_tokens)
            ref.logprobs = dense_logprobs(dense_model, windows, protocol.fidelity_tokens,
                                          _fidelity_batch(protocol, vocab), run_on)
            ref.prompts = _prompts(text.ids, protocol)
            ref.continuations = greedy_continuations(dense_model, ref.prompts, protocol.new_tokens,
                                                     protocol.batch_size, run_on)
            log.info("dense fidelity reference: %.1f s", time.perf_counter() - started)
        if "knowledge" in suites:
            from .knowledge import load_questions, run_knowledge
            started = time.perf_counter()
            ref.knowledge = run_knowledge(dense_model, tokenizer, load_questions(protocol.knowledge_data),
                                          shots=protocol.knowledge_shots, batch_size=protocol.batch_size,
                                          device=run_on)
            log.info("dense knowledge: %.1f s", time.perf_counter() - started)
        if "lm-eval" in suites:
            from .zeroshot import run_lm_eval
            ref.lm_eval = run_lm_eval(dense_model, tokenizer, protocol.lm_eval_tasks, limit=protocol.lm_eval_limit,
                                      batch_size=protocol.batch_size, include=protocol.lm_eval_include, device=run_on,
                                      trust_remote_code=trust_remote_code)
    return ref


# ----------------------------------------------------------------------------------------------
# Evaluation of one model
# ----------------------------------------------------------------------------------------------

def _fidelity(model, text_ids, protocol: EvalProtocol, ref: Reference, device) -> dict:
    from .fidelity import (divergent_tokens, fidelity_windows, teacher_forced_argmax, token_kl, top1_agreement,
                           window_logits)
    windows = fidelity_windows(text_ids, protocol.seqlen, protocol.fidelity_tokens)
    kl_sum, agree_sum, scored = 0.0, 0.0, 0
    for logits in window_logits(model, windows, protocol.fidelity_tokens, _fidelity_batch(protocol, ref.vocab_size),
                                device):
        dense = ref.logprobs[scored:scored + logits.shape[0]]
        kl_sum += float(token_kl(dense, logits).double().sum())
        agree_sum += float(top1_agreement(dense, logits).double().sum())
        scored += logits.shape[0]
    if scored != ref.logprobs.shape[0]:
        raise RuntimeError(f"fidelity scored {scored} positions, the reference has {ref.logprobs.shape[0]}")
    predicted = teacher_forced_argmax(model, ref.prompts, ref.continuations, protocol.batch_size, device)
    fdt, sdt = divergent_tokens(predicted, ref.continuations)
    n_prompts, new_tokens = ref.continuations.shape
    line = (f"KL(dense || model) and top-1 agreement over {scored} positions (the first {windows.shape[0]} "
            f"windows of seqlen={protocol.seqlen} of the evaluation text); divergent tokens: {n_prompts} prompts "
            f"of {protocol.prompt_tokens} tokens from the evaluation text, dense greedy continuation of "
            f"{new_tokens} tokens, model teacher-forced (arXiv 2311.01544)")
    return {
        "kl_mean": kl_sum / scored,
        "top1_agreement": agree_sum / scored,
        "first_divergent_token_mean": float(fdt.double().mean()),
        "first_divergent_token_median": float(fdt.double().median()),
        "share_divergent_tokens": float(sdt.double().mean()),
        "positions": scored,
        "prompts": n_prompts,
        "new_tokens": new_tokens,
        "first_divergent_token": fdt.tolist(),
        "protocol": line,
    }


def _comparable_fields(result: dict) -> dict:
    source = result.get("source") or {}
    return {"source": source.get("source"), "split": source.get("split"), "tokens": result.get("tokens"),
            "seqlen": result.get("seqlen"), "stride": result.get("stride"), "text sha256": source.get("sha256")}


def drift_warnings(baseline: dict | None, recorded: dict | None) -> list[str]:
    """Warnings when the dense perplexity measured now disagrees with the one recorded at pruning time.

    Both are `PerplexityResult.to_dict()`s. Same protocol (source, split, tokens, seqlen, stride,
    and the text's hash where both have one) and a relative difference above 0.1%: "protocol
    drift". Different protocols: say which fields differ, since the numbers are not comparable.
    """
    if not baseline or not recorded:
        return []
    mine, theirs = _comparable_fields(baseline), _comparable_fields(recorded)
    differ = [k for k in mine if mine[k] != theirs[k] and not (k == "text sha256" and None in (mine[k], theirs[k]))]
    now, then = baseline.get("ppl"), recorded.get("ppl")
    if differ:
        detail = ", ".join(f"{k} {theirs[k]!r} at pruning time vs {mine[k]!r} now" for k in differ)
        return [f"dense baseline measured under another protocol than at pruning time ({detail}); "
                f"its perplexity {now} and the recorded {then} are not comparable"]
    if not (isinstance(now, (int, float)) and isinstance(then, (int, float))):
        return []
    if math.isfinite(now) and math.isfinite(then) and then > 0 and abs(now - then) / then <= DRIFT_TOLERANCE:
        return []
    if now == then:
        return []
    return [f"protocol drift: the dense baseline perplexity is {now:.4f} now but {then:.4f} was recorded at "
            f"pruning time under the same protocol ({baseline.get('protocol')}); the tokenizer, the text, "
            "the dtype or a library version changed, so compare the pruned numbers with care"]


def evaluate(model, tokenizer, suites, protocol: EvalProtocol = EvalProtocol(), *,
             reference: Reference | None = None, device="cpu", recorded: dict | None = None,
             trust_remote_code: bool = False, token_pruning=None, kv_pruning=None, prompt_pruning=None) -> dict:
    """Run `suites` on `model`; JSON-ready dict of every number with its protocol (see the module docstring).

    `token_pruning` / `kv_pruning` (`prunekit.inference.configs`) wrap the generations of the
    long-context suite in `prunekit.inference.generation.pruning`, and `prompt_pruning` fits its prompts
    into a budget first; the other suites score the model as it is, so asking for pruning without the
    long-context suite is an error, not a no-op.
    """
    suites = parse_suites(suites)
    if any(c is not None for c in (token_pruning, kv_pruning, prompt_pruning)) and "long-context" not in suites:
        raise ValueError("token, KV and prompt pruning act on generation, which the long-context suite measures; "
                         "add long-context to the suites")
    ref = reference
    if "fidelity" in suites and ref is None:
        raise ValueError("the fidelity suite compares against the dense model: pass --baseline DENSE "
                         "(or reference=prunekit.eval.reference(dense_model, ...))")
    warnings: list[str] = []
    if ref is not None:
        ref.check(protocol, [s for s in suites if s != "perplexity"] or None)
        vocab = vocab_size(model)
        if vocab != ref.vocab_size:
            raise ValueError(f"the model's vocabulary ({vocab} tokens) differs from the dense reference's "
                             f"({ref.vocab_size}); a baseline must share the model's tokenizer")
    out: dict = {"suites": {}, "warnings": warnings, "protocol": protocol.to_dict()}
    text = None
    if "perplexity" in suites or "fidelity" in suites:
        text = _eval_text(tokenizer, protocol)
        if ref is not None and ref.text and ref.text.get("sha256") != text.protocol.get("sha256"):
            raise ValueError(f"the evaluation text differs from the dense reference's (sha256 "
                             f"{text.protocol.get('sha256')} vs {ref.text.get('sha256')}); recompute the reference")
        if ref is not None and ref.text and ref.text.get("tokens") != text.protocol.get("tokens"):
            raise ValueError(f"the evaluation text tokenizes to {text.protocol.get('tokens')} tokens, the dense "
                             f"reference's to {ref.text.get('tokens')}: the tokenizers differ")
    if "perplexity" in suites:
        with _timed("perplexity"):
            result = _run_perplexity(model, text, protocol, device).to_dict()
        if ref is not None and ref.perplexity is not None:
            result["baseline"] = ref.perplexity
            result["ratio_to_baseline"] = result["ppl"] / ref.perplexity["ppl"] if ref.perplexity["ppl"] else None
        out["suites"]["perplexity"] = result
    if ref is not None and ref.perplexity is not None:
        warnings.extend(drift_warnings(ref.perplexity, recorded))
    with _OnDevice(model, device) as run_on:
        if "fidelity" in suites:
            with _timed("fidelity"):
                out["suites"]["fidelity"] = _fidelity(model, text.ids, protocol, ref, run_on)
        if "knowledge" in suites:
            from .knowledge import load_questions, questions_fingerprint, run_knowledge, summarize
            questions = load_questions(protocol.knowledge_data)
            with _timed("knowledge"):
                per_question = run_knowledge(model, tokenizer, questions, shots=protocol.knowledge_shots,
                                             batch_size=protocol.batch_size, device=run_on)
            out["suites"]["knowledge"] = summarize(per_question, ref.knowledge if ref is not None else None,
                                                   shots=protocol.knowledge_shots,
                                                   fingerprint=questions_fingerprint(questions))
        if "lm-eval" in suites:
            from .zeroshot import run_lm_eval
            result = run_lm_eval(model, tokenizer, protocol.lm_eval_tasks, limit=protocol.lm_eval_limit,
                                 batch_size=protocol.batch_size, include=protocol.lm_eval_include, device=run_on,
                                 trust_remote_code=trust_remote_code)
            if ref is not None and ref.lm_eval is not None:
                result["baseline"] = ref.lm_eval
            out["suites"]["lm-eval"] = result
        if "long-context" in suites:
            from .long_context import long_context_suite
            with _timed("long-context"):
                out["suites"]["long-context"] = long_context_suite(
                    model, tokenizer, protocol.contexts, samples=protocol.long_context_samples, source=protocol.data,
                    token_pruning=token_pruning, kv_pruning=kv_pruning, prompt_pruning=prompt_pruning,
                    device=run_on)
    return out
