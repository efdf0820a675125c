"""Inspection (lens, attention, activations) and comparison against transformers and direct sums."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import transformers
from checkpoints import make_checkpoint
from safetensors import safe_open

from gpt2cli import load
from gpt2cli.errors import BadInputError
from gpt2cli.inspection import ActivationsInterrupted, select
from gpt2cli.model import hook_names
from gpt2cli.scoring import rank_bucket
from gpt2cli.tensorfile import GrowingSafetensors

TEXT = "The quick brown fox jumps over the lazy dog. ünïcödé 🎉 and 42!"


def reference(path: Path) -> transformers.GPT2LMHeadModel:
    model = transformers.GPT2LMHeadModel.from_pretrained(
        str(path), dtype=torch.float32, attn_implementation="eager"
    )
    return model.eval()


def assert_matches_transformers(lm, ref, text: str) -> None:
    """Every residual stream, attention pattern and the final norm equal transformers' to 1e-4.

    transformers' hidden_states[i] is block i's input (i < L) and the last is after ln_f.
    """
    acts = lm.activations(text, ["*"])
    with torch.no_grad():
        out = ref(acts["tokens"][None], output_hidden_states=True, output_attentions=True)
    L = lm.config.n_layer
    close = {"atol": 1e-4, "rtol": 0}
    for i in range(L):
        torch.testing.assert_close(acts[f"blocks.{i}.hook_resid_pre"], out.hidden_states[i][0], **close)
        # ours (query, head, key), theirs (head, query, key)
        torch.testing.assert_close(
            acts[f"blocks.{i}.attn.hook_pattern"].transpose(0, 1), out.attentions[i][0], **close
        )
        if i + 1 < L:
            torch.testing.assert_close(
                acts[f"blocks.{i}.hook_resid_post"], out.hidden_states[i + 1][0], **close
            )
    torch.testing.assert_close(acts["ln_final.hook_normalized"], out.hidden_states[L][0], **close)
    lens = lm.lens(text, layers=-1, top=3)
    logprobs = out.logits[0].log_softmax(-1)
    for cell in lens.cells:
        values, ids = logprobs[cell.position].topk(3)
        assert [c.id for c in cell.top] == ids.tolist()
        torch.testing.assert_close(torch.tensor([c.logprob for c in cell.top]), values, **close)


def test_hidden_states_and_attention_match_transformers(ckpt: Path) -> None:
    assert_matches_transformers(load(str(ckpt), device="cpu"), reference(ckpt), TEXT)


def test_124m_shape_matches_transformers(tmp_path: Path) -> None:
    path = make_checkpoint(tmp_path / "m124", n_layer=12, n_head=12, n_embd=768, n_positions=1024, std=0.02)
    lm = load(str(path), device="cpu")
    assert_matches_transformers(lm, reference(path), TEXT * 3)
    assert lm.model.hooks == {}


def test_activation_names_and_shapes(lm_h) -> None:
    acts = lm_h.activations(TEXT, ["*"])
    c = lm_h.config
    T = len(acts["tokens"])
    assert acts["tokens"][0] == 50256 and len(lm_h.encode(TEXT)) + 1 == T
    assert set(acts) == {"tokens", *hook_names(c.n_layer)}
    for L in range(c.n_layer):
        for point in ("hook_resid_pre", "hook_resid_mid", "hook_resid_post"):
            assert acts[f"blocks.{L}.{point}"].shape == (T, c.n_embd)
        assert acts[f"blocks.{L}.attn.hook_z"].shape == (T, c.n_head, c.head_dim)
        assert acts[f"blocks.{L}.attn.hook_pattern"].shape == (T, c.n_head, T)
        assert acts[f"blocks.{L}.mlp.hook_post"].shape == (T, c.inner_dim)
    assert acts["ln_final.hook_normalized"].shape == (T, c.n_embd)
    plain = lm_h.activations(TEXT, ["blocks.0.hook_resid_pre"], prepend_bos=False)
    assert plain["tokens"].tolist() == lm_h.encode(TEXT) and set(plain) == {
        "tokens",
        "blocks.0.hook_resid_pre",
    }


def test_hooks_change_nothing_and_are_removed(lm_h) -> None:
    ids = torch.tensor([lm_h.encode(TEXT)])
    with torch.no_grad():
        plain = lm_h.model(ids)
        with lm_h.model.hooked({name: (lambda x: None) for name in hook_names(lm_h.config.n_layer)}):
            hooked = lm_h.model(ids)  # explicit attention everywhere
    torch.testing.assert_close(hooked, plain, atol=1e-5, rtol=0)
    assert lm_h.model.hooks == {}
    with (
        pytest.raises(ValueError, match="not hook points"),
        lm_h.model.hooked({"blocks.99.hook_resid_pre": print}),
    ):
        pass


def test_lens_last_layer_is_the_model_and_ranks_are_exact(lm_h) -> None:
    ids = lm_h.encode(TEXT)
    with torch.no_grad():
        logits = lm_h.model(torch.tensor([[50256, *ids]]))[0]
    result = lm_h.lens(TEXT, top=4)
    last = lm_h.config.n_layer - 1
    assert result.layers == list(range(lm_h.config.n_layer)) and result.positions == list(range(len(ids) + 1))
    for p in result.positions:
        cell = result.cell(last, p)
        row = logits[p]
        assert [c.id for c in cell.top] == row.topk(4).indices.tolist()
        if p == len(ids):
            assert cell.target is None and cell.target_logprob is None and cell.target_rank is None
            continue
        target = ids[p]
        assert cell.target.id == target
        assert cell.target_logprob == pytest.approx(float(row.log_softmax(-1)[target]), abs=1e-4)
        assert cell.target_rank == int((row > row[target]).sum()) + 1


def test_lens_layer_zero_pre_is_the_embeddings_through_ln_f(lm_h) -> None:
    ids = [50256, *lm_h.encode("Hello there")]
    m = lm_h.model
    with torch.no_grad():
        x = m.wte(torch.tensor(ids)) + m.wpe(torch.arange(len(ids)))
        expected = m.logits(m.ln_f(x)).log_softmax(-1)
    result = lm_h.lens("Hello there", at="pre", layers="0", positions="1:", top=2)
    assert result.positions == list(range(1, len(ids)))
    for cell in result.cells:
        assert [c.id for c in cell.top] == expected[cell.position].topk(2).indices.tolist()
    mid = lm_h.lens("Hello there", at="mid", layers="0", top=2)
    resid_mid = lm_h.activations("Hello there", ["blocks.0.hook_resid_mid"])["blocks.0.hook_resid_mid"]
    with torch.no_grad():
        expected_mid = m.logits(m.ln_f(resid_mid)).log_softmax(-1)
    assert mid.at == "mid"
    assert [c.top[0].id for c in mid.cells] == expected_mid.argmax(-1).tolist()


def test_selection_specs() -> None:
    assert select(None, 4, "layer") == [0, 1, 2, 3]
    assert select("all", 4, "layer") == [0, 1, 2, 3]
    assert select("0,-1", 4, "layer") == [0, 3]
    assert select("1:3,3,-1", 5, "layer") == [1, 2, 3, 4]
    assert select("-2:", 5, "position") == [3, 4]
    assert select([2, 0], 3, "head") == [2, 0]
    for bad, needle in [
        ("4", "out of range"),
        ("-5", "out of range"),
        ("x", "cannot read"),
        ("3:1", "nothing"),
    ]:
        with pytest.raises(BadInputError, match=needle):
            select(bad, 4, "layer")


def test_too_long_text_is_refused_with_what_fits(lm_h) -> None:
    window = lm_h.window
    with pytest.raises(BadInputError, match=f"{window + 1} tokens with the <.endoftext.> prefix, more than"):
        lm_h.lens("<|endoftext|>" * window + " x")
    assert len(lm_h.attention([1] * window, prepend_bos=False).tokens) == window  # exactly the window fits


def test_attention_selects_layers_and_heads(lm_h) -> None:
    full = lm_h.attention(TEXT)
    part = lm_h.attention(TEXT, layers="-1", heads=[1])
    T = len(full.tokens)
    assert full.pattern.shape == (lm_h.config.n_layer, lm_h.config.n_head, T, T)
    torch.testing.assert_close(part.pattern[0, 0], full.pattern[-1, 1])
    torch.testing.assert_close(full.pattern.sum(-1), torch.ones(full.pattern.shape[:-1]), atol=1e-5, rtol=0)
    assert torch.equal(full.pattern.triu(1), torch.zeros_like(full.pattern))  # causal
    tops = list(part.top_keys(2))
    assert len(tops) == T and tops[0].keys == [(0, pytest.approx(1.0))]
    q = T - 1
    expected = part.pattern[0, 0, q].topk(2)
    assert [k for k, _ in tops[q].keys] == expected.indices.tolist()
    with pytest.raises(BadInputError, match="head 2 is out of range"):
        lm_h.attention(TEXT, heads="2")


def read_file(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()  # noqa: SIM118 - safe_open is no dict


def test_save_activations_many_texts(lm_h, tmp_path: Path) -> None:
    texts = ["One.", TEXT, "Two short words"]
    hooks = ["blocks.1.hook_resid_post", "blocks.0.attn.hook_*", "ln_final.*"]
    seen: list[tuple[int, int]] = []
    saved = lm_h.save_activations(
        iter(texts), tmp_path / "a.safetensors", hooks, progress=lambda *a: seen.append(a)
    )
    tensors, meta = read_file(saved.path)
    names = [
        "blocks.0.attn.hook_pattern",
        "blocks.0.attn.hook_z",
        "blocks.1.hook_resid_post",
        "ln_final.hook_normalized",
    ]
    assert set(tensors) == {"tokens", "offsets", *names}
    assert meta["complete"] == "true" and meta["texts"] == "3" and meta["hooks"] == ",".join(names)
    offsets = tensors["offsets"].tolist()
    assert offsets[0] == 0 and offsets[-1] == saved.tokens == len(tensors["tokens"]) and saved.texts == 3
    assert seen[-1] == (3, saved.tokens)
    longest = max(b - a for a, b in zip(offsets, offsets[1:], strict=False))
    assert tensors["blocks.0.attn.hook_pattern"].shape == (saved.tokens, lm_h.config.n_head, longest)
    for i, text in enumerate(texts):
        one = lm_h.activations(text, names)
        rows = slice(offsets[i], offsets[i + 1])
        assert tensors["tokens"][rows].tolist() == one["tokens"].tolist()
        for name in names:
            got = tensors[name][rows]
            if name.endswith("hook_pattern"):
                T = got.shape[0]
                assert torch.equal(got[..., T:], torch.zeros_like(got[..., T:]))  # padding
                got = got[..., :T]
            torch.testing.assert_close(got, one[name], atol=0, rtol=0)
    assert not list(tmp_path.glob(".a.safetensors*"))  # no temporary files left


def test_save_activations_ctrl_c_keeps_finished_texts(lm_h, tmp_path: Path) -> None:
    def texts():
        yield "first text"
        yield "second text"
        raise KeyboardInterrupt

    with pytest.raises(ActivationsInterrupted) as info:
        lm_h.save_activations(texts(), tmp_path / "b.safetensors")
    assert info.value.file is not None and info.value.file.texts == 2
    tensors, meta = read_file(tmp_path / "b.safetensors")
    assert meta["complete"] == "false" and meta["texts"] == "2"
    assert (
        tensors["offsets"].tolist()[-1]
        == len(tensors["tokens"])
        == tensors["blocks.0.hook_resid_post"].shape[0]
    )


def test_save_activations_bad_input_leaves_no_file(lm_h, tmp_path: Path) -> None:
    out = tmp_path / "c.safetensors"
    with pytest.raises(BadInputError, match="no hook point is called 'blocks.0.hook_nope'.*"):
        lm_h.save_activations(["x"], out, ["blocks.0.hook_nope"])
    with pytest.raises(BadInputError, match="text 2 is .* tokens"):
        lm_h.save_activations(["fine", "word " * 200], out)
    assert list(tmp_path.iterdir()) == []
    out.write_text("keep me")
    with pytest.raises(BadInputError, match="exists"):
        lm_h.save_activations(["x"], out)
    assert out.read_text() == "keep me"


def test_growing_file_writes_as_it_goes(tmp_path: Path) -> None:
    out = GrowingSafetensors(tmp_path / "g.safetensors", metadata={"k": "v"})
    rows = torch.arange(12, dtype=torch.float32).view(3, 4)
    out.append("x", rows)
    out.commit()
    spilled = sum(p.stat().st_size for p in out.workdir.iterdir())
    assert spilled == rows.numel() * 4  # on disk already, not held in memory
    out.append("x", rows + 1)  # not committed: left out
    out.close()
    tensors, meta = read_file(tmp_path / "g.safetensors")
    assert torch.equal(tensors["x"], rows) and meta == {"k": "v"}
    gone = GrowingSafetensors(tmp_path / "h.safetensors")
    gone.append("x", rows)
    gone.discard()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["g.safetensors"]


# --- comparison ---------------------------------------------------------------------------------


def test_compare_with_itself(lm_h) -> None:
    text = TEXT * 4
    result = lm_h.compare(lm_h, text, context=32, stride=16, per_token=True)
    score = lm_h.score(text, context=32, stride=16, per_token=True)
    assert result.tokens == score.tokens == len(result.token_diffs)
    assert abs(result.mean_kl) < 1e-6 and result.same_top1_fraction == 1.0
    assert result.perplexity_a == pytest.approx(score.perplexity, rel=1e-5)
    assert result.perplexity_ratio == pytest.approx(1.0) and result.delta_perplexity == pytest.approx(
        0.0, abs=1e-3
    )
    # with A = B, cross-entropy is the entropy: Binoculars = mean NLL / mean entropy
    entropy = sum(t.entropy for t in score.token_scores)
    assert result.binoculars == pytest.approx(score.total_nll / entropy, rel=1e-4)
    assert result.cross_perplexity == pytest.approx(math.exp(entropy / score.tokens), rel=1e-4)
    assert [d.position for d in result.token_diffs] == [t.position for t in score.token_scores]


def test_compare_int8_agrees_with_direct_logits(ckpt_h: Path) -> None:
    a = load(str(ckpt_h), device="cpu")
    b = load(str(ckpt_h), device="cpu", quantize="int8")
    result = a.compare(b, TEXT, per_token=True)
    ids = [50256, *a.encode(TEXT)]
    with torch.no_grad():
        la = a.model(torch.tensor([ids]))[0, :-1].float().log_softmax(-1)
        lb = b.model(torch.tensor([ids]))[0, :-1].float().log_softmax(-1)
    targets = torch.tensor(ids[1:])
    kl = (la.exp() * (la - lb)).sum(-1)
    xent = -(la.exp() * lb).sum(-1)
    lp_a, lp_b = la.gather(1, targets[:, None])[:, 0], lb.gather(1, targets[:, None])[:, 0]
    diffs = result.token_diffs
    assert len(diffs) == len(targets)
    torch.testing.assert_close(torch.tensor([d.kl for d in diffs]), kl, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(torch.tensor([d.delta_logprob for d in diffs]), lp_b - lp_a, atol=1e-5, rtol=0)
    assert [d.top1_b for d in diffs] == lb.argmax(-1).tolist()
    assert result.mean_kl == pytest.approx(float(kl.mean()), rel=1e-4) and result.mean_kl > 0
    assert result.same_top1_fraction == pytest.approx(float((la.argmax(-1) == lb.argmax(-1)).float().mean()))
    assert result.binoculars == pytest.approx(float(-lp_a.sum() / xent.sum()), rel=1e-4)
    assert result.perplexity_ratio == pytest.approx(math.exp(float((lp_a - lp_b).mean())), rel=1e-4)


def test_compare_refuses_another_vocabulary(lm_h, tmp_path: Path) -> None:
    other = make_checkpoint(tmp_path / "other", seed=5)
    vocab = json.loads((other / "vocab.json").read_text(encoding="utf-8"))
    vocab["!"], vocab['"'] = vocab['"'], vocab["!"]  # two byte tokens swap ids: same sizes, another tokenizer
    (other / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    with pytest.raises(BadInputError, match="different vocabularies"):
        lm_h.compare(load(str(other), device="cpu"), TEXT)


# --- GLTR view's numbers ------------------------------------------------------------------------


def test_token_entropy_and_rank_buckets(lm_h) -> None:
    result = lm_h.score(TEXT, per_token=True)
    ids = [50256, *lm_h.encode(TEXT)]
    with torch.no_grad():
        logprobs = lm_h.model(torch.tensor([ids]))[0, :-1].log_softmax(-1)
    expected = -(logprobs.exp() * logprobs).sum(-1)
    torch.testing.assert_close(
        torch.tensor([t.entropy for t in result.token_scores]), expected, atol=1e-4, rtol=0
    )
    assert [rank_bucket(r) for r in (1, 10, 11, 100, 101, 1000, 1001)] == [0, 0, 1, 1, 2, 2, 3]
