"""Checkpoints: save/load/resume (DeepSpeed layout), the checkpoint engine's I/O, the manifest."""
