"""The local replacement model: the model on one prompt with its attention patterns and norm scales frozen at
their clean-run values and each MLP replaced by its transcoder's skip connection plus fixed sources, so that
everything from the token embeddings to the MLP inputs and the logits is linear.

Dimension glossary as in model/llama.py (pos, d_model, n_heads, n_kv_heads, d_head), plus:
    rows        attribution rows computed together (one backward pass)
    n_layers    the model's layers; L below

Per layer l (a_1, a_2 = norm weight / frozen scale, per position):

    v        = (resid_pre * a_1) @ W_V.T + b_V
    attn_out = (pattern @ v) @ W_O.T + b_O                     pattern frozen  [n_heads, pos, pos]
    resid_mid = resid_pre + attn_out
    mlp_in   = resid_mid * a_2                                 (what transcoders read)
    mlp_out  = mlp_in @ W_skip.T + b_dec + source[l]           source: features' writes + error (+ frozen bits)
    resid_post = resid_mid + mlp_out

and logits read ln_final's output resid * a_f. `forward` runs it; `backward` is its transpose, written out so a
batch of rows needs no autograd graph and no batch-sized forward: it starts at the highest target layer and
hands back the gradient at each layer's MLP output and at the embedding.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .transcoders import TranscoderSet


@dataclass
class FrozenLayer:
    """One block's frozen linear pieces."""

    ln1_gain: torch.Tensor  # [pos, d_model]: ln1 weight / frozen scale
    ln2_gain: torch.Tensor  # [pos, d_model]
    pattern: torch.Tensor  # [n_heads, pos, pos]
    W_V: torch.Tensor  # [n_kv_heads * d_head, d_model]  (nn.Linear layout)
    b_V: torch.Tensor | None  # [n_kv_heads * d_head]
    W_O: torch.Tensor  # [d_model, n_heads * d_head]
    b_O: torch.Tensor | None  # [d_model]
    W_skip: torch.Tensor | None  # [d_model, d_model]
    b_dec: torch.Tensor  # [d_model]


def block_weights(block, dtype: torch.dtype, *, copy: bool = False) -> dict[str, torch.Tensor | None]:
    """What the replacement model keeps of one decoder block: the norm weights, V and O (and their biases), in
    `dtype`. `copy=True` copies them out of the block, so that a streamed layer's memory can go once it ran
    (its tensors are views of one block of memory: a view kept would keep the whole layer)."""

    def take(tensor: torch.Tensor | None) -> torch.Tensor | None:
        return None if tensor is None else tensor.detach().to(dtype, copy=copy)

    attn = block.attn
    return {
        "ln1": take(block.ln1.weight),
        "ln2": take(block.ln2.weight),
        "W_V": take(attn.v_proj.weight),
        "b_V": take(attn.v_proj.bias),
        "W_O": take(attn.o_proj.weight),
        "b_O": take(attn.o_proj.bias),
    }


