"""Pruner-Zero: prune by a symbolic metric of W, X and G found by genetic programming, compared
within each output row (Dong et al., "Pruner-Zero: Evolving Symbolic Pruning Metric from Scratch
for Large Language Models", arXiv 2406.02924). No weight update.

The default is the searched metric the reference ships for LLaMA (data/best_tree.json and the
README's "Searched Symbolic Pruning Metric" of pprp/Pruner-Zero): mul(abs(mul(W, W)), mms(G)),
written here as `abs(W * W) * mms(G)`, i.e. W^2 times the min-max-scaled gradient norm.

Matches `prune_pruner_zero` of pprp/Pruner-Zero (lib/prune.py) and its operators (lib/gptree.py):
- W is |W| (the reference hands the tree the magnitude), (out, in);
- X is the reference's `scaler_row`: sum_t x_tj^2 averaged over calibration windows, the squared
  input norm (not the norm), broadcast over rows as (1, in);
- G is GBLM's gradient file: 100 * the l2 norm of per-window gradients (`WithGradient.grad_l2`);
- functions keep the reference's names and guards: sqrt(|x|), log(|x| + 0.001), exp clamped at
  100, sqr = pow = x^2, skp = identity, neg, abs, tanh, mms (min-max over the whole tensor), zsn
  (z-score over the whole tensor), add/sub/mul, and div(x, y) = x / ||y||_F (the reference's
  tensor div); infix + - * / are elementwise. `sigmoid` and `square` are our additions. mms and
  zsn of a constant tensor give 0 (the reference gives NaN).

Formulas are parsed with `ast` and only the names, numbers and operators above are accepted, so
a recipe's formula can never run code.
"""
from __future__ import annotations

import ast
from dataclasses import dataclass
from functools import lru_cache

import torch
from torch import Tensor

from ..gradients import GradientScoreConfig, WithGradient
from ..masks import lowest
from ..registry import register
from ..stats import InputNorm

DEFAULT_FORMULA = "abs(W * W) * mms(G)"
GRADIENT_SCALE = 100.0    # the references store gradients * 100 (GBLM's --scale); G keeps that scale


def _min_max(x: Tensor) -> Tensor:
    low, high = x.min(), x.max()
    return (x - low) / (high - low).clamp_min(torch.finfo(x.dtype).tiny)


def _z_score(x: Tensor) -> Tensor:
    return (x - x.mean()) / x.std().clamp_min(torch.finfo(x.dtype).tiny)


UNARY = {
    "abs": torch.abs, "neg": torch.neg, "tanh": torch.tanh, "sigmoid": torch.sigmoid,
    "sqr": torch.square, "pow": torch.square, "square": torch.square,
    "sqrt": lambda x: x.abs().sqrt(), "log": lambda x: (x.abs() + 0.001).log(),
    "exp": lambda x: x.clamp(max=100).exp(), "skp": lambda x: x, "mms": _min_max, "zsn": _z_score,
}
BINARY = {"add": torch.add, "sub": torch.sub, "mul": torch.mul, "div": lambda x, y: x / torch.linalg.norm(y)}
OPERATORS = {ast.Add: torch.add, ast.Sub: torch.sub, ast.Mult: torch.mul, ast.Div: torch.div}
VARIABLES = ("W", "X", "G")
MAX_LENGTH = 500


