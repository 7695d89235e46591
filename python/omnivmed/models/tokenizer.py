"""Tokenizer glue: the image placeholder token, and a tiny offline tokenizer for tests and
the demo (no tokenizer can be downloaded there)."""

from __future__ import annotations

from collections.abc import Iterable

from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast

# Qwen2.5's chat format.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful medical assistant.<|im_end|>\\n' }}"
    "{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

_DEFAULT_CORPUS = [
    "The image shows a chest CT with a nodule in the right lower lobe.",
    "Axial T1-weighted MRI of the brain; no acute abnormality.",
    "Fundus photograph with microaneurysms and hard exudates.",
    "Endoscopy video of the colon: a small polyp is visible.",
    "What is the modality of this scan? It is a CT volume of the abdomen.",
    "Describe the findings. Which organ is shown? How many lesions are there?",
    "Surgical video frame: the instrument grasps the gallbladder.",
    "Histopathology slide stained with hematoxylin and eosin.",
]


def build_tiny_tokenizer(
    corpus: Iterable[str] | None = None, vocab_size: int = 512
) -> PreTrainedTokenizerFast:
    """A byte-level BPE trained in a fraction of a second, with Qwen2.5's chat special
    tokens and chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(corpus or _DEFAULT_CORPUS) * 4, trainer)
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=["<|im_start|>"],
    )
    wrapped.chat_template = CHAT_TEMPLATE
    return wrapped


def add_image_token(tokenizer: PreTrainedTokenizerBase, token: str = "<image>") -> int:
    """Add the image placeholder as a special token (kept whole by the tokenizer); returns
    its id."""
    if token not in tokenizer.get_vocab():
        tokenizer.add_special_tokens(
            {"additional_special_tokens": [token]}, replace_extra_special_tokens=False
        )
    return tokenizer.convert_tokens_to_ids(token)
