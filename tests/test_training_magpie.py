"""Magpie (tinygpt.magpie): pre-query sampling, stops, drops, output files, HF directories, and the round trip into sft.

Most tests use a *scripted* model: every block outputs zero, the position embedding is one-hot and the
unembedding maps position p to a chosen token, so the next token depends only on the position and the
expected records are known exactly.
"""

from __future__ import annotations

import json

import pytest
import torch

from tinygpt import GPT, GPTConfig, cli, save
from tinygpt.tokenizer import ByteTokenizer
from tinygpt.training.magpie import GPTBackend, HFBackend, chat, generate_turns, load_backend, magpie, meta_path_for
from tinygpt.training.sft import load_sft_data, sft
from tinygpt.training.templates import TemplateError, load_template

CHATML = ("<|im_start|>", "<|im_end|>")
START, END = 256, 257


pytestmark = pytest.mark.usefixtures("isolated_cache")


def scripted_model(script: dict[int, int], n_ctx: int = 64, specials=CHATML) -> GPT:
    """A model whose prediction after position p is `script[p]`, else "x" (with a margin of ~40 logits)."""
    tok = ByteTokenizer(list(specials))
    m = GPT(GPTConfig(n_layers=1, d_model=n_ctx, n_heads=2, n_ctx=n_ctx, d_vocab=tok.vocab_size), tokenizer=tok)
    with torch.no_grad():
        for p in m.parameters():
            p.zero_()
        for ln in (m.ln_final, m.blocks[0].ln1, m.blocks[0].ln2):
            ln.weight.fill_(1.0)
        m.pos_embed.weight.copy_(10 * torch.eye(n_ctx))
        for pos in range(n_ctx):  # unscripted positions write "x", so nothing is left to chance
            m.unembed.weight[script.get(pos, ord("x")), pos] = 5.0
    return m.eval()


def script_for(prefix_len: int, instruction: list[int], response_start: int, response: list[int]) -> dict[int, int]:
    """Positions -> tokens: the instruction after the pre-query prefix, the response after the full prompt."""
    out = {prefix_len - 1 + i: t for i, t in enumerate(instruction)}
    out.update({response_start - 1 + i: t for i, t in enumerate(response)})
    return out


def hi_ok_model() -> GPT:
    """Pre-query `<|im_start|>user\\n` (6 tokens) -> "Hi?" <|im_end|>; its 22-token prompt -> "Ok" <|im_end|>."""
    return scripted_model(script_for(6, [*b"Hi?", END], 22, [*b"Ok", END]))


def test_the_scripted_model_is_what_the_tests_assume():
    tok = ByteTokenizer(list(CHATML))
    ids, _ = load_template("chatml").encode([{"role": "user", "content": "Hi?"}], tok, add_generation_prompt=True)
    assert len(ids) == 22
    m = hi_ok_model()
    with torch.no_grad():
        assert m(torch.tensor([ids]))[0].argmax(-1)[5:9].tolist() == [*b"Hi?", END]


def test_magpie_samples_an_instruction_from_the_pre_query_prefix_then_a_response(tmp_path):
    out = tmp_path / "magpie.jsonl"
    res = magpie(hi_ok_model(), 1, progress=False, out=out)
    assert res.records == [{"instruction": "Hi?", "response": "Ok"}]
    assert res.stats == {"attempts": 1, "kept": 1, "empty": 0, "truncated": 0, "malformed": 0, "duplicate": 0}
    assert [json.loads(line) for line in out.read_text().splitlines()] == res.records
    meta = json.loads(meta_path_for(out).read_text())
    assert meta_path_for(out).name == "magpie.meta.json" and res.meta_path == meta_path_for(out)
    assert meta["pre_query"] == "<|im_start|>user\n" and meta["template"] == "chatml" and meta["stats"] == res.stats
    assert meta["temperature"] == 1.0 and meta["response_temperature"] == 0.0 and meta["backend"] == "tinygpt"
    fig = res.figure()
    assert list(fig.data[0].y) == [1, 0, 0, 0, 0]


def test_duplicates_are_dropped_and_a_shortfall_is_reported():
    with pytest.warns(UserWarning, match=r"kept 1 of the 3 records asked for after 5 attempts.*duplicate 4"):
        res = magpie(hi_ok_model(), 3, max_attempts=5, batch_size=2, progress=False)
    assert len(res) == 1 and res.stats["duplicate"] == 4 and res.stats["attempts"] == 5


@pytest.mark.parametrize(
    "instruction, response, why",
    [
        ([*b"Hi?"], [*b"Ok", END], "truncated"),  # the instruction never ends within its budget
        ([*b"Hi?", END], [*b"Ok"], "truncated"),  # the response never ends
        ([*b"Hi", START], [*b"Ok", END], "malformed"),  # a new turn starts inside the instruction
        ([*b"  ", END], [*b"Ok", END], "empty"),
        ([*b"Hi?", END], [*b" \n", END], "empty"),
    ],
)
def test_bad_turns_are_dropped_with_their_reason(instruction, response, why):
    model = scripted_model(script_for(6, instruction, 22, response))  # 22: the prompt of "Hi?" (when it ends)
    with pytest.warns(UserWarning, match="kept 0 of the 1"):
        res = magpie(model, 1, max_attempts=2, max_instruction_tokens=8, max_response_tokens=8, progress=False)
    assert res.records == [] and res.stats[why] == 2, res.stats


