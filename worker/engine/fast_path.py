"""A hand-written forward for the Llama family on CPU: the same math as transformers' modules,
with the weights prepacked for oneDNN and the per-layer small ops cut down.

Why: a decode step at 32 rows of the demo model spent ~60% of its time in matmuls that run at
about a third of the CPU's bf16 peak, and ~20% in small per-layer tensor ops. Two causes, two
changes:

- `aten::mm` hands oneDNN the weight in transformers' layout, and oneDNN lays it out again for
  its kernel on every call; for a 32-row input that re-layout costs about as much as the
  product. Here each weight is laid out once, at start (`torch.ops.mkldnn._reorder_linear_weight`,
  the layout inductor's weight freezing uses), and multiplied with `mkldnn._linear_pointwise`:
  1.3-2x faster for 2-128 rows, in bf16 and float32. It is a private torch API, so it is used
  only where it exists and checked equal to `F.linear` at start; otherwise plain `F.linear`.
  oneDNN takes a path for one-row inputs that re-lays the weight out again (measured 100x
  slower), so a one-row step runs as two rows.
- q, k and v are one matmul, gate and up another (vLLM's QKVParallelLinear /
  MergedColumnParallelLinear); RMSNorm is torch's fused kernel; rotary runs once over the query
  and key heads together; the LM head sees only the rows that sample.

Attention is the engine's `paged_attention`, as on the generic path. Everything else follows
transformers' LlamaDecoderLayer (and Qwen3's per-head q/k norms; Qwen2's q/k/v biases): RMSNorm
(torch's own op, computed in float32, rounded as transformers rounds), rotary from the model's
own `rotary_emb` (so every RoPE scaling it knows is right), SiLU-gated MLP, residual adds.
The prepacked weights are a second copy of the linear layers' weights (the model's own stay for
HF `generate` and the generic path), logged at start.

Families: model types in `FAMILIES` whose modules have exactly that shape (`supports` checks
the modules, not only the name). Anything else, and CUDA, runs the generic path. Tests check
this path's logits and greedy outputs against the generic path and transformers' `generate`.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from worker.engine.native import LayerOps

log = logging.getLogger(__name__)

# paged_attention's signature: (module, query, key, value, mask, scaling=) -> (out, None)
Attention = Callable[..., tuple[torch.Tensor, None]]
Norm = tuple[torch.Tensor, float]  # an RMSNorm's weight and epsilon

FAMILIES = frozenset({"llama", "mistral", "qwen2", "qwen3"})


def supports(model: Any) -> str | None:
    """None when the fast path can run `model`; else why not (logged by the runner)."""
    from transformers import PreTrainedModel

    if not isinstance(model, PreTrainedModel):
        return "not a transformers model"
    if model.device.type != "cpu":
        return f"the fast path is for CPU, the model is on {model.device.type}"
    config = model.config
    if config.model_type not in FAMILIES:
        return f"model type {config.model_type!r} is not in {sorted(FAMILIES)}"
    if model.dtype not in (torch.float32, torch.bfloat16):
        return f"dtype {model.dtype} (bfloat16 and float32 only)"
    if getattr(config, "hidden_act", None) != "silu":
        return f"activation {getattr(config, 'hidden_act', None)!r} (silu only)"
    if getattr(config, "mlp_bias", False):
        return "an MLP with biases"
    if not isinstance(getattr(model, "lm_head", None), torch.nn.Linear):
        return "no linear LM head (not a causal LM)"
    for layer in model.model.layers:
        attention, mlp = layer.self_attn, layer.mlp
        needed = (attention, ("q_proj", "k_proj", "v_proj", "o_proj")), (
            mlp, ("gate_proj", "up_proj", "down_proj"))
        for module, names in needed:
            if not all(isinstance(getattr(module, n, None), torch.nn.Linear) for n in names):
                return f"layer {attention.layer_idx}'s projections are not plain linear layers"
        if attention.o_proj.bias is not None:
            return "an output projection with a bias"
        if len({p.bias is None for p in (attention.q_proj, attention.k_proj,
                                          attention.v_proj)}) > 1:
            return "biases on some of q, k and v only"
    return None


@functools.cache
def prepacking_works(dtype: torch.dtype) -> bool:
    """Whether this torch has oneDNN's prepacked linear and it agrees with F.linear."""
    try:
        generator = torch.Generator().manual_seed(0)
        weight = torch.randn(24, 40, generator=generator).to(dtype)
        packed = torch.ops.mkldnn._reorder_linear_weight(weight)
        for rows in (2, 5, 33):
            x = torch.randn(rows, 40, generator=generator).to(dtype)
            got = torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], "")
            if not torch.allclose(got.float(), F.linear(x, weight).float(), rtol=1e-2,
                                  atol=1e-2):
                return False
    except (AttributeError, RuntimeError) as exc:
        log.info("oneDNN prepacked linear unavailable (%s): plain F.linear", exc)
        return False
    return True


