"""Exactness of attribution graphs on a tiny random Llama (GQA, 4 layers) in float64, with random per-layer
transcoders (ReLU, JumpReLU, TopK; with and without skip) and a random cross-layer transcoder (ReLU, JumpReLU;
circuit-tracer's CLTs have no skip), whose features write every layer from their own up:

- each feature and logit node's incoming edges plus its constant term sum to its value in the clean run;
- every edge equals the direct effect computed by `torch.autograd.functional.jacobian` through the model
  itself, run with hooks that freeze its patterns and norm scales and replace each MLP output by the
  transcoder's skip, bias and fixed sources: an oracle that shares no code with the graph's transposed pass;
- both hold for the model saved to disk and streamed (`ll.load(path, stream=True)`), whose graph is the one of
  the model in memory.
"""

import pytest
import torch
from random_transcoders import random_clt, random_transcoders
from support.models import tiny_config, tiny_model

import llama_lens as ll
from llama_lens.testing import write_hf_checkpoint

pytestmark = pytest.mark.usefixtures("one_torch_thread")

N_LAYERS = 4
KINDS = [("relu", False), ("relu", True), ("jumprelu", False), ("jumprelu", True), ("topk", False), ("topk", True)]
CLT_KINDS = [("clt-relu", False), ("clt-threshold", False)]


class PerLayerMath:
    """The test's own statement of what per-layer transcoders compute, for the oracle and the expected edges."""

    def __init__(self, transcoders):
        self.transcoders = transcoders

    def pre(self, layer, x):
        return self.transcoders[layer].encode_pre(x)[1]

    def acts(self, layer, x):
        return self.transcoders[layer].encode(x)

    def fixed_out(self, layer, x):
        """What the MLP output holds besides the features' writes and the error: b_dec and the skip."""
        dictionary = self.transcoders[layer]
        out = dictionary.param("b_dec")
        return out + x @ dictionary.param("W_skip").T if dictionary.has_skip else out + 0 * x

    def writes(self, layer, feature, act):
        """{output layer: the vector written there} by feature `feature` of `layer` with activation `act`."""
        return {layer: act * self.transcoders[layer].W_dec[feature]}

    def written(self, acts):
        """Every layer's features' writes [n_layers, pos, d_model] from the activations of every layer."""
        return torch.stack([a @ dictionary.W_dec for a, dictionary in zip(acts, self.transcoders, strict=True)])


class CrossLayerMath:
    """The same for a cross-layer transcoder: features of layer i write layers i..n_layers-1."""

    def __init__(self, clt):
        self.clt = clt

    def pre(self, layer, x):
        return self.clt.encode_pre(x, layer)

    def acts(self, layer, x):
        return self.clt.encode_layer(x, layer)

    def fixed_out(self, layer, x):
        return self.clt.param(layer, "b_dec") + 0 * x

    def writes(self, layer, feature, act):
        rows = self.clt.W_dec(layer)[feature]  # [n_layers - layer, d_model]
        return {layer + offset: act * rows[offset] for offset in range(len(rows))}

    def written(self, acts):
        n = self.clt.n_layers
        return torch.stack(
            [sum(acts[i] @ self.clt.W_dec(i)[:, j - i] for i in range(j + 1)) for j in range(n)]  # type: ignore[misc]
        )


def _setup(activation, skip, seed=0):
    cfg = tiny_config(n_layers=N_LAYERS)  # 4 heads over 2 KV heads: GQA
    model = tiny_model(cfg, seed=seed).to(torch.float64)
    tokens = torch.randint(3, cfg.d_vocab, (7,), generator=torch.Generator().manual_seed(seed))
    if activation.startswith("clt-"):
        clt = random_clt(cfg.d_model, N_LAYERS, activation=activation.removeprefix("clt-"), seed=seed)
        return model, clt, CrossLayerMath(clt), tokens
    transcoders = random_transcoders(cfg.d_model, N_LAYERS, activation=activation, skip=skip, seed=seed)
    return model, transcoders, PerLayerMath(transcoders), tokens


