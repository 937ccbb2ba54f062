"""Training: one loop for pretraining, SFT, DPO and GRPO; LoRA; checkpoints; HF export; DDP/FSDP2.

Imported only by `qwenkit train` and by users who train; `import qwenkit` never loads it.
"""

from .config import TrainConfig, load_config
from .lora import apply_adapter, apply_lora, merge_lora, remove_lora, save_adapter, unmerge_lora

__all__ = ["TrainConfig", "load_config", "apply_lora", "apply_adapter", "merge_lora", "unmerge_lora",
           "remove_lora", "save_adapter"]
