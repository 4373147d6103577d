import math

import matplotlib
import numpy as np
import pytest
import torch
from support.models import run_patterns

from llama_lens.model.hooks import ActivationCache
from llama_lens.viz import attention as pa

matplotlib.use("Agg")

TEXT = "hello world"  # BOS + 11 characters = 12 positions


@pytest.fixture(scope="module")
def model(char_model):
    return char_model()


@pytest.fixture(scope="module")
def output(model):
    return run_patterns(model, TEXT)


@pytest.fixture(scope="module")
def tokens(model):
    return model.to_str_tokens(TEXT)


def _image(fig, index=0):
    return fig.axes[index].images[0].get_array()


def _tick_texts(ax, axis):
    return [t.get_text() for t in getattr(ax, f"get_{axis}ticklabels")()]


def synthetic_pattern(pos=8, n_heads=4):
    """[1, n_heads, pos, pos]: head 0 all on BOS, head 1 on the previous token, head 2 on itself, head 3 uniform."""
    pattern = torch.zeros(1, n_heads, pos, pos)
    for q in range(pos):
        pattern[0, 0, q, 0] = 1
        pattern[0, 1, q, max(q - 1, 0)] = 1
        pattern[0, 2, q, q] = 1
        pattern[0, 3, q, : q + 1] = 1 / (q + 1)
    return pattern


# ------------------------------------------------------------------------------------------ attention()
def test_one_head_shows_that_heads_pattern_with_token_labels(output, tokens):
    _, cache = output
    fig = pa.attention(cache, 1, 2, tokens=tokens)
    ax = fig.axes[0]
    expected = cache["blocks.1.attn.hook_pattern"][0, 2].numpy()
    np.testing.assert_allclose(_image(fig), expected, rtol=1e-6)
    assert ax.get_title() == "layer 1, head 2: attention pattern"
    assert ax.get_xlabel() == "key position (attended to)"
    assert ax.get_ylabel() == "query position (attending)"
    assert _tick_texts(ax, "x") == [pa.token_label(t) for t in tokens]
    assert _tick_texts(ax, "y") == [pa.token_label(t) for t in tokens]
    assert _tick_texts(ax, "x")[:2] == ["<s>", "h"]


def test_accepts_cache_dict_and_run_with_cache_pair(output):
    logits, cache = output
    images = [_image(pa.attention(source, 0, 1)) for source in (cache, (logits, cache), dict(cache.items()))]
    for image in images[1:]:
        np.testing.assert_array_equal(image, images[0])


def test_head_none_draws_every_head(output, tokens):
    _, cache = output
    fig = pa.attention(cache, 0, tokens=tokens)
    panels = [ax for ax in fig.axes if ax.images and ax.get_title().startswith("head")]
    assert [ax.get_title() for ax in panels] == [f"head {h}" for h in range(4)]
    for h, ax in enumerate(panels):
        expected = cache["blocks.0.attn.hook_pattern"][0, h].numpy()
        np.testing.assert_allclose(ax.images[0].get_array(), expected, rtol=1e-6)
    assert "layer 0" in fig._suptitle.get_text()


def test_scores_leave_masked_cells_blank(output):
    _, cache = output
    fig = pa.attention(cache, 1, 0, scores=True)
    image = _image(fig)
    scores = cache["blocks.1.attn.hook_attn_scores"][0, 0].numpy()
    masked = np.ma.getmaskarray(np.ma.masked_invalid(image))
    np.testing.assert_array_equal(masked, np.triu(np.ones_like(scores, dtype=bool), k=1))
    np.testing.assert_allclose(image[~masked], scores[~masked], rtol=1e-6)
    assert "scores" in fig.axes[0].get_title()


def test_batch_prompt_index_picks_the_prompt(model):
    _, cache = run_patterns(model, ["ab", "xyz"])
    fig = pa.attention(cache, 0, 0, batch_index=1)
    np.testing.assert_allclose(_image(fig), cache["blocks.0.attn.hook_pattern"][1, 0].numpy(), rtol=1e-6)
    assert "prompt 1" in fig.axes[0].get_title()


