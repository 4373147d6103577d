"""`test_prompt`: how the model ranks an answer after a prompt, token by token, as TransformerLens prints it."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..model.protocols import LanguageModel


def test_prompt(
    prompt: str,
    answer: str | Sequence[str],
    model: LanguageModel,
    *,
    prepend_space_to_answer: bool = True,
    print_details: bool = True,
    prepend_bos: bool | None = None,
    top_k: int = 10,
) -> list[dict[str, float | int | str]]:
    """Prints how the model ranks `answer` after `prompt`, token by token, as TransformerLens' `test_prompt`.

    The model comes third, in TransformerLens' order: the one function here whose third argument is not
    keyword-only, so that calls written for TransformerLens run unchanged.

    The answer is appended to the prompt (with a space first unless `prepend_space_to_answer=False`) and, for each
    of its tokens, the rank, logit and probability the model gave it are printed, with the top `top_k` tokens.

    Returns:
        One dict per answer token: token, rank (0 = top), logit, prob (TransformerLens returns None; the rows
        are what it prints).
    """
    answers = [answer] if isinstance(answer, str) else list(answer)
    rows: list[dict[str, float | int | str]] = []
    for text in answers:
        if prepend_space_to_answer and not text.startswith(" "):
            text = " " + text
        prompt_tokens = model.to_tokens(prompt, prepend_bos=prepend_bos)[0]
        answer_tokens = model.to_tokens(text, prepend_bos=False)[0]
        tokens = torch.cat([prompt_tokens, answer_tokens])[None]
        with torch.no_grad():
            logits = model(tokens)[0].float()  # [pos, d_vocab]
        if print_details:
            print("Tokenized prompt:", model.to_str_tokens(prompt_tokens))
            print("Tokenized answer:", model.to_str_tokens(answer_tokens))
        n_prompt = prompt_tokens.shape[0]
        for i, token in enumerate(answer_tokens.tolist()):
            row_logits = logits[n_prompt - 1 + i]
            probs = row_logits.softmax(-1)
            rank = int((row_logits > row_logits[token]).sum())
            label = model.to_string(token)
            row = {"token": label, "rank": rank, "logit": float(row_logits[token]), "prob": float(probs[token])}
            rows.append(row)
            print(f"Performance on answer token:\nRank: {rank:<8} Logit: {row['logit']:5.2f} Prob: {row['prob']:6.2%}")
            if print_details:
                top = probs.topk(top_k)
                for r, (p, t) in enumerate(zip(top.values.tolist(), top.indices.tolist())):
                    text_t = model.to_string(t)
                    print(f"Top {r}th token. Logit: {float(row_logits[t]):5.2f} Prob: {p:6.2%} Token: |{text_t}|")
    return rows
