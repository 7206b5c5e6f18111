"""Tokenizer alignment: a teacher whose tokenizer is not the student's.

Two tokenizations of one text are matched by the bytes each prefix spells (`positions`), two
vocabularies by the bytes each token spells (`vocabulary`), and a batch of packed student rows
gets the teacher's rows and where each position aligns (`rows`). All read what a token stands
for from the tokenizers' own `token_bytes()` (`kd_jax.data.tokenizers`), so byte-level BPE's
byte alphabet, SentencePiece's word marker and byte fallback are undone once, there. numpy only.
"""