def test_text_stops_and_system_messages_with_the_alpaca_template():
    """Alpaca's user turn ends with a blank line (a text stop, not a token); the system turn comes first."""
    tmpl = load_template("alpaca")
    tok = ByteTokenizer(["<|endoftext|>"])
    pre = tmpl.encode_text(tok, tmpl.pre_query("Be brief."))
    prompt, _ = tmpl.encode(
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi?"}],
        tok,
        add_generation_prompt=True,
    )
    model = scripted_model(
        script_for(len(pre), [*b"Hi?\n\n"], len(prompt), [*b"Ok", 256]), n_ctx=96, specials=["<|endoftext|>"]
    )
    res = magpie(model, 1, template="alpaca", system="Be brief.", progress=False)
    assert res.records == [{"instruction": "Hi?", "response": "Ok", "system": "Be brief."}]
    assert chat(model, "Hi?", template="alpaca", system="Be brief.", temperature=0) == "Ok"


def test_a_model_without_the_template_tokens_is_refused_clearly():
    with pytest.raises(TemplateError, match=r"no special token\(s\).*sft\(\) does this"):
        magpie(GPT(GPTConfig(n_layers=1, d_model=32, n_heads=2, n_ctx=32)), 2, progress=False)
    with pytest.raises(ValueError, match="count must be a positive integer"):
        magpie(hi_ok_model(), 0, progress=False)
    with pytest.raises(ValueError, match="temperature must be >= 0"):
        magpie(hi_ok_model(), 1, temperature=-1, progress=False)


def test_magpie_output_feeds_sft(tmp_path):
    out = tmp_path / "m.jsonl"
    magpie(hi_ok_model(), 1, progress=False, out=out)
    assert [c.messages for c in load_sft_data(out)] == [
        [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Ok"}]
    ]
    torch.manual_seed(0)
    base = GPT(GPTConfig(n_layers=1, d_model=32, n_heads=2, n_ctx=64))
    res = sft(base, out, steps=3, batch_size=2, val_split=0, device="cpu", progress=False, max_lr=1e-2, warmup=1)
    assert res.n_train == 1 and res.history[-1]["loss"] < res.history[0]["loss"]


# ------------------------------------------------------------------------------------------- Hugging Face
def test_hf_directory_gives_the_same_tokens_as_the_tinygpt_model(tmp_path):
    """A random model exported to a HF directory: both backends sample the same tokens from the same seed."""
    pytest.importorskip("transformers")
    from tinygpt.interop.hf import export_hf

    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layers=2, d_model=32, n_heads=2, n_ctx=64, d_vocab=258), tokenizer=ByteTokenizer(CHATML))
    hf_dir = export_hf(model, tmp_path / "hf")
    hf = load_backend(hf_dir)
    assert isinstance(hf, HFBackend) and hf.tokenizer.special_tokens == {"<|im_start|>": 256, "<|im_end|>": 257}
    tmpl = load_template("chatml")
    prompt = tmpl.encode_text(hf.tokenizer, tmpl.pre_query())
    assert prompt == [START, *b"user\n"]
    runs = []
    for backend in (GPTBackend(model), hf):
        gen = torch.Generator().manual_seed(7)
        runs.append(generate_turns(backend, tmpl, prompt, 4, 20, stop=tmpl.instruction_stop, generator=gen))
    assert [(t.text, t.status, t.n_tokens) for t in runs[0]] == [(t.text, t.status, t.n_tokens) for t in runs[1]]
    assert len({t.text for t in runs[0]}) == 4  # four different random rows


def test_magpie_on_a_hf_directory_and_from_the_cli(tmp_path, capsys):
    pytest.importorskip("transformers")
    from tinygpt.interop.hf import export_hf

    hf_dir = export_hf(hi_ok_model(), tmp_path / "hf")
    res = magpie(str(hf_dir), 1, progress=False)
    assert res.records == [{"instruction": "Hi?", "response": "Ok"}] and res.settings["backend"] == "hf"
    path = save(hi_ok_model(), tmp_path / "chat.tinygpt")
    out = tmp_path / "cli.jsonl"
    assert (
        cli.main(["magpie", str(path), "--count", "2", "--max-attempts", "3", "--out", str(out), "--no-progress"]) == 0
    )
    text = capsys.readouterr().out
    assert "done: 1 records from 3 attempts (dropped: empty 0, truncated 0, malformed 0, duplicate 2)" in text
    assert "warning: only 1 of 2 records" in text
    assert json.loads(out.read_text()) == {"instruction": "Hi?", "response": "Ok"}
    assert json.loads(meta_path_for(out).read_text())["model"] == str(path)
    # the round trip: magpie's file goes straight into `tinygpt sft`
    base = save(GPT(GPTConfig(n_layers=1, d_model=32, n_heads=2, n_ctx=64)), tmp_path / "base.tinygpt")
    args = ["sft", str(base), "--data", str(out), "--steps", "1", "--batch", "1", "--val-split", "0"]
    assert cli.main([*args, "--device", "cpu", "--no-progress", "--out", str(tmp_path / "c2.tinygpt")]) == 0
    assert "data: 1 records" in capsys.readouterr().out
