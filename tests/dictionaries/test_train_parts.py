"""The parts of dictionary training, each against a plain restatement: the TopK step's sparse gradients, the
schedule-free Signum optimiser, the batches read from the store, and the token rows cut from texts."""

import pytest
import torch
import torch.nn.functional as F
from support.models import CharTokenizer, tiny_config, tiny_model

from llama_lens.data.token_rows import token_rows
from llama_lens.dictionaries.train_coder import SparseCoder, decode_sparse
from llama_lens.dictionaries.train_data import StoreBatches, collect_activations
from llama_lens.dictionaries.train_optim import ScheduleFreeSignum

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.mark.parametrize(("d_in", "apply_b_dec_to_input"), [(9, True), (12, False)])  # an SAE, a transcoder
def test_topk_sparse_gradients_match_dense_autograd(d_in, apply_b_dec_to_input):
    torch.manual_seed(0)
    coder = SparseCoder(d_in, 40, 9, k=5, apply_b_dec_to_input=apply_b_dec_to_input)
    with torch.no_grad():
        for p in coder.parameters():
            p.copy_(torch.randn_like(p) * 0.5)
    x, y = torch.randn(30, d_in), torch.randn(30, 9)
    values, indices = coder.encode_sparse(x)
    loss = (y - decode_sparse(values, indices, coder.W_dec) - coder.b_dec).pow(2).sum()
    loss.backward()
    sparse_grads = {name: p.grad.clone() for name, p in coder.named_parameters()}

    coder.zero_grad()
    # Dense restatement: every latent's pre-activation, the top k kept (ReLU'd), the rest zero.
    sae_in = x - coder.b_dec if apply_b_dec_to_input else x
    pre = sae_in @ coder.W_in.T + coder.b_enc
    keep = torch.zeros_like(pre).scatter(-1, pre.topk(5, dim=-1).indices, 1.0)
    acts = F.relu(pre) * keep
    torch.testing.assert_close(torch.zeros_like(pre).scatter(-1, indices, values), acts.detach())
    (y - acts @ coder.W_dec - coder.b_dec).pow(2).sum().backward()
    for name, p in coder.named_parameters():
        torch.testing.assert_close(sparse_grads[name], p.grad, atol=1e-4, rtol=1e-5, msg=name)


def test_schedule_free_signum_matches_its_definition():
    """Defazio et al.'s schedule-free iteration around sign descent, as schedulefree's wrapper computes it:
    y = (1 - m) z + m x; z <- z - lr sign(grad f(y)); x <- (1 - c) x + c z with c = 1 / (t + 1)."""
    torch.manual_seed(0)
    target = torch.randn(7)
    param = torch.nn.Parameter(torch.randn(7))
    optimizer = ScheduleFreeSignum([param], ["p"], lr=0.05, momentum=0.9)
    x = z = param.detach().clone()
    for t in range(25):
        param.grad = None
        (param - target).pow(2).sum().backward()
        optimizer.step()
        y = (1 - 0.9) * z + 0.9 * x
        z = z - 0.05 * torch.sign(2 * (y - target))
        x = (1 - 1 / (t + 1)) * x + 1 / (t + 1) * z
        torch.testing.assert_close(param.detach(), (1 - 0.9) * z + 0.9 * x, atol=1e-6, rtol=0)
    torch.testing.assert_close(optimizer.averaged()["p"], x, atol=1e-6, rtol=0)
    # the state round-trips through named tensors
    other = ScheduleFreeSignum([torch.nn.Parameter(param.detach().clone())], ["p"], lr=0.05, momentum=0.9)
    other.load_state_tensors(optimizer.state_tensors())
    torch.testing.assert_close(other.averaged()["p"], x, atol=1e-6, rtol=0)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    model = tiny_model(tiny_config(n_layers=1), seed=2)
    tokens = torch.randint(3, 128, (10, 16), generator=torch.Generator().manual_seed(1))
    return collect_activations(
        model, tokens, hook_names=["blocks.0.hook_resid_post", "blocks.0.attn.hook_z"],
        folder=tmp_path_factory.mktemp("store"), batch_rows=3, progress=False,
    )  # fmt: skip