def test_long_prompt_is_one_image_with_thinned_labels(model):
    text = "the quick brown fox jumps over the lazy dog; " * 12  # 541 positions with BOS
    _, cache = run_patterns(model, text)
    tokens = model.to_str_tokens(text)
    fig = pa.attention(cache, 1, 0, tokens=tokens)
    ax = fig.axes[0]
    assert _image(fig).shape == (len(tokens), len(tokens))
    assert len(ax.texts) == 0  # no text per cell
    labels = _tick_texts(ax, "x")
    assert 20 <= len(labels) <= pa.MAX_LABELS
    step = math.ceil(len(tokens) / pa.MAX_LABELS)
    assert labels[1] == f"{step} {pa.token_label(tokens[step])}"  # thinned labels carry their position

    grid = pa.attention(cache, 1, tokens=tokens)
    assert all(len(_tick_texts(a, "y")) <= 12 for a in grid.axes if a.images)


def test_max_positions_and_top_k_crop():
    pattern = synthetic_pattern(pos=30)
    pattern[0, 3] = 0
    pattern[0, 3, :, 0] = 0.5  # head 3 splits its attention between BOS and position 4 (when it can see it)
    pattern[0, 3, 4:, 4] = 0.5
    cache = {"blocks.0.attn.hook_pattern": pattern}
    fig = pa.attention(cache, 0, 3, max_positions=10)
    assert _image(fig).shape == (10, 10)
    assert _tick_texts(fig.axes[0], "y")[0] == "20"

    fig = pa.attention(cache, 0, 3, max_positions=10, top_k=2)
    assert _image(fig).shape == (10, 2)
    assert _tick_texts(fig.axes[0], "x") == ["0", "4"]
    np.testing.assert_allclose(_image(fig), np.full((10, 2), 0.5))

    with pytest.raises(ValueError, match="max_positions"):
        pa.attention(cache, 0, 3, max_positions=0)


def test_query_row_and_key_cell_are_outlined(output):
    _, cache = output
    fig = pa.attention(cache, 0, 0, query=5, key=2)
    outlines = [(p.get_xy(), p.get_width(), p.get_height()) for p in fig.axes[0].patches]
    assert ((-0.5, 4.5), 12, 1) in outlines
    assert ((1.5, 4.5), 1, 1) in outlines
    with pytest.raises(ValueError, match="query 2 is not drawn"):
        pa.attention(cache, 0, 0, query=2, max_positions=4)


def test_indices_take_numpy_ints_and_count_from_the_end(output):
    # What top_heads' DataFrame hands back: numpy integers.
    _, cache = output
    fig = pa.attention(cache, 0, np.int64(3), query=np.int64(-1), key=-12)
    expected = pa.attention(cache, 0, 3, query=11, key=0)
    assert fig.axes[0].get_title() == expected.axes[0].get_title()
    assert [(p.get_xy(), p.get_width()) for p in fig.axes[0].patches] == [
        (p.get_xy(), p.get_width()) for p in expected.axes[0].patches
    ]
    np.testing.assert_array_equal(fig.axes[0].images[0].get_array(), expected.axes[0].images[0].get_array())
    with pytest.raises(ValueError, match="head must be an integer, got 1.5"):
        pa.attention(cache, 0, 1.5)


def test_user_mistakes_name_the_problem(output, tokens):
    logits, cache = output
    with pytest.raises(KeyError, match=r"layers \[0, 1\]"):
        pa.attention(cache, 5)
    empty = ActivationCache({"blocks.0.hook_resid_post": torch.zeros(1, 2, 64)}, [0])
    with pytest.raises(KeyError, match="names_filter"):
        pa.attention(empty, 0)
    with pytest.raises(ValueError, match="head=4 is out of range"):
        pa.attention(cache, 0, 4)
    with pytest.raises(ValueError, match="batch_index=1 is out of range"):
        pa.attention(cache, 0, 0, batch_index=1)
    with pytest.raises(ValueError, match="3 entries but the pattern covers 12"):
        pa.attention(cache, 0, 0, tokens=tokens[:3])
    with pytest.raises(ValueError, match="to_str_tokens"):
        pa.attention(cache, 0, 0, tokens="hello world")
    with pytest.raises(ValueError, match="ActivationCache"):
        pa.attention(logits, 0)


def test_token_labels_are_one_line_visible_and_not_mathtext():
    assert pa.token_label("a\nb\tc") == "a↵b⇥c"
    assert pa.token_label("   ") == "···" and pa.token_label(" the") == "·the"  # as the lens plots write them
    assert pa.token_label("$x$") == r"\$x\$"
    assert pa.token_label("x" * 30, width=10) == "x" * 9 + "…"


