"""Weight-only int8 and int4 for the LLM's linear layers, and prepacked bf16 (inference only).

Decoding one token reads every LLM weight once, so its speed is bounded by memory bandwidth;
int8 weights halve the bytes of bf16. Each output channel of a weight gets one scale
(symmetric, max-abs / 127); activations stay in the model's dtype, and the product runs in
torch's own int8-weight kernel (``torch._weight_int8pack_mm``). That kernel is made for few rows
(decoding); a prefill of hundreds of positions is compute-bound, so there the int8 weight is
widened to the activation dtype once per call, multiplied by the fast dense kernel, and the
scales are applied to the (smaller) output. int4 (:class:`Int4Linear`) quarters the bytes of
bf16 with one scale and zero per 32 input columns, through torch's int4 CPU kernel
(``torch._weight_int4pack_mm_for_cpu``) in the same two regimes. The towers and TokenMining are
not touched: they are compute-bound, and small.
"""

from __future__ import annotations

import functools

import torch
from torch import nn

from hilight.errors import ConfigError

QUANTIZE = ("auto", "none", "int8", "int4", "packed", "q4_k_m", "q8_0")  # the last two: hilight.inference.llamacpp


# from this LLM width on, every packed product wins (measured, one row, 2 threads: 2,048 x 2,048
# 114 vs 275 us, 1,024 x 4,096 194 vs 480 us); at 256 wide (the bundled model) it is a wash
PACK_FROM_HIDDEN = 1024


