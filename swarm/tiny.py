"""Tiny random Llama-family checkpoints, saved as real Hugging Face folders.

The tests, the fuzzer and the membership and GPU checks exercise the real code path (preparation,
peers, transformers' layers) on these in seconds; the oracle for them is transformers itself.
"""

from __future__ import annotations

from pathlib import Path

TINY_CONFIGS = {
    # grouped-query attention: 4 query heads share 2 key/value heads
    "llama-gqa": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=6, num_attention_heads=4, num_key_value_heads=2),
    # plain multi-head attention, a different width and depth, untied head
    "llama-mha": dict(hidden_size=48, intermediate_size=96, num_hidden_layers=5, num_attention_heads=3, num_key_value_heads=3, tie_word_embeddings=False),
}


def make_tiny_model(path: Path, kind: str = "llama-gqa", seed: int = 0, tokenizer: bool = False) -> Path:
    """A random checkpoint of TINY_CONFIGS[kind] in `path` (vocabulary 256, eos 2), with a word
    tokenizer when asked (see `save_tiny_tokenizer`)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=256, max_position_embeddings=512, bos_token_id=1, eos_token_id=2, **TINY_CONFIGS[kind])
    model = LlamaForCausalLM(cfg).eval()
    # larger weights than the default init so that greedy paths are not all one token
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.08)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path, safe_serialization=True)
    if tokenizer:
        save_tiny_tokenizer(path)
    return path


def save_tiny_tokenizer(path: Path) -> None:
    """A tokenizer for the tiny vocabulary: one word per id ("w3" is id 3), split on spaces;
    ids 0-2 are <unk>, <s> and </s>. Real files, as transformers saves any fast tokenizer."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, 256)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>").save_pretrained(path)