@lru_cache(maxsize=64)
def parse_formula(formula: str) -> tuple[ast.expr, frozenset[str]]:
    """(expression tree, variables it uses); ValueError naming the first token not allowed."""
    if len(formula) > MAX_LENGTH:       # also bounds the nesting depth the recursive evaluator meets
        raise ValueError(f"formula is {len(formula)} characters long; at most {MAX_LENGTH} are accepted")
    try:
        tree = ast.parse(formula.strip(), mode="eval").body
    except SyntaxError as err:
        raise ValueError(f"formula {formula!r} is not a valid expression: {err.msg}") from None
    names, called = set(), set()
    for node in ast.walk(tree):       # breadth first: a call is seen before its function's name
        token = ast.get_source_segment(formula.strip(), node) or type(node).__name__
        if isinstance(node, ast.Call):
            if not isinstance(node.func, ast.Name) or node.keywords:
                raise ValueError(f"formula {formula!r}: {token!r} is not allowed (plain calls like mms(G) only)")
            called.add(id(node.func))
            arity = 1 if node.func.id in UNARY else 2 if node.func.id in BINARY else None
            if arity is None:
                raise ValueError(f"formula {formula!r}: unknown function {node.func.id!r}; "
                                 f"allowed: {', '.join(sorted(UNARY) + sorted(BINARY))}")
            if len(node.args) != arity or any(isinstance(a, ast.Starred) for a in node.args):
                raise ValueError(f"formula {formula!r}: {node.func.id} takes {arity} argument(s), in {token!r}")
        elif isinstance(node, ast.Name):
            if id(node) in called:
                continue
            if node.id not in VARIABLES:
                raise ValueError(f"formula {formula!r}: unknown name {node.id!r}; the variables are W, X, G "
                                 "(functions are called, like mms(G))")
            names.add(node.id)
        elif isinstance(node, ast.Constant):
            if isinstance(node.value, bool) or not isinstance(node.value, (int, float)):
                raise ValueError(f"formula {formula!r}: {token!r} is not a number")
        elif isinstance(node, ast.BinOp):
            if type(node.op) not in OPERATORS:
                raise ValueError(f"formula {formula!r}: operator in {token!r} is not allowed (only + - * /)")
        elif isinstance(node, ast.UnaryOp):
            if not isinstance(node.op, (ast.USub, ast.UAdd)):
                raise ValueError(f"formula {formula!r}: operator in {token!r} is not allowed (only - and +)")
        elif not isinstance(node, (ast.Load, ast.operator, ast.unaryop)):
            raise ValueError(f"formula {formula!r}: {token!r} ({type(node).__name__}) is not allowed")
    return tree, frozenset(names)


def evaluate(formula: str, **variables: Tensor) -> Tensor:
    """Value of `formula` with the given tensors (W, X, G), broadcast as torch does."""
    tree, names = parse_formula(formula)
    missing = names - set(variables)
    if missing:
        raise ValueError(f"formula {formula!r} uses {', '.join(sorted(missing))}, which was not given")
    like = next(iter(variables.values()), torch.zeros(()))

    def value(node: ast.expr) -> Tensor:
        if isinstance(node, ast.Constant):
            return torch.tensor(float(node.value), dtype=like.dtype, device=like.device)
        if isinstance(node, ast.Name):
            return variables[node.id]
        if isinstance(node, ast.UnaryOp):
            operand = value(node.operand)
            return -operand if isinstance(node.op, ast.USub) else operand
        if isinstance(node, ast.BinOp):
            return OPERATORS[type(node.op)](value(node.left), value(node.right))
        args = [value(a) for a in node.args]                                  # ast.Call, checked by the parser
        return (UNARY.get(node.func.id) or BINARY[node.func.id])(*args)

    return value(tree)


@dataclass(frozen=True)
class PrunerZeroConfig(GradientScoreConfig):
    per: str = "row"
    formula: str = DEFAULT_FORMULA    # over W = |weight| (out, in), X = mean squared input norm (1, in), G (out, in)

    def __post_init__(self):
        super().__post_init__()
        if not isinstance(self.formula, str):
            raise ValueError(f"formula must be a string like {DEFAULT_FORMULA!r}, got {self.formula!r}")
        parse_formula(self.formula)

    @property
    def uses_gradient(self) -> bool:
        return "G" in parse_formula(self.formula)[1]


def pruner_zero_score(W: Tensor, stats, cfg: PrunerZeroConfig) -> Tensor:
    A = W.abs()                                                                  # (out, in)
    gradient = isinstance(stats, WithGradient)
    # a plain observer (formula without G) does not know the window count: sum over all tokens
    X = (stats.mean_sq_norm if gradient else stats.sq_norm).to(A.device)[None, :]  # (1, in)
    variables = {"W": A, "X": X}
    if cfg.uses_gradient:
        if not gradient or stats.grad is None:
            raise TypeError(f"the formula {cfg.formula!r} uses G: the engine must pass "
                            f"WithGradient(stats, grad, windows=...), got {type(stats).__name__}")
        variables["G"] = GRADIENT_SCALE * stats.grad_l2.to(A.device)             # (out, in)
    return torch.broadcast_to(evaluate(cfg.formula, **variables), A.shape).float()


@register("pruner-zero", PrunerZeroConfig, stats=InputNorm, score=pruner_zero_score)
def pruner_zero(W: Tensor, stats, cfg: PrunerZeroConfig) -> Tensor:
    return W.masked_fill(lowest(pruner_zero_score(W, stats, cfg), cfg.sparsity, cfg.nm, cfg.per), 0)
