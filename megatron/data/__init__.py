"""Data pipeline: `.bin/.idx` indexed datasets, data lists, GPT samples, corpus blending, samplers."""
