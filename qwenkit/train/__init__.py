"""Training: one loop for pretraining, SFT, DPO and GRPO; checkpoints; HF export; DDP/FSDP2.

Imported only by `qwenkit train` and by users who train; `import qwenkit` never loads it.
LoRA adapters live with the model (`qwenkit.model.lora`): loading merges them too.
"""

from .config import TrainConfig, load_config

__all__ = ["TrainConfig", "load_config"]
