"""Shared fixtures: tiny models built from Hugging Face configs, no download."""
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


def tiny_model(family: str, seed: int = 0):
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(TINY_CONFIGS[family]())
    return model.eval()


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


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A saved 2-layer Llama with a tokenizer: what a user's local checkpoint looks like."""
    path = tmp_path_factory.mktemp("models") / "tiny-llama"
    tiny_model("llama").save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path
