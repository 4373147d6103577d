"""The `llama-lens` command: lens, inspect and generate on real checkpoints, and their errors."""

import pytest
import torch
from support.models import tiny_config

from llama_lens.cli import main
from llama_lens.io.checkpoint import Checkpoint
from llama_lens.testing import random_state_dict, write_meta_checkpoint

PROMPT = "The Eiffel Tower is located in the city of"


def test_lens_on_the_embedded_model_prints_the_table_and_writes_the_plot(demo_path, tmp_path, capsys):
    out_file = tmp_path / "lens.png"
    assert main(["lens", PROMPT, "--target", " Paris", "--out", str(out_file)]) == 0
    out = capsys.readouterr().out.splitlines()
    # SmolLM2's own tokenizer adds no BOS, so " of" is the tenth token (position 9).
    assert out[0] == "logit lens at position 9 (' of'): what each read-out predicts next"
    rows = out[2:-1]
    assert [row.split()[0] for row in rows] == ["embed"] + [f"{i}_post" for i in range(30)]
    last = rows[-1].split()
    assert last[1] == "'" and last[2] == "Paris'"  # the top token of the last layer is ' Paris'
    assert int(last[-1]) == 0  # and its rank there is 0
    assert int(rows[1].split()[-1]) > 1000  # while the first layer ranks it far down
    assert out_file.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert out[-1] == f"wrote {out_file}"


@pytest.mark.parametrize(
    ("out", "message"),
    [("missing-folder/lens.png", "the folder .*missing-folder does not exist"), ("lens.foo", "cannot write .foo")],
)
def test_lens_refuses_an_unwritable_out_before_running_the_model(tmp_path, monkeypatch, capsys, out, message):
    import llama_lens.cli as cli

    monkeypatch.setattr(cli, "_load_model", lambda args: pytest.fail("the model was loaded"))
    assert main(["lens", PROMPT, "--out", str(tmp_path / out)]) == 1
    assert capsys.readouterr().err.startswith("llama-lens: error: --out ")
    with pytest.raises(ValueError, match=message):
        cli._check_figure_path(tmp_path / out)


def test_lens_with_an_explicit_path_and_readout(demo_path, capsys):
    assert main(["lens", str(demo_path), "Hello", "--readout", "resid_mid", "--top-k", "2"]) == 0
    out = capsys.readouterr().out.splitlines()
    labels = [line.split()[0] for line in out[2:]]
    assert labels == [f"{i}_mid" for i in range(30)]
    assert "prob   rank" not in out[1]  # no target, no target columns


def test_generate_greedy_says_paris(demo_path, capsys):
    assert main(["generate", "The capital of France is", "--temperature", "0", "--max-new-tokens", "4"]) == 0
    assert capsys.readouterr().out.startswith("The capital of France is Paris")


def test_generate_chat_sends_the_template_ids_and_stops_at_the_end_of_turn(demo_path, capsys, monkeypatch):
    from transformers import PreTrainedTokenizerFast

    from llama_lens.model.llama import HookedLlama

    prompts = []
    original = HookedLlama.generate

    def recording(self, prompt, **kwargs):
        prompts.append(prompt)
        out = original(self, prompt, **kwargs)
        prompts.append(out.tokens[0])
        return out

    monkeypatch.setattr(HookedLlama, "generate", recording)
    question, system = "What is the capital of France?", "Answer in one sentence."
    argv = ["generate", "--chat", question, "--system", system, "--temperature", "0", "--max-new-tokens", "40"]
    assert main(argv) == 0
    reference = PreTrainedTokenizerFast.from_pretrained(demo_path)
    messages = [{"role": "system", "content": system}, {"role": "user", "content": question}]
    expected = reference.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
    assert prompts[0] == expected
    reply = capsys.readouterr().out
    assert "Paris" in reply
    assert len(prompts[1]) < 40  # stopped at <|im_end|>, which is not printed
    assert reply == reference.decode(prompts[1]) + "\n" and "<|im_end|>" not in reply


def test_generate_system_needs_chat(capsys, monkeypatch):
    from llama_lens import cli

    monkeypatch.setattr(cli, "_load_model", lambda args: pytest.fail("the model was loaded"))
    assert main(["generate", "Hi", "--system", "Be brief."]) == 1
    assert "--system needs --chat" in capsys.readouterr().err


