"""The tuned lens (Belrose et al. 2023, "Eliciting Latent Predictions from Transformers with the Tuned Lens",
arXiv:2303.08112): the logit lens with one learned affine translator per residual stream.

The logit lens reads a residual stream x out as the model reads its last one, unembed(ln_final(x)). Early
layers of Llama models do not speak the last layer's "language", so that read-out is mostly noise. The tuned
lens first maps x to where the last layer would have put it,

    translate(x) = x + A x + b                                      [.., d_model]

with A [d_model, d_model] and b [d_model] trained to minimise KL(final || read-out), the divergence of the
translated read-out's distribution from the model's own output at the same position. A and b start at zero,
so an untrained lens is the logit lens exactly; weight decay pulls A towards zero, i.e. towards the identity.

Translators, one per residual stream in forward order (labels as in `LensResult`):

    "embed"        the token embedding, which is also layer 0's resid_pre
    "{i}_mid"      layer i's resid_mid (only when trained with readout including "resid_mid")
    "{i}_post"     layer i's resid_post, which is also layer i + 1's resid_pre

The last layer's resid_post has none: its read-out is the model's own output. With the default read-outs
("embed", "resid_post") a lens has n_layers translators, the same set as the `tuned-lens` package's, whose
translator k acts on transformers' `hidden_states[k]` (k = 0 is the embedding, k = i + 1 layer i's output):
`TunedLens.load` reads those files too.

Training (`TunedLens.train`) follows the package's recipe (tuned_lens/scripts/train_loop.py, ingredients.py):
SGD with Nesterov momentum 0.9, learning rate lr * (1 - momentum) (PyTorch's momentum scales steps by
1 / (1 - momentum); the package undoes that so that lr = 1 is the good default), weight decay 1e-3, gradient
norm clipped to 1, the learning rate decayed linearly to 0 over `max_steps` with no warm-up, and the loss the
sum over translators of the mean per-token KL to the final distribution at the same position. See
docs/tuned_lens.md.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ..errors import ArgumentError, LensFileError, MissingFileError
from ..files import atomic_path, read_json_file, write_text_atomic
from .readouts import DEFAULT_READOUT, READOUTS, hook_readout, readout_kinds, stream_label
from .train import TrainConfig, fit

if TYPE_CHECKING:
    from ..model.llama import HookedLlama

FORMAT_NAME = "llama_lens.lens.tuned"
FORMAT_VERSION = 1
CONFIG_FILE = "config.json"
PARAMS_FILE = "params.safetensors"
PACKAGE_PARAMS_FILE = "params.pt"  # what the tuned-lens package's TunedLens.save writes beside its config.json
PACKAGE_LENS_TYPE = "linear_tuned_lens"


def translator_labels(n_layers: int, readout: str | Sequence[str] = DEFAULT_READOUT) -> list[str]:
    """The translators a lens over `n_layers` layers holds for these read-outs, in forward order.

    "resid_pre" adds none of its own: layer 0's is the embedding and layer i's is layer i - 1's resid_post.
    The last layer's resid_post has no translator: its read-out is the model's output.

    Raises:
        ArgumentError: for an unknown read-out.
    """
    kinds = readout_kinds(readout)
    labels = ["embed"] if {"embed", "resid_pre"} & set(kinds) else []
    for i in range(n_layers):
        if "resid_mid" in kinds:
            labels.append(f"{i}_mid")
        if {"resid_post", "resid_pre"} & set(kinds) and i < n_layers - 1:
            labels.append(f"{i}_post")
    return labels


class TunedLens:
    """One affine translator per residual stream, x -> x + A x + b, read out through ln_final and unembed.

    Not an nn.Module (so that `TunedLens.train` can be the training entry point); the translators are the
    `translators` ModuleDict, keyed by label ("embed", "0_post", ...).

    Attributes:
        d_model: width of the residual stream.
        n_layers: layers of the model the lens was made for (its last resid_post has no translator).
        translators: label -> nn.Linear(d_model, d_model), zero at initialisation.
        info: what the lens was trained with (JSON-serialisable), saved with it.
        losses: the mean KL over translators at each training step, in nats (empty for a lens not trained here).
    """

    def __init__(
        self,
        d_model: int,
        n_layers: int,
        *,
        labels: Sequence[str] | None = None,
        bias: bool = True,
        info: dict[str, Any] | None = None,
    ) -> None:
        """An identity lens: every translator's weight and bias are zero.

        Args:
            d_model: width of the residual stream.
            n_layers: the model's number of layers.
            labels: which translators (default `translator_labels(n_layers)`: "embed" and every resid_post but
                the last).
            bias: whether translators have a bias b.
            info: free-form JSON-serialisable notes saved with the lens.
        """
        self.d_model = int(d_model)
        self.n_layers = int(n_layers)
        labels = translator_labels(self.n_layers) if labels is None else list(labels)
        valid = set(translator_labels(self.n_layers, READOUTS))
        bad = [label for label in labels if label not in valid]
        if bad:
            raise ArgumentError(
                f"no residual stream {bad} in a {self.n_layers}-layer model; labels are 'embed', '{{i}}_mid' and "
                f"'{{i}}_post' with i < {self.n_layers} (none for the last layer's resid_post)"
            )
        self.translators = nn.ModuleDict()
        for label in labels:
            translator = nn.Linear(self.d_model, self.d_model, bias=bias)
            nn.init.zeros_(translator.weight)
            if bias:
                nn.init.zeros_(translator.bias)
            self.translators[label] = translator
        self.translators.requires_grad_(False)
        self.info: dict[str, Any] = dict(info or {})
        self.losses: list[float] = []

    @classmethod
    def for_model(cls, model: HookedLlama, readout: str | Sequence[str] = DEFAULT_READOUT) -> TunedLens:
        """An identity lens with a translator for each of `model`'s residual streams that `readout` names."""
        return cls(model.cfg.d_model, model.cfg.n_layers, labels=translator_labels(model.cfg.n_layers, readout))

    # ------------------------------------------------------------------ translating
    @property
    def labels(self) -> list[str]:
        return list(self.translators.keys())

    @property
    def bias(self) -> bool:
        return all(t.bias is not None for t in self.translators.values())

    def parameters(self) -> Iterator[nn.Parameter]:
        return self.translators.parameters()

    def to(self, device: str | torch.device) -> TunedLens:
        """Moves the translators (in place) and returns the lens."""
        self.translators.to(device)
        return self

    def translator(self, layer: int, readout: str = "resid_post") -> nn.Linear | None:
        """The translator of layer `layer`'s `readout` stream; None where the lens has none (the identity).

        Raises:
            ArgumentError: for a layer outside the model or an unknown read-out.
        """
        if not 0 <= int(layer) < self.n_layers:
            raise ArgumentError(f"layer {layer} is outside this lens's model, which has {self.n_layers} layers")
        label = stream_label(int(layer), readout)
        if label == f"{self.n_layers - 1}_post":
            return None  # the model's own output
        if label not in self.translators:
            raise ArgumentError(
                f"this tuned lens has no translator for {readout} of layer {layer} ({label!r}); it has "
                f"{self._labels_summary()}: train one with TunedLens.train(..., readout=[..., {readout!r}])"
            )
        return self.translators[label]

    def translate(self, resid: torch.Tensor, layer: int, *, readout: str = "resid_post") -> torch.Tensor:
        """resid + A resid + b: the residual stream moved to where the last layer would read it out.

        Apply before ln_final: `logits = model.unembed(model.ln_final(lens.translate(resid, layer)))`.
        The last layer's resid_post is returned as is (the model's own read-out).

        Args:
            resid: [..., d_model] layer `layer`'s `readout` residual stream (any float dtype; computed in the
                translator's dtype and returned in resid's).
            layer: the layer (0 with "embed").
            readout: "embed", "resid_pre", "resid_mid" or "resid_post".

        Returns:
            [..., d_model], on resid's device and in its dtype.
        """
        translator = self.translator(layer, readout)
        if resid.shape[-1] != self.d_model:
            raise ArgumentError(f"resid must be [..., d_model={self.d_model}], got {tuple(resid.shape)}")
        if translator is None:
            return resid
        weight = translator.weight
        x = resid.to(device=weight.device, dtype=weight.dtype)
        # Residually, as in the package: zero A and b give x + 0 = x exactly, and weight decay regularises
        # towards the identity rather than towards the zero map.
        return (x + translator(x)).to(device=resid.device, dtype=resid.dtype)

    def translate_hook(self, resid: torch.Tensor, hook_name: str) -> torch.Tensor:
        """`translate` for a residual stream named by its hook point ("hook_embed", "blocks.3.hook_resid_post")."""
        layer, kind = hook_readout(hook_name)
        return self.translate(resid, layer, readout=kind)

    def check_model(self, model: HookedLlama) -> None:
        """Raises ArgumentError unless `model` has this lens's d_model and number of layers."""
        if (model.cfg.d_model, model.cfg.n_layers) != (self.d_model, self.n_layers):
            raise ArgumentError(
                f"this tuned lens was made for a model with d_model={self.d_model} and {self.n_layers} layers; "
                f"this model has d_model={model.cfg.d_model} and {model.cfg.n_layers} layers"
            )

    def _labels_summary(self) -> str:
        labels = self.labels
        return f"{len(labels)} translators ({labels[0]}..{labels[-1]})" if labels else "no translators"

    def __repr__(self) -> str:
        return f"TunedLens(d_model={self.d_model}, n_layers={self.n_layers}, {self._labels_summary()})"

    # ------------------------------------------------------------------ training
    @classmethod
    def train(cls, model: HookedLlama, texts: Any, *, lens: TunedLens | None = None, **options: Any) -> TunedLens:
        """Trains a tuned lens on `model`'s own predictions over `texts`.

        Args:
            model: a HookedLlama holding every layer (streamed or not); it is not changed.
            texts: a list of strings, a text file (paragraphs) or a Parquet file, see `ll.read_texts`; or token
                ids [n_rows, seq_len] (a LongTensor), used as they are.
            lens: a lens to go on training (default: a new identity lens for `readout=`).
            options: the settings of `TrainConfig` (`max_steps=`, `readout=`, `lr=`, `seq_len=`, ...), with
                its defaults: the tuned-lens package's recipe.

        Returns:
            The trained lens; `lens.losses` holds each step's loss and `lens.info` the settings.

        Raises:
            ArgumentError: a partial model, a model without tokenizer, bad settings or too little text.
            ArgumentTypeError: a setting `TrainConfig` does not have.
        """
        config = TrainConfig.from_options(options)
        if lens is None:
            lens = cls.for_model(model, config.readout)
        else:
            lens.check_model(model)
        return fit(lens, model, texts=texts, config=config)

    # ------------------------------------------------------------------ saving and loading
    def state_dict(self) -> dict[str, torch.Tensor]:
        """label.weight / label.bias -> tensor (e.g. "3_post.weight" [d_model, d_model])."""
        return {name: tensor.detach() for name, tensor in self.translators.state_dict().items()}

    def save(self, path: str | Path) -> Path:
        """Writes the lens into the folder `path` (made if missing): config.json and params.safetensors.

        Returns:
            The folder.
        """
        from safetensors.torch import save_file

        folder = Path(path)
        folder.mkdir(parents=True, exist_ok=True)
        config = {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "d_model": self.d_model,
            "n_layers": self.n_layers,
            "labels": self.labels,
            "bias": self.bias,
            "info": self.info,
            "losses": self.losses,
        }
        tensors = {name: t.contiguous().cpu() for name, t in self.state_dict().items()}
        # Both files are written whole before either replaces a lens saved there before: a save that fails half
        # way (disk full) leaves the old lens loadable.
        text = json.dumps(config, indent=1) + "\n"
        with atomic_path(folder / PARAMS_FILE) as temporary:
            save_file(tensors, str(temporary), metadata={"format": FORMAT_NAME})
        write_text_atomic(folder / CONFIG_FILE, text)
        return folder

    @classmethod
    def load(cls, path: str | Path, device: str | torch.device = "cpu") -> TunedLens:
        """Reads a lens saved by `save`, or by the tuned-lens package (its config.json + params.pt).

        A tuned-lens package lens has translators 0..num_hidden_layers-1 acting on transformers'
        hidden_states[k]: k = 0 becomes "embed" and k = i + 1 becomes "{i}_post". Its params.pt is read with
        `torch.load(weights_only=True)` (tensors only, no code), its weights cast to float32.

        Args:
            path: the folder (or its config.json).
            device: where the translators go.

        Raises:
            MissingFileError: no such folder, or neither params file beside config.json.
            LensFileError: a config or params file that is not a tuned lens, naming the file and key.
        """
        folder = Path(path)
        if folder.name == CONFIG_FILE:
            folder = folder.parent
        config_path = folder / CONFIG_FILE
        if not config_path.is_file():
            raise MissingFileError(
                f"no tuned lens at {folder}: {CONFIG_FILE} is missing (a lens folder holds {CONFIG_FILE} and "
                f"{PARAMS_FILE}, or the tuned-lens package's {PACKAGE_PARAMS_FILE})"
            )
        config = read_json_file(config_path, LensFileError)
        if not isinstance(config, dict):
            raise LensFileError(f"{config_path} holds {type(config).__name__}, not a JSON object")
        if config.get("format") == FORMAT_NAME:
            lens = _load_ours(folder, config)
        elif "num_hidden_layers" in config or (folder / PACKAGE_PARAMS_FILE).is_file():
            lens = _load_package(folder, config)
        else:
            raise LensFileError(
                f"{config_path} is neither a llama_lens tuned lens (key 'format' = {FORMAT_NAME!r}) nor a tuned-lens "
                f"package lens (key 'num_hidden_layers'); found keys {sorted(config)[:8]}"
            )
        return lens.to(device)


