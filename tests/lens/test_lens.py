"""The logit lens and direct logit attribution, checked against independent computations on tiny random
models, plus the real SmolLM2 end to end."""

import functools
import gc
import subprocess
import sys

import numpy as np
import pytest
import torch
from support import models as helpers
from support.models import assert_same_top_k, tiny_config
from torch.overrides import TorchFunctionMode

import llama_lens as ll
from llama_lens.lens import logit as lens_module
from llama_lens.lens import readout as readout_module
from llama_lens.lens import readout_online
from llama_lens.viz.tokens import visible_token

CORPUS = [
    "The Eiffel Tower is located in the city of Paris.",
    "The capital of France is Paris.",
    "Rome is in Italy.\nBerlin is in Germany.",
] * 5


# Read-outs peaked enough for top-k and ranks to mean something.
tiny_model = functools.partial(helpers.tiny_model, seed=1, scale=4.0, embed_scale=25.0)


@pytest.fixture(scope="module")
def tokenizer():
    """A byte-level BPE (like SmolLM2's) over 300 ids, with <s> as BOS (added by its post-processor, as Llama's
    tokenizer.json adds it) and </s> as EOS and padding."""
    from tokenizers import Tokenizer as Backend
    from tokenizers import decoders, models, pre_tokenizers, processors, trainers

    from llama_lens.tokenizer import HFTokenizer

    backend = Backend(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<s>", "</s>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())  # fmt: skip
    backend.train_from_iterator(CORPUS, trainer)
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    return HFTokenizer(backend=backend)


@pytest.fixture(scope="module")
def text_model(tokenizer):
    return tiny_model(tiny_config(d_vocab=tokenizer.vocab_size), tokenizer=tokenizer)


def reference_readouts(model, tokens, hooks):
    """Every read-out's logits [n_readouts, batch, pos, d_vocab] the plain way: cache, norm, unembed."""
    with torch.no_grad():
        # Only the read-out hooks: caching everything would hook attn.hook_result too, which computes the
        # attention output head by head, a slightly different sum.
        logits, cache = model.run_with_cache(tokens, names_filter=hooks)
        return logits, torch.stack([model.unembed(model.ln_final(cache[h])) for h in hooks])


# ----------------------------------------------------------------------------------------------- read-outs
def test_last_readout_is_the_models_own_logits(device):
    model = tiny_model().to(device)
    tokens = torch.randint(0, 128, (2, 9)).to(device)
    result = ll.logit_lens(model, tokens, keep_logits=True)
    assert result.labels == ["embed", "0_post", "1_post"]
    # The last read-out by its definition, ln_final then unembed of the last resid_post, is the model's output
    # exactly: the lens takes that output as it is, with no second norm.
    hooks = ["hook_embed", "blocks.0.hook_resid_post", "blocks.1.hook_resid_post"]
    logits, ref = (t.cpu() for t in reference_readouts(model, tokens, hooks))  # the lens returns CPU tensors
    assert torch.equal(ref[-1], logits) and torch.equal(result.logits[:, -1], ref[-1])
    # The other read-outs go through ln_final once, like the model's last one.
    torch.testing.assert_close(result.logits[:, :2], ref[:2].transpose(0, 1), atol=1e-5, rtol=0)
    # The lens's own read-out path gives the model's logits too, where it reads out a layer that is a smaller
    # model's last: layer 0's resid_post here, the output of the model loaded with layer 0 only.
    first_layer = tiny_model(layers=[0]).to(device)
    with torch.no_grad():
        first_logits = first_layer(tokens).cpu()
    torch.testing.assert_close(result.logits[:, 1], first_logits, atol=1e-5, rtol=1e-6)
    # KL to the final distribution from the kept logits, for every read-out.
    final = logits.log_softmax(-1)[:, None]
    kl = (final.exp() * (final - result.logits.log_softmax(-1))).sum(-1)
    torch.testing.assert_close(result.kl_to_final, kl, atol=2e-5, rtol=0)
    assert kl[:, :-1].min() > 1e-3


