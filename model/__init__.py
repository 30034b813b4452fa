"""The byte-level recurrent language model: Hyena (modal filters), gated delta rule, memory reads.

The model imports nothing from engine/, memory/ or gateway/.
"""

from model.codec import BOS, EOS, PAD, SEP, decode, encode
from model.config import VOCAB, ModelConfig
from model.lm import ByteLM, RunOutput, State
from model.memread import MemorySlots, age_bucket

__all__ = [
    "BOS",
    "EOS",
    "PAD",
    "SEP",
    "VOCAB",
    "ByteLM",
    "MemorySlots",
    "ModelConfig",
    "RunOutput",
    "State",
    "age_bucket",
    "decode",
    "encode",
]