def resolve_quantize(mode: str, model, device: str | torch.device) -> str:
    """``auto``: ``packed`` for a bf16 model at least PACK_FROM_HIDDEN wide on a CPU whose oneDNN
    runs bf16 natively (the same values, decoding 1.5x faster at full size, see docs/performance.md),
    otherwise ``none``; other modes as given."""
    if mode not in QUANTIZE:
        raise ConfigError(f"unknown quantization {mode!r} ({', '.join(QUANTIZE)})")
    if mode != "auto":
        return mode
    usable = (next(model.llm.parameters()).dtype == torch.bfloat16 and torch.device(device).type == "cpu"
              and model.config.llm.hidden_size >= PACK_FROM_HIDDEN and cpu_has_native_bf16() and _packing_works())
    return "packed" if usable else "none"


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AVX512-BF16 / AMX), as torch detects it."""
    return getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)()


@functools.cache
def _packing_works() -> bool:
    """Whether this torch build packs and runs a small bf16 linear layer through oneDNN."""
    try:
        layer = PackedLinear(nn.Linear(16, 8).to(torch.bfloat16))
        return layer(torch.ones(2, 16, dtype=torch.bfloat16)).shape == (2, 8)
    except (RuntimeError, AttributeError):  # no mkldnn ops in this build, or they refuse bf16
        return False


class PackedLinear(nn.Module):
    """A frozen bf16 ``nn.Linear`` whose weight is reordered once into oneDNN's blocked layout
    (the values are unchanged). torch's plain bf16 product reads a [16384, 2048] weight for one
    input row at 19 GB/s on a 2-core AVX512-BF16 CPU; the prepacked one at 60 GB/s, the speed
    of summing the same tensor, so decoding becomes bandwidth-bound as it should be."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        weight = linear.weight.detach()
        if weight.dtype != torch.bfloat16 or weight.device.type != "cpu":
            raise ConfigError("packed weights are for bf16 models on CPU (--dtype bf16)")
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.register_buffer("packed", torch.ops.mkldnn._reorder_linear_weight(weight, None))
        self.dtype = weight.dtype
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().clone())

    @property
    def weight(self) -> torch.Tensor:
        """A stand-in with the weight's dtype and device (for code that inspects ``.weight``)."""
        return torch.empty(0, dtype=self.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        flat = x.reshape(-1, shape[-1]).to(self.dtype).contiguous()
        out = torch.ops.mkldnn._linear_pointwise(flat, self.packed, self.bias, "none", [], "")
        return out.reshape(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, oneDNN-packed bf16 weights"


class Int8Linear(nn.Module):
    """A frozen ``nn.Linear`` with int8 weights [N, K] and per-output-channel scales [N]."""

    # from this many input rows on, widening the weight and the dense kernel win (measured on one
    # 16,384 x 2,048 weight: 128 rows 57 vs 59 ms, 431 rows 175 vs 101 ms)
    DENSE_ROWS = 128

    def __init__(self, linear: nn.Linear, chunk_rows: int = 4096):
        super().__init__()
        weight = linear.weight.detach()
        scales = weight.abs().amax(dim=1).float().clamp(min=1e-12) / 127.0  # [N]
        quantized = torch.empty(weight.shape, dtype=torch.int8)
        # a few thousand rows at a time: an fp32 copy of a whole 256k-word LM head would be 2 GB
        for start in range(0, weight.shape[0], chunk_rows):
            rows = slice(start, start + chunk_rows)
            quantized[rows] = torch.round(weight[rows].float() / scales[rows, None]).clamp(-127, 127).to(torch.int8)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.register_buffer("weight_int8", quantized)
        self.register_buffer("scales", scales.to(linear.weight.dtype))
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().clone())

    @property
    def weight(self) -> torch.Tensor:
        """The dequantized weight (for code that inspects ``.weight``: dtype, device)."""
        return self.weight_int8.to(self.scales.dtype) * self.scales[:, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        if flat.stride(-1) != 1 or flat.stride(0) != shape[-1]:
            flat = flat.contiguous()
        flat = flat.to(self.scales.dtype)
        if flat.shape[0] >= self.DENSE_ROWS:  # [M, K] x [K, N] with a large M: compute-bound
            out = torch.nn.functional.linear(flat, self.weight_int8.to(flat.dtype))
            out = out * self.scales  # [M, N]: per-output-channel scales, after the product
        else:
            out = torch._weight_int8pack_mm(flat, self.weight_int8, self.scales)
        if self.bias is not None:
            out = out + self.bias
        return out.reshape(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 weights"


class Int4Linear(nn.Module):
    """A frozen ``nn.Linear`` with 4-bit weights: each output row's inputs in groups of GROUP,
    each group with its own scale and zero (asymmetric, min-max: w = (q - 8) * scale + zero,
    q in 0..15), kept in torch's CPU int4 layout. Needs ``out_features % 64 == 0`` (the layout's
    blocks) and ``in_features % GROUP == 0``: see :func:`int4_fits`.

    Few rows (decoding) run torch's int4 kernel, which reads the 4-bit weight as it goes; from
    DENSE_ROWS rows on (a prefill, compute-bound) the weight is widened to the activation dtype
    once per call and multiplied by the dense kernel, as :class:`Int8Linear` does."""

    GROUP = 32
    BLOCK = 64  # torch's CPU int4 layout packs 64 output rows at a time
    DENSE_ROWS = 128

    def __init__(self, linear: nn.Linear, chunk_rows: int = 4096):
        super().__init__()
        weight = linear.weight.detach()
        n, k = weight.shape
        if not int4_fits(linear):
            raise ConfigError(f"int4 needs out_features % {self.BLOCK} == 0 and in_features % {self.GROUP} == 0, "
                              f"not {n} x {k}")
        self.in_features, self.out_features, self.dtype = k, n, weight.dtype
        packed = torch.empty(n, k // 2, dtype=torch.uint8)
        scale_zero = torch.empty(k // self.GROUP, n, 2, dtype=weight.dtype)
        # a few thousand rows at a time (whole layout blocks): an fp32 copy of a whole 256k-word
        # LM head would be 2 GB
        for start in range(0, n, chunk_rows):
            rows = slice(start, start + chunk_rows)
            groups = weight[rows].float().reshape(-1, k // self.GROUP, self.GROUP)
            low, high = groups.amin(-1), groups.amax(-1)
            scale = ((high - low) / 15).clamp(min=1e-12)
            q = torch.round((groups - low[..., None]) / scale[..., None]).clamp(0, 15).to(torch.int32)
            packed[rows] = torch._convert_weight_to_int4pack_for_cpu(q.reshape(-1, k), 1)
            scale_zero[:, rows] = torch.stack([scale, low + 8 * scale], -1).transpose(0, 1).to(weight.dtype)
        self.register_buffer("packed", packed)
        self.register_buffer("scale_zero", scale_zero)  # [K / GROUP, N, 2]
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().clone())

    @property
    def weight(self) -> torch.Tensor:
        """A stand-in with the weight's dtype and device (for code that inspects ``.weight``)."""
        return torch.empty(0, dtype=self.dtype)

    def dequantized(self) -> torch.Tensor:
        """The weight [N, K] in the model's dtype, unpacked from torch's layout: each block of
        64 output rows is [K, 32] bytes, byte j of column k holding rows j (low nibble) and j + 32."""
        n, k = self.out_features, self.in_features
        blocks = self.packed.view(n // self.BLOCK, k, self.BLOCK // 2)
        q = torch.cat([blocks & 15, blocks >> 4], -1).transpose(1, 2).reshape(n, k // self.GROUP, self.GROUP)
        scale, zero = self.scale_zero.transpose(0, 1).unbind(-1)  # [N, K / GROUP] each
        return ((q.to(self.dtype) - 8) * scale[..., None] + zero[..., None]).reshape(n, k)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        flat = x.reshape(-1, shape[-1]).to(self.dtype).contiguous()
        if flat.shape[0] >= self.DENSE_ROWS:
            out = torch.nn.functional.linear(flat, self.dequantized())
        else:
            out = torch._weight_int4pack_mm_for_cpu(flat, self.packed, self.GROUP, self.scale_zero)
        if self.bias is not None:
            out = out + self.bias
        return out.reshape(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int4 weights (groups of {self.GROUP})"


def int4_fits(linear: nn.Linear) -> bool:
    """Whether ``linear``'s shape suits :class:`Int4Linear` (others get :class:`Int8Linear`)."""
    return linear.out_features % Int4Linear.BLOCK == 0 and linear.in_features % Int4Linear.GROUP == 0


def _int4_or_int8(linear: nn.Linear) -> nn.Module:
    return Int4Linear(linear) if int4_fits(linear) else Int8Linear(linear)


def quantize_llm(model, include_lm_head: bool = True, mode: str = "int8") -> int:
    """Replace the LLM's linear layers (and its LM head) by :class:`Int8Linear` (``mode="int8"``),
    :class:`Int4Linear` (``"int4"``; a layer whose shape int4 cannot take gets int8) or
    :class:`PackedLinear` (``"packed"``), in place; returns how many were replaced. The input
    embedding keeps its dtype (it is a lookup)."""
    kind = {"int8": Int8Linear, "int4": _int4_or_int8, "packed": PackedLinear}[mode]
    llm = model.llm
    # names only: a list of the modules themselves would keep every original weight alive until
    # the last one is replaced (full hilight-2b packed: peak 11.1 GiB instead of 7.x)
    targets = [name for name, module in llm.named_modules() if isinstance(module, nn.Linear)
               and (include_lm_head or name != "lm_head")]
    for name in targets:
        parent_name, _, child = name.rpartition(".")
        parent = llm.get_submodule(parent_name) if parent_name else llm
        module = getattr(parent, child)
        replacement = kind(module)
        # the pre-hook that gives the LM head standard strides stays with it
        replacement._forward_pre_hooks.update(module._forward_pre_hooks)
        setattr(parent, child, replacement)
        del module, replacement  # the original weight is freed here (unless tied to the embedding)
    if include_lm_head and getattr(llm.config, "tie_word_embeddings", False):
        llm.config.tie_word_embeddings = False  # the head is its own copy now
    return len(targets)
