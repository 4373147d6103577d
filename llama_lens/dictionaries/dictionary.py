"""A sparse dictionary: a sparse autoencoder (SAE) or transcoder that reads one hook point and writes one.

Shapes (the model's glossary, plus):
    d_in        width of the activation the dictionary reads (d_model at the residual stream)
    d_sae       number of features (latents)
    d_out       width of the activation it writes (d_in for an SAE)

    encode:  x [..., d_in] -> feature activations [..., d_sae]
    decode:  acts [..., d_sae] (and x, for a skip connection) -> reconstruction [..., d_out]

The math is one function for every format, with the switches the formats differ by (each file format in
formats/ says how its files set them):

    x' = normalize(x)                           (SAELens' normalize_activations)
    pre = (x' - b_dec if apply_b_dec_to_input else x') @ (W_enc * input_scale) + b_enc   (Llama Scope's norm)
    acts = activation(pre)     relu | jumprelu (relu, pre > threshold) | threshold | topk (k largest) | gated
    out = denormalize((acts @ W_dec + b_dec) / output_scale) + x @ W_skip.T

The encoder and the biases are read on the first encode; the decoder is read by rows, only for the features
that fired (`W_dec_rows`), unless it is stored transposed (as Llama Scope's nn.Linear weight is), where it is
read whole on first use.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from ..errors import ArgumentError
from .tensors import TensorFile

ACTIVATIONS = ("relu", "jumprelu", "threshold", "topk", "gated")
NORMALIZATIONS = ("none", "constant_norm_rescale", "layer_norm")


@dataclass(frozen=True)
class TensorRef:
    """Where one parameter lives: a file, a tensor name, and whether it is stored transposed."""

    file: TensorFile
    name: str
    transposed: bool = False  # stored as [columns, rows] of what the math above wants (nn.Linear's weight)
    exp: bool = False  # stored as its log (a JumpReLU log_threshold)


@dataclass
class Dictionary:
    """A sparse dictionary (SAE or transcoder) at one site of the model; see the module docstring for the math.

    Built by `ll.load_dictionary` from a folder in one of the formats it reads (`format` names which).

    Attributes:
        hook_in: the hook point it reads ("blocks.3.hook_resid_post", "blocks.3.mlp.hook_in", ...).
        hook_out: the hook point it writes (hook_in for an SAE).
        architecture: the format's own name for it ("standard", "jumprelu", "topk", "gated", "transcoder", ...).
        activation: one of ACTIVATIONS.
    """

    format: str
    architecture: str
    path: Path
    hook_in: str
    hook_out: str
    d_in: int
    d_sae: int
    d_out: int
    params: dict[str, TensorRef]  # W_enc, b_enc, W_dec, b_dec and, by architecture, threshold, b_gate, ...
    activation: str = "relu"
    k: int | None = None
    apply_b_dec_to_input: bool = False
    normalize_activations: str = "none"
    input_scale: float = 1.0  # x is multiplied by it before encoding (folded into W_enc, and the threshold)...
    output_scale: float = 1.0  # ...and the reconstruction divided by this after decoding
    rescale_acts_by_decoder_norm: bool = False  # SAELens TopK: rank pre * |W_dec row|, decode acts / |W_dec row|
    dtype: torch.dtype = torch.float32
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    _loaded: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)

    # ------------------------------------------------------------------------------------------ parameters
    @property
    def is_transcoder(self) -> bool:
        return self.hook_in != self.hook_out

    @property
    def has_skip(self) -> bool:
        return "W_skip" in self.params

    @property
    def bytes_read(self) -> int:
        """Bytes read from the dictionary's files since it was opened."""
        return sum(file.bytes_read for file in {ref.file for ref in self.params.values()})

    def param(self, name: str) -> torch.Tensor:
        """A whole parameter, read on first use and kept: W_enc [d_in, d_sae], b_enc [d_sae], b_dec [d_out],
        threshold [d_sae], W_skip [d_out, d_in], W_dec [d_sae, d_out] (the whole decoder: prefer W_dec_rows)."""
        if name not in self._loaded:
            with torch.inference_mode(False):  # kept for later passes, which may track gradients
                self._loaded[name] = self._read(name)
        return self._loaded[name]

    def _read(self, name: str) -> torch.Tensor:
        ref = self.params[name]
        tensor = ref.file.read(ref.name, torch.float32)
        if ref.exp:
            tensor = tensor.exp()
        if ref.transposed:
            tensor = tensor.T.contiguous()
        return tensor.to(self.device, self.dtype)

    def has_param(self, name: str) -> bool:
        return name in self.params

    @property
    def W_enc(self) -> torch.Tensor:
        return self.param("W_enc")

    @property
    def W_dec(self) -> torch.Tensor:
        return self.param("W_dec")

    def W_dec_rows(self, ids: torch.Tensor | list[int]) -> torch.Tensor:
        """Decoder directions of features `ids`: [len(ids), d_out], reading only those rows from disk (the
        whole decoder when it is stored transposed or already read)."""
        ids = torch.as_tensor(ids, dtype=torch.long).reshape(-1).cpu()
        ref = self.params["W_dec"]
        if ref.transposed or "W_dec" in self._loaded:
            return self.param("W_dec")[ids.to(self.device)]
        return ref.file.read_rows(ref.name, ids, torch.float32).to(self.device, self.dtype)

    def splice_memory(self, rows: int, active_features: int | None = None) -> tuple[int, int]:
        """(bytes held once spliced, bytes of one splice's working tensors) for `rows` tokens per pass, as
        `ll.plan(..., dictionaries=[...])` counts them: held are the encoder, the biases and thresholds (and the
        whole decoder where it is read whole: stored transposed, or ranked by its row norms); a pass reads the
        decoder rows of the features that fired, `active_features` (default: for TopK the expected number of
        distinct features rows * k uniform firings hit, d_sae * (1 - exp(-rows * k / d_sae)); every feature
        otherwise: an upper bound)."""
        size = self.dtype.itemsize
        whole_decoder = self.params["W_dec"].transposed or self.rescale_acts_by_decoder_norm
        held = sum(
            math.prod(ref.file.shape(ref.name)) for name, ref in self.params.items() if name != "W_dec" or whole_decoder
        )
        active = active_features if active_features is not None else self.d_sae
        if active_features is None and self.k:
            # rows * k firings land on this many distinct features if they fall uniformly; a real dictionary's
            # skewed firing hits fewer (the count is concave in the firing rates), so it stays an upper bound
            # in expectation, where rows * k alone overshoots once features repeat across rows.
            active = math.ceil(self.d_sae * -math.expm1(-rows * self.k / self.d_sae))
        active = 0 if whole_decoder else min(active, self.d_sae)
        # A splice holds the most at one of two moments (measured by scripts/bench_stream_dictionary.py; their
        # sum overshot by a quarter at 512 tokens): encoding, the pre-activations, the activations and the
        # activation's own temporaries (ReLU, mask or TopK's scatter); decoding, the pre-activations and
        # activations still held, the fired-feature mask, the decoder rows (and their float32 read), the
        # active columns. The inputs and outputs are held at both.
        inputs = rows * (2 * self.d_in + 2 * self.d_out) * size
        encoding = 3 * rows * self.d_sae * size + rows * self.d_sae
        decoding = 2 * rows * self.d_sae * size + rows * self.d_sae + active * self.d_out * (size + 4)
        decoding += rows * active * size
        working = max(encoding, decoding) + inputs
        return held * size, working

    def _bias(self, name: str, width: int) -> torch.Tensor:
        if name in self.params:
            return self.param(name)
        return torch.zeros(width, device=self.device, dtype=self.dtype)

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> Dictionary:
        """Moves (in place) what was read, and where later reads go; returns self."""
        self.device = torch.device(device) if device is not None else self.device
        self.dtype = dtype or self.dtype
        self._loaded = {name: t.to(self.device, self.dtype) for name, t in self._loaded.items()}
        return self

    # ----------------------------------------------------------------------------------------------- math
    def _flat(self, x: torch.Tensor, width: int, what: str) -> torch.Tensor:
        # hook_z is [batch, pos, n_heads, d_head]; dictionaries there read it flattened to n_heads * d_head.
        if x.shape[-1] != width and x.dim() >= 2 and x.shape[-2] * x.shape[-1] == width:
            x = x.flatten(-2)
        if x.shape[-1] != width:
            raise ArgumentError(f"{what} has last dimension {x.shape[-1]}; this dictionary takes {width} ({self.path})")
        return x.to(self.device, self.dtype)

    def _normalize(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None]:
        """x' and what `_denormalize` needs to undo it (SAELens' run-time normalization)."""
        if self.normalize_activations == "constant_norm_rescale":
            coeff = self.d_in**0.5 / x.norm(dim=-1, keepdim=True)
            return x * coeff, (coeff, coeff)
        if self.normalize_activations == "layer_norm":
            mu = x.mean(dim=-1, keepdim=True)
            std = (x - mu).std(dim=-1, keepdim=True)
            return (x - mu) / (std + 1e-5), (mu, std)
        return x, None

    def _denormalize(self, out: torch.Tensor, state) -> torch.Tensor:
        # SAELens undoes the normalization on an SAE's output only (a transcoder's output has another width).
        if state is None or self.is_transcoder:
            return out
        if self.normalize_activations == "constant_norm_rescale":
            return out / state[0]
        mu, std = state
        return out * std + mu

    def encode_pre(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(the encoder's input after normalization, the pre-activations [..., d_sae])."""
        x = self._flat(x, self.d_in, "x")
        x, _ = self._normalize(x)
        if self.apply_b_dec_to_input:
            x = x - self.param("b_dec")
        if self.activation == "gated":
            return x, x @ (self.W_enc * self.param("r_mag").exp()) + self.param("b_mag")
        return x, x @ self._scaled_W_enc() + self._bias("b_enc", self.d_sae)

    def _scaled_W_enc(self) -> torch.Tensor:
        """W_enc with input_scale folded in, as SAELens folds Llama Scope's dataset norm into its encoder (the
        same rounding as theirs, so a pre-activation at the threshold falls on the same side)."""
        if self.input_scale == 1.0:
            return self.W_enc
        if "W_enc_scaled" not in self._loaded:
            self._loaded["W_enc_scaled"] = self.W_enc * self.input_scale
        return self._loaded["W_enc_scaled"]

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Feature activations [..., d_sae] of activations x [..., d_in] read at `hook_in`."""
        return self._activate(*self.encode_pre(x))

    def _activate(self, x: torch.Tensor, pre: torch.Tensor) -> torch.Tensor:
        if self.activation == "relu":
            return F.relu(pre)
        if self.activation == "jumprelu":
            return F.relu(pre) * (pre > self.param("threshold") * self.input_scale).to(pre.dtype)
        if self.activation == "threshold":  # circuit-tracer's JumpReLU: no ReLU under the threshold test
            return pre * (pre > self.param("threshold")).to(pre.dtype)
        if self.activation == "gated":
            gate = (x @ self.W_enc + self.param("b_gate")) > 0
            return gate.to(pre.dtype) * F.relu(pre)
        # topk: the k largest pre-activations (ranked by pre * |W_dec row| under SAELens' rescale), ReLU'd.
        if self.rescale_acts_by_decoder_norm:
            pre = pre * self.W_dec.norm(dim=-1)
        values, indices = pre.topk(self.k, dim=-1, sorted=False)
        return torch.zeros_like(pre).scatter(-1, indices, F.relu(values))

    def decode(self, acts: torch.Tensor, x: torch.Tensor | None = None) -> torch.Tensor:
        """The reconstruction [..., d_out] from feature activations [..., d_sae], reading only the decoder rows
        of the features active somewhere in `acts`. A dictionary that normalizes its input, or has a skip
        connection, needs the input `x` it encoded."""
        if acts.shape[-1] != self.d_sae:
            raise ArgumentError(f"acts has last dimension {acts.shape[-1]}; this dictionary has {self.d_sae} features")
        acts = acts.to(self.device, self.dtype)
        if self.rescale_acts_by_decoder_norm:
            acts = acts / self.W_dec.norm(dim=-1)
        active = acts.reshape(-1, self.d_sae).ne(0).any(0).nonzero().squeeze(-1)
        out = acts[..., active] @ self.W_dec_rows(active) + self._bias("b_dec", self.d_out)
        out = out / self.output_scale
        if self.normalize_activations != "none" or self.has_skip:
            if x is None:
                raise ArgumentError(
                    f"decode needs the input x of this dictionary ({self.path}): it "
                    + ("has a skip connection" if self.has_skip else f"normalizes ({self.normalize_activations})")
                )
            x = self._flat(x, self.d_in, "x")
            out = self._denormalize(out, self._normalize(x)[1])
            if self.has_skip:
                out = out + x @ self.param("W_skip").T
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """decode(encode(x), x): the reconstruction of the activation at `hook_out`."""
        return self.decode(self.encode(x), x)

    __call__ = forward

    def __repr__(self) -> str:
        site = self.hook_in if not self.is_transcoder else f"{self.hook_in} -> {self.hook_out}"
        return (
            f"Dictionary({self.format} {self.architecture}, {site}, d_in={self.d_in}, d_sae={self.d_sae}, "
            f"d_out={self.d_out}, activation={self.activation}{f', k={self.k}' if self.k else ''})"
        )
