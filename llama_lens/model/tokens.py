"""Text <-> token helpers of `HookedLlama`, under TransformerLens' names and with its semantics.

`prepend_bos=None` everywhere means the tokenizer's own default (what transformers or Meta's code would do);
True / False override it. `to_tokens` right-pads a list of texts as TransformerLens does (`padding_side=`
changes it); `model.prepare_tokens`, which `forward`, `generate` and the lens use, left-pads.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..errors import ArgumentError


def _is_texts(value: object) -> bool:
    return isinstance(value, (list, tuple)) and bool(value) and all(isinstance(v, str) for v in value)


class TokenHelpers:
    """Mixed into `HookedLlama`: needs `self.tokenizer` and `self.embed`."""

    def _need_tokenizer(self):
        if self.tokenizer is None:
            raise ArgumentError("this model has no tokenizer; pass tokenizer= to ll.load or give token ids")
        return self.tokenizer

    def encode_texts(
        self, texts: Sequence[str], *, prepend_bos: bool | None = None, padding_side: str = "right"
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Encodes texts one by one and pads them into a batch on `padding_side` with the tokenizer's pad id.

        Returns:
            tokens [batch, pos] and attention_mask [batch, pos] (1 = real token), on the CPU.
        """
        if padding_side not in ("left", "right"):
            raise ArgumentError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
        if not texts:
            raise ArgumentError("need at least one text")
        tokenizer = self._need_tokenizer()
        bos = {} if prepend_bos is None else {"bos": prepend_bos}
        rows = [tokenizer.encode(text, **bos) for text in texts]
        pos = max(len(row) for row in rows)
        if pos == 0:
            raise ArgumentError("every text encodes to no token at all; pass prepend_bos=True or a longer text")
        tokens = torch.full((len(rows), pos), tokenizer.padding_id, dtype=torch.long)
        mask = torch.zeros((len(rows), pos), dtype=torch.long)
        for b, row in enumerate(rows):
            span = slice(pos - len(row), pos) if padding_side == "left" else slice(0, len(row))
            tokens[b, span] = torch.tensor(row, dtype=torch.long)
            mask[b, span] = 1
        return tokens, mask

    def to_tokens(
        self,
        input: str | Sequence[str],  # noqa: A002 - TransformerLens' name
        prepend_bos: bool | None = None,
        padding_side: str | None = None,
        move_to_device: bool = True,
    ) -> torch.Tensor:
        """Token ids [batch, pos] of a text or list of texts, as TransformerLens' `to_tokens`.

        Args:
            input: a text or list of texts.
            prepend_bos: add BOS (True), not (False), or follow the tokenizer's own default (None).
            padding_side: "right" (the default, as TransformerLens) or "left". Right padding keeps each prompt at
                positions 0..len-1 (find its last token with `mask.sum(-1) - 1`); forward, generate and the lens
                left-pad instead (`model.prepare_tokens`), so that `[:, -1]` is every prompt's last token.
            move_to_device: put the ids on the model's device (else the CPU).
        """
        if not isinstance(input, str) and not _is_texts(input):
            raise ArgumentError(f"to_tokens takes a text or a list of texts, got {type(input).__name__}")
        texts = [input] if isinstance(input, str) else list(input)
        tokens, _ = self.encode_texts(texts, prepend_bos=prepend_bos, padding_side=padding_side or "right")
        return tokens.to(self.embed.weight.device) if move_to_device else tokens

    def to_str_tokens(
        self,
        input: str | Sequence[str] | torch.Tensor | Sequence[int] | int,  # noqa: A002 - TransformerLens' name
        prepend_bos: bool | None = None,
        padding_side: str | None = None,
    ) -> list[str] | list[list[str]]:
        """The text of each token, e.g. ['<|im_start|>', 'The', ' capital', ...], as TransformerLens'.

        Args:
            input: a text; a list of texts (gives one list per text, unpadded); token ids [pos] (or [1, pos]) as a
                tensor or list; or one id.
            prepend_bos: for texts: add BOS (True), not (False), or the tokenizer's own default (None).
            padding_side: accepted for TransformerLens' signature; texts are not padded here.
        """
        del padding_side  # each text is tokenized on its own, so nothing is padded
        tokenizer = self._need_tokenizer()
        bos = {} if prepend_bos is None else {"bos": prepend_bos}
        if isinstance(input, str):
            return tokenizer.token_strs(tokenizer.encode(input, **bos))
        if _is_texts(input):
            return [tokenizer.token_strs(tokenizer.encode(text, **bos)) for text in input]
        if isinstance(input, int):
            return tokenizer.token_strs([input])
        if isinstance(input, torch.Tensor):
            ids = input
            if ids.dim() == 2:
                if ids.shape[0] != 1:
                    raise ArgumentError(
                        f"to_str_tokens takes one prompt, got ids of shape {tuple(ids.shape)}; index the batch first"
                    )
                ids = ids[0]
            if ids.dim() > 1 or ids.is_floating_point():
                raise ArgumentError(f"to_str_tokens takes integer ids [pos], got {ids.dtype} {tuple(input.shape)}")
            return tokenizer.token_strs(ids.tolist())
        if isinstance(input, (list, tuple)) and all(isinstance(i, int) for i in input):
            return tokenizer.token_strs(list(input))
        raise ArgumentError(
            f"to_str_tokens takes a text, a list of texts, token ids or one id, got {type(input).__name__}"
        )

    def to_string(self, tokens: int | torch.Tensor | Sequence[int]) -> str | list[str]:
        """Decodes one id or ids [pos] to a string, or [batch, pos] to a list of strings."""
        if isinstance(tokens, int):
            tokens = [tokens]
        if isinstance(tokens, torch.Tensor):
            if tokens.dim() == 0:
                tokens = tokens[None]
            if tokens.dim() == 2:
                return [self.to_string(row) for row in tokens]
            tokens = tokens.tolist()
        if tokens and isinstance(tokens[0], (list, tuple)):
            return [self.to_string(list(row)) for row in tokens]
        return self._need_tokenizer().decode(list(tokens))

    def to_single_token(self, string: str) -> int:
        """The id of a text that is exactly one token (no BOS), e.g. `to_single_token(" Paris")`.

        Raises:
            ValueError: the text encodes to zero or several tokens; the message lists them.
        """
        tokenizer = self._need_tokenizer()
        ids = tokenizer.encode(string, bos=False)
        if len(ids) != 1:
            pieces = ", ".join(f"{t!r}" for t in tokenizer.token_strs(ids))
            raise ArgumentError(f"{string!r} is not a single token: it encodes to [{pieces}]")
        return ids[0]

    def get_token_position(
        self,
        single_token: str | int,
        input: str | torch.Tensor,  # noqa: A002 - TransformerLens' name
        mode: str = "first",
        prepend_bos: bool | None = None,
        padding_side: str | None = None,
    ) -> int:
        """The position of `single_token` in one prompt, as TransformerLens' `get_token_position`.

        Args:
            single_token: a single-token text or an id.
            input: a text (tokenized with `to_tokens`) or ids [pos] / [1, pos].
            mode: "first" or "last" occurrence.

        Raises:
            ValueError: the token does not occur, or the input holds several prompts.
        """
        if mode not in ("first", "last"):
            raise ArgumentError(f"mode must be 'first' or 'last', got {mode!r}")
        if isinstance(input, str):
            tokens = self.to_tokens(input, prepend_bos=prepend_bos, padding_side=padding_side)
        else:
            tokens = torch.as_tensor(input)
        if tokens.dim() == 2:
            if tokens.shape[0] != 1:
                raise ArgumentError(f"get_token_position takes one prompt, got a batch of {tokens.shape[0]}")
            tokens = tokens[0]
        token_id = self.to_single_token(single_token) if isinstance(single_token, str) else int(single_token)
        found = (tokens == token_id).nonzero().flatten()
        if found.numel() == 0:
            raise ArgumentError(f"token {single_token!r} (id {token_id}) does not occur in the input")
        return int(found[0] if mode == "first" else found[-1])