# ---------------------------------------------------------------------------------------------- loading
# Far beyond any model, and small enough that the tables built from them (labels, translators) stay small: a config
# saying 10**9 layers is refused before anything is allocated for it.
MAX_LAYERS = 10_000
MAX_D_MODEL = 2**17


def _config_int(config: dict, key: str, path: Path, maximum: int) -> int:
    value = config.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= maximum:
        raise LensFileError(f"{path}: key {key!r} must be an integer from 1 to {maximum}, got {value!r}")
    return value


def _config_bool(config: dict, key: str, path: Path) -> bool:
    value = config.get(key, True)
    if not isinstance(value, bool):
        raise LensFileError(f"{path}: key {key!r} must be true or false, got {value!r}")
    return value


def _check_sizes(state: dict[str, Any], labels: list[str], d_model: int, bias: bool, path: Path) -> None:
    """Refuses a params file whose tensors do not match the config, before any translator is allocated."""
    for label in labels:
        weight = state.get(f"{label}.weight")
        if not isinstance(weight, torch.Tensor) or tuple(weight.shape) != (d_model, d_model):
            shape = tuple(weight.shape) if isinstance(weight, torch.Tensor) else None
            raise LensFileError(
                f"{path}: tensor '{label}.weight' is {shape}, expected ({d_model}, {d_model}) (d_model in the config)"
            )
    expected = len(labels) * (2 if bias else 1)
    if len(state) != expected:
        raise LensFileError(
            f"{path}: holds {len(state)} tensors, expected {expected} for the config's {len(labels)} translators"
        )


