"""DeepSeek-V2/V3 models in Flax NNX."""

from models.config import ModelConfig, from_dict
from models.execution import EXECUTION_FIELDS, Execution, ExpertParallel, execution_from_dict
from models.transformer import ModelOutput, Transformer

__all__ = ["EXECUTION_FIELDS", "Execution", "ExpertParallel", "ModelConfig", "ModelOutput", "Transformer", "execution_from_dict",
           "from_dict"]

from models.hf import CheckpointError, hf_model_config, load_hf_checkpoint, save_hf_checkpoint  # noqa: E402

__all__ += ["CheckpointError", "hf_model_config", "load_hf_checkpoint", "save_hf_checkpoint"]