def _oracle(model, math, tokens, graph):
    """f(embed [pos, d_model], sources [n_layers, pos, d_model]) -> (every active feature's pre-activation,
    the demeaned logits of the graph's logit nodes), through the hooked model with its frozen pieces."""
    frozen_names = lambda name: name.endswith(("hook_scale", "hook_pattern", "mlp.hook_in", "hook_mlp_out"))  # noqa: E731
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens, names_filter=lambda n: frozen_names(n) or n == "hook_embed")
    active = graph.active_features.tolist()

    def run(embed, sources):
        mlp_in = {}
        resid_in = {}

        def keep(tensor, hook):
            return cache[hook.name]

        def capture_in(tensor, hook):
            mlp_in[hook.name] = tensor

        def normalized(tensor, hook):
            # The norm's input over its frozen scale, recomputed so the gradient flows through the input only.
            return resid_in[hook.name] / cache[hook.name.replace("hook_normalized", "hook_scale")]

        def capture_resid(name):
            def fn(tensor, hook):
                resid_in[name] = tensor

            return fn

        def mlp_out(tensor, hook):
            layer = int(hook.name.split(".")[1])
            return math.fixed_out(layer, mlp_in[f"blocks.{layer}.mlp.hook_in"]) + sources[layer][None]

        hooks = [("hook_embed", lambda t, hook: embed[None])]
        last = f"blocks.{N_LAYERS - 1}.hook_resid_post"
        for layer in range(N_LAYERS):
            block = f"blocks.{layer}"
            hooks += [
                (f"{block}.hook_resid_pre", capture_resid(f"{block}.ln1.hook_normalized")),
                (f"{block}.hook_resid_mid", capture_resid(f"{block}.ln2.hook_normalized")),
                (f"{block}.ln1.hook_scale", keep),
                (f"{block}.ln2.hook_scale", keep),
                (f"{block}.ln1.hook_normalized", normalized),
                (f"{block}.ln2.hook_normalized", normalized),
                (f"{block}.attn.hook_pattern", keep),
                (f"{block}.mlp.hook_in", capture_in),
                (f"{block}.hook_mlp_out", mlp_out),
            ]
        hooks += [
            (last, capture_resid("ln_final.hook_normalized")),
            ("ln_final.hook_scale", keep),
            ("ln_final.hook_normalized", normalized),
        ]
        with model.hooks(fwd_hooks=hooks):
            logits = model(tokens[None])[0, -1]
        x = torch.stack([mlp_in[f"blocks.{i}.mlp.hook_in"][0] for i in range(N_LAYERS)])  # [n_layers, pos, d_model]
        pre = [math.pre(layer, x[layer, pos])[feature] for layer, pos, feature in active]
        return torch.stack(pre), (logits - logits.mean())[graph.logit_tokens]

    return run, cache


