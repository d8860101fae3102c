"""Synthetic DeepSeek-VL2 checkpoints in the exact official layout, for tests and benchmarks without real weights.

    from edge_vl2.tools.synth import write_checkpoint
    write_checkpoint("/tmp/vl2-tiny-test", "tiny", "test")   # a loader reads it exactly like the real checkpoint
"""

from .configs import synthetic_config
from .tokenizer import build_tokenizer, special_token_ids, write_tokenizer_files
from .weights import mean_entropy, sample_final_hidden, synth_tensor
from .writer import shard_name, shard_plan, write_checkpoint

__all__ = ["synthetic_config", "build_tokenizer", "special_token_ids", "write_tokenizer_files", "synth_tensor",
           "sample_final_hidden", "mean_entropy", "write_checkpoint", "shard_name", "shard_plan"]