class _Linear:
    """y = x @ W.T (+ b) for W the rows of `weights` stacked, laid out once for oneDNN."""

    def __init__(self, weights: list[torch.Tensor], biases: list[torch.Tensor | None]) -> None:
        weight = torch.cat(weights) if len(weights) > 1 else weights[0]
        self.bias = None if biases[0] is None else torch.cat([b for b in biases if b is not None])
        self.prepacked = prepacking_works(weight.dtype)
        self.weight = torch.ops.mkldnn._reorder_linear_weight(weight) if self.prepacked \
            else weight
        # Beyond the model's own weights: the packed copy, or the stacked one.
        self.nbytes = 0 if self.weight is weights[0] else weight.element_size() * weight.numel()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if not self.prepacked:
            return F.linear(x, self.weight, self.bias)
        if x.shape[0] == 1:  # oneDNN's one-row path re-lays the weight out (100x slower)
            return torch.ops.mkldnn._linear_pointwise(
                x.expand(2, -1).contiguous(), self.weight, self.bias, "none", [], "")[:1]
        return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "none", [], "")


@dataclass
class _Layer:
    attention: torch.nn.Module  # transformers' module: paged_attention reads its layer_idx
    scaling: float
    qkv: _Linear
    o: _Linear
    gate_up: _Linear
    down: _Linear
    norm_in: Norm
    norm_post: Norm
    q_norm: Norm | None  # Qwen3: RMSNorm over each head's vector
    k_norm: Norm | None


def _norm_of(module: torch.nn.Module) -> Norm:
    return module.weight, module.variance_epsilon


