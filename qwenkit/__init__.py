"""qwenkit: the Qwen model family end to end on PyTorch.

    import qwenkit
    model = qwenkit.load_model("qwen2.5-coder-0.5b-instruct")
    tok = qwenkit.load_tokenizer("qwen2.5-coder-0.5b-instruct")
    ids = tok.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=True)
    print(tok.decode(qwenkit.generate(model, ids, 32), skip_special_tokens=True))
"""

from .config import QwenConfig
from .engine import LLM, EngineSettings, SamplingParams
from .errors import CheckpointError, ConfigError, QwenkitError, RequestError, TokenizerError
from .generate import generate, generate_stream
from .loader import build_model, load_model
from .model.qwen import QwenForCausalLM
from .backends.quant import quantize


def load_tokenizer(path_or_id=None):
    """The tokenizer of a checkpoint directory, a .gguf file or a model id (see qwenkit.tokenizer)."""
    from .tokenizer import load_tokenizer as _load

    return _load(path_or_id)


__all__ = [
    "LLM", "SamplingParams", "EngineSettings", "quantize",
    "QwenConfig", "QwenForCausalLM", "build_model", "load_model", "load_tokenizer", "generate",
    "generate_stream", "QwenkitError", "ConfigError", "CheckpointError", "TokenizerError", "RequestError",
]
