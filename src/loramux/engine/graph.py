"""A compiled decode step: base model plus each row's LoRA mixture over a static KV cache.

The eager decode step goes through transformers' modules, the fused layers' Python and one ATen
dispatch per op; with one row that overhead is about half of a step of the default model
(`benchmarks/results/serve.json`, `decode_step_profile`), while the step's floor is reading the
weights once. Here one decode step of a Llama-family model is written as a plain function of
tensors (`DecodeGraph`) so that TorchInductor compiles it whole: the linears, RMSNorm, RoPE,
attention over the cache and each row's LoRA update (y += Σ_j w_j·(x·A_jᵀ)·B_jᵀ over the adapters j
the row mixes, gathered from the batch's table of factors, compiled.py) become one generated program
per shape, with no Python between ops up to 4 rows but one C++ call per layer for an fp32 CPU
step's attention (kernels/decode_attention.cpp); above that each base linear is one call of
`loramux::packed_linear` (cpu_linear.py) on the server's oneDNN-packed weight. A quantized base's
linears (quantize.py) are one call each of its C++ kernels (kernels/int8_linear.cpp: a prefetched
pass over the int8 weight for decode's few rows; a w8a8 block's q, k and v in one call, its gate
and up in another), or above 4 rows of w8a8 of the integer GEMM.

The state it runs over (row slots, the static cache, the batch's table of LoRA factors) is kept by
`compiled.py`. Position p of a row is written at index p of its slot: no left padding, and the
mask is `index <= position`.

The reference is transformers' own forward (with the fused layers); `tests/engine/test_compiled.py`
checks the two agree to fp32 rounding, with and without mixtures, and that a row's logits do not
depend on its slot-mates. Families whose blocks differ from Llama's (Gemma's norms, Qwen3's
q/k norms, sliding windows, Phi-3's fused projections) are refused by `unsupported`, with the
reason, when the compiled path is asked for.
"""

from __future__ import annotations

import logging
import math

import torch
from torch import nn

from ..cpu_linear import PackedLinear
from ..errors import LoramuxError
from ..quantize import _KERNEL, W8A8_KERNEL_MAX_K, W8A8_KERNEL_ROWS, Int8Linear, W8A8Linear, quantize_rows

log = logging.getLogger("loramux.compiled")

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
_FAMILIES = ("llama", "mistral", "qwen2")
_EXACT_TERMS = 1024  # int8 products fp32 sums exactly at a time: 1024 · 127² < 2^24
# The C++ operators the step calls where they could be built (kernels/): looked up once per process
# (for a CPU model), read as plain values while torch.compile traces; None where the build failed
# (the tensor-op form serves).
_OPS: dict = {}
# up to this many rows (every slot count the step compiles) an fp32 step's attention is the C++
# operator: it measured ahead of the batched matmuls at 16 rows as at 1 and 4
# (benchmarks/results/step_profile_attention_rows16.json)
ATTENTION_KERNEL_ROWS = 64


def _load_ops() -> None:
    if "attention" not in _OPS:
        from ..kernels import build_error, decode_attention_op

        _OPS["attention"] = decode_attention_op()
        if _OPS["attention"] is None:
            log.warning("compiled decode: the few-row attention operator could not be built (%s); attention "
                        "takes two batched matmuls a layer instead: the same results, slower", build_error())


def _round_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """quantize.quantize_rows by its C++ operator; by the tensor ops where that could not be
    built (the same values, slower compiled)."""
    op = _KERNEL["quantize_rows"]
    return op(x.float()) if op is not None else quantize_rows(x.float())


def _linear(module: nn.Module) -> nn.Linear:
    """The base linear under a fused layer (MultiLoraLinear.base) or a prepacked one."""
    return getattr(module, "base", module)


