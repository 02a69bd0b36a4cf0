"""Triton kernels for attention (imported lazily; `import tinygpt` never imports triton)."""