def _load_ours(folder: Path, config: dict) -> TunedLens:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    config_path = folder / CONFIG_FILE
    version = config.get("format_version")
    if version != FORMAT_VERSION:
        raise LensFileError(
            f"{config_path}: format_version {version!r} is not one this llama_lens reads ({FORMAT_VERSION}); "
            "upgrade llama_lens"
        )
    d_model = _config_int(config, "d_model", config_path, MAX_D_MODEL)
    n_layers = _config_int(config, "n_layers", config_path, MAX_LAYERS)
    labels = config.get("labels")
    if not isinstance(labels, list) or not all(isinstance(label, str) for label in labels):
        raise LensFileError(f"{config_path}: key 'labels' must be a list of strings, got {labels!r}")
    bias = _config_bool(config, "bias", config_path)
    info = config.get("info")
    if info is not None and not isinstance(info, dict):
        raise LensFileError(f"{config_path}: key 'info' must be a JSON object, got {type(info).__name__}")
    losses = config.get("losses") or []
    if not isinstance(losses, list) or not all(isinstance(x, int | float) and not isinstance(x, bool) for x in losses):
        raise LensFileError(f"{config_path}: key 'losses' must be a list of numbers")
    params_path = folder / PARAMS_FILE
    if not params_path.is_file():
        raise MissingFileError(f"{params_path} is missing: the tuned lens's weights are saved beside {CONFIG_FILE}")
    try:
        state = load_file(str(params_path))  # no bigger than the file
    except (SafetensorError, OSError, ValueError) as err:
        raise LensFileError(f"{params_path} is not a readable safetensors file: {err}") from None
    _check_sizes(state, labels, d_model, bias, params_path)
    try:
        lens = TunedLens(d_model, n_layers, labels=labels, bias=bias, info=info)
    except ValueError as err:
        raise LensFileError(f"{config_path}: {err}") from None
    _assign(lens, state, params_path)
    lens.losses = [float(x) for x in losses]
    return lens