class FrozenReplacement:
    """The linear replacement model of one prompt (see the module docstring).

    Args:
        layers: the frozen blocks, in order.
        final_gain: ln_final weight / frozen scale [pos, d_model].
        n_heads, n_kv_heads, d_head: the attention's shape.
    """

    def __init__(self, layers: list[FrozenLayer], final_gain: torch.Tensor, n_heads: int, n_kv_heads: int, d_head: int):
        self.layers = layers
        self.final_gain = final_gain
        self.n_heads, self.n_kv_heads, self.d_head = n_heads, n_kv_heads, d_head

    @classmethod
    def from_cache(
        cls,
        model,
        cache: dict[str, torch.Tensor],
        transcoders: TranscoderSet,
        dtype: torch.dtype,
        weights: dict[int, dict[str, torch.Tensor | None]] | None = None,
    ):
        """Freezes the clean run's `cache` (ln scales and patterns, batch 1) around `transcoders`.

        `weights`: each layer's `block_weights`, taken while the layer was in memory (a streamed model's blocks
        hold no weights after its pass); by default they are read from the model's blocks."""
        cfg = model.cfg

        def gain(weight: torch.Tensor, scale_name: str) -> torch.Tensor:
            return (weight.to(dtype) / cache[scale_name][0].to(dtype)).detach()  # [pos, d_model]

        layers = []
        for layer in range(cfg.n_layers):
            held = weights[layer] if weights is not None else block_weights(model.blocks[layer], dtype)
            skip = transcoders.skip_weight(layer)
            layers.append(
                FrozenLayer(
                    ln1_gain=gain(held["ln1"], f"blocks.{layer}.ln1.hook_scale"),
                    ln2_gain=gain(held["ln2"], f"blocks.{layer}.ln2.hook_scale"),
                    pattern=cache[f"blocks.{layer}.attn.hook_pattern"][0].to(dtype),
                    W_V=held["W_V"],
                    b_V=held["b_V"],
                    W_O=held["W_O"],
                    b_O=held["b_O"],
                    W_skip=None if skip is None else skip.detach().to(dtype),
                    b_dec=transcoders.output_bias(layer).detach().to(dtype),
                )
            )
        return cls(layers, gain(model.ln_final.weight, "ln_final.hook_scale"), cfg.n_heads, cfg.n_kv_heads, cfg.d_head)

    # ------------------------------------------------------------------------------------------ forward
    def _attention(self, frozen: FrozenLayer, x: torch.Tensor, with_bias: bool) -> torch.Tensor:
        """x [..., pos, d_model] (after ln1) -> attention output [..., pos, d_model] with the frozen pattern."""
        v = x @ frozen.W_V.T
        if with_bias and frozen.b_V is not None:
            v = v + frozen.b_V
        v = v.unflatten(-1, (self.n_kv_heads, self.d_head))  # [..., pos, n_kv_heads, d_head]
        v = v.repeat_interleave(self.n_heads // self.n_kv_heads, dim=-2)  # [..., pos, n_heads, d_head]
        z = torch.einsum("hqk,...khd->...qhd", frozen.pattern, v)  # [..., pos, n_heads, d_head]
        out = z.flatten(-2) @ frozen.W_O.T
        return out + frozen.b_O if with_bias and frozen.b_O is not None else out

    def forward(
        self, embed: torch.Tensor, sources: torch.Tensor, *, with_bias: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Runs the replacement model from fixed sources.

        Args:
            embed: the token embeddings [..., pos, d_model].
            sources: what each layer's MLP output holds beyond skip and b_dec [..., n_layers, pos, d_model].
            with_bias: add the constant terms (b_V, b_O, b_dec); without them the map is linear, not affine.

        Returns:
            (mlp_in [..., n_layers, pos, d_model], ln_final's output [..., pos, d_model]).
        """
        resid = embed
        mlp_ins = []
        for layer, frozen in enumerate(self.layers):
            resid = resid + self._attention(frozen, resid * frozen.ln1_gain, with_bias)
            mlp_in = resid * frozen.ln2_gain
            mlp_ins.append(mlp_in)
            mlp_out = sources[..., layer, :, :]
            if frozen.W_skip is not None:
                mlp_out = mlp_out + mlp_in @ frozen.W_skip.T
            if with_bias:
                mlp_out = mlp_out + frozen.b_dec
            resid = resid + mlp_out
        return torch.stack(mlp_ins, dim=-3), resid * self.final_gain

    # ----------------------------------------------------------------------------------------- backward
    def _attention_transpose(self, frozen: FrozenLayer, grad: torch.Tensor) -> torch.Tensor:
        """The transpose of `_attention` without biases: grad [rows, pos, d_model] at its output -> at its input."""
        grad_z = (grad @ frozen.W_O).unflatten(-1, (self.n_heads, self.d_head))  # [rows, pos, n_heads, d_head]
        grad_v = torch.einsum("hqk,rqhd->rkhd", frozen.pattern, grad_z)  # [rows, pos, n_heads, d_head]
        # Query heads that share a key/value head add up there.
        n_rep = self.n_heads // self.n_kv_heads
        grad_v = grad_v.unflatten(-2, (self.n_kv_heads, n_rep)).sum(-2)  # [rows, pos, n_kv_heads, d_head]
        return grad_v.flatten(-2) @ frozen.W_V

    def backward(
        self,
        inject_mlp_in: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
        inject_final: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None,
        n_rows: int,
        on_mlp_out,
    ) -> torch.Tensor:
        """Gradients of a batch of rows, each a linear read-out of one MLP input (a feature's encoder) or of the
        final norm's output (a logit direction), with respect to every source below it.

        Args:
            inject_mlp_in: {layer: (row ids [k], positions [k], vectors [k, d_model])} read from that layer's
                mlp_in.
            inject_final: (row ids, positions, vectors) read from ln_final's output, or None.
            n_rows: rows in the batch.
            on_mlp_out: called as on_mlp_out(layer, grad [rows, pos, d_model]) with the gradient at each layer's
                MLP output, from the top layer down (the contraction with that layer's sources happens there).

        Returns:
            The gradient at the token embeddings [rows, pos, d_model].
        """
        pos, d_model = self.final_gain.shape
        grad = self.final_gain.new_zeros(n_rows, pos, d_model)
        top = len(self.layers) - 1 if inject_final is not None else max(inject_mlp_in)
        if inject_final is not None:
            rows, positions, vectors = inject_final
            grad[rows, positions] += vectors * self.final_gain[positions]
        for layer in range(top, -1, -1):
            frozen = self.layers[layer]
            # grad is at resid_post of `layer`: the MLP output sees all of it.
            on_mlp_out(layer, grad)
            if frozen.W_skip is not None:
                grad = grad + (grad @ frozen.W_skip) * frozen.ln2_gain
            if layer in inject_mlp_in:
                rows, positions, vectors = inject_mlp_in[layer]
                grad[rows, positions] += vectors * frozen.ln2_gain[positions]
            grad = grad + self._attention_transpose(frozen, grad) * frozen.ln1_gain
        return grad
