"""Doing less work for the same answers: post-training quantization, quantization-aware training (1-8 bit),
pruning and distillation. The task they are proven on (line OCR) lives in tasks/."""
