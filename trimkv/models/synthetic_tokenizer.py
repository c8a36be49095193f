"""The word-level tokenizer of the synthetic task, built offline from the task vocabulary.

Every word of the task (separators, digits, variable names, `VAR=DIGIT` assignments, filler
words) is one token, and generated text separates words by single spaces. So
`decode(encode(text)) == text` for every generated record, and a token position is a word
position plus one for the leading `<bos>`.
"""

from __future__ import annotations

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from trimkv.tasks.synthetic import ASSIGNMENT_WORDS, DIGIT_WORDS, FILLER_WORDS, SEPARATOR_WORDS, VARIABLE_WORDS

PAD_TOKEN = "<pad>"
UNK_TOKEN = "<unk>"
BOS_TOKEN = "<bos>"
EOS_TOKEN = "<eos>"
SPECIAL_TOKENS = (PAD_TOKEN, UNK_TOKEN, BOS_TOKEN, EOS_TOKEN)


def synthetic_vocabulary() -> dict[str, int]:
    """Return the word-to-id map: special tokens, separators, digits, variables, assignments, fillers."""
    words = [*SPECIAL_TOKENS, *SEPARATOR_WORDS, *DIGIT_WORDS, *VARIABLE_WORDS, *ASSIGNMENT_WORDS, *FILLER_WORDS]
    return {word: index for index, word in enumerate(words)}


def build_synthetic_tokenizer(model_max_length: int = 1024) -> PreTrainedTokenizerFast:
    """Build the tokenizer; the same call always gives the same ids.

    Encoding adds `<bos>` in front (with `add_special_tokens=True`, the transformers default) and
    never adds `<eos>`: training code appends `eos_token` after the completion.
    """
    vocabulary = synthetic_vocabulary()
    backend = Tokenizer(models.WordLevel(vocab=vocabulary, unk_token=UNK_TOKEN))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.post_processor = processors.TemplateProcessing(
        single=f"{BOS_TOKEN} $A",
        pair=f"{BOS_TOKEN} $A $B",
        special_tokens=[(BOS_TOKEN, vocabulary[BOS_TOKEN])],
    )
    # WordPiece's decoder with an unused prefix joins tokens with single spaces.
    backend.decoder = decoders.WordPiece(prefix="##", cleanup=False)
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        unk_token=UNK_TOKEN,
        model_max_length=model_max_length,
        # Batched generation with a decoder-only model needs the padding on the left.
        padding_side="left",
        clean_up_tokenization_spaces=False,
    )