def test_unshuffled_batches_are_the_store_in_order(store):
    batches = StoreBatches(store, hook_in="blocks.0.attn.hook_z", hook_out="blocks.0.hook_resid_post",
                           batch_tokens=48, shuffle=False, buffer_tokens=96, seed=0)  # fmt: skip
    every_x = torch.cat([store[i]["blocks.0.attn.hook_z"].flatten(1) for i in range(len(store))])
    every_y = torch.cat([store[i]["blocks.0.hook_resid_post"] for i in range(len(store))])
    assert (batches.steps_per_epoch, batches.d_in, batches.d_out) == (3, 64, 64)  # 160 tokens: 3 whole steps
    for step in range(4):
        x, y = batches.batch(step)
        rows = slice(48 * (step % 3), 48 * (step % 3) + 48)  # step 3 starts the next pass
        assert torch.equal(x, every_x[rows]) and torch.equal(y, every_y[rows])


def test_shuffled_batches_cover_each_pass_once_and_repeat_by_seed(store):
    def batches(seed):
        return StoreBatches(store, hook_in="blocks.0.hook_resid_post", hook_out="blocks.0.hook_resid_post",
                            batch_tokens=16, shuffle=True, buffer_tokens=64, seed=seed)  # fmt: skip

    a, b, c = batches(0), batches(0), batches(1)
    every = torch.cat([store[i]["blocks.0.hook_resid_post"] for i in range(len(store))])
    first_pass = torch.cat([a.batch(step)[0] for step in range(10)])
    assert torch.equal(first_pass.sort(0).values, every.sort(0).values)  # each token once
    assert not torch.equal(first_pass, every)  # ... in another order
    # a step's batch depends on the step alone, read in any order
    assert all(torch.equal(a.batch(step)[0], b.batch(step)[0]) for step in (7, 2, 13, 0))
    assert not torch.equal(a.batch(2)[0], c.batch(2)[0])
    assert not torch.equal(a.batch(2)[0], a.batch(12)[0])  # the second pass draws again


def test_collect_reuses_a_store_of_the_same_tokens(tmp_path, monkeypatch):
    model = tiny_model(tiny_config(n_layers=1), seed=2)
    tokens = torch.randint(3, 128, (4, 8), generator=torch.Generator().manual_seed(1))
    collect_activations(model, tokens, hook_names=["blocks.0.hook_resid_post"], folder=tmp_path, progress=False)
    monkeypatch.setattr(type(model), "forward", lambda *a, **k: pytest.fail("collected again"))
    again = collect_activations(model, tokens, hook_names=["blocks.0.hook_resid_post"], folder=tmp_path,
                                progress=False)  # fmt: skip
    assert len(again) == 4
    monkeypatch.undo()
    other = tokens.clone()
    other[0, 1] += 1
    changed = collect_activations(model, other, hook_names=["blocks.0.hook_resid_post"], folder=tmp_path,
                                  progress=False)  # fmt: skip
    _, cache = model.run_with_cache(other[:1], names_filter="blocks.0.hook_resid_post")
    torch.testing.assert_close(changed[0]["blocks.0.hook_resid_post"], cache["blocks.0.hook_resid_post"][0])


def test_token_rows_cuts_rows_that_start_with_bos():
    tokenizer = CharTokenizer()
    rows = token_rows(tokenizer, ["abcdefghij", "klmnopq", "rstuvwxyz" * 3], seq_len=8)
    assert rows.shape[1] == 8 and bool((rows[:, 0] == tokenizer.bos_id).all())
    stream = [i for text in ["abcdefghij", "klmnopq", "rstuvwxyz" * 3] for i in tokenizer.encode(text, bos=True)]
    body = [i for row in rows.tolist() for i in row]
    # the rows are the stream in order, a BOS put in front of any row that starts inside a text
    assert [i for i in body if i != tokenizer.bos_id] == [i for i in stream if i != tokenizer.bos_id][
        : len([i for i in body if i != tokenizer.bos_id])
    ]
    with pytest.raises(ValueError, match="fewer than seq_len=64"):
        token_rows(tokenizer, ["ab"], seq_len=64)
