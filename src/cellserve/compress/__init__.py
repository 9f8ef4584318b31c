"""Doing less work for the same answers: the OCR proof task, quantization, pruning, distillation."""