def test_inspect_prints_the_summary_and_totals_without_reading_weights(tmp_path, capsys, monkeypatch):
    cfg = tiny_config(n_layers=3)
    folder = write_meta_checkpoint(tmp_path / "meta", cfg, random_state_dict(cfg), mp=2, dtype=torch.bfloat16)

    def no_reads(*args, **kwargs):
        raise AssertionError("inspect read a weight")

    monkeypatch.setattr(Checkpoint, "_read", no_reads)
    assert main(["inspect", str(folder), "--depth", "2"]) == 0
    out = capsys.readouterr().out
    params = Checkpoint(folder).num_params
    assert f"total: {params:,} parameters" in out
    assert "in 2 file(s)" in out and "(bfloat16)" in out
    for module in ("embed", "blocks.0.attn", "blocks.2.mlp", "ln_final", "unembed"):
        assert f"\n{module.rjust(13)} " in out or f"\n{module} " in out, module


def test_errors_are_one_line_with_a_non_zero_exit(tmp_path, capsys):
    assert main(["inspect", str(tmp_path / "nowhere")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "nowhere" in err and err.startswith("llama-lens: error:")

    cfg = tiny_config()
    folder = write_meta_checkpoint(tmp_path / "no_tokenizer", cfg, random_state_dict(cfg))
    assert main(["lens", str(folder), "hello"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no tokenizer.json or tokenizer.model" in err


@pytest.mark.parametrize("options", [["--chat"], ["--dtype", "bfloat16"], ["--chat", "--max-new-tokens", "4"]])
def test_path_and_prompt_may_sit_on_either_side_of_the_options(tmp_path, capsys, options):
    # `generate PATH --chat PROMPT` read PATH as the prompt and refused PROMPT as an unrecognized argument.
    assert main(["generate", str(tmp_path / "nowhere"), *options, "What is rain?"]) == 1
    assert "checkpoint folder" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main(["generate", str(tmp_path / "nowhere"), "--chat", "What is rain?", "one too many"])
    assert exit_info.value.code == 2 and "unrecognized arguments: What is rain? one too many" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["lens", "inspect", "generate", "demo-model"])
def test_each_command_has_help(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: llama-lens {command}") and len(out.splitlines()) > 8


def test_lens_prepend_bos_flags(demo_path, capsys):
    # Without either flag the model's own default applies (prepare_tokens decides); these two override it.
    first_lines = {}
    for flag in ("--prepend-bos", "--no-prepend-bos"):
        assert main(["lens", "Hello world", flag, "--top-k", "1"]) == 0
        first_lines[flag] = capsys.readouterr().out.splitlines()[0]
    # The last token is " world" either way; without BOS it sits one position earlier.
    with_bos, without = first_lines["--prepend-bos"], first_lines["--no-prepend-bos"]
    assert with_bos.endswith(" (' world'): what each read-out predicts next")
    position = int(with_bos.split()[4])
    assert without == with_bos.replace(f"position {position} ", f"position {position - 1} ")


def test_lens_reads_out_through_a_saved_tuned_lens(demo_path, tmp_path, capsys):
    import torch

    import llama_lens as ll

    model = ll.load(demo_path, progress=False)
    identity = ll.TunedLens.for_model(model)  # every translator zero: x + 0 x + 0 = x
    identity.save(tmp_path / "identity")
    args = ["lens", "The capital of France is", "--top-k", "1"]
    assert main(args) == 0
    plain = capsys.readouterr().out
    assert main([*args, "--tuned-lens", str(tmp_path / "identity")]) == 0
    assert capsys.readouterr().out == plain
    # A translator whose bias swamps the embedding read-out: that row now shows what the bias alone reads out
    # to (computed here through the model's own norm and unembedding), and no other row changes.
    moved = ll.TunedLens.for_model(model)
    paris = model.tokenizer.id_of(" Paris")
    bias = model.unembed.weight[paris] * model.ln_final.weight * 1e4
    with torch.no_grad():
        moved.translator(0, "embed").bias.copy_(bias)
        expected = model.tokenizer.token_strs([int(model.unembed(model.ln_final(bias)).argmax())])[0]
    plain_embed_row = next(line for line in plain.splitlines() if line.lstrip().startswith("embed"))
    assert repr(expected) not in plain_embed_row  # so the row below must have changed
    moved.save(tmp_path / "moved")
    assert main([*args, "--tuned-lens", str(tmp_path / "moved")]) == 0
    rows = capsys.readouterr().out.splitlines()
    embed_row = next(line for line in rows if line.lstrip().startswith("embed"))
    assert repr(expected) in embed_row
    assert [r for r in rows if not r.lstrip().startswith("embed")] == [
        r for r in plain.splitlines() if not r.lstrip().startswith("embed")
    ]
    assert main([*args, "--tuned-lens", str(tmp_path / "missing")]) == 1
    assert "missing" in capsys.readouterr().err
