"""Weight-only quantization applied from outside the model: int8 per channel, int4 per group, and
bf16 weights under fp32 arithmetic.

`quantize(model, "int8")` (or `load_model(..., quantize="int8")`, which quantizes each layer as
it loads) swaps every projection (qkv, o, gate_up, down, experts excluded) and
the LM head for a module that keeps packed weights (and the token embedding for int8 rows, or bf16
rows for "bf16") and calls torch's weight-only kernels
(`_weight_int8pack_mm`, `_weight_int4pack_mm[_for_cpu]`). Decode at batch 1 is bound by reading
weights, so halving (bf16, int8) or quartering (int4) the bytes read is what makes it faster. On an
AVX2 CPU, fp32 calls of up to 16 rows (decode) go to qwenkit's own GEMVs (`cpu_kernels.c`), which
stream the weights once (int8/int4 multiply in integers against x quantized to int8 blocks; bf16
is widened in registers); longer inputs (prefill) dequantize W once a call and use the GEMM
of `PREFILL_DTYPE`: bf16 where the CPU multiplies it natively (AVX512-BF16, AMX: 3-4x the fp32
GEMM's rate), else fp32.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import cpu_kernels
from .cpu import fp32_linear
from .host import native_bf16

SCHEMES = ("int8", "int4", "bf16")
PREFILL_DTYPE = torch.bfloat16 if native_bf16() else torch.float32  # a fact of the host, read once


def prefill_matmul(x2: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x2 (M, K) fp32 times a weight w (N, K) in fp32 or bf16 -> (M, N) fp32: a bf16 weight gets
    a bf16 GEMM (x rounded to bf16, as a bf16 model computes), an fp32 one the fp32 GEMM."""
    if w.dtype == torch.bfloat16:
        return F.linear(x2.to(torch.bfloat16), w).float()
    return fp32_linear(x2, w, None)


class Int8Linear(nn.Module):
    """y = x W^T (+ b) with W stored as int8 (N, K) and one scale per output channel."""

    def __init__(self, linear: nn.Linear, source=None):
        super().__init__()
        q, scales = _by_row_blocks(linear.weight, _int8_rows, source)
        self.register_buffer("weight", q)  # (N, K) int8
        self.register_buffer("scales", scales.to(linear.weight.dtype))  # (N,)
        self.bias = linear.bias
        self.in_features, self.out_features = linear.in_features, linear.out_features

    def dequantized(self, dtype=torch.float32) -> torch.Tensor:
        """W as (N, K) in dtype (fp32 or bf16)."""
        if self.weight.device.type == "cpu" and cpu_kernels.kernels() is not None:
            return cpu_kernels.int8_dequant(self.weight, self.scales.float(), dtype)
        return (self.weight.float() * self.scales.float()[:, None]).to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])  # (M, K)
        if cpu_kernels.takes(x2):
            return cpu_kernels.int8_gemv(x2, self.weight, self.scales.float(), self.bias).reshape(*shape[:-1], -1)
        if x.device.type == "cpu" and x.dtype == torch.float32 and not x.requires_grad:
            if x2.shape[0] > cpu_kernels.MAX_ROWS:  # prefill: one dequantized copy of W, then the GEMM
                y = prefill_matmul(x2, self.dequantized(PREFILL_DTYPE))
                y = y.reshape(*shape[:-1], self.out_features)
                return y if self.bias is None else y + self.bias
        y = torch._weight_int8pack_mm(x2, self.weight, self.scales)  # (M, N)
        y = y.reshape(*shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias


class Bf16Linear(nn.Module):
    """y = x W^T (+ b) with W stored in bf16 and x in the model's dtype (fp32 on a CPU without
    native bf16 arithmetic, where torch's bf16 matmul crawls): half of fp32's bytes per decode
    step, fp32 arithmetic. Decode (<= 16 rows) runs qwenkit's bf16 GEMV; prefill multiplies W as
    stored with the bf16 GEMM where the CPU has one natively, else widens W to fp32 for the GEMM."""

    def __init__(self, linear: nn.Linear, source=None):
        super().__init__()
        (weight,) = _by_row_blocks(linear.weight, lambda w: [w.to(torch.bfloat16)], source)
        self.register_buffer("weight", weight)
        self.bias = linear.bias
        self.in_features, self.out_features = linear.in_features, linear.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, x.shape[-1])
        if cpu_kernels.takes(x2):
            return cpu_kernels.f32_gemv(x2, self.weight, self.bias).reshape(*x.shape[:-1], -1)
        if x.dtype == torch.float32 and PREFILL_DTYPE == torch.bfloat16:  # the bf16 GEMM on W as stored
            y = prefill_matmul(x2, self.weight).reshape(*x.shape[:-1], -1)
            return y if self.bias is None else y + self.bias
        return fp32_linear(x, self.weight.to(x.dtype), self.bias)


