"""The proof tasks and their data and training: the number speller (seq2seq, the embedded default model)
and line OCR (the BiLSTM-CTC recognizer that compression is measured on). Torch is used here for
training only."""