def test_figures_stay_out_of_pyplot(output):
    import matplotlib.pyplot as plt

    before = plt.get_fignums()
    pa.attention(output[1], 0, 0)
    pa.attention_summary(output[1])
    assert plt.get_fignums() == before


# ------------------------------------------------------------------------------------------ head statistics
def test_head_statistics_on_known_patterns():
    pos = 8
    cache = {
        "blocks.0.attn.hook_pattern": synthetic_pattern(pos),
        "blocks.1.attn.hook_pattern": synthetic_pattern(pos).flip(1),  # the same heads in reverse order
    }
    queries = range(1, pos)  # query 0 has no choice to make
    uniform_bos = sum(1 / (q + 1) for q in queries) / len(queries)
    uniform_entropy = sum(math.log(q + 1) for q in queries) / len(queries)

    bos = pa.head_statistics(cache, "bos")
    assert bos.shape == (2, 4)
    torch.testing.assert_close(bos[0], torch.tensor([1.0, 1 / 7, 0.0, uniform_bos]))  # prev hits BOS from query 1
    torch.testing.assert_close(bos[1], bos[0].flip(0))
    torch.testing.assert_close(pa.head_statistics(cache, "prev")[0], torch.tensor([1 / 7, 1.0, 0.0, uniform_bos]))
    torch.testing.assert_close(pa.head_statistics(cache, "self")[0], torch.tensor([0.0, 0.0, 1.0, uniform_bos]))
    torch.testing.assert_close(pa.head_statistics(cache, "entropy")[0], torch.tensor([0.0, 0.0, 0.0, uniform_entropy]))


def test_induction_score_finds_the_induction_head():
    period, pos = 5, 1 + 3 * 5  # BOS, then a block of 5 repeated three times
    pattern = synthetic_pattern(pos)
    for q in range(period + 1, pos):
        pattern[0, 2, q] = 0
        pattern[0, 2, q, q - period + 1] = 1  # the token after the previous copy of this one
    cache = {"blocks.0.attn.hook_pattern": pattern}
    scores = pa.head_statistics(cache, "induction", period=period)
    assert scores[0, 2] == 1.0
    assert scores[0, 0] == 0.0 and scores[0, 1] == 0.0
    with pytest.raises(ValueError, match="period="):
        pa.head_statistics(cache, "induction")
    with pytest.raises(ValueError, match="two copies"):
        pa.head_statistics(cache, "induction", period=20)


def test_attention_mask_counts_padded_prompts_from_their_own_bos():
    pos, pad = 8, 3
    padded = torch.zeros(1, 4, pos, pos)
    padded[0, :, :pad] = torch.eye(pos)[:pad]  # padding queries see themselves only
    padded[0, :, pad:, pad:] = synthetic_pattern(pos - pad)[0]
    pattern = torch.cat([synthetic_pattern(pos), padded])
    mask = torch.ones(2, pos, dtype=torch.long)
    mask[1, :pad] = 0
    cache = {"blocks.0.attn.hook_pattern": pattern}
    bos = pa.head_statistics(cache, "bos", attention_mask=mask, batch_index=1)
    assert bos[0, 0] == 1.0  # attends to its BOS at position 3, not position 0
    assert pa.head_statistics(cache, "self", attention_mask=mask, batch_index=1)[0, 2] == 1.0
    with pytest.raises(ValueError, match="attention_mask must be"):
        pa.head_statistics(cache, "bos", attention_mask=mask[:, 1:])


def test_custom_stat_and_unknown_stat():
    cache = {"blocks.0.attn.hook_pattern": synthetic_pattern()}
    last_column = pa.head_statistics(cache, lambda p: p[..., -1, -1].mean(dim=0))
    torch.testing.assert_close(last_column[0], torch.tensor([0.0, 0.0, 1.0, 1 / 8]))
    with pytest.raises(ValueError, match=r"return \[n_heads=4\]"):
        pa.head_statistics(cache, lambda p: p.sum())
    with pytest.raises(ValueError, match="unknown stat 'bose'"):
        pa.head_statistics(cache, "bose")


