"""A tiny chat GGUF written by the tests: nothing comes from a model hub.

A llama-architecture model with random weights (2 layers, 64 wide), a SentencePiece
vocabulary of the special tokens, the 256 byte tokens (so any text tokenizes) and
a few letters, a ChatML `tokenizer.chat_template`, and `<|im_end|>` as the
end-of-turn token. Its output is noise; what it proves is the plumbing.
"""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np

CHATML = (Path(__file__).parent / "data" / "chat_templates" / "Qwen-Qwen2.5-7B-Instruct.jinja").read_text()
SPECIALS = ("<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>")
UNK, BOS, EOS, IM_START, IM_END = range(len(SPECIALS))
EMBED, LAYERS, HEADS, FFN, CONTEXT = 64, 2, 4, 128, 256


def vocabulary() -> tuple[list[str], list[float], list[int]]:
    tokens = list(SPECIALS)
    types = [gguf.TokenType.UNKNOWN] + [gguf.TokenType.CONTROL] * (len(SPECIALS) - 1)
    tokens += [f"<0x{byte:02X}>" for byte in range(256)]
    types += [gguf.TokenType.BYTE] * 256
    pieces = ["▁", *"abcdefghijklmnopqrstuvwxyz", "▁the", "▁a", "er", "in"]
    tokens += pieces
    types += [gguf.TokenType.NORMAL] * len(pieces)
    scores = [0.0] * (len(SPECIALS) + 256) + [-float(i) for i in range(len(pieces))]
    return tokens, scores, [int(kind) for kind in types]


def write_tiny_chat_gguf(
    path: Path, *, seed: int = 0, chat_template: str | None = CHATML, ends_at_once: bool = False
) -> Path:
    """`ends_at_once`: every token embeds the same vector, and only `<|im_end|>`'s
    output row matches it, so greedy decoding's first token is the end of turn."""
    tokens, scores, types = vocabulary()
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("tcserve-tiny-chat")
    writer.add_context_length(CONTEXT)
    writer.add_embedding_length(EMBED)
    writer.add_block_count(LAYERS)
    writer.add_feed_forward_length(FFN)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(HEADS)
    writer.add_rope_dimension_count(EMBED // HEADS)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    writer.add_unk_token_id(UNK)
    writer.add_bos_token_id(BOS)
    writer.add_eos_token_id(EOS)
    writer.add_eot_token_id(IM_END)
    writer.add_add_bos_token(True)
    if chat_template is not None:
        writer.add_chat_template(chat_template)
    for name, shape in _tensors(len(tokens)):
        rng = np.random.default_rng([seed, len(name)])
        norm = name.endswith("norm.weight")
        data = np.ones(shape, np.float32) if norm else rng.normal(0, 0.02, shape).astype(np.float32)
        if ends_at_once and name == "token_embd.weight":
            data = np.ones(shape, np.float32)
        if ends_at_once and name == "output.weight":
            data[IM_END] = 1.0
        writer.add_tensor(name, data)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _tensors(vocab: int) -> list[tuple[str, tuple[int, ...]]]:
    """Names and numpy shapes ((rows, columns) = llama.cpp's {ne1, ne0} reversed)."""
    tensors = [
        ("token_embd.weight", (vocab, EMBED)),
        ("output_norm.weight", (EMBED,)),
        ("output.weight", (vocab, EMBED)),
    ]
    for layer in range(LAYERS):
        block = f"blk.{layer}"
        tensors += [
            (f"{block}.attn_norm.weight", (EMBED,)),
            (f"{block}.attn_q.weight", (EMBED, EMBED)),
            (f"{block}.attn_k.weight", (EMBED, EMBED)),
            (f"{block}.attn_v.weight", (EMBED, EMBED)),
            (f"{block}.attn_output.weight", (EMBED, EMBED)),
            (f"{block}.ffn_norm.weight", (EMBED,)),
            (f"{block}.ffn_gate.weight", (FFN, EMBED)),
            (f"{block}.ffn_up.weight", (FFN, EMBED)),
            (f"{block}.ffn_down.weight", (EMBED, FFN)),
        ]
    return tensors
