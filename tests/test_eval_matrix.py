"""The evaluation matrix: chunking and BM25 retrieval, the prompts of each setup, reference-answer losses checked
against a manual computation, greedy outputs and the result's views (its dashboard: test_widgets_evalmatrix.py)."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from tinygpt import GPT, GPTConfig
from tinygpt.eval.matrix import (
    BM25Retriever,
    EvalMatrix,
    chunk_text,
    cut_at_stop,
    eval_matrix,
    few_shot_pool,
    load_qa,
    normalize_answer,
)
from tinygpt.sampling import generate
from tinygpt.training.lora import add_lora, save_lora

ROOT = Path(__file__).resolve().parents[1]
NOTES = ROOT / "data" / "shakespeare_notes.md"
HELDOUT = ROOT / "data" / "eval_prompts.jsonl"
TRAIN_QA = ROOT / "data" / "eval_train_qa.jsonl"

QA = [
    {"instruction": "Who kills Polonius?", "response": "Hamlet kills Polonius."},
    {"instruction": "Whom does Macbeth murder?", "response": "Macbeth murders King Duncan."},
    {"instruction": "How does Cleopatra die?", "response": "She dies from the bite of an asp."},
]
SHOTS = [("Who is Ophelia's father?", "Polonius."), ("Where is Hamlet set?", "Elsinore.")]


def make_model(seed: int = 0, n_ctx: int = 128) -> GPT:
    torch.manual_seed(seed)
    return GPT(GPTConfig(n_layers=1, d_model=32, n_heads=2, n_ctx=n_ctx)).eval()


def make_lora(base: GPT) -> GPT:
    m = copy.deepcopy(base)
    add_lora(m, "attn.q_proj,mlp.fc_in", rank=2)
    torch.manual_seed(5)
    with torch.no_grad():
        for n, p in m.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)
    return m


def snapshot(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@torch.no_grad()
def manual_loss(model, prompt: str, answer: str) -> float:
    tok = model.tokenizer
    p, a = tok.encode(prompt), tok.encode(answer)
    x = torch.tensor([p + a])
    logits = model(x)[0]
    targets = x[0, len(p) :]
    return float(F.cross_entropy(logits[len(p) - 1 : -1], targets))


@pytest.fixture(scope="module")
def retriever() -> BM25Retriever:
    return BM25Retriever(NOTES, chunk_chars=160)


# ------------------------------------------------------------------------------------------ data and retrieval
def test_the_shipped_qa_files_parse_and_do_not_overlap():
    held, train = load_qa(HELDOUT), load_qa(TRAIN_QA)
    assert len(held) >= 15 and len(train) >= 30
    assert all(r["instruction"].strip() and r["response"].strip() for r in held + train)
    assert not {r["instruction"] for r in held} & {r["instruction"] for r in train}


def test_load_qa_names_the_bad_line(tmp_path):
    f = tmp_path / "qa.jsonl"
    f.write_text('{"instruction": "a", "response": "b"}\n\n{"instruction": 3}\n')
    with pytest.raises(ValueError, match=r"qa.jsonl:3: .*instruction"):
        load_qa(f)
    f.write_text('{"instruction": "a"}\n{oops\n')
    with pytest.raises(ValueError, match=r"qa.jsonl:2: not valid JSON"):
        load_qa(f)


def test_chunk_text_packs_paragraphs_and_cuts_long_ones():
    text = "one two.\n\nthree four.\n\n" + " ".join(["word"] * 60) + "\n\nlast."
    chunks = chunk_text(text, chunk_chars=40)
    assert all(len(c) <= 40 for c in chunks)
    assert chunks[0] == "one two.\n\nthree four."  # short paragraphs packed together
    assert " ".join(" ".join(chunks).split()) == " ".join(text.split())  # nothing lost or reordered
    with pytest.raises(ValueError, match="chunk_chars"):
        chunk_text(text, 5)


def test_bm25_finds_the_paragraph_that_answers(retriever):
    assert all(len(c) <= 160 for c in retriever.chunks)
    for q, word in [
        ("Who kills Polonius?", "arras"),
        ("How does Cleopatra die?", "asp"),
        ("Who is Caliban?", "Caliban"),
    ]:
        hits = retriever.search(q, 2)
        assert hits and word in hits[0][0], (q, hits)
        assert hits[0][1] >= hits[-1][1] > 0
    assert retriever.search("zyxxy qwerty", 3) == []  # no shared word: nothing retrieved
    assert retriever.search("the of and", 3) == []  # stop words only
    assert len(retriever.search("Hamlet", 1000)) <= len(retriever)
    small = BM25Retriever(["apples are red", "the sky is blue"])
    assert small.search("what colour is the sky", 5) == [(small.chunks[1], pytest.approx(small.search("sky", 1)[0][1]))]


# ------------------------------------------------------------------------------------------ setups and inputs
def test_default_setups_follow_the_ingredients_given(retriever):
    base = make_model()
    assert EvalMatrix(base).setups == ["base"]
    assert EvalMatrix(base, few_shot=SHOTS).setups == ["base", "few-shot"]
    lm = make_lora(base)
    assert EvalMatrix(base, few_shot=SHOTS, lora=lm, retrieval=retriever).setups == [
        "base",
        "few-shot",
        "lora",
        "lora+retrieval",
    ]
    with pytest.raises(ValueError, match="needs retrieval="):
        EvalMatrix(base, setups=["base", "retrieval"])
    with pytest.raises(ValueError, match="unknown setup"):
        EvalMatrix(base, setups=["zero-shot"])
    with pytest.raises(ValueError, match="base model itself"):
        EvalMatrix(base, lora=base)
    with pytest.raises(ValueError, match="need answers"):
        EvalMatrix(base, few_shot=["just a question"])


def test_inputs_put_context_then_examples_then_the_question(retriever):
    base = make_model()
    m = EvalMatrix(
        base,
        lora=make_lora(base),
        retrieval=retriever,
        few_shot=SHOTS,
        k=1,
        setups=["base", "few-shot", "lora+retrieval", "lora+few-shot"],
    )
    res = m.run(QA[:1], progress=False)
    inp = {s: res.inputs[s][0] for s in res.setups}
    assert inp["base"] == "Q: Who kills Polonius?\nA:"
    assert (
        inp["few-shot"]
        == "Q: Who is Ophelia's father?\nA: Polonius.\n\nQ: Where is Hamlet set?\nA: Elsinore.\n\n" + inp["base"]
    )
    assert inp["lora+few-shot"] == inp["few-shot"]
    chunk = res.retrieved[0][0][0]
    assert "Polonius" in chunk and inp["lora+retrieval"] == chunk + "\n\n" + inp["base"]
    custom = EvalMatrix(base, template=lambda q: f"<{q}>", answer_template="={response}").run(QA[:1], progress=False)
    assert custom.inputs["base"] == ["<Who kills Polonius?>"]


# ------------------------------------------------------------------------------------------ losses and outputs
def test_reference_losses_match_a_manual_computation_for_every_setup(retriever, tmp_path):
    base = make_model(n_ctx=256)  # room for every prompt: nothing is truncated
    lm = make_lora(base)
    snap = snapshot(base)
    res = eval_matrix(base, QA, lora=lm, retrieval=retriever, few_shot=SHOTS, k=1, progress=False, max_new_tokens=4)
    assert res.setups == ["base", "few-shot", "lora", "lora+retrieval"]
    assert not any(any(v) for v in res.truncated.values())
    for s in res.setups:
        model = lm if s.startswith("lora") else base
        for i, rec in enumerate(QA):
            want = manual_loss(model, res.inputs[s][i], " " + rec["response"])
            assert res.losses[s][i] == pytest.approx(want, abs=1e-5), (s, i)
    assert res.losses["lora"] != pytest.approx(res.losses["base"])  # the adapter really ran
    for k, v in snap.items():  # the base model is never modified
        assert torch.equal(base.state_dict()[k], v), k
    # an adapter file is applied to a copy of the base
    path = save_lora(lm, tmp_path / "a.lora")
    res2 = eval_matrix(base, QA, lora=path, setups=["base", "lora"], progress=False, max_new_tokens=4)
    assert res2.losses["lora"] == pytest.approx(res.losses["lora"], abs=1e-6)
    assert not any("lora" in k for k in base.state_dict())


def test_long_prompts_lose_their_oldest_tokens_but_score_the_whole_answer():
    base = make_model(n_ctx=64)
    shots = [(f"a fairly long worked example question number {i}?", f"its answer {i}.") for i in range(3)]
    res = eval_matrix(base, QA[:2], few_shot=shots, progress=False, max_new_tokens=4)
    tok = base.tokenizer
    for i, rec in enumerate(QA[:2]):
        p, a = tok.encode(res.inputs["few-shot"][i]), tok.encode(" " + rec["response"])
        drop = len(p) + len(a) - 64
        assert drop > 0 and res.truncated["few-shot"][i] == drop
        assert res.truncated["base"][i] == 0
        want = manual_loss(base, tok.decode(p[drop:]), " " + rec["response"])
        assert res.losses["few-shot"][i] == pytest.approx(want, abs=1e-5)


def test_outputs_are_greedy_continuations_cut_at_the_stop():
    base = make_model()
    res = eval_matrix(base, QA, progress=False, max_new_tokens=12, stop=None)
    for i, text in enumerate(res.inputs["base"]):
        full = generate(base, text, 12, temperature=0)
        assert res.outputs["base"][i] == full[len(text) :].strip()
    assert cut_at_stop(" Hamlet.\nQ: next", "\n") == "Hamlet."
    assert cut_at_stop("\n\n Hamlet.\nmore", "\n") == "Hamlet."
    assert cut_at_stop("no stop here ", None) == "no stop here"


def test_prompts_without_references_get_outputs_but_no_loss():
    base = make_model()
    res = eval_matrix(base, ["Who kills Polonius?", "Who is Caliban?"], progress=False, max_new_tokens=3)
    assert all(math.isnan(v) for v in res.losses["base"]) and math.isnan(res.mean_loss("base"))
    res2 = eval_matrix(base, ["Who kills Polonius?"], ["Hamlet."], progress=False, max_new_tokens=3)
    assert res2.losses["base"][0] == pytest.approx(
        manual_loss(base, "Q: Who kills Polonius?\nA:", " Hamlet."), abs=1e-5
    )
    with pytest.raises(ValueError, match="2 prompts but 1 answers"):
        eval_matrix(base, ["a", "b"], ["x"], progress=False)


# ------------------------------------------------------------------------------------------ views
def test_result_views_show_every_setup_side_by_side(retriever):
    base = make_model()
    res = eval_matrix(
        base, QA, lora=make_lora(base), retrieval=retriever, few_shot=SHOTS, k=1, progress=False, max_new_tokens=4
    )
    text = res.table()
    for s in res.setups:
        assert f"{res.mean_loss(s):.4f}" in text
    assert all(q in text for q in res.prompts)
    page = res.to_html()
    assert page.count("<tr") == 1 + len(QA) + 1 and "Hamlet kills Polonius." in page
    md = res.to_markdown()
    assert md.splitlines()[0] == "| # | prompt | reference | base | few-shot | lora | lora+retrieval |"
    fig = res.figure(highlight=1)
    assert list(fig.data[0].y) == pytest.approx([res.mean_loss(s) for s in res.setups])
    sizes = list(fig.data[1].marker.size)
    assert len(sizes) == len(QA) * len(res.setups) and sizes.count(14) == len(res.setups)
    row = res.row(2)
    assert row["prompt"] == QA[2]["instruction"] and set(row["setups"]) == set(res.setups)
    assert set(res.summary()) == set(res.setups)


def test_answer_match_and_normalisation():
    base = make_model()
    res = eval_matrix(base, QA[:2], progress=False, max_new_tokens=2)
    res.outputs["base"] = ["hamlet KILLS polonius!", "someone else"]
    assert res.answer_match("base") == [True, False]
    assert res.summary()["base"]["match"] == 0.5
    assert normalize_answer("  The  Queen's, closet. ") == "the queens closet"


def test_extend_and_few_shot_pool():
    base = make_model()
    a = eval_matrix(base, QA[:1], progress=False, max_new_tokens=2)
    b = eval_matrix(base, QA[1:], progress=False, max_new_tokens=2)
    a.extend(b)
    assert a.prompts == [r["instruction"] for r in QA] and len(a.losses["base"]) == 3
    pool = load_qa(TRAIN_QA)
    picks = few_shot_pool(pool, 3, seed=1)
    assert len(picks) == 3 and picks == few_shot_pool(pool, 3, seed=1) and all(p in pool for p in picks)


def test_old_module_path_and_the_package_export_the_same_names():
    import tinygpt.eval
    from tinygpt.eval import matrix
    from tinygpt.evalmatrix import EvalMatrix as Old
    from tinygpt.evalmatrix import eval_matrix as old_eval_matrix
    from tinygpt.evalmatrix import few_shot_pool as old_pool
    from tinygpt.evalmatrix import load_qa as old_load_qa

    assert (Old, old_eval_matrix, old_pool, old_load_qa) == (EvalMatrix, eval_matrix, few_shot_pool, load_qa)
    for name in matrix.__all__:
        assert getattr(tinygpt.eval, name) is getattr(matrix, name), name