def test_summary_figure_and_top_heads_use_absolute_layers():
    cache = {
        "blocks.3.attn.hook_pattern": synthetic_pattern(),
        "blocks.5.attn.hook_pattern": synthetic_pattern().flip(1),
    }
    fig = pa.attention_summary(cache, "prev")
    ax = fig.axes[0]
    np.testing.assert_allclose(_image(fig), pa.head_statistics(cache, "prev").numpy())
    assert _tick_texts(ax, "y") == ["3", "5"]
    assert (ax.get_xlabel(), ax.get_ylabel()) == ("head", "layer")
    assert ax.get_title() == pa.HEAD_STATS["prev"]
    assert len(ax.texts) == 8  # one value per cell

    top = pa.top_heads(cache, "prev", k=2)
    assert list(top.columns) == ["layer", "head", "prev"]
    assert top[["layer", "head"]].values.tolist() == [[3, 1], [5, 2]]


def test_summary_of_a_model_cache(output):
    fig = pa.attention_summary(output, "entropy")
    assert _image(fig).shape == (2, 4)
    assert (_image(fig) > 0).all()


def test_padding_is_left_out_with_the_attention_mask(model):
    tokens, mask = model.prepare_tokens(["hi", TEXT])  # "hi" is left-padded to 12 positions
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens, attention_mask=mask)
    n_real = int(mask[0].sum())
    assert n_real == 3 and tokens.shape[1] == 12
    fig = pa.attention(cache, 0, 1, batch_index=0, attention_mask=mask, tokens=model.to_str_tokens(tokens[0]))
    image = _image(fig)
    assert image.shape == (n_real, n_real)  # no padding rows or columns
    np.testing.assert_allclose(image.sum(axis=1), 1.0, rtol=1e-5)  # each real query's weights, all of them
    assert _tick_texts(fig.axes[0], "x")[0].endswith("<s>")
    assert _image(pa.attention(cache, 0, 1, batch_index=0, attention_mask=mask, top_k=2)).shape == (n_real, 2)
    assert _image(pa.attention(cache, 0, 1, batch_index=1, attention_mask=mask)).shape == (12, 12)
    with pytest.raises(ValueError, match="query 0 is padding in prompt 0"):
        pa.attention(cache, 0, 1, batch_index=0, attention_mask=mask, query=0)
    with pytest.raises(ValueError, match=r"attention_mask must be \[batch=2, pos=12\]"):
        pa.attention(cache, 0, 1, attention_mask=mask[:, 1:])


# ------------------------------------------------------------------------------------------ renamed keywords
def test_old_prompt_keyword_warns_and_gives_the_same_result():
    # batch_index= is which prompt of the batch; prompt= (its old name) works for one release, with a warning.
    pattern = torch.cat([synthetic_pattern(), synthetic_pattern().roll(1, dims=1)])  # two prompts, heads rotated
    cache = {"blocks.0.attn.hook_pattern": pattern}
    new = _image(pa.attention(cache, 0, 1, batch_index=1))
    with pytest.warns(DeprecationWarning, match=r"attention\(prompt=...\) is deprecated .* use batch_index="):
        old = _image(pa.attention(cache, 0, 1, prompt=1))
    np.testing.assert_array_equal(old, new)
    assert not np.array_equal(new, _image(pa.attention(cache, 0, 1, batch_index=0)))
    stats = pa.head_statistics(cache, "bos", batch_index=1)
    assert stats.shape == (1, 4)
    assert stats[0, 1] == 1.0 and pa.head_statistics(cache, "bos", batch_index=0)[0, 1] < 0.5  # rotated heads
    with pytest.warns(DeprecationWarning, match=r"head_statistics\(prompt=...\)"):
        assert torch.equal(pa.head_statistics(cache, "bos", prompt=1), stats)
    with pytest.warns(DeprecationWarning, match=r"attention_summary\(prompt=...\)"):
        old = _image(pa.attention_summary(cache, "bos", prompt=1))
    np.testing.assert_array_equal(old, _image(pa.attention_summary(cache, "bos", batch_index=1)))
    with pytest.warns(DeprecationWarning, match=r"top_heads\(prompt=...\)"):
        old = pa.top_heads(cache, "bos", k=2, prompt=1)
    assert old.equals(pa.top_heads(cache, "bos", k=2, batch_index=1)) and old["head"].tolist()[0] == 1
    with pytest.raises(TypeError, match="got both prompt= and batch_index="):
        pa.attention(cache, 0, 1, prompt=1, batch_index=1)