def _load_package(folder: Path, config: dict) -> TunedLens:
    config_path = folder / CONFIG_FILE
    lens_type = config.get("lens_type", PACKAGE_LENS_TYPE)
    if lens_type != PACKAGE_LENS_TYPE:
        raise LensFileError(f"{config_path}: lens_type {lens_type!r} is not {PACKAGE_LENS_TYPE!r}, the only one read")
    d_model = _config_int(config, "d_model", config_path, MAX_D_MODEL)
    n_layers = _config_int(config, "num_hidden_layers", config_path, MAX_LAYERS)
    bias = _config_bool(config, "bias", config_path)
    params_path = folder / PACKAGE_PARAMS_FILE
    if not params_path.is_file():
        raise MissingFileError(f"{params_path} is missing: a tuned-lens package lens keeps its weights there")
    try:
        raw = torch.load(params_path, map_location="cpu", weights_only=True)
    except Exception as err:  # pickle and zip errors come in many types; weights_only refusals too
        raise LensFileError(
            f"{params_path} could not be read as tensors (torch.load, weights_only=True): {err}"
        ) from None
    if not isinstance(raw, dict):
        raise LensFileError(f"{params_path} holds {type(raw).__name__}, not a state dict")
    # The package's ModuleList keys are "k.weight" / "k.bias" with k over hidden_states[k], k < num_hidden_layers.
    labels = ["embed"] + [f"{i}_post" for i in range(n_layers - 1)]
    state = {}
    for name, tensor in raw.items():
        index, _, kind = str(name).partition(".")
        if not index.isdigit() or int(index) >= n_layers or kind not in ("weight", "bias"):
            raise LensFileError(
                f"{params_path}: unexpected key {name!r}; a tuned-lens package lens has '<k>.weight' and '<k>.bias' "
                f"for k < num_hidden_layers ({n_layers})"
            )
        state[f"{labels[int(index)]}.{kind}"] = tensor
    info = {
        "source": "tuned-lens package",
        "base_model_name_or_path": config.get("base_model_name_or_path"),
        "unembed_hash": config.get("unembed_hash"),
    }
    _check_sizes(state, labels, d_model, bias, params_path)
    lens = TunedLens(d_model, n_layers, labels=labels, bias=bias, info=info)
    _assign(lens, state, params_path)
    return lens


def _assign(lens: TunedLens, state: dict[str, torch.Tensor], path: Path) -> None:
    """Copies `state` into the lens's translators (cast to float32), naming missing, unexpected or misshapen keys."""
    expected = lens.translators.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise LensFileError(f"{path}: missing tensors {missing[:4]}, unexpected tensors {unexpected[:4]}")
    for name, tensor in state.items():
        if not isinstance(tensor, torch.Tensor) or tuple(tensor.shape) != tuple(expected[name].shape):
            shape = tuple(tensor.shape) if isinstance(tensor, torch.Tensor) else type(tensor).__name__
            raise LensFileError(f"{path}: tensor {name!r} is {shape}, expected {tuple(expected[name].shape)}")
        if not tensor.is_floating_point():
            raise LensFileError(f"{path}: tensor {name!r} is {tensor.dtype}, expected floating point")
    with torch.no_grad():
        for name, param in lens.translators.named_parameters():
            param.copy_(state[name].float())
