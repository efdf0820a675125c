"""`gpt2 finetune` and the training library against the real tiny model: learning, the output
checkpoint (ours and transformers' loaders), LoRA, resume after Ctrl-C, DDP parity, bad input."""

from __future__ import annotations

import contextlib
import io
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from cliutil import assert_one_line_error, run_inprocess
from safetensors.torch import load_file

from gpt2cli import load
from gpt2cli.cli.app import run
from gpt2cli.train.loop import EvalEvent, SaveEvent, StepEvent, finetune
from gpt2cli.train.settings import FinetuneSettings

NOUNS = ["cat", "dog", "bird", "fox", "horse", "mouse", "king", "queen", "farmer", "child"]
ADJS = ["red", "small", "quick", "lazy", "happy", "old", "young", "brown"]
VERBS = ["sees", "chases", "likes", "finds", "helps", "follows"]
PLACES = ["in the garden", "by the river", "at the market", "under the tree", "on the hill"]


def grammar_text(n_bytes: int, seed: int = 0) -> str:
    """Deterministic sentences from a small grammar: learnable structure, ~n_bytes long."""
    rng = random.Random(seed)
    out: list[str] = []
    size = 0
    while size < n_bytes:
        s = (
            f"The {rng.choice(ADJS)} {rng.choice(NOUNS)} {rng.choice(VERBS)} "
            f"the {rng.choice(ADJS)} {rng.choice(NOUNS)} {rng.choice(PLACES)}.\n"
        )
        out.append(s)
        size += len(s)
    return "".join(out)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny matrices gain nothing from a second thread, and on a shared 2-core machine the
    threads' spin-waits made training ~8x slower (measured side by side: 12 s vs 94 s)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("corpus") / "train.txt"
    path.write_text(grammar_text(100_000), encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def small(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 12 KB corpus for the tests that check mechanics rather than learning (a cheap held-out set)."""
    path = tmp_path_factory.mktemp("small") / "small.txt"
    path.write_text(grammar_text(12_000, seed=1), encoding="utf-8")
    return path


def scratch_settings(corpus: Path, ckpt_h: Path, output: Path, **kw) -> FinetuneSettings:
    base = dict(
        data=[corpus],
        output=output,
        model=str(ckpt_h),  # gives the tokenizer only
        from_scratch=True,
        size="tiny",
        block_size=16,
        batch_size=4,
        lr=3e-3,
        device="cpu",
        seed=0,
    )
    base.update(kw)
    return FinetuneSettings(**base)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def trained(one_thread, corpus: Path, ckpt_h: Path, tmp_path_factory: pytest.TempPathFactory):
    """The acceptance run: a tiny model from scratch on ~100 KB, a few hundred steps on CPU."""
    out = tmp_path_factory.mktemp("runs") / "tiny"
    result = finetune(scratch_settings(corpus, ckpt_h, out, max_steps=200, eval_every=100))
    return out, result


def test_from_scratch_perplexity_halves(trained) -> None:
    out, result = trained
    assert result.steps == 200
    assert result.final_eval.perplexity < result.first_eval.perplexity / 2
    # It learned the grammar, not just the unigram counts (a random model sits near 50257).
    assert result.final_eval.perplexity < 20
    readme = (out / "README.md").read_text()
    assert f"{result.final_eval.perplexity:.3f}" in readme and "| lr | `0.003` |" in readme


def test_output_is_a_hub_checkpoint(trained) -> None:
    out, _ = trained
    assert {p.name for p in out.iterdir()} == {
        "config.json",
        "model.safetensors",
        "vocab.json",
        "merges.txt",
        "README.md",
        "training_state.pt",
    }
    keys = load_file(str(out / "model.safetensors"))
    assert keys["h.0.attn.c_attn.weight"].shape == (32, 96)  # Conv1D (in, out) as on the Hub
    assert json.loads((out / "config.json").read_text())["model_type"] == "gpt2"
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]  # no temp dirs left


def test_transformers_loads_output_with_same_logits(trained) -> None:
    transformers = pytest.importorskip("transformers")
    out, _ = trained
    lm = load(str(out), device="cpu")
    ref = transformers.GPT2LMHeadModel.from_pretrained(str(out), dtype=torch.float32).eval()
    ids = torch.tensor([lm.encode("The quick fox sees the old king by the river.")])
    with torch.no_grad():
        torch.testing.assert_close(lm.model(ids), ref(ids).logits, atol=1e-4, rtol=0)


def test_generate_loads_output(trained, capsys, monkeypatch) -> None:
    out, _ = trained
    result = run_inprocess(["generate", "-m", str(out), "The", "-n", "12", "-t", "0"], capsys, monkeypatch)
    assert result.code == 0, result.err
    words = result.out.split()
    assert words and set(words) & set(NOUNS + ADJS + VERBS + ["the"])


def test_score_loads_output(trained, tmp_path: Path, capsys, monkeypatch) -> None:
    out, result = trained
    text = tmp_path / "unseen.txt"
    text.write_text(grammar_text(2000, seed=5))
    scored = run_inprocess(["score", "-m", str(out), str(text), "--format", "json"], capsys, monkeypatch)
    assert scored.code == 0, scored.err
    # New sentences of the same grammar: about as predictable as the held-out blocks.
    assert json.loads(scored.out)["perplexity"] < 3 * result.final_eval.perplexity


def test_cli_runs_and_prints_output_dir(
    small: Path, ckpt_h: Path, tmp_path: Path, capsys, monkeypatch
) -> None:
    out = tmp_path / "cli"
    args = [
        "finetune",
        str(small),
        "-o",
        str(out),
        "-m",
        str(ckpt_h),
        "--from-scratch",
        "--max-steps",
        "3",
        "--eval-every",
        "3",
    ]
    result = run_inprocess(
        [*args, "--block-size", "16", "--batch-size", "2", "--device", "cpu"], capsys, monkeypatch
    )
    assert result.code == 0, result.err
    assert result.out == f"{out}\n"
    assert "held-out perplexity" in result.err and "\x1b" not in result.err
    assert (out / "model.safetensors").is_file()


def test_jsonl_and_markdown_documents(ckpt_h: Path, tmp_path: Path) -> None:
    jsonl = tmp_path / "d.jsonl"
    jsonl.write_text("\n".join(json.dumps({"text": grammar_text(300, seed=i)}) for i in range(20)) + "\n")
    md = tmp_path / "d.md"
    md.write_text("# Notes\n\n" + grammar_text(2000, seed=99))
    settings = scratch_settings(
        jsonl, ckpt_h, tmp_path / "o", data=[jsonl, md], max_steps=4, batch_size=2, save_every=2
    )
    saves: list[SaveEvent] = []
    result = finetune(settings, lambda e: saves.append(e) if isinstance(e, SaveEvent) else None)
    assert result.steps == 4 and (tmp_path / "o" / "model.safetensors").is_file()
    assert [(e.step, e.final) for e in saves] == [(2, False), (4, True)]


def test_lora_changes_only_adapted_projections(small: Path, ckpt_h: Path, tmp_path: Path) -> None:
    out = tmp_path / "lora"
    settings = FinetuneSettings(
        data=[small],
        output=out,
        model=str(ckpt_h),
        lora=4,
        block_size=32,
        batch_size=4,
        max_steps=4,
        lr=1e-2,
        device="cpu",
    )
    result = finetune(settings)
    assert result.final_eval.loss < result.first_eval.loss
    before, after = load_file(str(ckpt_h / "model.safetensors")), load_file(str(out / "model.safetensors"))
    for key, tensor in after.items():
        changed = not torch.equal(tensor, before[key])
        adapted = key.endswith(("c_attn.weight", "c_proj.weight", "c_fc.weight"))
        assert changed == adapted, key
    # The merged weights are what our loader and transformers see.
    lm = load(str(out), device="cpu")
    assert lm.model.h[0].attn.c_attn.weight.shape == (96, 32)


def test_gradient_checkpointing_same_gradients(ckpt_h: Path) -> None:
    from gpt2cli.config import GPT2Config
    from gpt2cli.train.init import load_trainable

    config = GPT2Config.from_json(ckpt_h / "config.json")
    ids = torch.randint(0, 50257, (2, 17), generator=torch.Generator().manual_seed(0))
    grads = []
    for flag in (False, True):
        model = load_trainable(ckpt_h, config)
        model.gradient_checkpointing = flag
        model(ids).logsumexp(-1).mean().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], atol=1e-5, rtol=1e-5)


def test_ctrl_c_saves_and_resume_matches_uninterrupted(small: Path, ckpt_h: Path, tmp_path: Path) -> None:
    common = dict(max_steps=8, batch_size=4, block_size=16, eval_every=4)
    straight = tmp_path / "straight"
    finetune(scratch_settings(small, ckpt_h, straight, **common))

    def interrupt(event) -> None:
        if isinstance(event, StepEvent) and event.step == 5:
            raise KeyboardInterrupt

    cut = tmp_path / "cut"
    with pytest.raises(KeyboardInterrupt):
        finetune(scratch_settings(small, ckpt_h, cut, **common), interrupt)
    assert "step 5 of 8" in (cut / "README.md").read_text()
    evals: list[EvalEvent] = []
    result = finetune(
        scratch_settings(small, ckpt_h, cut, resume=True, **common),
        lambda e: evals.append(e) if isinstance(e, EvalEvent) else None,
    )
    assert result.steps == 8 and evals[0].step == 5
    a, b = load_file(str(straight / "model.safetensors")), load_file(str(cut / "model.safetensors"))
    for key in a:
        torch.testing.assert_close(b[key], a[key], atol=1e-5, rtol=1e-5)


def test_lora_resume_matches_uninterrupted(small: Path, ckpt_h: Path, tmp_path: Path) -> None:
    """LoRA resumes from --model's weights plus the stored adapters (the saved weights are merged)."""

    def settings(out: Path, **kw) -> FinetuneSettings:
        return FinetuneSettings(
            data=[small],
            output=out,
            model=str(ckpt_h),
            lora=4,
            block_size=16,
            batch_size=2,
            max_steps=5,
            lr=1e-2,
            eval_every=5,
            device="cpu",
            **kw,
        )

    finetune(settings(tmp_path / "straight"))

    def interrupt(event) -> None:
        if isinstance(event, StepEvent) and event.step == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        finetune(settings(tmp_path / "cut"), interrupt)
    finetune(settings(tmp_path / "cut", resume=True))
    a = load_file(str(tmp_path / "straight" / "model.safetensors"))
    b = load_file(str(tmp_path / "cut" / "model.safetensors"))
    for key in a:
        torch.testing.assert_close(b[key], a[key], atol=1e-5, rtol=1e-5)


def test_ddp_two_cpu_processes_match_single_process(small: Path, ckpt_h: Path, tmp_path: Path) -> None:
    """torchrun with 2 gloo ranks x batch 2 equals one process with batch 4 (same global batch)."""
    base = ["finetune", str(small), "-m", str(ckpt_h), "--from-scratch", "--max-steps", "4"]
    base += ["--block-size", "16", "--eval-every", "2", "--device", "cpu", "--lr", "3e-3"]
    single = tmp_path / "single"
    finetune(scratch_settings(small, ckpt_h, single, max_steps=4, batch_size=4, block_size=16, eval_every=2))
    ddp = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    cmd += ["-m", "gpt2cli", *base, "--batch-size", "2", "-o", str(ddp), "--seed", "0"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == str(ddp)  # only rank 0 prints and writes
    a, b = load_file(str(single / "model.safetensors")), load_file(str(ddp / "model.safetensors"))
    for key in a:
        torch.testing.assert_close(b[key], a[key], atol=1e-5, rtol=1e-4)


def _stop_by_ctrl_c() -> None:
    raise KeyboardInterrupt  # where the signal's handler would raise it


def _stop_by_sigterm() -> None:
    import signal

    os.kill(os.getpid(), signal.SIGTERM)  # a real signal: our handler turns it into the stop


@pytest.mark.parametrize(
    ("stop", "code", "said"),
    [
        (_stop_by_ctrl_c, 130, "gpt2: interrupted; saved step 2"),
        (_stop_by_sigterm, 143, "gpt2: terminated; saved step 2"),
    ],
    ids=["ctrl-c", "sigterm"],
)
def test_cli_ctrl_c_or_sigterm_saves_the_last_step(
    small: Path, ckpt_h: Path, tmp_path: Path, capsys, monkeypatch, stop, code: int, said: str
) -> None:
    """A stop during step 3: step 2 is saved; exit 130 for Ctrl-C, 143 for SIGTERM."""
    import signal

    from gpt2cli.train import loop

    original = loop._Run._one_step

    def one_step(self) -> None:
        if self.step == 2:
            stop()
        original(self)

    monkeypatch.setattr(loop._Run, "_one_step", one_step)
    before = signal.getsignal(signal.SIGTERM)
    out = tmp_path / "cut"
    args = ["finetune", str(small), "-o", str(out), "-m", str(ckpt_h), "--from-scratch", "--max-steps", "6"]
    result = run_inprocess(
        [*args, "--block-size", "16", "--batch-size", "2", "--device", "cpu"], capsys, monkeypatch
    )
    assert result.code == code, result.err
    assert said in result.err and "--resume" in result.err and "Traceback" not in result.err
    assert result.out == ""
    assert "step 2 of 6" in (out / "README.md").read_text()
    assert load(str(out), device="cpu").config.n_embd == 32
    assert signal.getsignal(signal.SIGTERM) is before  # put back after the run


# --- bad input ---------------------------------------------------------------------------------


def test_an_output_that_cannot_be_written_is_refused_before_training(ft, small: Path, tmp_path: Path) -> None:
    afile = tmp_path / "afile"
    afile.write_text("x")
    result = ft([str(small), "-o", str(afile / "out"), "--block-size", "16", "--max-steps", "2"])
    assert_one_line_error(result, 2, "cannot write --output", "afile")
    assert "step" not in result.err  # no step was trained (and lost)


@pytest.fixture
def ft(capsys, monkeypatch, ckpt_h: Path):
    def call(args: list[str]):
        return run_inprocess(["finetune", *args, "-m", str(ckpt_h), "--device", "cpu"], capsys, monkeypatch)

    return call


def test_missing_data(ft, tmp_path: Path) -> None:
    result = ft([str(tmp_path / "nope.txt"), "-o", str(tmp_path / "o")])
    assert_one_line_error(result, 2, "nope.txt", "does not exist")
    assert not (tmp_path / "o").exists()


def test_empty_data(ft, tmp_path: Path) -> None:
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    assert_one_line_error(ft([str(empty), "-o", str(tmp_path / "o")]), 2, "empty")
    assert not (tmp_path / "o").exists()


def test_jsonl_line_without_text(ft, tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"content": "oops"}\n')
    assert_one_line_error(ft([str(bad), "-o", str(tmp_path / "o")]), 2, "bad.jsonl line 2", '"text"')


def test_block_size_larger_than_window(ft, small: Path, tmp_path: Path) -> None:
    result = ft([str(small), "-o", str(tmp_path / "o"), "--block-size", "256"])
    assert_one_line_error(result, 2, "block size 256", "window of 128")
    assert not (tmp_path / "o").exists()


def test_foreign_output_dir_refused_unless_overwrite(ft, small: Path, tmp_path: Path) -> None:
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("precious")
    result = ft([str(small), "-o", str(out), "--from-scratch", "--max-steps", "1", "--block-size", "16"])
    assert_one_line_error(result, 2, "not a gpt2 finetune checkpoint", "--overwrite")
    assert (out / "notes.txt").read_text() == "precious"
    result = ft(
        [
            str(small),
            "-o",
            str(out),
            "--from-scratch",
            "--max-steps",
            "1",
            "--block-size",
            "16",
            "--overwrite",
        ]
    )
    assert result.code == 0, result.err
    assert not (out / "notes.txt").exists() and (out / "model.safetensors").is_file()


def test_lora_with_from_scratch(ft, small: Path, tmp_path: Path) -> None:
    result = ft([str(small), "-o", str(tmp_path / "o"), "--from-scratch", "--lora", "8"])
    assert_one_line_error(result, 2, "--lora cannot be combined with --from-scratch")


def test_resume_without_checkpoint(ft, small: Path, tmp_path: Path) -> None:
    assert_one_line_error(ft([str(small), "-o", str(tmp_path / "o"), "--resume"]), 2, "nothing to resume")


def test_help_lists_options() -> None:
    err, out = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = run(["finetune", "--help"])
    assert code == 0
    for flag in ("--lora", "--from-scratch", "--resume", "--save-every", "--gradient-checkpointing"):
        assert flag in out.getvalue()


# --- units ---------------------------------------------------------------------------------------


def test_lr_schedule_warms_up_then_decays_to_floor() -> None:
    from gpt2cli.train.loop import lr_at

    lrs = [lr_at(s, 1.0, 10, 100, 0.1) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[9:-1], lrs[10:], strict=True))
    assert lr_at(100, 1.0, 10, 100, 0.1) == pytest.approx(0.1)


def test_rank_shards_together_equal_one_process_batch() -> None:
    from gpt2cli.train.data import Batching, pack, step_batches

    data = pack(torch.arange(2000), block_size=8, val_fraction=0.1, seed=3)
    for step in (0, 5, 30):  # 30 is in the second epoch
        alone = torch.cat(list(step_batches(data, Batching(4, 2, 1, 0), 7, step)))
        ranks = [torch.cat(list(step_batches(data, Batching(2, 2, 2, r), 7, step))) for r in (0, 1)]
        as_set = lambda t: sorted(map(tuple, t.tolist()))  # noqa: E731
        assert as_set(torch.cat(ranks)) == as_set(alone)
        assert not set(map(tuple, ranks[0].tolist())) & set(map(tuple, ranks[1].tolist()))
    # held-out blocks never appear in training
    train = set(map(tuple, data.train.tolist()))
    assert not train & set(map(tuple, data.val.tolist()))


# --- issue 14: directories of data, --data-format, the output's mode, odd values -------------


def test_directories_of_data_are_walked_in_order(small: Path, ckpt_h: Path, tmp_path: Path) -> None:
    from gpt2cli.train.data import collect_files, read_documents

    corpus = tmp_path / "corpus"
    (corpus / "b").mkdir(parents=True)
    (corpus / "a.txt").write_text("first document\n")
    (corpus / "b" / "c.md").write_text("second document\n")
    (corpus / "b" / "d.jsonl").write_text('{"text": "third"}\n{"text": "fourth"}\n')
    (corpus / "script.py").write_text("print('code')\n")
    (corpus / ".hidden.txt").write_text("never read\n")
    found = collect_files([corpus])
    assert found.files == [corpus / "a.txt", corpus / "b" / "c.md", corpus / "b" / "d.jsonl"]
    assert found.skipped == [corpus / "script.py"]
    assert "3 files (1 .jsonl, 1 .md, 1 .txt)" in found.describe() and "skipped 1" in found.describe()
    assert read_documents([corpus]) == ["first document\n", "second document\n", "third", "fourth"]
    as_text = read_documents([corpus], "text")
    assert "print('code')\n" in as_text and len(as_text) == 4  # each file whole, jsonl too


def test_cli_takes_a_directory_and_says_what_it_found(
    small: Path, ckpt_h: Path, tmp_path: Path, capsys, monkeypatch
) -> None:
    import shutil

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    shutil.copy(small, corpus / "notes.txt")
    (corpus / "tool.py").write_text("x = 1\n" * 200)
    out = tmp_path / "out"
    args = ["finetune", str(corpus), "-o", str(out), "-m", str(ckpt_h), "--from-scratch", "--max-steps", "2"]
    args += ["--block-size", "16", "--batch-size", "2", "--device", "cpu"]
    before = os.umask(0o022)
    try:
        result = run_inprocess(args, capsys, monkeypatch)
    finally:
        os.umask(before)
    assert result.code == 0, result.err
    assert "data: 1 file (1 .txt); skipped 1 other files (--data-format text takes them)" in result.err
    assert (out.stat().st_mode & 0o777) == 0o755  # not mkdtemp's 0700
    assert ((out / "model.safetensors").stat().st_mode & 0o777) == 0o644  # not safetensors' 0600
    text = run_inprocess([*args[:4], "--data-format", "text", *args[4:]], capsys, monkeypatch)
    assert text.code == 0, text.err
    assert "data: 2 files (1 .py, 1 .txt)" in text.err


def test_directory_without_text_and_unknown_files(ft, tmp_path: Path) -> None:
    empty = tmp_path / "code"
    empty.mkdir()
    (empty / "main.py").write_text("pass\n")
    result = ft([str(empty), "-o", str(tmp_path / "o")])
    assert_one_line_error(result, 2, "holds no .txt, .md or .jsonl files", "--data-format text")
    result = ft([str(empty / "main.py"), "-o", str(tmp_path / "o")])
    assert_one_line_error(result, 2, "unsupported data file type '.py'", "--data-format text")


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--lora", "4", "--lora-alpha", "-1"], "lora-alpha must be a positive number"),
        (["--lora-alpha", "8"], "--lora-alpha needs --lora"),
        (["--seed", "-1"], "seed must be an integer from 0 to"),
        (["--seed", "99999999999999999999"], "seed must be an integer from 0 to"),
    ],
)
def test_odd_training_values_are_refused(ft, small: Path, tmp_path: Path, args, needle) -> None:
    assert_one_line_error(ft([str(small), "-o", str(tmp_path / "o"), *args]), 2, needle)


def test_any_64_bit_seed_shuffles() -> None:
    from gpt2cli.train.data import epoch_order

    assert sorted(epoch_order(10, 2**64 - 1, 3).tolist()) == list(range(10))


@pytest.mark.parametrize("steps", [3, 15, 25])
def test_default_evaluation_is_at_most_ten_a_run(
    small: Path, ckpt_h: Path, tmp_path: Path, steps: int
) -> None:
    """Without --eval-every: the first and final evaluations and at most ten in all (help's words)."""
    evals: list[EvalEvent] = []
    settings = scratch_settings(small, ckpt_h, tmp_path / "out", max_steps=steps, batch_size=4, block_size=16)
    finetune(settings, lambda e: evals.append(e) if isinstance(e, EvalEvent) else None)
    at = [e.step for e in evals]
    assert at[0] == 0 and at[-1] == steps and at == sorted(set(at))
    assert len(at) <= 11  # 0, up to nine between, the end
    gaps = [b - a for a, b in zip(at, at[1:], strict=False)]
    assert max(gaps) <= max(1, steps // 5)  # spread over the run
