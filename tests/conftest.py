"""Shared fixtures: tiny models built from Hugging Face configs, no download."""
import os
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

import transformers

VOCAB = 128

# 2-layer models of every supported family; widths are multiples of 8 so 2:4 and 4:8 apply.
TINY_CONFIGS = {
    "llama": lambda: llama_config(),
    "mistral": lambda: transformers.MistralConfig(hidden_size=64, intermediate_size=96, num_attention_heads=4,
                                                  num_key_value_heads=2, num_hidden_layers=2, vocab_size=VOCAB,
                                                  sliding_window=8),
    "qwen2": lambda: transformers.Qwen2Config(hidden_size=64, intermediate_size=96, num_attention_heads=4,
                                              num_key_value_heads=2, num_hidden_layers=2, vocab_size=VOCAB),
    "qwen3": lambda: transformers.Qwen3Config(hidden_size=64, intermediate_size=96, num_attention_heads=4,
                                              num_key_value_heads=2, head_dim=16, num_hidden_layers=2,
                                              vocab_size=VOCAB),
    "gemma2": lambda: transformers.Gemma2Config(hidden_size=64, intermediate_size=96, num_attention_heads=4,
                                                num_key_value_heads=2, head_dim=16, num_hidden_layers=2,
                                                vocab_size=VOCAB, sliding_window=8),
    "gemma3_text": lambda: transformers.Gemma3TextConfig(hidden_size=64, intermediate_size=96, num_attention_heads=4,
                                                         num_key_value_heads=2, head_dim=16, num_hidden_layers=2,
                                                         vocab_size=VOCAB, sliding_window=8,
                                                         layer_types=["sliding_attention", "full_attention"]),
    "phi3": lambda: transformers.Phi3Config(hidden_size=64, intermediate_size=96, num_attention_heads=4,
                                            num_key_value_heads=2, num_hidden_layers=2, vocab_size=VOCAB,
                                            pad_token_id=0, eos_token_id=0, bos_token_id=0),
    "opt": lambda: transformers.OPTConfig(hidden_size=64, ffn_dim=96, num_attention_heads=4, num_hidden_layers=2,
                                          vocab_size=VOCAB, word_embed_proj_dim=64, max_position_embeddings=64),
    "gpt2": lambda: transformers.GPT2Config(n_embd=64, n_head=4, n_layer=2, vocab_size=VOCAB, n_positions=64,
                                            eos_token_id=0, bos_token_id=0),
}


LLAMA = dict(hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2,
             vocab_size=VOCAB)


def llama_config(**overrides) -> transformers.LlamaConfig:
    """The tiny Llama's config (TINY_CONFIGS["llama"]) with some values changed."""
    return transformers.LlamaConfig(**{**LLAMA, **overrides})


def llama(seed: int = 0, **overrides):
    """A tiny Llama (see `llama_config`), seeded, in eval mode."""
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(llama_config(**overrides)).eval()


def saved_tensors(folder) -> dict:
    """Every tensor of the *.safetensors files in `folder`, by name."""
    from pathlib import Path

    from safetensors.torch import load_file
    out = {}
    for path in sorted(Path(folder).glob("*.safetensors")):
        out.update(load_file(str(path)))
    return out


def tiny_model(family: str, seed: int = 0):
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(TINY_CONFIGS[family]())
    return model.eval()


@pytest.fixture(scope="module")
def one_thread():
    """Tiny matrices gain nothing from threads; on a shared 2-core host OpenMP threads waiting on each other
    make such tests up to 10x slower. A module opts in with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def recover_cli(argv):
    """`prunekit recover ...` through a parser that has only that subcommand, with main()'s error handling."""
    import argparse
    import sys

    from prunekit.recovery import cli as recovery_cli
    parser = argparse.ArgumentParser(prog="prunekit")
    recovery_cli.add_parser(parser.add_subparsers(required=True))
    args = parser.parse_args(["recover", *argv])
    try:
        return args.handler(args)
    except (ValueError, FileNotFoundError, FileExistsError, NotADirectoryError, ImportError, TypeError,
            RuntimeError) as err:
        print(f"prunekit: error: {err}", file=sys.stderr)
        return 2


