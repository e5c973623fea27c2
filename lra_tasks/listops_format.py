"""The ListOps data format: symbols, the fixed vocabulary, the release's file layout. The reader
(`lra_tasks.listops`) and the generator (`lra_tasks.listops_generator`) both import it."""
from __future__ import annotations

OPERATORS = ("[MIN", "[MAX", "[MED", "[SM")
END = "]"
DIGITS = tuple(str(d) for d in range(10))
# Fixed order: token ids never depend on the process (unlike a vocabulary built from a set).
VOCAB: tuple[str, ...] = ("<pad>",) + OPERATORS + (END,) + DIGITS + ("<cls>",)
PAD_ID = 0
CLS_ID = VOCAB.index("<cls>")
VOCAB_SIZE = len(VOCAB)
NUM_CLASSES = 10

SPLIT_FILES = {"train": "basic_train.tsv", "validation": "basic_val.tsv",
               "test": "basic_test.tsv"}
HEADER = "Source\tTarget"
