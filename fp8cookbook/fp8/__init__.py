"""The FP8 core: numerics at the bottom, then the linear layer, fast path, fusion and attention (no import cycles).

Import order, bottom up: numerics <- linear <- fastpath, fusion; numerics <- attention <- attention_diffusers;
attention_mode and quantize on top. This file imports nothing, so `import fp8cookbook.fp8.numerics` stays light.
"""