class Int4Linear(nn.Module):
    """y = x W^T (+ b) with W in 4 bits: groups of `group_size` inputs share a scale and a minimum.

    An fp32 model on the CPU with groups of 32 keeps qwenkit's own layout (`cpu_kernels.pack_int4`)
    for its AVX2 GEMV; anything else keeps the layout of torch's int4 kernels."""

    def __init__(self, linear: nn.Linear, group_size: int = 32, source=None):
        super().__init__()
        N, K = linear.weight.shape
        if K % group_size:
            raise ValueError(f"in_features {K} is not a multiple of the int4 group size {group_size}")
        self.device_kind = linear.weight.device.type
        self.own_layout = self.device_kind == "cpu" and linear.weight.dtype == torch.float32 and group_size == 32
        params = torch.float16 if self.own_layout else torch.float32  # fp16 scales: 5 bits a weight, not 6
        def rows(w):  # q (n, K) in 0..15, scale and minimum (n, K/G)
            return _int4_rows(w, group_size, params)

        if self.own_layout:  # (N/8, 4K) uint8 and (N/8, K/32 * 8) fp16 twice: blocks of 8 rows
            packed = _by_row_blocks(linear.weight, lambda w: cpu_kernels.pack_int4(*rows(w)), source)
            for name, t in zip(("qweight", "scales", "mins"), packed):
                self.register_buffer(name, t)
        else:
            q, scale, lo = _by_row_blocks(linear.weight, rows, source)
            zero = lo + 8 * scale  # torch's kernels compute (q - 8) * scale + zero
            scale_zero = torch.stack([scale, zero], -1).transpose(0, 1).contiguous()  # (K/G, N, 2)
            self.register_buffer("packed", _pack_int4(q.to(torch.int32), linear.weight.device))
            self.register_buffer("scale_zero", scale_zero.to(linear.weight.dtype))
        self.group_size = group_size
        self.bias = linear.bias
        self.in_features, self.out_features = K, N

    def dequantized(self, dtype=torch.float32) -> torch.Tensor:
        """W as (N, K) in dtype (fp32 or bf16) (qwenkit's layout only)."""
        if cpu_kernels.kernels() is not None:
            return cpu_kernels.int4_dequant(self.qweight, self.scales, self.mins, self.out_features, dtype)
        q, scales, mins = cpu_kernels.unpack_int4(self.qweight, self.scales, self.mins, self.out_features)
        q = q.float().reshape(self.out_features, -1, self.group_size)
        w = q * scales.float()[..., None] + mins.float()[..., None]
        return w.reshape(self.out_features, self.in_features).to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        if self.own_layout:
            if cpu_kernels.takes(x2):
                return cpu_kernels.int4_gemv(x2, self.qweight, self.scales, self.mins, self.bias,
                                             self.out_features).reshape(*shape[:-1], -1)
            y = prefill_matmul(x2, self.dequantized(PREFILL_DTYPE))  # prefill: one dequantized W, then the GEMM
        elif self.device_kind == "cpu":
            y = torch._weight_int4pack_mm_for_cpu(x2, self.packed, self.group_size, self.scale_zero)
        else:
            y = torch._weight_int4pack_mm(x2, self.packed, self.group_size, self.scale_zero)
        y = y.reshape(*shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias


class QuantEmbedding(nn.Module):
    """The token embedding of a quantized model: int8 rows with one scale per token (int8, int4)
    or bf16 rows (bf16 weights); a lookup widens only the rows it reads to the model's dtype. A
    0.5B model's fp32 table is 545 MB, 137 MB in int8: the largest tensor left after quantizing
    the projections."""

    def __init__(self, embedding: nn.Embedding, scheme: str, source=None):
        super().__init__()
        weight = embedding.weight
        self.out_dtype = weight.dtype
        if scheme == "bf16":
            (table,) = _by_row_blocks(weight, lambda w: [w.to(torch.bfloat16)], source)
            self.register_buffer("weight", table)
            self.scales = None
        else:
            q, scales = _by_row_blocks(weight, _int8_rows, source)
            self.register_buffer("weight", q)  # (V, H) int8
            self.register_buffer("scales", scales)  # (V,) fp32
        self.num_embeddings, self.embedding_dim = weight.shape

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.scales is None:
            return self.weight[ids].to(self.out_dtype)
        return (self.weight[ids].float() * self.scales[ids].float().unsqueeze(-1)).to(self.out_dtype)


def _by_row_blocks(weight: torch.Tensor, quantize_rows, source=None, rows: int = 4096) -> list[torch.Tensor]:
    """quantize_rows over blocks of `rows` rows of weight (as fp32), its outputs joined along rows:
    the fp32 temporaries of quantizing a large matrix (the LM head) stay a block's size. `source`,
    when given, holds the values instead of `weight` (a checkpoint tensor, read a block at a time
    and rounded to weight's dtype as loading would have; weight itself is then never filled)."""
    def read(block: slice) -> torch.Tensor:
        if source is None:
            return weight.detach()[block]
        part = source.rows(block.start, block.stop) if hasattr(source, "rows") else source[block]
        return part.to(weight.device, weight.dtype)

    n = weight.shape[0]
    outs, at = None, None
    for i in range(0, n, rows):
        parts = quantize_rows(read(slice(i, i + rows)).float())
        if outs is None:  # each output has rows in proportion to the input's (pack_int4: one per 8)
            outs = [p.new_empty(-(-n * p.shape[0] // min(rows, n)), *p.shape[1:]) for p in parts]
            at = [0] * len(parts)
        for j, p in enumerate(parts):  # filled in place: joining the blocks at the end would hold W twice
            outs[j][at[j] : at[j] + p.shape[0]] = p
            at[j] += p.shape[0]
    assert at == [len(o) for o in outs]
    return outs


def _int8_rows(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(n, K) fp32 -> int8 (n, K), scales (n,): symmetric, one scale per row."""
    scales = (w.abs().amax(dim=1) / 127.0).clamp(min=1e-12)
    return torch.round(w / scales[:, None]).clamp_(-127, 127).to(torch.int8), scales


def _int4_rows(w: torch.Tensor, group_size: int, params=torch.float32) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(n, K) fp32 -> q uint8 (n, K) in 0..15, scale and minimum (n, K/group) in `params`' dtype;
    q is rounded against the scale and minimum as stored (fp16 rounds them first)."""
    n, K = w.shape
    w = w.reshape(n, K // group_size, group_size)
    lo, hi = w.amin(-1, keepdim=True), w.amax(-1, keepdim=True)
    scale = ((hi - lo) / 15).clamp(min=6e-8).to(params)  # 6e-8: fp16's smallest step, never zero
    lo = lo.to(params)
    q = torch.round((w - lo.float()) / scale.float()).clamp_(0, 15).to(torch.uint8).reshape(n, K)
    return q, scale[..., 0], lo[..., 0]


def _pack_int4(q: torch.Tensor, device: torch.device) -> torch.Tensor:
    if device.type == "cpu":
        return torch._convert_weight_to_int4pack_for_cpu(q, 1)
    uint8 = (q[:, ::2] << 4 | q[:, 1::2]).to(torch.uint8)  # CUDA kernel layout: two values per byte
    return torch._convert_weight_to_int4pack(uint8.to(device), 8)


def _quantizable(module: nn.Module) -> bool:
    return (isinstance(module, nn.Linear) and module.out_features > 1  # not the shared-expert gate
            or isinstance(module, nn.Embedding))


@torch.no_grad()
def _swap(model, name: str, scheme: str, group_size: int, source=None) -> None:
    """Replace module `name` by its quantized form, made from `source` (a checkpoint tensor) in
    place of its weight when given."""
    parent_name, _, attr = name.rpartition(".")
    parent = model.get_submodule(parent_name)
    linear = getattr(parent, attr)
    if isinstance(linear, nn.Embedding):
        new = QuantEmbedding(linear, scheme, source)
    elif scheme == "int8":
        new = Int8Linear(linear, source)
    elif scheme == "int4":
        new = Int4Linear(linear, group_size, source)
    else:
        new = Bf16Linear(linear, source)
    setattr(parent, attr, new)


def check_scheme(scheme: str) -> None:
    if scheme not in SCHEMES:
        raise ValueError(f"unknown quantization {scheme!r}; choose from {', '.join(SCHEMES)}")


def quantize(model, scheme: str = "int8", group_size: int = 32):
    """Replace the model's dense projections, LM head and token embedding in place; returns the
    model. Each fp32 weight is released as its layer is replaced, so this holds one layer's two
    copies at a time."""
    check_scheme(scheme)
    for name in [name for name, m in model.named_modules() if _quantizable(m)]:  # names, not modules
        _swap(model, name, scheme, group_size)
    _share_tied_table(model)
    model.quantization = scheme
    return model


def _share_tied_table(model) -> None:
    """A tied model's int8 LM head and int8 embedding hold the same per-row quantization of one
    matrix: the embedding reads the head's copy (136 MB saved for a tied 0.5B model)."""
    head, embed = getattr(model, "lm_head", None), getattr(getattr(model, "model", None), "embed_tokens", None)
    if (isinstance(head, Int8Linear) and isinstance(embed, QuantEmbedding) and embed.scales is not None
            and head.weight.shape == embed.weight.shape and torch.equal(head.weight, embed.weight)
            and torch.equal(head.scales.float(), embed.scales)):
        embed.weight, embed.scales = head.weight, head.scales


class QuantizeOnLoad:
    """`load_tensors`' on_filled callback: quantizes each projection as soon as its weight (and
    bias) are loaded, so loading never holds the whole model in full precision. `take` quantizes
    a weight that completes its module straight from the checkpoint tensor, a block of rows at a
    time, so not even that one full-precision matrix is made (545 MB for a 0.5B model's LM head).
    `finish()` quantizes what no checkpoint tensor completes (an LM head tied to the embedding)."""

    def __init__(self, model, scheme: str, group_size: int = 32):
        check_scheme(scheme)
        self.model, self.scheme, self.group_size = model, scheme, group_size
        self.pending = {name: {f"{name}.{p}" for p, _ in m.named_parameters()}
                        for name, m in model.named_modules() if _quantizable(m)}
        self.owner = {pname: name for name, pnames in self.pending.items() for pname in pnames}
        uses: dict[int, int] = {}
        for p in dict(model.named_parameters(remove_duplicate=False)).values():
            uses[id(p)] = uses.get(id(p), 0) + 1
        # a tied embedding's weight is the LM head's too: it must be filled for the head to read
        self.shared = {pname for pname, p in model.named_parameters(remove_duplicate=False) if uses[id(p)] > 1}

    def take(self, pname: str, tensor) -> bool:
        """Quantize parameter pname's module from `tensor` (pname's whole value) if pname is all it
        still waits for; returns whether it did (the parameter is then never filled)."""
        name = self.owner.get(pname)
        if name is None or self.pending[name] != {pname} or pname in self.shared:
            return False
        del self.pending[name]
        _swap(self.model, name, self.scheme, self.group_size, source=tensor)
        return True

    def __call__(self, pname: str) -> None:
        name = self.owner.get(pname)
        if name is None:
            return
        self.pending[name].discard(pname)
        if not self.pending[name]:
            del self.pending[name]
            _swap(self.model, name, self.scheme, self.group_size)

    def finish(self):
        return quantize(self.model, self.scheme, self.group_size)
