"""Recipes: YAML -> dataclasses -> YAML, overrides, and errors that name the bad key."""
from pathlib import Path

import pytest

from prunekit.registry import method_for_config

from prunekit import SparseGPTConfig, WandaConfig
from prunekit.recipe import apply_override, dump_recipe, load_recipe

RECIPES = sorted((Path(__file__).parents[1] / "recipes").glob("*.yaml"))

TEXT = """\
model: default
calibration: {source: default, samples: 16, seqlen: 128}
steps:
- {method: sparsegpt, nm: [2, 4], damp: 0.05}
eval: {seqlen: 128}
export: {path: out/x}
"""


def test_load_builds_frozen_dataclasses():
    recipe = load_recipe(TEXT)
    step = recipe.steps[0]
    assert isinstance(step, SparseGPTConfig)
    assert step.nm == (2, 4) and step.sparsity == 0.5 and step.damp == 0.05
    assert recipe.calibration.samples == 16 and recipe.calibration.seed == 0
    assert recipe.export.path == "out/x" and recipe.export.overwrite is False
    with pytest.raises(AttributeError):
        recipe.model = "x"


def test_round_trip_is_exact():
    once = dump_recipe(load_recipe(TEXT))
    assert dump_recipe(load_recipe(once)) == once
    assert load_recipe(once) == load_recipe(TEXT)


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_shipped_recipes_are_canonical(path):
    assert dump_recipe(load_recipe(path)) == path.read_text()


def test_shipped_recipes_cover_every_method_and_pattern():
    steps = [load_recipe(p).steps[0] for p in RECIPES]
    for method in ("magnitude", "wanda", "sparsegpt"):
        mine = [s for s in steps if method_for_config(s).name == method]
        assert any(s.nm is None for s in mine) and any(s.nm == (2, 4) for s in mine), method
    assert any(getattr(s, "nm", None) == (4, 8) for s in steps)


def test_overrides():
    recipe = load_recipe(TEXT, ["steps.0.damp=0.1", "calibration.samples=4", "eval.stride=64",
                                "steps.0.ignore=[lm_head, 'layers\\.0\\.']"])
    assert recipe.steps[0].damp == 0.1 and recipe.calibration.samples == 4 and recipe.eval.stride == 64
    assert recipe.steps[0].ignore == ("lm_head", r"layers\.0\.")
    recipe = load_recipe("steps: [{method: wanda}]", ["steps.0.sparsity=0.7"])
    assert recipe.steps[0] == WandaConfig(sparsity=0.7)


@pytest.mark.parametrize("text, overrides, match", [
    ("steps: [{method: wanda, sparsty: 0.5}]", [], "sparsty.*did you mean 'sparsity'"),
    ("stepz: [{method: wanda}]", [], "stepz.*did you mean 'steps'"),
    ("steps: [{method: wandaa}]", [], "unknown method 'wandaa'.*'wanda'"),
    ("steps: [{method: wanda, sparsity: 1.2}]", [], r"\[0, 1\)"),
    ("steps: [{method: wanda, nm: [4, 2]}]", [], "smaller than M"),
    ("steps: []", [], "at least one step"),
    ("steps: [{method: wanda}]\ncalibration: {samples: 0}", [], "positive"),
    ("steps: [{method: wanda}]", ["steps.3.sparsity=0.1"], "not an index"),
    ("steps: [{method: wanda}]", ["steps.0.sparsity"], "key=value"),
    ("steps: [{method: wanda}]\neval: {sedlen: 5}", [], "sedlen.*seqlen"),
])
def test_errors_name_the_problem(text, overrides, match):
    with pytest.raises(ValueError, match=match):
        load_recipe(text, overrides)


def test_yaml_is_loaded_safely():
    # a refused tag is a ValueError naming it (CLI exit 2); more in test_faults.py
    with pytest.raises(ValueError, match="python/object"):
        load_recipe("steps: !!python/object/apply:os.system ['echo unsafe']")


def test_missing_recipe_file():
    with pytest.raises(FileNotFoundError):
        load_recipe("does/not/exist.yaml")


def test_apply_override_creates_sections():
    raw = {"steps": [{"method": "wanda"}]}
    apply_override(raw, "export.path=out/y")
    assert raw["export"] == {"path": "out/y"}