@pytest.fixture
def calib():
    return torch.randint(0, VOCAB, (8, 16), generator=torch.Generator().manual_seed(1))


def word_tokenizer(lines, vocab_size=VOCAB):
    """A word-level tokenizer trained offline on `lines` (no download), with <unk>/<pad>/</s>."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.WordLevelTrainer(vocab_size=vocab_size, special_tokens=["<unk>", "<pad>", "</s>"])
    tk.train_from_iterator(lines, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", pad_token="<pad>", eos_token="</s>")


def tiny_tokenizer():
    """A word-level tokenizer trained on a slice of the default corpus."""
    from prunekit.data import load_text
    text, _ = load_text("default", "calibration")
    return word_tokenizer(text[:200_000].splitlines())


BPE_VOCAB = 320


@pytest.fixture(scope="session")
def bpe():
    """A byte-level BPE tokenizer (GPT-2 style, BPE_VOCAB tokens) trained offline on a slice of the default
    corpus: a tokenizer llama.cpp can read (the word-level `tiny_tokenizer` has no GGUF form)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from prunekit.data import load_text
    text, _ = load_text("default", "calibration")
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=BPE_VOCAB, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tk.train_from_iterator(text[:100_000].splitlines(), trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<|endoftext|>")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A saved 2-layer Llama with a tokenizer: what a user's local checkpoint looks like."""
    path = tmp_path_factory.mktemp("models") / "tiny-llama"
    tiny_model("llama").save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_pruned_dir(tiny_model_dir, tmp_path_factory):
    """`tiny_model_dir` magnitude-pruned to 50% by `prunekit prune` (its prunekit.json records the dense source):
    what `prunekit recover` takes. Tests only read it."""
    from prunekit.cli import main
    out = tmp_path_factory.mktemp("pruned") / "tiny-llama-magnitude50"
    assert main(["prune", str(tiny_model_dir), "--method", "magnitude", "--sparsity", "0.5", "--no-eval",
                 "--out", str(out)]) == 0
    return out


# Mixture-of-Experts families (transformers 5 fused experts), 3 blocks, 8 routed experts, top-2.
# DeepSeek-V3 / GLM-4-MoE route in 2 groups (best 1 group) and keep block 0 dense; Qwen3-MoE keeps
# block 0 dense through mlp_only_layers; Qwen2-MoE has a gated shared expert.
_MOE_SHAPE = dict(hidden_size=32, intermediate_size=48, num_attention_heads=4, num_key_value_heads=2,
                  num_hidden_layers=3, vocab_size=VOCAB, num_experts_per_tok=2, pad_token_id=0, bos_token_id=1,
                  eos_token_id=2)
MOE_CONFIGS = {
    "mixtral": lambda: transformers.MixtralConfig(**_MOE_SHAPE, num_local_experts=8),
    "qwen2_moe": lambda: transformers.Qwen2MoeConfig(**_MOE_SHAPE, num_experts=8, moe_intermediate_size=16,
                                                     shared_expert_intermediate_size=24),
    "qwen3_moe": lambda: transformers.Qwen3MoeConfig(**_MOE_SHAPE, num_experts=8, moe_intermediate_size=16,
                                                     head_dim=8, mlp_only_layers=[0], norm_topk_prob=True),
    "olmoe": lambda: transformers.OlmoeConfig(**_MOE_SHAPE, num_experts=8),
    "deepseek_v3": lambda: transformers.DeepseekV3Config(
        **{**_MOE_SHAPE, "num_key_value_heads": 4}, n_routed_experts=8, n_group=2, topk_group=1,
        moe_intermediate_size=16, first_k_dense_replace=1, kv_lora_rank=16, q_lora_rank=16, qk_rope_head_dim=8,
        qk_nope_head_dim=8, v_head_dim=8, routed_scaling_factor=2.5),
    "glm4_moe": lambda: transformers.Glm4MoeConfig(**_MOE_SHAPE, n_routed_experts=8, n_group=2, topk_group=1,
                                                   moe_intermediate_size=16, first_k_dense_replace=1, head_dim=8),
    "gpt_oss": lambda: transformers.GptOssConfig(**_MOE_SHAPE, num_local_experts=8, head_dim=8, sliding_window=8),
    "phimoe": lambda: transformers.PhimoeConfig(**_MOE_SHAPE, num_local_experts=8),
    "granitemoe": lambda: transformers.GraniteMoeConfig(**_MOE_SHAPE, num_local_experts=8),
}


def tiny_moe(family: str, seed: int = 0):
    """A tiny MoE model of `family` (MOE_CONFIGS), seeded, in eval mode; router rows and the
    DeepSeek correction bias are drawn with a visible spread so that routing is not near-uniform."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(MOE_CONFIGS[family]()).eval()
    with torch.no_grad():
        for name, module in model.named_modules():
            if name.endswith((".gate", ".router")) and hasattr(module, "weight") and module.weight.dim() == 2:
                module.weight.normal_(0, 0.5)
            if hasattr(module, "e_score_correction_bias"):
                module.e_score_correction_bias.normal_(0, 0.1)
    return model


@pytest.fixture(scope="session")
def tiny_moe_dir(tmp_path_factory):
    """A saved 3-block Mixtral (8 experts, top-2) with a tokenizer, as transformers writes it."""
    path = tmp_path_factory.mktemp("models") / "tiny-mixtral"
    tiny_moe("mixtral").save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


# families whose configs derive head_dim from hidden_size: their heads stay for a stock reload
NO_STOCK_HEADS = ("gpt2", "opt")


def _model_logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def _greedy(model, ids, use_cache: bool):
    with torch.no_grad():
        return model.generate(ids, max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=0,
                              use_cache=use_cache)


def check_stock_reload_and_cache(model, calib, tmp_path):
    """The pruned model saves, reloads with stock transformers to the same logits, and greedy
    generation with the KV cache equals generation without it."""
    from prunekit.io.export import save_pretrained_atomic
    from prunekit.surgery import stock_widths
    assert stock_widths(model) is not None
    before = _model_logits(model, calib[:2])
    reloaded = AutoModelForCausalLM.from_pretrained(save_pretrained_atomic(model, None, tmp_path / "out",
                                                                           metadata={})).eval()
    torch.testing.assert_close(_model_logits(reloaded, calib[:2]), before, atol=1e-5, rtol=1e-4)
    prompt = calib[:1, :5]
    assert torch.equal(_greedy(reloaded, prompt, True), _greedy(reloaded, prompt, False))


@pytest.fixture
def default_signal_dispositions():
    """Python's default SIGINT/SIGTERM handling for one test (restored after), which its subprocesses inherit.

    A test run started in the background by a non-interactive shell (`make test &`, `nohup ... &`) inherits
    SIGINT ignored, and prunekit then leaves it ignored on purpose (a nohup'ed run must not stop on Ctrl-C), so
    every test that interrupts a command would see it run to the end. Found: the interrupt tests failed only in
    such background runs, and a per-test check of the dispositions over the whole suite found no test that
    changes them."""
    import signal
    previous = {signum: signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM)}
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    yield
    for signum, handler in previous.items():
        signal.signal(signum, handler)


def load_bench(name: str):
    """A script of bench/ imported as a module (bench/ is not a package), for its tiny-mode tests."""
    import importlib.util
    path = Path(__file__).resolve().parents[1] / "bench" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def src_on_path(monkeypatch):
    """A bench script may start `python -m prunekit` subprocesses: they must find this checkout."""
    src = str(Path(__file__).resolve().parents[1] / "src")
    monkeypatch.setenv("PYTHONPATH", src + os.pathsep + os.environ.get("PYTHONPATH", ""))