@pytest.mark.parametrize(
    "d_vocab, vocab_block, chunk_size, top_k",
    # several blocks, with a tail; last, a tail narrower than top_k that holds a target, so it is swept first
    [(128, None, None, 4), (128, None, 5, 4), (9000, None, 7, 4), (3000, 1000, 16, 4), (2300, 1000, 16, 400)],
)
def test_metrics_match_an_independent_computation(d_vocab, vocab_block, chunk_size, top_k, monkeypatch):
    if vocab_block is not None:
        monkeypatch.setattr(readout_module, "VOCAB_BLOCK", vocab_block)
    model = tiny_model(tiny_config(d_vocab=d_vocab))
    tokens = torch.randint(0, d_vocab, (2, 11))
    with torch.no_grad():
        top = model(tokens)[:, -1].argmax(-1).tolist()  # rank 0 at the last read-out
    target = [[top[0], d_vocab - 1], [d_vocab // 2, top[1]]]  # two per prompt, in different blocks
    readout = list(lens_module.READOUTS)
    result = ll.logit_lens(model, tokens, target=target, readout=readout, top_k=top_k, chunk_size=chunk_size)
    hooks = ["blocks.0.hook_resid_pre", "blocks.0.hook_resid_mid", "blocks.0.hook_resid_post",
             "blocks.1.hook_resid_pre", "blocks.1.hook_resid_mid", "blocks.1.hook_resid_post"]  # fmt: skip
    assert result.labels == ["0_pre", "0_mid", "0_post", "1_pre", "1_mid", "1_post"]
    assert result.readouts == ["resid_pre", "resid_mid", "resid_post"] * 2
    assert result.layers == [0, 0, 0, 1, 1, 1]
    final, logits = reference_readouts(model, tokens, hooks)
    logits = logits.transpose(0, 1)  # [batch, n_readouts, pos, d_vocab]
    log_probs = logits.log_softmax(-1)
    probs = log_probs.exp()
    final_log_probs = final.log_softmax(-1)[:, None]

    top = logits.topk(top_k, dim=-1)  # by logit: float32 probabilities can round distinct logits to a tie
    assert_same_top_k(result.top_ids, result.top_logits, top.values, scores=logits, expected_ids=top.indices, atol=1e-5)
    torch.testing.assert_close(result.top_probs, probs.gather(-1, top.indices), atol=1e-6, rtol=0)
    torch.testing.assert_close(result.entropy, -(probs * log_probs).sum(-1), atol=2e-5, rtol=0)
    kl = (final_log_probs.exp() * (final_log_probs - log_probs)).sum(-1)
    torch.testing.assert_close(result.kl_to_final, kl, atol=2e-5, rtol=0)
    assert kl[:, :-1].min() > 1e-3  # the read-outs really differ from the final distribution

    ids = torch.tensor(target)[:, None, None, :].expand(-1, 6, 11, -1)
    torch.testing.assert_close(result.target_probs, probs.gather(-1, ids), atol=1e-6, rtol=0)
    torch.testing.assert_close(result.target_logits, logits.gather(-1, ids), atol=1e-5, rtol=0)
    # rank = how many tokens have a strictly higher logit (so tied logits share a rank)
    ranks = (logits[..., None, :] > logits.gather(-1, ids)[..., None]).sum(-1)
    assert torch.equal(result.target_ranks, ranks)
    assert result.target_ranks.min() == 0 and result.target_ranks.max() > 5


def test_top_k_when_a_short_last_block_is_swept_first(monkeypatch):
    # The block that holds the target is swept first. Here that is a last block of one id, and that id is the
    # top token of a read-out: the running top-k starts with fewer than top_k tokens, and must still take in
    # the next blocks although none beats the best so far.
    monkeypatch.setattr(readout_module, "VOCAB_BLOCK", 127)  # blocks [0, 127) and [127, 128)
    model = tiny_model()
    tokens = torch.randint(0, 128, (1, 5))
    _, ref = reference_readouts(model, tokens, ["hook_embed"])
    best = int(ref[0, 0, 0].argmax())
    with torch.no_grad():  # make the embedding read-out's top token at position 0 the last id
        model.unembed.weight[[best, 127]] = model.unembed.weight[[127, best]]
    _, ref = reference_readouts(model, tokens, ["hook_embed"])
    assert ref[0, 0, 0].argmax() == 127
    result = ll.logit_lens(model, tokens, target=127, readout="embed", top_k=3)
    top = ref[0, 0].topk(3, dim=-1)
    assert_same_top_k(
        result.top_ids[0, 0], result.top_logits[0, 0], top.values, scores=ref[0, 0], expected_ids=top.indices, atol=1e-5
    )
    assert (result.top_ids[0, 0, 0, 0] == 127).all()
    assert (result.target_ranks[0, 0, 0] == 0).all()


def test_chunking_and_positions_select_the_same_numbers():
    model = tiny_model()
    tokens = torch.randint(0, 128, (3, 10))
    full = ll.logit_lens(model, tokens, target=5)
    for chunk_size in (1, 7, 1000):
        other = ll.logit_lens(model, tokens, target=5, chunk_size=chunk_size)
        assert_same_top_k(other.top_ids, other.top_logits, full.top_logits, expected_ids=full.top_ids, atol=1e-5)
        torch.testing.assert_close(other.kl_to_final, full.kl_to_final, atol=1e-5, rtol=0)
    some = ll.logit_lens(model, tokens, target=5, positions=[0, -1, 4])
    assert some.positions == [0, 9, 4]
    picked = full.top_ids[:, :, [0, 9, 4]]
    assert_same_top_k(some.top_ids, some.top_logits, full.top_logits[:, :, [0, 9, 4]], expected_ids=picked, atol=1e-5)
    assert torch.equal(some.target_ranks, full.target_ranks[:, :, [0, 9, 4]])
    torch.testing.assert_close(some.entropy, full.entropy[:, :, [0, 9, 4]], atol=1e-6, rtol=0)
    last = ll.logit_lens(model, tokens[0], positions=-1)  # one prompt as [pos]
    assert last.top_ids.shape == (1, 3, 1, 5) and last.positions == [9]


class LargestNewStorage(TorchFunctionMode):
    """Records the largest storage a torch call makes anew: not a view of its arguments, nor an out= one."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        given = {t.untyped_storage().data_ptr() for t in _tensors([*args, *kwargs.values()])}
        for t in _tensors([out]):
            if t.untyped_storage().data_ptr() not in given:
                self.largest = max(self.largest, t.untyped_storage().nbytes())
        return out


def _tensors(values) -> list[torch.Tensor]:
    found = []
    for value in values:
        if isinstance(value, torch.Tensor):
            found.append(value)
        elif isinstance(value, (list, tuple)):
            found += _tensors(value)
    return found


@pytest.mark.slow
def test_read_out_holds_blocks_not_vocabulary_rows(monkeypatch):
    # Beside the model's own logits, no [rows, d_vocab] array: the largest tensor the read-out makes is a
    # [chunk_size, VOCAB_BLOCK] block of float32, however many rows there are.
    model = tiny_model(tiny_config(d_vocab=9000))
    tokens = torch.randint(0, 9000, (2, 100))
    monkeypatch.setattr(readout_module, "VOCAB_BLOCK", 1024)  # several blocks across this small vocabulary
    mode = LargestNewStorage()
    read_out = lens_module.read_out

    def watched(*args, **kwargs):
        with mode:
            return read_out(*args, **kwargs)

    monkeypatch.setattr(lens_module, "read_out", watched)
    ll.logit_lens(model, tokens, target=[[5, 8999], [3000, 7]], chunk_size=64)
    block_bytes = 64 * readout_module.VOCAB_BLOCK * 4
    assert 0 < mode.largest <= block_bytes < 2 * 100 * 9000 * 4 / 10


def test_only_the_asked_positions_outlive_the_forward(monkeypatch):
    # With positions=-1 the read-out needs one position: the model's logits and the residual streams at every
    # position are let go before it starts. Tensors are found by the size of the memory they hold, as a view
    # or a detached alias keeps the whole of it.
    model = tiny_model(tiny_config(d_vocab=9000))
    tokens = torch.randint(0, 9000, (3, 97))
    every_position = {3 * 97 * 9000 * 4: "logits", 3 * 97 * 64 * 4: "residual stream"}  # bytes, float32
    kept = []
    read_out = lens_module.read_out

    def watched(*args, **kwargs):
        gc.collect()
        sizes = {t.untyped_storage().nbytes() for t in gc.get_objects()
                 if type(t) is torch.Tensor and t.layout == torch.strided and t.device.type == "cpu"}  # fmt: skip
        kept.append(sorted(every_position[n] for n in sizes & every_position.keys()))
        return read_out(*args, **kwargs)

    monkeypatch.setattr(lens_module, "read_out", watched)
    last = ll.logit_lens(model, tokens, target=5, positions=-1)
    every = ll.logit_lens(model, tokens, target=5)
    assert kept == [[], ["logits", "residual stream"]]  # the second: the check sees them when they are needed
    assert_same_top_k(
        last.top_ids, last.top_logits, every.top_logits[:, :, -1:], expected_ids=every.top_ids[:, :, -1:], atol=1e-5
    )
    assert torch.equal(last.target_ranks, every.target_ranks[:, :, -1:])


@pytest.mark.parametrize("d_vocab", [8192, 9000, 300])  # whole blocks, a tail past the last block, too few
def test_blockwise_top_k_matches_torch_topk(d_vocab):
    from llama_lens.lens.top_k import top_k_largest

    logits = torch.randn(37, d_vocab)
    logits[3, :] = 0.5  # all tied
    logits[4, -3:] = 100.0  # the winners in the tail
    logits[5, 256:261] = torch.tensor([9.0, 8.0, 7.0, 6.0, 5.0])  # the winners in one block
    values, ids = top_k_largest(logits, 5)
    expected = logits.topk(5, dim=-1)
    assert torch.equal(values, expected.values)
    assert torch.equal(logits.gather(-1, ids), values)  # the ids point at those values
    untied = [i for i in range(37) if i not in (3, 4)]
    assert torch.equal(ids[untied], expected.indices[untied])
    if d_vocab == 9000:
        assert set(ids[4, :3].tolist()) == {8997, 8998, 8999}


def test_shared_residual_vectors_give_identical_rows():
    model = tiny_model()
    tokens = torch.randint(0, 128, (1, 6))
    result = ll.logit_lens(model, tokens, readout=["embed", "resid_pre", "resid_post"])
    # "embed" is 0_pre, so it is left out; 0_post is 1_pre.
    assert result.labels == ["0_pre", "0_post", "1_pre", "1_post"]
    assert torch.equal(result.top_probs[:, 1], result.top_probs[:, 2])
    embed = ll.logit_lens(model, tokens, readout="embed")
    assert embed.labels == ["embed"] and embed.readouts == ["embed"]
    assert_same_top_k(
        embed.top_ids[:, 0],
        embed.top_logits[:, 0],
        result.top_logits[:, 0],
        expected_ids=result.top_ids[:, 0],
        atol=1e-5,
    )


def test_partial_model_reads_out_its_loaded_layers():
    cfg = tiny_config(n_layers=3)
    full, partial = tiny_model(cfg), tiny_model(cfg, layers=range(0, 2))
    tokens = torch.randint(0, 128, (2, 8))
    result = ll.logit_lens(partial, tokens, keep_logits=True)
    assert result.labels == ["embed", "0_post", "1_post"]
    whole = ll.logit_lens(full, tokens, keep_logits=True)
    # The partial model's last read-out is its own output; the whole model reads out the same resid_post
    # through the general path, and gets the same logits.
    torch.testing.assert_close(result.logits, whole.logits[:, :3], atol=1e-5, rtol=1e-6)
    assert_same_top_k(
        result.top_ids, result.top_logits, whole.top_logits[:, :3], expected_ids=whole.top_ids[:, :3], atol=1e-5
    )
    # KL is to the partial model's own output, for every read-out.
    with torch.no_grad():
        final = partial(tokens).log_softmax(-1)[:, None]
    kl = (final.exp() * (final - result.logits.log_softmax(-1))).sum(-1)
    torch.testing.assert_close(result.kl_to_final, kl, atol=2e-5, rtol=0)
    assert not torch.allclose(result.kl_to_final, whole.kl_to_final[:, :3])  # KL is to the partial's output
    only = ll.logit_lens(full, tokens, layers=[1])
    assert only.labels == ["embed", "1_post"]
    assert_same_top_k(
        only.top_ids[:, 1], only.top_logits[:, 1], whole.top_logits[:, 2], expected_ids=whole.top_ids[:, 2], atol=1e-5
    )
    with pytest.raises(ValueError, match=r"layers \[2\] are not loaded"):
        ll.logit_lens(partial, tokens, layers=[2])


def test_bfloat16_model_reads_out_in_its_own_dtype():
    model = tiny_model(tiny_config(d_vocab=5000))
    tokens = torch.randint(0, 5000, (2, 6))
    full = ll.logit_lens(model, tokens, target=7)
    half = ll.logit_lens(model.to(torch.bfloat16), tokens, target=7, keep_logits=True)
    assert half.logits.dtype == torch.bfloat16
    hooks = ["hook_embed", "blocks.0.hook_resid_post", "blocks.1.hook_resid_post"]
    _, ref = reference_readouts(model, tokens, hooks)  # in bfloat16: the read-outs as the model would make them
    torch.testing.assert_close(half.logits, ref.transpose(0, 1), atol=0, rtol=2**-7)
    # The metrics are computed in float32 from bfloat16 logits: close to the float32 model's.
    torch.testing.assert_close(half.entropy, full.entropy, atol=0.05, rtol=0.02)
    assert (half.top_ids[..., 0] == full.top_ids[..., 0]).float().mean() > 0.9


def test_bad_arguments_are_named():
    model = tiny_model()
    tokens = torch.randint(0, 128, (2, 5))
    with pytest.raises(ValueError, match="unknown read-out"):
        ll.logit_lens(model, tokens, readout="resid_postt")
    with pytest.raises(ValueError, match=r"positions=5 is out of range: the prompt has 5 tokens \(0..4, or -5..-1"):
        ll.logit_lens(model, tokens, positions=5)
    with pytest.raises(ValueError, match="3 targets for 2 prompt"):
        ll.logit_lens(model, tokens, target=[1, 2, 3])
    with pytest.raises(ValueError, match="out of range"):
        ll.logit_lens(model, tokens, target=128)
    with pytest.raises(ValueError, match="no tokenizer"):
        ll.logit_lens(model, tokens, target=" Paris")
    with pytest.raises(ValueError, match="no tokenizer"):
        ll.logit_lens(model, "some text")
    with pytest.raises(ValueError, match="top_k"):
        ll.logit_lens(model, tokens, top_k=0)
    with pytest.raises(ValueError, match="top_k must be an integer, got 5.0"):
        ll.logit_lens(model, tokens, top_k=5.0)
    with pytest.raises(ValueError, match="a target is a token's text or id, got float 5.0"):
        ll.logit_lens(model, tokens, target=5.0)
    with pytest.raises(ValueError, match="positions must be ints, got 1.5"):
        ll.logit_lens(model, tokens, positions=[0, 1.5])
    later = tiny_model(tiny_config(n_layers=3), layers=[1, 2])
    for lens in (ll.logit_lens, ll.direct_logit_attribution):
        with pytest.raises(ValueError, match=r"holds layers 1..2 only; .* load it with layers=range\(0, 3\)"):
            lens(later, tokens, target=3)


def test_numpy_and_tensor_integers_are_taken_as_ids_and_positions():
    model = tiny_model()
    tokens = torch.randint(0, 128, (2, 5))
    expected = ll.logit_lens(model, tokens, target=[[7], [9]], positions=[-1], top_k=3)
    for target, positions, top_k in [
        (torch.tensor([[7], [9]]), np.int64(-1), np.int64(3)),
        ([np.int64(7), torch.tensor(9)], torch.tensor(-1), 3),
        ([torch.tensor([7]), torch.tensor([9])], torch.tensor([4]), 3),  # one row of ids per prompt
    ]:
        result = ll.logit_lens(model, tokens, target=target, positions=positions, top_k=top_k)
        assert result.positions == [4] and result.target_ids.tolist() == [[7], [9]]
        assert torch.equal(result.target_ranks, expected.target_ranks)
        assert_same_top_k(
            result.top_ids, result.top_logits, expected.top_logits, expected_ids=expected.top_ids, atol=1e-5
        )


# ----------------------------------------------------------------------------------------------- texts, frames
def test_batch_of_texts_with_padding_and_text_targets(text_model, tokenizer):
    prompts = ["The capital of France is", "The Eiffel Tower is located in the city of"]
    result = ll.logit_lens(text_model, prompts, target=" Paris")
    n_real = [len(tokenizer.encode(p)) for p in prompts]
    assert result.tokens.shape == (2, max(n_real))
    assert result.attention_mask.sum(1).tolist() == n_real
    assert result.str_tokens[1][0] == "<s>" and " Paris" not in result.str_tokens[0]
    assert result.target_strs == [[" Paris"], [" Paris"]]
    assert result.target_ids[0, 0] == tokenizer.id_of(" Paris")
    assert result.top_strs[1][0][3] == tokenizer.token_strs(result.top_ids[1, 0, 3].tolist())

    frame = result.to_frame()
    assert len(frame) == sum(n_real) * result.n_readouts  # padding rows left out
    assert len(result.to_frame(drop_padding=False)) == 2 * max(n_real) * result.n_readouts
    first = frame[frame.batch_index == 0]
    assert first.position.min() == max(n_real) - n_real[0]  # left padding: prompt 0 starts later
    row = frame[(frame.batch_index == 1) & (frame.label == "1_post") & (frame.position == 4)].iloc[0]
    assert row.token == result.str_tokens[1][4] and row.layer == 1 and row.readout == "resid_post"
    assert row.top_token == result.top_strs[1][2][4][0]
    assert row.target_prob == pytest.approx(float(result.target_probs[1, 2, 4, 0]))
    # Each prompt's own target, given as text.
    per_prompt = ll.logit_lens(text_model, prompts, target=[" Paris", " of"])
    assert per_prompt.target_strs == [[" Paris"], [" of"]]


def test_to_frame_columns_and_rows():
    model = tiny_model()
    tokens = torch.randint(0, 128, (2, 4))
    result = ll.logit_lens(model, tokens, target=[[1, 2, 3], [4, 5, 6]], top_k=3)
    frame = result.to_frame()
    assert list(frame.columns) == [
        "batch_index", "label", "layer", "readout", "position", "token", "top_token", "top_id", "top_prob", "entropy",
        "kl_to_final", "target", "target_id", "target_prob", "target_logit", "target_rank",
    ]  # fmt: skip
    assert len(frame) == 2 * 3 * 4 * 3  # prompt × read-out × position × target
    assert frame.target_id[frame.batch_index == 1].unique().tolist() == [4, 5, 6]
    assert frame.token.iloc[0] == f"<{int(tokens[0, 0])}>"  # no tokenizer: ids in angle brackets
    top = result.to_frame("top_k")
    assert list(top.columns) == ["batch_index", "label", "layer", "readout", "position", "token", "k", "top_token",
                                 "top_id", "top_prob", "top_logit"]  # fmt: skip
    assert len(top) == 2 * 3 * 4 * 3 and top.k.tolist()[:4] == [0, 1, 2, 0]
    assert (top.groupby(["batch_index", "label", "position"], observed=True).top_prob.apply(
        lambda p: p.is_monotonic_decreasing)).all()  # fmt: skip
    assert list(frame.sort_values("label").label.unique()) == ["embed", "0_post", "1_post"]
    with pytest.raises(ValueError, match="kind"):
        result.to_frame("wide")
    no_target = ll.logit_lens(model, tokens).to_frame()
    assert "target" not in no_target.columns and len(no_target) == 2 * 3 * 4


# ----------------------------------------------------------------------------------------------- attribution
def test_components_sum_to_the_final_logit():
    cfg = tiny_config(attention_bias=True, n_layers=3)
    model = tiny_model(cfg)
    tokens = torch.randint(0, 128, (2, 7))
    result = ll.direct_logit_attribution(model, tokens, target=[[3, 9], [11, 0]], positions=None)
    assert result.labels == ["embed", "0_attn", "0_mlp", "1_attn", "1_mlp", "2_attn", "2_mlp"]
    assert result.components.shape == (2, 7, 7, 2)
    with torch.no_grad():
        logits = model(tokens)
    expected = logits.gather(-1, torch.tensor([[3, 9], [11, 0]])[:, None, :].expand(-1, 7, -1))
    torch.testing.assert_close(result.final_logits, expected, atol=1e-5, rtol=0)
    # Frozen final-norm scale: RMSNorm is linear, so the parts add up to the model's logit.
    torch.testing.assert_close(result.components.sum(1), expected, atol=1e-4, rtol=0)
    assert result.components.abs().amax(dim=(0, 2, 3)).min() > 1e-3  # every component takes part
    # Heads add up to their layer's attention term, plus the o_proj bias's own term.
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens, names_filter="ln_final.hook_scale")
        scale = cache["ln_final.hook_scale"]  # [batch, pos, 1]
        directions = model.unembed.weight[torch.tensor([[3, 9], [11, 0]])] * model.ln_final.weight
        bias = torch.stack([torch.einsum("d,btd->bt", model.blocks[str(i)].attn.o_proj.bias, directions)
                            for i in range(3)], dim=1)  # [batch, n_layers, n_targets]  # fmt: skip
    bias_terms = bias[:, :, None, :] / scale[:, None, :, :]
    attn = result.components[:, 1::2]  # [batch, n_layers, pos, n_targets]
    torch.testing.assert_close(result.heads.sum(2) + bias_terms, attn, atol=1e-5, rtol=0)


def test_attribution_frames_and_last_position(text_model):
    result = ll.direct_logit_attribution(text_model, "The Eiffel Tower is located in the city of", target=" Paris")
    assert result.positions == [result.tokens.shape[1] - 1]
    frame = result.to_frame()
    assert list(frame.columns) == ["batch_index", "label", "layer", "component", "position", "token", "target",
                                   "target_id", "contribution", "final_logit"]  # fmt: skip
    assert len(frame) == 5 and frame.contribution.sum() == pytest.approx(frame.final_logit.iloc[0], abs=1e-4)
    heads = result.to_frame("heads")
    assert len(heads) == 2 * 4 and set(heads["head"]) == {0, 1, 2, 3} and set(heads.target) == {" Paris"}
    no_heads = ll.direct_logit_attribution(text_model, "The capital of France is", target=" Paris", heads=False)
    assert no_heads.heads is None
    with pytest.raises(ValueError, match="heads=True"):
        no_heads.to_frame("heads")
    with pytest.raises(ValueError, match="needs a target"):
        ll.direct_logit_attribution(text_model, "The capital", target=None)


def test_results_are_ordinary_tensors():
    # Users scale, zero or patch results in place; tensors made under inference_mode would refuse.
    model = tiny_model()
    tokens = torch.randint(0, 128, (1, 5))
    attribution = ll.direct_logit_attribution(model, tokens, target=3)
    attribution.components[0] *= 2
    attribution.heads.zero_()
    attribution.final_logits.add_(1)
    attribution.scale.mul_(2)
    lens = ll.logit_lens(model, tokens, target=3, keep_logits=True)
    for value in (lens.top_probs, lens.entropy, lens.kl_to_final, lens.target_ranks, lens.logits):
        value.mul_(2)


def test_bfloat16_attribution_directions_are_multiplied_in_float32():
    model = tiny_model(tiny_config(attention_bias=True)).to(torch.bfloat16)
    tokens = torch.randint(0, 128, (2, 7))
    target = torch.tensor([[3, 9], [11, 0]])
    result = ll.direct_logit_attribution(model, tokens, target=target, positions=None, heads=False)
    hooks = ["hook_embed"] + [f"blocks.{i}.hook_{part}_out" for i in range(2) for part in ("attn", "mlp")]
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens, names_filter=hooks + ["ln_final.hook_scale"])
        directions = model.unembed.weight[target].float() * model.ln_final.weight.float()  # [batch, n_targets, d_model]
    scale = cache["ln_final.hook_scale"]  # [batch, pos, 1], float32
    expected = torch.stack([torch.einsum("bpd,btd->bpt", cache[h].float(), directions) / scale for h in hooks], 1)
    torch.testing.assert_close(result.components, expected, atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------------------------- plots
def test_visible_token():
    assert visible_token(" Paris\n") == "·Paris↵"
    assert visible_token("\tx") == "⇥x"
    assert visible_token(" internationalisation", 8) == "·intern…"
    assert visible_token("$x$") == r"\$x\$"


def test_heatmap_axes_labels_and_cells(text_model):
    from matplotlib.figure import Figure

    prompts = ["The capital of France is", "The Eiffel Tower is located in the city of"]
    result = ll.logit_lens(text_model, prompts, target=" Paris")
    fig = result.plot(batch_index=1)  # the longer prompt: no padding
    assert isinstance(fig, Figure)
    ax = fig.axes[0]
    n_tokens = result.tokens.shape[1]
    assert ax.images[0].get_array().shape == (3, n_tokens)
    assert [t.get_text() for t in ax.get_yticklabels()] == ["embed", "0_post", "1_post"]
    assert [t.get_text() for t in ax.get_xticklabels()] == [visible_token(t, 10) for t in result.str_tokens[1]]
    assert ax.get_xlabel() == "input token" and ax.get_ylabel() == "read-out (layer)"
    cells = [t.get_text() for t in ax.texts]
    assert len(cells) == 3 * n_tokens
    assert cells[0] == visible_token(result.top_strs[1][0][0][0], 7)
    assert "probability of the top token" in fig.axes[-1].get_ylabel()  # the colour bar

    # Prompt 0 is shorter: its padding columns are left out.
    short = result.plot("rank", batch_index=0)
    n_real = int(result.attention_mask[0].sum())
    assert short.axes[0].images[0].get_array().shape == (3, n_real)
    assert "rank of ' Paris'" in short.axes[0].get_title()
    for metric in ("entropy", "kl", "target_prob"):
        assert result.plot(metric, batch_index=1).axes[0].images[0].get_array().shape == (3, n_tokens)
    with pytest.raises(ValueError, match="unknown metric"):
        result.plot("loss")
    with pytest.raises(ValueError, match=r"batch_index=2 is out of range: there are 2 prompts in the batch \(0..1\)"):
        result.plot(batch_index=2)
    assert result.plot(batch_index=np.int64(-1)).axes[0].images[0].get_array().shape == (3, n_tokens)  # prompt 1
    with pytest.raises(ValueError, match="needs a target"):
        ll.logit_lens(text_model, prompts).plot("rank")


def test_heatmap_fonts_shrink_for_big_prompts():
    cfg = tiny_config(n_layers=32, d_model=32, d_mlp=32, n_heads=2, n_kv_heads=1)
    model = tiny_model(cfg)
    result = ll.logit_lens(model, torch.randint(0, 128, (1, 45)))
    big = result.plot(figsize=(12, 8))
    small = ll.logit_lens(tiny_model(), torch.randint(0, 128, (1, 5))).plot(figsize=(12, 8))
    assert big.axes[0].images[0].get_array().shape == (33, 45)
    assert big.axes[0].texts[0].get_fontsize() < small.axes[0].texts[0].get_fontsize()
    assert len(big.axes[0].get_yticklabels()) == 33


def test_thinned_position_labels_carry_the_position():
    model = tiny_model(tiny_config(n_layers=1))
    result = ll.logit_lens(model, torch.randint(0, 128, (1, 130)))
    labels = [t.get_text() for t in result.plot(figsize=(20, 6)).axes[0].get_xticklabels()]
    # 130 columns, at most 60 labels: every third column is labelled, and its label starts with its position.
    assert [label.split(" ", 1)[0] for label in labels] == [str(p) for p in range(0, 130, 3)]


def test_heatmap_of_one_readout_leaves_room_for_cells_and_a_full_colour_bar(demo_path):
    import warnings

    from matplotlib.backends.backend_agg import FigureCanvasAgg

    # One read-out, with SmolLM2's word tokens as labels: the rotated labels below and above used to squeeze
    # the cells to nothing ("constrained_layout not applied"), and the colour bar was a stub beside a narrow
    # figure. Layer 0 alone is enough to draw it.
    model = ll.load(demo_path, dtype=torch.float32, layers=range(0, 1), progress=False)
    result = ll.logit_lens(model, "The Eiffel Tower is located in the city of", readout="resid_post")
    assert result.n_readouts == 1
    for fig in (result.plot(), ll.logit_lens(model, "Hi", target=" Paris").plot("rank")):
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # a collapsed layout only warns
            FigureCanvasAgg(fig).draw()
        heatmap, colour_bar = fig.axes[0].get_position(), fig.axes[1].get_position()
        assert heatmap.height * fig.get_figheight() > 0.4  # inches of cells
        assert colour_bar.height == pytest.approx(heatmap.height, rel=0.05)


def test_plots_default_to_the_last_position_read_out_and_refuse_padding(text_model):
    result = ll.logit_lens(text_model, "The Eiffel Tower is located in the city of", target=" Paris", positions=[3, 7])
    line = result.plot_trajectory(metric="prob").axes[0].lines[0]
    assert line.get_ydata().tolist() == pytest.approx(result.target_probs[0, :, 1, 0].tolist())  # position 7
    padded = ll.logit_lens(text_model, ["Paris", "The Eiffel Tower is in"], target=" Paris")
    assert padded.attention_mask[0, 0] == 0
    with pytest.raises(ValueError, match="position 0 of prompt 0 is padding"):
        padded.plot_trajectory(batch_index=0, position=0)
    padded.plot_trajectory(batch_index=1, position=0)  # a real token there


def test_trajectory_and_attribution_plots(text_model):
    result = ll.logit_lens(text_model, "The Eiffel Tower is located in the city of", target=[[" Paris", " of"]])
    fig = result.plot_trajectory()
    prob_ax, rank_ax = fig.axes[:2]
    assert [len(ax.lines) for ax in (prob_ax, rank_ax)] == [2, 2]
    assert prob_ax.get_ylabel() == "probability" and rank_ax.get_yscale() == "log"
    assert [t.get_text() for t in rank_ax.get_xticklabels()] == result.labels
    assert prob_ax.lines[0].get_ydata().tolist() == pytest.approx(result.target_probs[0, :, -1, 0].tolist())
    assert len(result.plot_trajectory(metric="prob").axes) == 1
    with pytest.raises(ValueError, match="was not read out"):
        ll.logit_lens(text_model, "The city of", target=" Paris", positions=0).plot_trajectory(position=-1)

    attribution = ll.direct_logit_attribution(text_model, "The Eiffel Tower is located in the city of", target=" Paris")
    fig = attribution.plot()
    bars, heads = fig.axes[:2]
    assert len(bars.patches) == 1 + 2 * 2  # embed, then attn and mlp per layer
    assert heads.images[0].get_array().shape == (2, 4)
    assert heads.get_xlabel() == "head" and bars.get_ylabel() == "direct contribution to the logit"


def test_lens_module_imports_no_pandas_or_matplotlib():
    code = (
        "import llama_lens as ll, sys; ll.logit_lens; ll.plot; "
        "print(sorted(m for m in ('pandas', 'matplotlib') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


# ----------------------------------------------------------------------------------------------- real model
def test_paris_rises_to_the_top_in_smollm2(demo_path):
    model = ll.load(demo_path, dtype=torch.float32)
    result = ll.logit_lens(model, "The Eiffel Tower is located in the city of", target=" Paris", positions=-1)
    ranks = result.target_ranks[0, :, 0, 0]
    assert result.labels[-1] == "29_post" and ranks[-1] == 0
    assert result.top_strs[0][-1][0][0] == " Paris"
    assert ranks[:20].min() > 100 and (ranks[-4:] < 30).all()  # absent early, rising through the last layers
    attribution = ll.direct_logit_attribution(model, "The Eiffel Tower is located in the city of", target=" Paris")
    assert float(attribution.components.sum()) == pytest.approx(float(attribution.final_logits), abs=1e-3)


@pytest.mark.parametrize("chunk_size", [None, 5])
def test_bfloat16_ranks_count_only_strictly_higher_logits(chunk_size):
    # bfloat16 keeps 8 bits of mantissa, so many tokens share the target's logit exactly: a tie is not "higher".
    model = tiny_model(tiny_config(d_vocab=5000)).to(torch.bfloat16)
    tokens = torch.randint(0, 5000, (2, 6))
    target = [[7, 4000], [2100, 4999]]  # in three different vocabulary blocks, one of them the short last one
    result = ll.logit_lens(model, tokens, target=target, keep_logits=True, chunk_size=chunk_size)
    hooks = ["hook_embed", "blocks.0.hook_resid_post", "blocks.1.hook_resid_post"]
    _, logits = reference_readouts(model, tokens, hooks)
    logits = logits.transpose(0, 1)  # [batch, n_readouts, pos, d_vocab], in bfloat16
    assert logits.dtype == torch.bfloat16
    assert torch.equal(result.logits, logits)  # the same read-outs, rounded the same way
    ids = torch.tensor(target)[:, None, None, :].expand(-1, 3, 6, -1)
    target_logits = logits.gather(-1, ids)  # [batch, 3, pos, n_targets]
    ranks = (logits[..., None, :] > target_logits[..., None]).sum(-1)
    ties = (logits[..., None, :] == target_logits[..., None]).sum(-1) - 1
    assert ties.sum() > 20  # the case at stake: tokens tied with the target
    assert torch.equal(result.target_logits, target_logits.float())
    assert torch.equal(result.target_ranks, ranks)
    assert ranks.max() > 100


def test_entropy_and_kl_stay_accurate_at_large_logits():
    # Logits of about 200, as the embedding read-out of real models reaches: lse and the mean logit are both
    # near 200, and the entropy is their small difference, so float32 rounding of either shows up in it.
    model = tiny_model(tiny_config(d_vocab=9000))
    with torch.no_grad():
        model.unembed.weight.mul_(40 / model.unembed.weight.abs().max())
    tokens = torch.randint(0, 9000, (2, 11))
    result = ll.logit_lens(model, tokens, keep_logits=True)
    logits = result.logits.double()
    assert logits.abs().amax() > 150
    log_probs = logits.log_softmax(-1)
    entropy = -(log_probs.exp() * log_probs).sum(-1)
    kl = (log_probs[:, -1:].exp() * (log_probs[:, -1:] - log_probs)).sum(-1)
    assert entropy.min() < 0.1  # peaked rows: lse and the mean logit nearly cancel
    torch.testing.assert_close(result.entropy.double(), entropy, atol=1e-4, rtol=0)
    torch.testing.assert_close(result.kl_to_final.double(), kl, atol=1e-4, rtol=0)


# ----------------------------------------------------------------------------------------------- the engine alone
@pytest.mark.parametrize("flat", [False, True])
def test_engine_without_a_model_matches_float64(flat, monkeypatch):
    # readout.read_out on bare tensors (no model, no norm): every metric against a float64 computation of
    # the same logits. Blocks of 1000 ids over 2300 (a short tail), chunks of 7 vectors, targets in three blocks.
    monkeypatch.setattr(readout_module, "VOCAB_BLOCK", 1000)
    generator = torch.Generator().manual_seed(3)
    n_rows, n_readouts, d_model, d_vocab, top_k = 5, 3, 32, 2300, 4
    normed = torch.randn(n_rows, n_readouts, d_model, generator=generator)
    weight = torch.randn(d_vocab, d_model, generator=generator)
    final_logits = 4 * torch.randn(n_rows, d_vocab, generator=generator)
    targets = torch.tensor([[0, 1500, 2299]] * n_rows)
    if flat:
        normed = normed[:, 0]
    final, out = readout_module.read_out(normed, weight, final_logits=final_logits, targets=targets, top_k=top_k,
                                         chunk_size=7, keep_logits=True)  # fmt: skip

    logits = normed.double() @ weight.double().T  # [n_rows, (n_readouts,) d_vocab]
    final64 = final_logits.double()
    if not flat:
        final64 = final64[:, None]
    log_probs, final_log_probs = logits.log_softmax(-1), final64.log_softmax(-1)
    top = logits.topk(top_k, dim=-1)
    assert_same_top_k(out.top_ids, out.top_logits.double(), top.values, scores=logits, expected_ids=top.indices,
                      atol=1e-4)  # fmt: skip
    # Probabilities to float32 rounding of the logits (a few 1e-6 at logits near 20): relative, not absolute.
    torch.testing.assert_close(out.top_probs.double(), log_probs.gather(-1, out.top_ids).exp(), atol=1e-7, rtol=2e-5)
    torch.testing.assert_close(out.lse.double(), logits.logsumexp(-1), atol=1e-4, rtol=0)
    entropy = -(log_probs.exp() * log_probs).sum(-1)
    torch.testing.assert_close(out.entropy.double(), entropy, atol=1e-4, rtol=0)
    kl = (final_log_probs.exp() * (final_log_probs - log_probs)).sum(-1)
    torch.testing.assert_close(out.kl.double(), kl, atol=1e-4, rtol=0)
    assert kl.min() > 1e-2  # the read-outs really differ from the final distribution
    ids = targets if flat else targets[:, None].expand(-1, n_readouts, -1)
    torch.testing.assert_close(out.target_logits.double(), logits.gather(-1, ids), atol=1e-4, rtol=0)
    torch.testing.assert_close(out.target_probs.double(), log_probs.gather(-1, ids).exp(), atol=1e-7, rtol=2e-5)
    # A rank by its definition, on the engine's own float32 logits: tokens with a strictly higher logit.
    torch.testing.assert_close(out.logits.double(), logits, atol=1e-4, rtol=0)
    kept = out.logits
    assert torch.equal(out.target_ranks, (kept[..., None, :] > kept.gather(-1, ids)[..., None]).sum(-1))
    # The final distribution's own metrics: KL 0, entropy and top-k from its logits.
    assert torch.equal(final.kl, torch.zeros(n_rows))
    final_probs = final_logits.double().log_softmax(-1)
    torch.testing.assert_close(final.entropy.double(), -(final_probs.exp() * final_probs).sum(-1), atol=1e-4, rtol=0)
    expected = final_logits.topk(top_k, dim=-1)
    assert_same_top_k(final.top_ids, final.top_logits, expected.values, scores=final_logits,
                      expected_ids=expected.indices)  # fmt: skip


def test_engine_refuses_tensors_that_do_not_fit():
    normed, weight, final = torch.randn(4, 2, 8), torch.randn(50, 8), torch.randn(4, 50)
    with pytest.raises(ValueError, match=r"shapes do not fit: normed \(4, 2, 8\)"):
        readout_module.read_out(normed, torch.randn(50, 9), final_logits=final)
    with pytest.raises(ValueError, match=r"final_logits \(3, 50\)"):
        readout_module.read_out(normed, weight, final_logits=final[:3])
    with pytest.raises(ValueError, match=r"targets=\[\[0\], \[1\], \[50\], \[2\]\] is out of range: .* \(0..49\)"):
        readout_module.read_out(normed, weight, final_logits=final, targets=torch.tensor([[0], [1], [50], [2]]))
    with pytest.raises(ValueError, match=r"top_k=51 is out of range: the vocabulary has 50 ids \(1..50\)"):
        readout_module.read_out(normed, weight, final_logits=final, top_k=51)
    with pytest.raises(ValueError, match="chunk_size=0 is out of range: it must be at least 1"):
        readout_module.read_out(normed, weight, final_logits=final, chunk_size=0)


def test_lens_results_are_the_engines_on_normed_residuals():
    # logit_lens = the model's residual streams through ln_final, then the engine: a tuned lens changes the
    # engine's input only.
    model = tiny_model()
    tokens = torch.randint(0, 128, (2, 6))
    result = ll.logit_lens(model, tokens, target=5)
    hooks = ["hook_embed", "blocks.0.hook_resid_post"]
    with torch.no_grad():
        logits, cache = model.run_with_cache(tokens, names_filter=hooks)
        normed = model.ln_final(torch.stack([cache[h] for h in hooks], dim=2)).flatten(0, 1)  # [rows, 2, d_model]
    targets = torch.full((12, 1), 5)
    final, out = readout_module.read_out(
        normed, model.unembed.weight, final_logits=logits.flatten(0, 1), targets=targets
    )
    torch.testing.assert_close(result.entropy[:, :2], out.entropy.unflatten(0, (2, 6)).transpose(1, 2), atol=1e-5,
                               rtol=0)  # fmt: skip
    torch.testing.assert_close(result.kl_to_final[:, :2], out.kl.unflatten(0, (2, 6)).transpose(1, 2), atol=1e-5,
                               rtol=0)  # fmt: skip
    assert torch.equal(result.target_ranks[:, 2], final.target_ranks.unflatten(0, (2, 6)))


# ----------------------------------------------------------------------------------------------- inputs, prepend_bos
def test_results_share_their_inputs(text_model):
    prompt = "The Eiffel Tower is located in the city of"
    lens = ll.logit_lens(text_model, prompt, target=" Paris", positions=[-2, -1])
    dla = ll.direct_logit_attribution(text_model, prompt, target=" Paris", positions=[-2, -1])
    for result in (lens, dla):
        assert isinstance(result.inputs, ll.LensInputs)
        inputs = result.inputs
        assert result.tokens is inputs.tokens and result.positions is inputs.positions
        assert result.attention_mask is inputs.attention_mask and result.str_tokens is inputs.str_tokens
        assert result.target_ids is inputs.target_ids and result.target_strs == [[" Paris"]]
    assert torch.equal(lens.tokens, dla.tokens) and lens.positions == dla.positions
    n = lens.tokens.shape[1]
    assert lens.inputs.column_of(-1) == 1 and lens.inputs.column_of(n - 2) == 0 and lens.inputs.column_of() == 1
    with pytest.raises(ValueError, match=f"position 0 was not read out; this result holds positions \\[{n - 2}, "):
        lens.inputs.column_of(0)


def test_prepend_bos_is_passed_only_when_given(text_model, monkeypatch):
    prompt = "The capital of France is"
    for compute in (ll.logit_lens, lambda *a, **k: ll.direct_logit_attribution(*a, target=" Paris", **k)):
        calls = []
        prepare = text_model.prepare_tokens
        # Texts only: the forward pass also runs ids through prepare_tokens.
        record = lambda p, **k: (calls.append(k) if isinstance(p, str) else None) or prepare(p, **k)
        monkeypatch.setattr(text_model, "prepare_tokens", record)
        with_bos, without = compute(text_model, prompt), compute(text_model, prompt, prepend_bos=False)
        monkeypatch.undo()
        assert calls == [{}, {"prepend_bos": False}]  # None: the model's own default applies
        assert with_bos.str_tokens[0][0] == "<s>" and without.str_tokens[0][0] != "<s>"
        assert without.tokens.tolist() == [with_bos.tokens[0, 1:].tolist()]
    lens = ll.logit_lens(text_model, prompt, target=" Paris", prepend_bos=False)
    ids = text_model.prepare_tokens(prompt, prepend_bos=False)[0]
    same = ll.logit_lens(text_model, ids, target=" Paris")
    assert torch.equal(lens.target_ranks, same.target_ranks)


# ----------------------------------------------------------------------------------------------- renamed keywords
def test_old_plot_keywords_warn_and_give_the_same_figure(text_model):
    prompts = ["The capital of France is", "The Eiffel Tower is located in the city of"]
    result = ll.logit_lens(text_model, prompts, target=[[" Paris", " of"]] * 2)
    new = result.plot("rank", batch_index=1, target_index=1).axes[0].images[0].get_array()
    with (
        pytest.warns(DeprecationWarning, match=r"lens_heatmap\(prompt=...\) is deprecated .* use batch_index="),
        pytest.warns(DeprecationWarning, match=r"lens_heatmap\(target=...\) .* use target_index="),
    ):
        old = result.plot("rank", prompt=1, target=1).axes[0].images[0].get_array()
    np.testing.assert_array_equal(old, new)
    assert "rank of ' of'" in result.plot("rank", batch_index=1, target_index=1).axes[0].get_title()
    with pytest.warns(DeprecationWarning, match=r"lens_trajectory\(prompt=...\) .* use batch_index="):
        old = result.plot_trajectory(prompt=0).axes[0].lines[0].get_ydata()
    np.testing.assert_array_equal(old, result.plot_trajectory(batch_index=0).axes[0].lines[0].get_ydata())
    with pytest.raises(TypeError, match=r"got both prompt= and batch_index=; pass batch_index= only"):
        result.plot(prompt=0, batch_index=0)

    dla = ll.direct_logit_attribution(text_model, prompts, target=[[" Paris", " of"]] * 2)
    new = [p.get_height() for p in dla.plot(batch_index=1, target_index=1).axes[0].patches]
    with (
        pytest.warns(DeprecationWarning, match=r"logit_attribution\(prompt=...\)"),
        pytest.warns(DeprecationWarning, match=r"logit_attribution\(target=...\)"),
    ):
        old = [p.get_height() for p in dla.plot(prompt=1, target=1).axes[0].patches]
    assert old == new and new != [p.get_height() for p in dla.plot(batch_index=1).axes[0].patches]


def test_positions_and_layers_take_any_iterable():
    model = tiny_model(tiny_config(n_layers=3))
    tokens = torch.randint(0, 128, (2, 7))
    expected = ll.logit_lens(model, tokens, positions=[1, 6], layers=[0, 2])
    for positions, layers in [(range(1, 7, 5), range(0, 3, 2)), ((1, -1), (2, 0)), (np.array([1, 6]), {0, 2}),
                              (torch.tensor([1, 6]), np.array([0, 2])), ([1, 6], (i for i in (0, 2, 2)))]:  # fmt: skip
        result = ll.logit_lens(model, tokens, positions=positions, layers=layers)
        assert result.positions == [1, 6] and result.labels == ["embed", "0_post", "2_post"]
        torch.testing.assert_close(result.entropy, expected.entropy, atol=1e-6, rtol=0)
    dla = ll.direct_logit_attribution(model, tokens, target=3, positions=range(1, 7, 5))
    assert dla.positions == [1, 6]
    assert ll.direct_logit_attribution(model, tokens, target=3).positions == [6]  # default: the last position
    assert ll.direct_logit_attribution(model, tokens, target=3, positions=None).positions == list(range(7))
    with pytest.raises(ValueError, match=r"layers must hold ints, got 1.0"):
        ll.logit_lens(model, tokens, layers=[1.0])
    with pytest.raises(ValueError, match=r"layers=range\(2, 5\) is out of range: layers \[3, 4\] are not loaded; "
                                         r"this model holds layers \(0..2\)"):  # fmt: skip
        ll.logit_lens(model, tokens, layers=range(2, 5))


@pytest.mark.parametrize("vectorized", [True, False])  # exp2 or exp for the shifted blocks
@pytest.mark.parametrize("scale", [1.0, 40.0])  # logits within EXP_SAFE_MAX (unshifted exp), and far beyond it
def test_read_out_metrics_match_softmax_whether_or_not_the_block_is_shifted(scale, vectorized, monkeypatch):
    monkeypatch.setattr(readout_online, "_exp2_is_vectorized", lambda: vectorized)
    # Rows mixing small logits, logits far past e^64 and rows far below zero: every block's logsumexp, entropy
    # and KL equal what torch's log_softmax gives over the whole row.
    generator = torch.Generator().manual_seed(0)
    n_rows, n_readouts, d_model, d_vocab = 6, 3, 32, 3000
    weight = torch.randn(d_vocab, d_model, generator=generator)
    normed = torch.randn(n_rows, n_readouts, d_model, generator=generator) * scale / d_model**0.5
    normed[0] *= 10  # maxima of several hundred
    final_logits = torch.randn(n_rows, d_vocab, generator=generator) * scale
    final_logits[2] -= 500.0  # every logit of a row far below zero
    final, readouts = readout_module.read_out(normed, weight, final_logits=final_logits, top_k=3)
    logits = normed @ weight.T  # [n_rows, n_readouts, d_vocab]
    log_p = final_logits.log_softmax(-1)
    log_q = logits.log_softmax(-1)
    torch.testing.assert_close(final.lse, final_logits.logsumexp(-1))
    torch.testing.assert_close(readouts.lse, logits.logsumexp(-1), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(final.entropy, -(log_p.exp() * log_p).sum(-1), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(readouts.entropy, -(log_q.exp() * log_q).sum(-1), rtol=1e-4, atol=2e-4)
    kl = (log_p.exp()[:, None] * (log_p[:, None] - log_q)).sum(-1)
    torch.testing.assert_close(readouts.kl, kl, rtol=1e-4, atol=2e-3 * scale)
    assert torch.equal(readouts.top_logits, logits.topk(3, dim=-1).values)