def unsupported(model: nn.Module) -> str | None:
    """Why the compiled step cannot run this model (None: it can)."""
    config = model.config
    kind = getattr(config, "model_type", None)
    if kind not in _FAMILIES:
        return f"model family {kind!r} (compiled decode covers {', '.join(_FAMILIES)})"
    if getattr(config, "hidden_act", "silu") != "silu":
        return f"activation {config.hidden_act!r}"
    if getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window", kind == "mistral"):
        return "sliding-window attention"
    rope = getattr(model.model.rotary_emb, "rope_type", "default")
    if rope not in ("default", "linear", "llama3"):  # those whose frequencies do not depend on length
        return f"RoPE type {rope!r}"
    layer = model.model.layers[0]
    for name in PROJECTIONS:
        if not isinstance(_linear(DecodeGraph.module(layer, name)), nn.Linear):
            return f"no {name} linear"
    if not isinstance(_linear(model.lm_head), nn.Linear):
        return "the output head is not a plain linear"
    return None


class DecodeGraph(nn.Module):
    """One decode step as a function of tensors; the model's weights are read from its modules
    (through fused and prepacked wrappers), never copied."""

    def __init__(self, model: nn.Module, gemv_rows: int = 4):
        super().__init__()
        self.gemv_rows = gemv_rows
        reason = unsupported(model)
        if reason:
            raise LoramuxError(f"compiled decode does not support this model: {reason}")
        if model.model.embed_tokens.weight.device.type == "cpu":  # the operators are CPU code
            _load_ops()
        config = model.config
        self.model = model
        self.layers = list(model.model.layers)
        self.w8a8 = isinstance(_linear(model.model.layers[0].self_attn.q_proj), W8A8Linear)
        self.n_heads = config.num_attention_heads
        self.n_kv = getattr(config, "num_key_value_heads", None) or self.n_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.n_heads
        self.eps = config.rms_norm_eps
        rotary = model.model.rotary_emb
        self.register_buffer("inv_freq", rotary.inv_freq.detach().float().clone(), persistent=False)
        self.rope_scale = float(getattr(rotary, "attention_scaling", 1.0))

    @staticmethod
    def module(layer: nn.Module, proj: str) -> nn.Module | None:
        """A block's projection module (fused or not); None where the block has none by that name."""
        return getattr(layer.self_attn if proj in PROJECTIONS[:4] else layer.mlp, proj, None)

    def _norm(self, x: torch.Tensor, norm: nn.Module) -> torch.Tensor:
        """RMSNorm in fp32, rounded back before the weight (as transformers' Llama)."""
        xf = x.float()
        return norm.weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)

    def _matmul(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        if x.shape[0] <= self.gemv_rows:
            # A few rows: a multiply and a sum, which Inductor turns into one vectorised pass over
            # the weight; BLAS's GEMM with one row is not a GEMV and reads the weights well below
            # the machine's bandwidth (benchmarks/compiled_decode.py measures the whole step).
            y = (x[:, None, :] * weight).sum(-1)
            return y if bias is None else y + bias
        return torch.nn.functional.linear(x, weight, bias)

    def _rounded(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """A w8a8 base's few rows rounded to int8 once for every projection that reads them (q, k
        and v; gate and up): as tensor ops, Inductor would round them again for every output of
        every projection, and the operator costs a call each time."""
        if self._kernel_rows(x):
            return None  # the kernel rounds them itself, in the same pass
        return _round_rows(x) if self.w8a8 and x.shape[0] <= self.gemv_rows else None

    def _apply(self, x: torch.Tensor, linear: nn.Linear,
               rounded: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        if isinstance(linear, W8A8Linear):
            op = _KERNEL["w8a8"]
            if self._kernel_rows(x):
                # the kernel rounds the rows and sums exactly in one prefetched pass over the weight,
                # faster than the generated reduction below, which converts every weight to fp32 as it
                # streams it (benchmarks/few_row_linears.py); the generated form serves where the
                # kernels could not be built
                y = op(x.float(), linear.weight, linear.scale)
                return (y if linear.bias is None else y + linear.bias).to(x.dtype)
            if x.shape[0] <= self.gemv_rows:
                # A multiply and sum fused into the step's program like the weight-only form (a
                # padded GEMM call per linear cost more per step). Products of int8 values are
                # integers, and fp32 adds integers exactly below 2^24: summed in fp32 over at most
                # _EXACT_TERMS inputs at a time (127² · 1024 < 2^24), then in int32, these are the
                # GEMM's exact sums, so a row's output does not depend on how many rows decode with it.
                q, scale = rounded if rounded is not None else _round_rows(x)
                qf, wf = q.float(), linear.weight.float()
                acc = sum(self._matmul(qf[:, i:i + _EXACT_TERMS], wf[:, i:i + _EXACT_TERMS]).to(torch.int32)
                          for i in range(0, q.shape[1], _EXACT_TERMS))
                y = acc.float() * scale * linear.scale
                return (y if linear.bias is None else y + linear.bias).to(x.dtype)
            return linear(x)  # more rows: their rounding fuses into the program around one integer GEMM
        if isinstance(linear, Int8Linear):
            # its C++ kernel up to KERNEL_ROWS rows (one prefetched pass over the int8 weight for all of
            # them: level with Inductor's generated reduction at 1-2 rows, faster at 4,
            # benchmarks/few_row_linears.py), the dequantised weight's GEMM above
            return linear(x)
        if (isinstance(linear, PackedLinear) and x.shape[0] > self.gemv_rows and x.shape[0] >= linear.min_rows
                and not torch.is_grad_enabled()):
            # a batch of rows on the weight oneDNN laid out once: a plain GEMM lays it out again at
            # every call, which costs more than the multiply at these row counts (cpu_linear.py)
            return torch.ops.loramux.packed_linear(x, linear.weight, linear.bias)
        return self._matmul(x, linear.weight, linear.bias)

    def _kernel_rows(self, x: torch.Tensor) -> bool:
        """Whether a w8a8 base's C++ kernels take these rows (and are built)."""
        return _KERNEL["w8a8"] is not None and x.shape[0] <= W8A8_KERNEL_ROWS and x.shape[1] <= W8A8_KERNEL_MAX_K

    def _bases(self, x: torch.Tensor, modules: tuple[nn.Module, ...]) -> list[torch.Tensor]:
        """The base outputs of projections that read the same rows (q, k and v; gate and up). A
        w8a8 base's few rows take one kernel call for all of them: one rounding of the rows, one
        call's overhead and one thread start-up where each projection paid its own."""
        linears = [_linear(m) for m in modules]
        op = _KERNEL["w8a8s"]
        if op is not None and self._kernel_rows(x) and all(isinstance(lin, W8A8Linear) for lin in linears):
            ys = op(x.float(), [lin.weight for lin in linears], [lin.scale for lin in linears])
            return [(y if lin.bias is None else y + lin.bias).to(x.dtype) for y, lin in zip(ys, linears)]
        r = self._rounded(x)
        return [self._apply(x, lin, r) for lin in linears]

    def _lora(self, x: torch.Tensor, y: torch.Tensor, lora: tuple[torch.Tensor, torch.Tensor] | None,
              mix: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
        """y (a projection's base output for rows x) plus each row's LoRA update."""
        if lora is None:
            return y
        # the table: A (P, W, d_in) scaled, B (P, W, d_out), an adapter per position; mix: each
        # row's picks (S, J) of positions and its weight of each (S, J), 0 past a row's own
        # adapters. A row multiplies the factors it picks, gathered inside the generated
        # reductions (never copied out): two GEMMs over the whole table multiplied every row by
        # every adapter of the batch, most of them weighted 0, in two library calls per
        # projection (step_profile_rows16_adapters14_table_gemm.json in benchmarks/results).
        # fp32 factors whatever the base's dtype, the update added in fp32 before one
        # rounding, PEFT's order (fusion/layer.py).
        picks, weights = mix
        A, B = lora
        z = (x.float()[:, None, None, :] * A[picks]).sum(-1) * weights[:, :, None]  # (S, J, W)
        return (y.float() + (z[..., None] * B[picks]).sum((1, 2))).to(x.dtype)

    def _projs(self, x: torch.Tensor, modules: tuple[nn.Module, ...], loras: list, mix) -> list[torch.Tensor]:
        """Projections of the same rows x, each with its LoRA update."""
        return [self._lora(x, y, lora, mix) for y, lora in zip(self._bases(x, modules), loras)]

    def _attention(self, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor,
                   bias: torch.Tensor) -> torch.Tensor:
        """Grouped-query attention of one query token per row (q (S, H, D)) over its slot's cache;
        returns (S, H·D)."""
        S, H, D = q.shape
        G = keys.shape[2]
        op = _OPS.get("attention")
        if op is not None and S <= ATTENTION_KERNEL_ROWS and q.dtype == torch.float32 and q.device.type == "cpu":
            # one C++ call a layer (kernels/decode_attention.cpp) where the two batched matmuls
            # below cost more in call and thread set-up than their H·D·L multiply-adds at a few
            # rows, and ran slower at 16
            return op(q, keys, values, positions)
        # bf16, another device, or no operator: two batched matmuls per layer (written as multiplies and sums instead,
        # Inductor's program ran the served 16-row step slower: benchmarks/results/vs_llamacpp_table.json)
        qg = q.view(S, G, H // G, D)
        scores = torch.einsum("sgqd,lsgd->sgql", qg, keys).float() / math.sqrt(D)
        probs = torch.softmax(scores + bias[:, None, None, :], dim=-1).to(q.dtype)  # fp32, as transformers
        return torch.einsum("sgql,lsgd->sgqd", probs, values).reshape(S, H * D)

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor, keys: list[torch.Tensor],
                values: list[torch.Tensor], lora: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None,
                picks: torch.Tensor | None = None, weights: torch.Tensor | None = None) -> torch.Tensor:
        """tokens, positions (S,); keys/values: per layer (L, S, n_kv, head_dim), written in place at
        each row's position (one tensor per layer: Inductor then updates it in place, where a
        slice of one stacked tensor was copied whole at every write; positions first, so that the
        first L of a longer cache is a contiguous view); lora: projection -> (A (layers, P, W, d_in),
        B (layers, P, W, d_out)), the batch's table of adapters' factors (an adapter per position,
        A scaled), picks (S, J) the positions each row mixes and weights (S, J) its weight of each
        (compiled.py's table). Returns the next-token logits (S, vocab)."""
        S, L = tokens.shape[0], keys[0].shape[0]
        H, G, D = self.n_heads, self.n_kv, self.head_dim
        x = self.model.model.embed_tokens.weight[tokens]  # (S, d)
        freqs = positions[:, None].float() * self.inv_freq  # (S, D/2)
        emb = torch.cat([freqs, freqs], dim=-1)
        cos = (emb.cos() * self.rope_scale).to(x.dtype)  # (S, D)
        sin = (emb.sin() * self.rope_scale).to(x.dtype)
        visible = torch.arange(L, device=tokens.device)[None, :] <= positions[:, None]  # (S, L)
        bias = torch.zeros(S, L, device=tokens.device).masked_fill(~visible, float("-inf"))
        rows = torch.arange(S, device=tokens.device)

        def rope(t: torch.Tensor) -> torch.Tensor:  # (S, heads, D)
            half = t.shape[-1] // 2
            rotated = torch.cat([-t[..., half:], t[..., :half]], dim=-1)
            return t * cos[:, None] + rotated * sin[:, None]

        mix = None if lora is None else (picks, weights)
        for i, layer in enumerate(self.layers):
            def lo(name: str):
                return None if lora is None else (lora[name][0][i], lora[name][1][i])

            attn, mlp = layer.self_attn, layer.mlp
            h = self._norm(x, layer.input_layernorm)
            q, k, v = self._projs(h, (attn.q_proj, attn.k_proj, attn.v_proj),
                                  [lo("q_proj"), lo("k_proj"), lo("v_proj")], mix)
            q, k, v = rope(q.view(S, H, D)), rope(k.view(S, G, D)), v.view(S, G, D)
            keys[i].index_put_((positions, rows), k)
            values[i].index_put_((positions, rows), v)
            out = self._attention(q, keys[i], values[i], positions, bias)
            x = x + self._lora(out, self._apply(out, _linear(attn.o_proj)), lo("o_proj"), mix)
            h = self._norm(x, layer.post_attention_layernorm)
            gate, up = self._projs(h, (mlp.gate_proj, mlp.up_proj), [lo("gate_proj"), lo("up_proj")], mix)
            act = torch.nn.functional.silu(gate) * up
            x = x + self._lora(act, self._apply(act, _linear(mlp.down_proj)), lo("down_proj"), mix)
        x = self._norm(x, self.model.model.norm)
        return self._apply(x, _linear(self.model.lm_head))
