"""A word-level tokenizer trained on the world's text with the ``tokenizers`` library.

Every word and punctuation mark of the world is one token, so a name or a value is one
token and a fact is a handful. Sequences start with ``<bos>``; decoding joins words with
spaces and tidies the space before punctuation.

>>> tok = train_word_tokenizer(["Where was Ana born?", "Ana was born in Olton."])
>>> tok.convert_ids_to_tokens(tok("Ana was born?")["input_ids"])
['<bos>', 'Ana', 'was', 'born', '?']
>>> tok.decode(tok("Ana was born in Olton.")["input_ids"], skip_special_tokens=True)
'Ana was born in Olton.'
"""

from __future__ import annotations

from collections.abc import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

SPECIAL_TOKENS = {
    "pad_token": "<pad>",
    "unk_token": "<unk>",
    "bos_token": "<bos>",
    "eos_token": "<eos>",
}


def train_word_tokenizer(texts: Iterable[str]) -> PreTrainedTokenizerFast:
    """A Hugging Face fast tokenizer whose vocabulary is every word in ``texts``."""
    core = Tokenizer(models.WordLevel(unk_token=SPECIAL_TOKENS["unk_token"]))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    core.decoder = decoders.WordPiece(prefix="##", cleanup=True)  # joins words, tidies "x ."
    trainer = trainers.WordLevelTrainer(
        special_tokens=list(SPECIAL_TOKENS.values()), min_frequency=1
    )
    core.train_from_iterator(sorted(set(texts)), trainer=trainer)  # sorted: deterministic ids
    bos = SPECIAL_TOKENS["bos_token"]
    core.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A $B", special_tokens=[(bos, core.token_to_id(bos))]
    )
    return PreTrainedTokenizerFast(tokenizer_object=core, **SPECIAL_TOKENS)
