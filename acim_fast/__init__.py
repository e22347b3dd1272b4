"""acim_fast: an AutoCode trainer for math language models that decide by themselves when to run Python.

The package holds the trainer; the fused loss kernels live in the separate `acim_kernels` package so that any
PyTorch trainer can use them without this one.
"""
