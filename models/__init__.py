"""DeepSeek-V2/V3 models in Flax NNX."""

from models.config import ModelConfig, from_dict
from models.transformer import ModelOutput, Transformer

__all__ = ["ModelConfig", "ModelOutput", "Transformer", "from_dict"]

from models.hf import CheckpointError, load_hf_checkpoint, save_hf_checkpoint  # noqa: E402

__all__ += ["CheckpointError", "load_hf_checkpoint", "save_hf_checkpoint"]
