"""A readable Llama forward pass with a named hook at every step (Llama, Mistral, Qwen2 and Qwen3).

Dimension glossary (shape comments use only these words):
    batch       prompts in the batch
    pos         token positions (q_pos / k_pos when queries and keys differ, as with a KV cache)
    d_model     width of the residual stream
    n_heads     query heads;  n_kv_heads  key/value heads (GQA: n_heads is a multiple of n_kv_heads)
    d_head      width of one head
    d_mlp       hidden width of the SwiGLU MLP
    d_vocab     vocabulary size

Attention (RoPE, GQA, sliding windows, Qwen3's q/k norms) is in attention.py, RMSNorm in norm.py; the
architectures differ only there (see config.ARCHITECTURES).

References: RoPE (Su et al. 2021, arXiv:2104.09864), RMSNorm (Zhang & Sennrich 2019, arXiv:1910.07467),
SwiGLU (Shazeer 2020, arXiv:2002.05202), GQA (Ainslie et al. 2023, arXiv:2305.13245), Llama (Touvron et al.
2023). Numerics follow transformers' LlamaForCausalLM (and its Mistral/Qwen2/Qwen3 siblings) so that logits
agree to float rounding.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..config import LlamaConfig
from ..errors import ArgumentError, UnknownNameError
from ..validate import check_layer_bound
from .attention import Attention, rope_cos_sin
from .cpu_matmul import Linear
from .generate import generate
from .hooks import HookedModule, HookPoint
from .kv_cache import KVCache
from .limits import check_context_length, check_forward_fits
from .norm import RMSNorm
from .summary import module_summary
from .tokens import TokenHelpers
from .weights import Embed, Unembed, WeightViews


# ------------------------------------------------------------------------------------------------ MLP
def _bias_or_zeros(linear: nn.Linear) -> torch.Tensor:
    return linear.bias if linear.bias is not None else linear.weight.new_zeros(linear.out_features)


class MLP(nn.Module):
    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        self.gate_proj = Linear(cfg.d_model, cfg.d_mlp, bias=cfg.mlp_bias)
        self.up_proj = Linear(cfg.d_model, cfg.d_mlp, bias=cfg.mlp_bias)
        self.down_proj = Linear(cfg.d_mlp, cfg.d_model, bias=cfg.mlp_bias)
        # The MLP's input, after ln2 and its weight: where transcoders read (sparsify's `layers.N.mlp` input,
        # circuit-tracer's `mlp.hook_in`). ln2.hook_normalized is the same before the weight.
        self.hook_in = HookPoint()  # [batch, pos, d_model]
        self.hook_pre = HookPoint()  # gate, before the SiLU  [batch, pos, d_mlp]
        self.hook_pre_linear = HookPoint()  # up
        self.hook_post = HookPoint()  # silu(gate) * up

    # TransformerLens' names for a gated MLP: W_gate feeds hook_pre, W_in feeds hook_pre_linear.
    W_in = property(lambda self: self.up_proj.weight.T)  # [d_model, d_mlp]
    W_gate = property(lambda self: self.gate_proj.weight.T)  # [d_model, d_mlp]
    W_out = property(lambda self: self.down_proj.weight.T)  # [d_mlp, d_model]
    b_in = property(lambda self: _bias_or_zeros(self.up_proj))  # [d_mlp]
    b_out = property(lambda self: _bias_or_zeros(self.down_proj))  # [d_model]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.hook_in(x)
        gate = self.hook_pre(self.gate_proj(x))
        up = self.hook_pre_linear(self.up_proj(x))
        return self.down_proj(self.hook_post(F.silu(gate) * up))


# ---------------------------------------------------------------------------------------------- Block
class Block(nn.Module):
    def __init__(self, cfg: LlamaConfig, layer: int) -> None:
        super().__init__()
        # Registered in forward order, so hook_names and caches list activations in the order they happen.
        self.hook_resid_pre = HookPoint()
        self.ln1 = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attn = Attention(cfg, layer)
        self.hook_attn_out = HookPoint()
        self.hook_resid_mid = HookPoint()
        self.ln2 = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mlp = MLP(cfg)
        self.hook_mlp_out = HookPoint()
        self.hook_resid_post = HookPoint()

    def forward(self, resid: torch.Tensor, cos, sin, mask, kv_cache: KVCache | None) -> torch.Tensor:
        resid_pre = self.hook_resid_pre(resid)
        attn_out = self.hook_attn_out(self.attn(self.ln1(resid_pre), cos, sin, mask, kv_cache))
        resid_mid = self.hook_resid_mid(resid_pre + attn_out)
        mlp_out = self.hook_mlp_out(self.mlp(self.ln2(resid_mid)))
        return self.hook_resid_post(resid_mid + mlp_out)


# ---------------------------------------------------------------------------------------------- Llama
def lm_cross_entropy_loss(
    logits: torch.Tensor, tokens: torch.Tensor, *, attention_mask: torch.Tensor | None = None, per_token: bool = False
) -> torch.Tensor:
    """Next-token cross-entropy, TransformerLens' `loss_fn`: position p predicts token p + 1.

    Args:
        logits: [batch, pos, d_vocab]
        tokens: [batch, pos]
        attention_mask: [batch, pos], 1 for real tokens: a prediction counts when it and its target are real.
        per_token: return the loss of each prediction instead of their mean.

    Returns:
        [] (the mean over counted predictions) or [batch, pos - 1] (padding predictions are 0).
    """
    log_probs = logits[:, :-1].float().log_softmax(dim=-1)
    target_log_probs = log_probs.gather(-1, tokens[:, 1:, None].to(logits.device)).squeeze(-1)  # [batch, pos - 1]
    if attention_mask is None:
        return -target_log_probs if per_token else -target_log_probs.mean()
    counted = (attention_mask[:, :-1] * attention_mask[:, 1:]).to(target_log_probs)
    target_log_probs = target_log_probs * counted
    return -target_log_probs if per_token else -target_log_probs.sum() / counted.sum()


class Blocks(nn.ModuleDict):
    """The decoder layers, keyed "0", "1", ... so parameter names stay `blocks.3.attn.q_proj.weight`;
    `model.blocks[3]` and `model.blocks[-1]` (counted from cfg.n_layers) work as with TransformerLens' list.
    Iterating yields the keys, as for any ModuleDict: use `.values()` for the blocks."""

    def __init__(self, blocks: dict[str, nn.Module], n_layers: int) -> None:
        super().__init__(blocks)
        self.n_layers = n_layers

    def __getitem__(self, key: int | str) -> nn.Module:
        if isinstance(key, int) and not isinstance(key, bool):
            layer = key + self.n_layers if key < 0 else key
            if str(layer) not in self._modules:
                raise UnknownNameError(f"layer {key} is not loaded; this model holds layers {list(self._modules)}")
            key = str(layer)
        return super().__getitem__(key)


class HookedLlama(TokenHelpers, WeightViews, HookedModule):
    """LlamaForCausalLM (or Mistral, Qwen2, Qwen3: `cfg.architecture`) with TransformerLens hook points; holds
    all layers or only `layers`.

    Token helpers (`to_tokens`, `to_str_tokens`, ...) come from llama_lens/model/tokens.py and TransformerLens' weight
    views (`W_Q`, `W_U`, `OV`, ...) from llama_lens/model/weights.py.

    Args:
        cfg: the model's shape.
        layers: absolute indices of the decoder layers to hold (default: all). The embedding, final norm and
            unembedding are always held, so a partial model still reads out logits.
    """

    def __init__(self, cfg: LlamaConfig, layers: Sequence[int] | None = None) -> None:
        super().__init__()
        self.cfg = cfg
        self.layer_indices = sorted(range(cfg.n_layers) if layers is None else layers)
        self.tokenizer = None  # set by the loader
        # Past max_position_embeddings forward raises, or with allow_past_context warns once (limits.py).
        self.allow_past_context = False
        self.warned_past_context = False
        embed_weight = torch.empty(cfg.d_vocab, cfg.d_model)
        if not embed_weight.is_meta:
            # nn.Embedding's own init. Skipped on the meta device (the loader's), where normal_ imports sympy:
            # about 2 s of every first load.
            nn.init.normal_(embed_weight)
        self.embed = Embed(cfg.d_vocab, cfg.d_model, _weight=embed_weight)
        self.hook_embed = HookPoint()
        self.blocks = Blocks({str(i): Block(cfg, i) for i in self.layer_indices}, cfg.n_layers)
        self.ln_final = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.unembed = Unembed(cfg.d_model, cfg.d_vocab, bias=False)
        self.hook_logits = HookPoint()
        if cfg.tie_embeddings:
            self.unembed.weight = self.embed.weight
        self.setup_hook_points()

    @property
    def device(self) -> torch.device:
        """Where the weights are (a fact of the loaded model, not of its config)."""
        return self.embed.weight.device

    @property
    def dtype(self) -> torch.dtype:
        """The weights' dtype (a fact of the loaded model, not of its config)."""
        return self.embed.weight.dtype

    def forward(
        self,
        input: torch.Tensor | str | list[str] | list[int] | None = None,  # noqa: A002 - TransformerLens' name
        return_type: str | None = "logits",
        loss_per_token: bool = False,
        *,
        prepend_bos: bool | None = None,
        padding_side: str | None = None,
        start_at_layer: int | None = None,
        stop_at_layer: int | None = None,
        tokens: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        resid: torch.Tensor | None = None,
        kv_cache: KVCache | None = None,
        start_layer: int | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor] | None:
        """Runs the loaded layers (TransformerLens' arguments and return types).

        Args:
            input: token ids [batch, pos] or [pos] (a tensor or a list), or a text or list of texts (tokenized as
                `prepare_tokens` does: left-padded, unlike `to_tokens`, so `[:, -1]` is every prompt's last
                token). With `start_at_layer`, the residual stream [batch, pos, d_model] entering that layer.
            return_type: "logits" [batch, pos, d_vocab], "loss" (next-token cross-entropy, `loss_fn`), "both"
                ((logits, loss)) or None (nothing, for runs that only feed hooks).
            loss_per_token: the loss of each prediction [batch, pos - 1] instead of the mean.
            prepend_bos: for texts: add BOS (True), not (False), or the tokenizer's own default (None).
            padding_side: for a list of texts: "left" (the default here) or "right".
            start_at_layer: resume at this layer, `input` (or `resid=`) being its resid_pre, e.g. from a cache.
            stop_at_layer: return the residual stream entering this layer [batch, pos, d_model] instead; negative
                counts from the end, as in TransformerLens (-1: after all but the last layer). So does
                `start_at_layer`.
            tokens: the token ids [batch, pos] a loss is computed against when `input` is a residual stream.
            attention_mask: [batch, pos], 1 for real tokens and 0 for padding. When omitted: exact for texts; for
                ids, inferred from leading pad tokens (pass it when a prompt may start with the pad id).
            resid: the residual stream entering `start_at_layer` (another way to pass it), in the weights' dtype.
            kv_cache: keys/values of earlier positions; filled in place (see `generate`).
            start_layer: the former name of `start_at_layer` (deprecated).

        Returns:
            As `return_type` says, or resid [batch, pos, d_model] when `stop_at_layer` is given.

        Raises:
            ArgumentError: bad arguments, or more positions than `cfg.max_position_embeddings` (unless
                `model.allow_past_context = True`, which warns once instead).
            NotEnoughMemoryError: the pass's working memory (`limits.forward_nbytes`) is more than is available.
        """
        if start_layer is not None:
            warnings.warn("start_layer= is now start_at_layer= (TransformerLens' name)", DeprecationWarning, 2)
            start_at_layer = start_layer if start_at_layer is None else start_at_layer
        if return_type not in ("logits", "loss", "both", None):
            raise ArgumentError(f"return_type must be 'logits', 'loss', 'both' or None, got {return_type!r}")
        if isinstance(input, torch.Tensor) and input.is_floating_point() and input.dim() == 3:
            if resid is not None:
                raise ArgumentError("pass the residual stream once: as input or as resid=, not both")
            resid, input = input, None
        if input is not None:
            input, prepared_mask = self.prepare_tokens(input, prepend_bos=prepend_bos, padding_side=padding_side)
            if attention_mask is None:
                # Texts come with their exact padding mask; bare ids with one inferred from leading pad tokens.
                attention_mask = prepared_mask
            tokens = input if tokens is None else tokens
        layers = self._layers_to_run(start_at_layer, stop_at_layer, resid is not None)
        weight = self.embed.weight
        if resid is None:
            if input is None:
                raise ArgumentError("forward needs tokens, or a residual stream with start_at_layer=")
            resid = self.hook_embed(self.embed(input))  # [batch, pos, d_model]
        elif resid.dim() != 3 or resid.shape[-1] != self.cfg.d_model or resid.dtype != weight.dtype:
            raise ArgumentError(
                f"resid must be [batch, pos, d_model={self.cfg.d_model}] {str(weight.dtype).removeprefix('torch.')}"
                f" like the model's weights, got {tuple(resid.shape)} {str(resid.dtype).removeprefix('torch.')}"
            )
        else:
            resid = resid.to(weight.device)
        batch, pos, _ = resid.shape
        k_pos = pos + (0 if kv_cache is None else kv_cache.length)
        check_context_length(self, k_pos)
        logits_pos = 0 if stop_at_layer is not None else pos
        check_forward_fits(
            self, batch=batch, pos=pos, k_pos=k_pos, logits_pos=logits_pos, itemsize=resid.element_size(),
            device=resid.device,
        )  # fmt: skip
        positions, mask = self.positions_and_mask(batch, pos, attention_mask, kv_cache, resid.device)
        cos, sin = rope_cos_sin(self.cfg, positions, dtype=resid.dtype)

        for i in layers:
            resid = self.run_block(i, resid, cos, sin, mask, kv_cache)
        if stop_at_layer is not None:
            return resid
        logits = self.hook_logits(self.unembed(self.ln_final(resid)))
        if return_type == "logits":
            return logits
        if return_type is None:
            return None
        if tokens is None:
            raise ArgumentError("a loss needs the token ids: pass tokens= when input is a residual stream")
        loss = self.loss_fn(logits, tokens, attention_mask, per_token=loss_per_token)
        return loss if return_type == "loss" else (logits, loss)

    def loss_fn(
        self,
        logits: torch.Tensor,
        tokens: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        per_token: bool = False,
    ) -> torch.Tensor:
        """Next-token cross-entropy of `logits` [batch, pos, d_vocab] against `tokens` [batch, pos]; see
        `lm_cross_entropy_loss`. Returns [] or, with `per_token`, [batch, pos - 1]."""
        return lm_cross_entropy_loss(logits, tokens, attention_mask=attention_mask, per_token=per_token)

    def run_block(self, layer: int, resid: torch.Tensor, cos, sin, mask, kv_cache: KVCache | None) -> torch.Tensor:
        """Runs one decoder layer; the streaming model overrides this to fetch the layer's weights first."""
        return self.blocks[str(layer)](resid, cos, sin, mask, kv_cache)

    # ---------------------------------------------------------------- helpers of forward
    def prepare_tokens(
        self,
        prompts: torch.Tensor | str | Sequence[str] | Sequence[int],
        *,
        prepend_bos: bool | None = None,
        padding_side: str | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Token ids and padding mask for any prompt form `forward`, `generate` and the lens take.

        Unlike `to_tokens` (right padding, as TransformerLens), texts are left-padded by default: every prompt's
        last token then sits at position -1, where the lens and `generate` read the next-token logits.

        Args:
            prompts: a text or list of texts, or token ids [pos] / [batch, pos] as a tensor or (nested) list.
            prepend_bos: for texts: add BOS (True), not (False), or the tokenizer's own default (None).
            padding_side: for texts: "left" (default) or "right".

        Returns:
            ids [batch, pos] on the model's device, and the mask [batch, pos] (1 = real token): exact for texts;
            for ids inferred from leading pad tokens, None when nothing is padded.

        Raises:
            ValueError: for ids that are not integers, an empty prompt, or an id outside [0, d_vocab).
        """
        device = self.embed.weight.device
        if isinstance(prompts, str) or (isinstance(prompts, (list, tuple)) and prompts and isinstance(prompts[0], str)):
            texts = [prompts] if isinstance(prompts, str) else list(prompts)
            ids, mask = self.encode_texts(texts, prepend_bos=prepend_bos, padding_side=padding_side or "left")
            return ids.to(device), mask.to(device)
        ids = torch.tensor(prompts) if isinstance(prompts, (list, tuple)) else prompts
        if not isinstance(ids, torch.Tensor):
            raise ArgumentError(f"pass a text, a list of texts or token ids, got {type(prompts).__name__}")
        ids = ids[None] if ids.dim() == 1 else ids
        if ids.dim() != 2 or ids.dtype not in (torch.int32, torch.int64) or ids.shape[1] == 0:
            raise ArgumentError(
                f"token ids must be integers [pos] or [batch, pos] with pos >= 1, got {ids.dtype} {tuple(ids.shape)}"
            )
        ids = ids.long().to(device)
        low, high = int(ids.min()), int(ids.max())  # checked here: past d_vocab, the embedding fails obscurely
        if low < 0 or high >= self.cfg.d_vocab:
            raise ArgumentError(f"token ids must lie in [0, d_vocab={self.cfg.d_vocab}), got {low}..{high}")
        return ids, self.infer_attention_mask(ids)

    def _layers_to_run(self, start_layer: int | None, stop_at_layer: int | None, has_resid: bool) -> list[int]:
        loaded = self.layer_indices
        # Negative layers count from the end, as in TransformerLens (a slice of its blocks): stop_at_layer=-1 runs
        # all but the last layer.
        if start_layer is not None:
            start_layer = check_layer_bound("start_at_layer", start_layer, self.cfg.n_layers)
        if stop_at_layer is not None:
            stop_at_layer = check_layer_bound("stop_at_layer", stop_at_layer, self.cfg.n_layers)
        if has_resid:
            start = loaded[0] if start_layer is None else start_layer
        elif start_layer not in (None, 0):
            raise ArgumentError("start_at_layer needs the residual stream entering that layer (as input or resid=)")
        elif loaded and loaded[0] != 0:
            first = loaded[0]
            raise ArgumentError(
                f"this model holds layers {first}..{loaded[-1]} only; pass resid= (the residual stream entering "
                f"layer {first}, e.g. cache['blocks.{first}.hook_resid_pre'] of a full model) and "
                f"start_at_layer={first}"
            )
        else:
            start = 0
        # A partial model loaded with layers=range(0, k) stops after its last layer: its logits are the lens
        # read-out of layer k - 1.
        stop = (loaded[-1] + 1 if loaded else start) if stop_at_layer is None else stop_at_layer
        layers = list(range(start, stop))
        missing = [i for i in layers if str(i) not in self.blocks]
        if missing:
            raise ArgumentError(
                f"layers {missing} are not loaded (this model holds {loaded}); load them or pick others"
            )
        return layers

    def infer_attention_mask(self, tokens: torch.Tensor) -> torch.Tensor | None:
        """1 for real tokens, 0 for left padding: leading tokens equal to the id the tokenizer pads with. None
        when nothing is padded, so the common case takes the plain causal path."""
        pad_id = getattr(self.tokenizer, "padding_id", getattr(self.tokenizer, "pad_id", None))
        if pad_id is None or tokens.shape[0] == 1 or not bool((tokens[:, 0] == pad_id).any()):
            return None
        mask = (tokens != pad_id).long().cumsum(dim=-1) > 0
        bos_id = getattr(self.tokenizer, "bos_id", None)
        if bos_id == pad_id:
            # The pad token doubles as BOS: the last leading one is the real BOS.
            first_real = (~mask).sum(dim=-1, keepdim=True) - 1
            mask.scatter_(1, first_real.clamp(min=0), True)
        return mask.long()

    def positions_and_mask(
        self,
        batch: int,
        pos: int,
        attention_mask: torch.Tensor | None,
        kv_cache: KVCache | None,
        device: torch.device,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Position ids [batch, pos] counted from each prompt's first real token, and the attention mask
        [batch, 1, q_pos, k_pos] (None for the plain causal case the fused kernel handles itself).

        With a `kv_cache`, the positions come after the cached ones (k_pos = cached + pos) and the cache's
        `attention_mask` [batch, k_pos] grows by `attention_mask`: the caller runs positions after a prefix
        by setting it to the prefix's mask (activation patching does, see patching_sweep.py).
        """
        past = 0 if kv_cache is None else kv_cache.length
        if attention_mask is None:
            attention_mask = torch.ones(batch, pos, dtype=torch.long, device=device)
        elif tuple(attention_mask.shape) != (batch, pos):
            raise ArgumentError(
                f"attention_mask must be [batch, pos] = {(batch, pos)} like the tokens, "
                f"got {tuple(attention_mask.shape)}"
            )
        attention_mask = attention_mask.to(device)
        if kv_cache is not None:
            if kv_cache.attention_mask is not None:
                attention_mask = torch.cat([kv_cache.attention_mask, attention_mask], dim=1)
            kv_cache.attention_mask = attention_mask  # [batch, k_pos]
        positions = (attention_mask.cumsum(dim=-1) - 1).clamp(min=0)[:, past:]  # [batch, pos]
        if past == 0 and bool(attention_mask.all()):
            return positions, None
        k_pos = past + pos
        causal = torch.ones(pos, k_pos, dtype=torch.bool, device=device).tril(past)  # [q_pos, k_pos]
        # A left-padding query sees no key at all: Attention gives it an all-zero pattern row.
        mask = causal[None] & attention_mask.bool()[:, None, :]  # [batch, q_pos, k_pos]
        return positions, mask[:, None]

    # ---------------------------------------------------------------- generation and summaries
    def generate(self, prompts, max_new_tokens: int = 32, temperature: float = 0.6, top_p: float = 0.9, **kwargs):
        """Samples continuations with a KV cache; see `llama_lens.model.llama.generate.generate` for the arguments."""
        return generate(self, prompts, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, **kwargs)

    def summary(self):
        """Parameters per module (a pandas DataFrame: module, parameters, share of total)."""
        return module_summary(self)

    def extra_repr(self) -> str:
        cfg = self.cfg
        layers = f"{self.layer_indices[0]}..{self.layer_indices[-1]}" if self.layer_indices else "-..-"
        return (
            f"{cfg.model_type}, layers={layers}"
            f" of {cfg.n_layers}, d_model={cfg.d_model}, n_heads={cfg.n_heads}, n_kv_heads={cfg.n_kv_heads}"
        )
