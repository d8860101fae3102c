"""edge-vl2: DeepSeek-VL2 Tiny/Small in plain PyTorch for edge devices.

The public API is `VL2Pipeline`, `SamplingParams` and `Conversation`; they are imported lazily so `import edge_vl2` stays cheap
(the CLI and the toolchain import only what they use).
"""

__version__ = "0.1.0"
__all__ = ["VL2Pipeline", "SamplingParams", "Conversation", "UserError"]


def __getattr__(name):
    if name == "VL2Pipeline":
        from .pipeline import VL2Pipeline

        return VL2Pipeline
    if name == "SamplingParams":
        from .generate import SamplingParams

        return SamplingParams
    if name == "Conversation":
        from .conversation import Conversation

        return Conversation
    if name == "UserError":
        from .errors import UserError

        return UserError
    raise AttributeError(name)