class FastForward:
    """forward(input_ids [T], positions [T], keep [R]) -> logits [R, vocab], inside a step."""

    def __init__(self, model: Any, attention: Attention, ops: LayerOps | None = None) -> None:
        config = model.config
        self.model = model
        self.attention = attention
        # The residual adds, RMSNorms, SiLU product and rotary fused in C (native/layer_ops.c),
        # when they built; else torch's ops. A switch: benchmarks.engine_ab compares the two.
        self.ops = ops
        self.heads = config.num_attention_heads
        self.kv_heads = config.num_key_value_heads or self.heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.heads
        self.layers = [self._layer(layer) for layer in model.model.layers]
        self.norm = _norm_of(model.model.norm)
        head = model.lm_head
        self.lm_head = _Linear([head.weight], [head.bias])
        extra = sum(part.nbytes for layer in self.layers
                    for part in (layer.qkv, layer.o, layer.gate_up, layer.down))
        extra += self.lm_head.nbytes
        log.info("fast path for %s: weights %s (%.0f MiB more memory)", config.model_type,
                 "prepacked for oneDNN" if self.lm_head.prepacked else "stacked", extra / 2**20)

    @staticmethod
    def _layer(layer: torch.nn.Module) -> _Layer:
        attention, mlp = layer.self_attn, layer.mlp
        q_norm, k_norm = getattr(attention, "q_norm", None), getattr(attention, "k_norm", None)
        projections = (attention.q_proj, attention.k_proj, attention.v_proj)
        return _Layer(
            attention=attention, scaling=attention.scaling,
            qkv=_Linear([p.weight for p in projections], [p.bias for p in projections]),
            o=_Linear([attention.o_proj.weight], [None]),
            gate_up=_Linear([mlp.gate_proj.weight, mlp.up_proj.weight], [None]),
            down=_Linear([mlp.down_proj.weight], [None]),
            norm_in=_norm_of(layer.input_layernorm),
            norm_post=_norm_of(layer.post_attention_layernorm),
            q_norm=None if q_norm is None else _norm_of(q_norm),
            k_norm=None if k_norm is None else _norm_of(k_norm))

    def __call__(self, input_ids: torch.Tensor, positions: torch.Tensor,
                 keep: torch.Tensor) -> torch.Tensor:
        model = self.model.model
        x = model.embed_tokens(input_ids)  # [T, hidden]
        cos, sin = model.rotary_emb(x, positions.unsqueeze(0))  # [1, T, head_dim]
        if self.ops is not None:
            return self._fused(x, cos[0], sin[0], keep, self.ops)
        cos, sin = cos[0].unsqueeze(1), sin[0].unsqueeze(1)  # [T, 1, head_dim]
        for layer in self.layers:
            x = x + self._attention(layer, _rms_norm(x, *layer.norm_in), cos, sin)
            gate, up = layer.gate_up(_rms_norm(x, *layer.norm_post)).chunk(2, dim=-1)
            x = x + layer.down(F.silu(gate).mul_(up))
        return self.lm_head(_rms_norm(x.index_select(0, keep), *self.norm))

    def _fused(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, keep: torch.Tensor,
               ops: LayerOps) -> torch.Tensor:
        """The same layers with each residual add fused into the norm after it (x, the
        embedding's own output, is the residual stream, added to in place)."""
        h = ops.rms_norm(x, *self.layers[0].norm_in)
        for index, layer in enumerate(self.layers):
            h = ops.rms_norm(x, *layer.norm_post,
                             delta=self._attention(layer, h, cos, sin, ops))
            following = (self.layers[index + 1].norm_in if index + 1 < len(self.layers)
                         else self.norm)
            h = ops.rms_norm(x, *following, delta=layer.down(ops.silu_mul(layer.gate_up(h))))
        return self.lm_head(h.index_select(0, keep))

    def _attention(self, layer: _Layer, x: torch.Tensor, cos: torch.Tensor,
                   sin: torch.Tensor, ops: LayerOps | None = None) -> torch.Tensor:
        """cos/sin: [T, 1, head_dim] for torch's ops, [T, head_dim] for `ops`."""
        tokens = x.shape[0]
        heads, kv_heads, dim = self.heads, self.kv_heads, self.head_dim
        qkv = layer.qkv(x).view(tokens, heads + 2 * kv_heads, dim)
        if layer.q_norm is None or layer.k_norm is None:
            if ops is not None:
                ops.rotary_(qkv, heads + kv_heads, cos, sin)
                q, k = qkv[:, :heads], qkv[:, heads:heads + kv_heads]
            else:
                qk = _rotate(qkv[:, :heads + kv_heads], cos, sin)
                q, k = qk[:, :heads], qk[:, heads:]
        else:
            if ops is not None:  # Qwen3's per-head norms stay torch's; its rotary too
                cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
            q = _rotate(_rms_norm(qkv[:, :heads], *layer.q_norm), cos, sin)
            k = _rotate(_rms_norm(qkv[:, heads:heads + kv_heads], *layer.k_norm), cos, sin)
        v = qkv[:, heads + kv_heads:]
        out, _ = self.attention(layer.attention, q.transpose(0, 1).unsqueeze(0),
                                 k.transpose(0, 1).unsqueeze(0), v.transpose(0, 1).unsqueeze(0),
                                 None, scaling=layer.scaling)
        return layer.o(out.view(tokens, heads * dim))


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """transformers' LlamaRMSNorm, rounding included: normalised in float32 inside torch's op,
    cast back, then scaled in the input's dtype (with the weight inside the op, bf16 outputs
    differed from transformers' on 5 of 8 demo prompts within 32 tokens)."""
    return weight * F.rms_norm(x, (x.shape[-1],), eps=eps)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """transformers' apply_rotary_pos_emb for x [T, heads, dim], cos/sin [T, 1, dim]."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


@torch.no_grad()
def build(model: Any, attention: Attention,
          ops: LayerOps | None = None) -> tuple[FastForward | None, str]:
    """The fast path for `model` and what runs: the fast path, or why the generic one. `ops`:
    the fused layer operations to run its small ops with (else torch's)."""
    reason = supports(model)
    if reason is not None:
        return None, f"generic transformers forward ({reason})"
    how = f"fast path for {model.config.model_type}"
    return FastForward(model, attention, ops), how + (
        ", small ops fused (native)" if ops is not None else "")