@pytest.mark.parametrize(("activation", "skip"), KINDS + CLT_KINDS)
def test_edges_and_constants_sum_to_each_node_value(activation, skip):
    model, transcoders, math, tokens = _setup(activation, skip)
    graph = ll.attribution_graph(model, tokens, transcoders, batch_size=16)
    assert graph.n_features > 20 and graph.n_logits >= 2
    rows = torch.cat([torch.arange(graph.n_features), torch.arange(graph.n_nodes - graph.n_logits, graph.n_nodes)])
    edges = graph.adjacency[rows]
    total = edges.sum(1) + graph.node_constants[rows]
    scale = edges.abs().sum(1) + graph.node_constants[rows].abs()
    assert ((total - graph.node_values).abs() <= 1e-10 * scale).all()
    # node_values are the clean run's own numbers: the transcoders' pre-activations...
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens, names_filter=lambda n: n.endswith("mlp.hook_in"))
    for node, (layer, pos, feature) in enumerate(graph.active_features[graph.selected_features].tolist()):
        pre = math.pre(layer, cache[f"blocks.{layer}.mlp.hook_in"][0, pos])[feature]
        assert graph.node_values[node] == pytest.approx(float(pre), rel=1e-12, abs=1e-12)
    # ...and the demeaned logits.
    logits = model(tokens[None])[0, -1].detach()
    expected = (logits - logits.mean())[graph.logit_tokens]
    torch.testing.assert_close(graph.node_values[graph.n_features :], expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(
    ("activation", "skip"),
    [("relu", True), ("jumprelu", False), ("topk", True), ("clt-relu", False), ("clt-threshold", False)],
)
def test_every_edge_is_the_jacobians_direct_effect(activation, skip):
    model, transcoders, math, tokens = _setup(activation, skip, seed=1)
    _assert_edges_are_the_jacobians(model, transcoders, math, tokens)


def _streamed(model, folder):
    """`model` saved as a Hugging Face checkpoint in `folder` (float64) and loaded back with stream=True."""
    path = write_hf_checkpoint(folder, model.cfg, {k: v.detach() for k, v in model.state_dict().items()}, shards=2)
    return ll.load(path, stream=True, dtype=torch.float64, progress=False, index_cache=False)


def test_a_streamed_model_gives_the_graph_of_the_model_in_memory(tmp_path):
    model, transcoders, math, tokens = _setup("relu", True, seed=1)
    streamed = _streamed(model, tmp_path / "hf")
    assert all(param.is_meta for param in streamed.blocks.parameters())
    held = ll.attribution_graph(model, tokens, transcoders, batch_size=8, max_feature_nodes=40)
    graph = _assert_edges_are_the_jacobians(streamed, transcoders, math, tokens)
    assert torch.equal(graph.selected_features, held.selected_features)
    torch.testing.assert_close(graph.adjacency, held.adjacency, rtol=0, atol=1e-12)
    torch.testing.assert_close(graph.node_constants, held.node_constants, rtol=0, atol=1e-12)
    assert all(param.is_meta for param in streamed.blocks.parameters())  # no layer left in memory


def _assert_edges_are_the_jacobians(model, transcoders, math, tokens):
    """Every edge of the graph equals the oracle's jacobian along its source; returns the graph."""
    graph = ll.attribution_graph(model, tokens, transcoders, batch_size=8, max_feature_nodes=40)
    run, _ = _oracle(model, math, tokens, graph)
    n_pos = len(tokens)

    # The sources in the clean run: what each MLP output holds beyond skip and b_dec.
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens, names_filter=lambda n: n.endswith(("mlp.hook_in", "hook_mlp_out")))
    embed = model.embed.weight[tokens].detach().clone()
    sources = torch.stack(
        [
            cache[f"blocks.{i}.hook_mlp_out"][0] - math.fixed_out(i, cache[f"blocks.{i}.mlp.hook_in"][0])
            for i in range(N_LAYERS)
        ]
    )
    # The model rerun through the oracle reproduces the clean run's values.
    pre, logits = run(embed, sources)
    selected_pre = pre[graph.selected_features]
    torch.testing.assert_close(torch.cat([selected_pre, logits]), graph.node_values, rtol=1e-10, atol=1e-10)

    def targets(embed, sources):
        pre, logits = run(embed, sources)
        return torch.cat([pre[graph.selected_features], logits])

    d_embed, d_sources = torch.autograd.functional.jacobian(targets, (embed, sources), vectorize=True)
    # d_embed [n_targets, pos, d_model], d_sources [n_targets, n_layers, pos, d_model]

    # Each source node's vector: a feature writes activation * decoder row at its position, at its own layer
    # (and, in a CLT, every layer above); an error node its layer's error; a token its embedding. Their direct
    # effects are the jacobian along them.
    expected_columns = []
    for layer, pos, feature in graph.active_features[graph.selected_features].tolist():
        node = graph.active_features.tolist().index([layer, pos, feature])
        writes = math.writes(layer, feature, graph.activation_values[node])
        expected_columns.append(sum(d_sources[:, out, pos] @ write for out, write in writes.items()))
    errors = _errors(math, cache)
    for layer in range(N_LAYERS):
        for pos in range(n_pos):
            expected_columns.append(d_sources[:, layer, pos] @ errors[layer, pos])
    for pos in range(n_pos):
        expected_columns.append(d_embed[:, pos] @ embed[pos])
    expected = torch.stack(expected_columns, dim=1)  # [n_targets, n_sources]
    rows = torch.cat([torch.arange(graph.n_features), torch.arange(graph.n_nodes - graph.n_logits, graph.n_nodes)])
    actual = graph.adjacency[rows][:, : graph.n_nodes - graph.n_logits]
    assert actual.abs().max() > 1e-2
    torch.testing.assert_close(actual, expected, rtol=0, atol=1e-8)
    return graph


def _errors(math, cache):
    """The error nodes' vectors: MLP output minus the transcoders' reconstruction there (all the features' writes
    to that layer, b_dec, skip); zero at position 0, whose features are left out."""
    x = [cache[f"blocks.{layer}.mlp.hook_in"][0] for layer in range(N_LAYERS)]
    acts = [math.acts(layer, x[layer]) for layer in range(N_LAYERS)]
    for a in acts:
        a[0] = 0
    written = math.written(acts)
    out = []
    for layer in range(N_LAYERS):
        error = cache[f"blocks.{layer}.hook_mlp_out"][0] - written[layer] - math.fixed_out(layer, x[layer])
        error[0] = 0
        out.append(error)
    return torch.stack(out)
