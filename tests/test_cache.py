"""The cache interface (`model/cache.py`): what the static cache does beyond a forward."""

from __future__ import annotations

import pytest
import torch

import qwenkit
from tiny import make_checkpoint


def test_trim_forgets_the_last_tokens(tmp_path):
    model = qwenkit.load_model(make_checkpoint(tmp_path / "ckpt", "qwen2"), dtype=torch.float32)
    ids = torch.randint(0, 256, (1, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        cache = model.new_cache(1, 16)
        model(ids[:, :6], cache=cache)
        model(ids[:, 6:9], cache=cache)  # three tokens, then taken back
        cache.trim(3)
        assert cache.length == 6
        again = model(ids[:, 6:], cache=cache)[:, -1]
        torch.testing.assert_close(again, model(ids)[:, -1], atol=1e-4, rtol=1e-4)
        with pytest.raises(ValueError, match="cannot forget 11"):
            cache.trim(11)
