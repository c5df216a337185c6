"""A small byte-level BPE tokenizer trained by code, shaped like Llama-3.2-Instruct's.

Same special tokens (`<|begin_of_text|>`, `<|start_header_id|>`, `<|end_header_id|>`,
`<|eot_id|>`, ...) and a chat template of the same structure (system header with
"Cutting Knowledge Date" / "Today Date: {date_string}", user and assistant turns closed by
`<|eot_id|>`), saved as an ordinary HF tokenizer folder. Used by the offline demo and the tests,
where the real 128k-token tokenizer would make tiny models needlessly large.
"""

from __future__ import annotations

import json
from pathlib import Path

SPECIAL_TOKENS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                  "<|eot_id|>", "<|finetune_right_pad_id|>"]

CHAT_TEMPLATE = (
    "{{- bos_token }}"
    "{%- if not date_string is defined %}{%- set date_string = \"26 Jul 2024\" %}{%- endif %}"
    "{%- if messages[0]['role'] == 'system' %}"
    "{%- set system_message = messages[0]['content']|trim %}{%- set messages = messages[1:] %}"
    "{%- else %}{%- set system_message = \"\" %}{%- endif %}"
    "{{- \"<|start_header_id|>system<|end_header_id|>\\n\\n\" }}"
    "{{- \"Cutting Knowledge Date: December 2023\\n\" }}"
    "{{- \"Today Date: \" + date_string + \"\\n\\n\" }}"
    "{{- system_message }}{{- \"<|eot_id|>\" }}"
    "{%- for message in messages %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim"
    " + '<|eot_id|>' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
)


def build_demo_tokenizer(texts: list[str], out_dir: str | Path, vocab_size: int = 512) -> Path:
    """Train the BPE on `texts` and save tokenizer.json + tokenizer_config.json in `out_dir`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    # newlines are their own pre-tokens, so the prompt (ending in "\n\n") tokenizes as a prefix of
    # the full chat and the answer's labels line up
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split("\n", behavior="isolated"),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    boilerplate = ["Cutting Knowledge Date: December 2023\nToday Date: 10 Apr 2025\n\nYou are a helpful assistant.",
                   "system\n\n", "user\n\n", "assistant\n\n"]
    tok.train_from_iterator(list(texts) + boilerplate * 50, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>",
                                   clean_up_tokenization_spaces=False)
    fast.chat_template = CHAT_TEMPLATE
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(out_dir)
    cfg_path = out_dir / "tokenizer_config.json"
    if "chat_template" not in json.loads(cfg_path.read_text()) and not (out_dir / "chat_template.jinja").exists():
        (out_dir / "chat_template.jinja").write_text(CHAT_TEMPLATE)
    return out_dir
