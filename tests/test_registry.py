"""Method registry (registry.py) and the catalogue of built-in methods (catalog.py)."""
from dataclasses import dataclass

import pytest

import prunekit.registry as registry
from prunekit import catalog
from prunekit.config import SparsityConfig
from prunekit.methods.magnitude import MagnitudeConfig
from prunekit.methods.wanda import WandaConfig
from prunekit.registry import SCOPES, Method, method_for_config, register, registered
from prunekit.stats import Hessian, InputNorm

BUILT_IN = {"magnitude", "wanda", "sparsegpt", "ria", "gblm", "pruner-zero", "magnitude-sp", "wanda-sp", "flap",
            "taylor", "block-influence", "angular", "sleb", "last-k", "laco", "eora", "lora", "perp", "kd"}


@pytest.fixture
def scratch_registry(monkeypatch):
    """Registrations made in a test vanish with it: the registry is a copy for its duration."""
    monkeypatch.setattr(registry, "_METHODS", dict(registry._METHODS))


@dataclass(frozen=True)
class _ThrowawayConfig(SparsityConfig):
    pass


def _fn(W, stats, cfg):
    return W


def test_register_adds_a_method_with_its_fields(scratch_registry):
    before = set(registered())
    returned = register("test-registry-throwaway", _ThrowawayConfig, stats=Hessian, updates_weights=True)(_fn)
    assert returned is _fn                                        # the decorator hands the function back
    assert set(registered()) == before | {"test-registry-throwaway"}
    method = registered()["test-registry-throwaway"]
    assert method == Method("test-registry-throwaway", _ThrowawayConfig, _fn, Hessian, "linear", None, None, True)
    assert method_for_config(_ThrowawayConfig()) is method
    assert catalog.get_method("test-registry-throwaway") is method


def test_register_rejects_a_duplicate_name(scratch_registry):
    with pytest.raises(ValueError, match=r"'wanda' is already registered by prunekit\.methods\.wanda"):
        register("wanda", _ThrowawayConfig)(_fn)
    assert registered()["wanda"].config_cls is WandaConfig          # the original is kept
    register("test-registry-twice", _ThrowawayConfig)(_fn)
    with pytest.raises(ValueError, match="'test-registry-twice' is already registered by test_registry"):
        register("test-registry-twice", _ThrowawayConfig)(_fn)


def test_register_rejects_an_unknown_scope(scratch_registry):
    before = registered()
    with pytest.raises(ValueError, match=r"scope must be one of .*'linear'.*got 'global'"):
        register("test-registry-scope", _ThrowawayConfig, scope="global")
    assert registered() == before
    assert SCOPES == ("linear", "width", "depth", "experts", "search", "state", "compensate", "recover")


def test_registered_returns_a_copy():
    copy = registered()
    copy.pop("wanda")
    copy["not-a-method"] = copy["magnitude"]
    fresh = registered()
    assert "wanda" in fresh and "not-a-method" not in fresh
    assert fresh is not registered()


def test_method_for_config_finds_the_exact_class():
    assert method_for_config(MagnitudeConfig(sparsity=0.3)).name == "magnitude"
    wanda = method_for_config(WandaConfig())
    assert wanda.name == "wanda" and wanda.stats is InputNorm and wanda.scope == "linear"
    assert method_for_config(catalog.get_method("sparsegpt").config_cls()).updates_weights is True


def test_method_for_config_rejects_an_unregistered_class():
    @dataclass(frozen=True)
    class MyWandaConfig(WandaConfig):        # a subclass is not its parent's method
        pass

    with pytest.raises(TypeError, match="MyWandaConfig is not the config of a registered method"):
        method_for_config(MyWandaConfig())
    with pytest.raises(TypeError, match="SparsityConfig is not the config"):
        method_for_config(SparsityConfig())
    with pytest.raises(TypeError, match="dict is not the config"):
        method_for_config({"method": "wanda"})


def test_available_methods_lists_every_built_in_sorted():
    names = catalog.available_methods()
    assert BUILT_IN <= set(names)
    assert names == sorted(names) and len(names) == len(set(names))
    scopes = {name: catalog.get_method(name).scope for name in BUILT_IN}
    assert {n for n, s in scopes.items() if s == "depth"} == {"block-influence", "angular", "sleb", "last-k", "laco"}
    assert {n for n, s in scopes.items() if s == "width"} == {"magnitude-sp", "wanda-sp", "flap", "taylor"}
    assert {n for n, s in scopes.items() if s == "recover"} == {"lora", "perp", "kd"}
    assert scopes["eora"] == "compensate"


def test_get_method_suggests_the_nearest_name():
    with pytest.raises(ValueError) as err:
        catalog.get_method("wandaa")
    message = str(err.value)
    assert message.startswith("unknown method 'wandaa'. Did you mean 'wanda'? Available: ")
    listed = message.split("Available: ", 1)[1].split(", ")
    assert listed == catalog.available_methods()
    with pytest.raises(ValueError, match="Did you mean 'sparsegpt'"):
        catalog.get_method("sparsgpt")
    with pytest.raises(ValueError) as err:
        catalog.get_method("zzzzzzzz")
    assert "Did you mean" not in str(err.value) and "Available: amp, angular, " in str(err.value)


def test_needs_calibration_of_a_data_free_method():
    magnitude = catalog.get_method("magnitude")
    assert magnitude.stats is None and not magnitude.needs_calibration
    assert not magnitude.needs_calibration_for(MagnitudeConfig(sparsity=0.5))
    assert magnitude.needs_calibration_for(MagnitudeConfig(sparsity=0.5, allocation="owl"))
    assert magnitude.needs_calibration_for(MagnitudeConfig(sparsity=0.5, update="obs"))
    assert magnitude.needs_calibration_for(MagnitudeConfig(sparsity=0.5, update="admm"))


def test_needs_calibration_follows_the_observer_unless_overridden():
    wanda = catalog.get_method("wanda")
    assert wanda.needs_calibration and wanda.needs_calibration_for(WandaConfig())
    last_k = catalog.get_method("last-k")        # depth, declared data-free
    assert last_k.calibrated is False and not last_k.needs_calibration
    assert not last_k.needs_calibration_for(last_k.config_cls(layers=1))
    magnitude_sp = catalog.get_method("magnitude-sp")   # width, no observer: data-free
    assert not magnitude_sp.needs_calibration_for(magnitude_sp.config_cls())
    for name in ("sleb", "angular", "laco", "block-influence", "lora", "eora"):
        method = catalog.get_method(name)
        assert method.calibrated is True and method.needs_calibration, name
    forced = Method("x", MagnitudeConfig, _fn, stats=InputNorm, calibrated=False)
    assert not forced.needs_calibration and not forced.needs_calibration_for(MagnitudeConfig())
