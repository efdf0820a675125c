"""lm-evaluation-harness's `local-completions` model against `gpt2 serve`, checked against our own scores.

Too heavy for CI (it needs ``pip install lm-eval[api] transformers``); run it by hand:

    python benchmarks/lm_eval_server.py                  # a random tiny checkpoint, fully offline
    python benchmarks/lm_eval_server.py --model gpt2     # a cached real model

It writes a small multiple-choice task (a local JSONL file and a task YAML), starts the server in
this process on a free 127.0.0.1 port, runs lm-eval on it with ``log_samples``, and recomputes
every log-likelihood lm-eval received with ``gpt2cli.logprobs.sequence_logprobs`` (the function
`gpt2 score --per-token` shares) on the same tokens. It prints the accuracy and the largest
difference, which should be below 1e-4.

lm-eval sends, for each (context, continuation), the token ids of both with ``echo``,
``logprobs=1`` and ``max_tokens=1``, and sums ``token_logprobs[len(context):-1]``; an empty
context is replaced by ``<|endoftext|>``. Since one token is generated, the request is at most
``window - 1`` tokens long, hence ``max_length=window-1`` below.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

ITEMS = [
    ("The capital of France is", [" Paris", " London", " Berlin"], 0),
    ("Two plus two equals", [" four", " five", " seven"], 0),
    ("The sun rises in the", [" east", " west", " north"], 0),
    ("Water freezes at zero degrees", [" Celsius", " Fahrenheit", " Kelvin"], 0),
    ("A group of lions is called a", [" pride", " flock", " school"], 0),
    ("", [" Hello", " Goodbye"], 0),  # an empty context: lm-eval puts <|endoftext|> there
]

TASK_YAML = """\
task: gpt2cli_tiny_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
target_delimiter: ""
metric_list:
  - metric: acc
"""


def write_task(folder: Path) -> None:
    data = folder / "data.jsonl"
    with data.open("w") as f:
        for question, choices, answer in ITEMS:
            f.write(json.dumps({"question": question, "choices": choices, "answer": answer}) + "\n")
    (folder / "gpt2cli_tiny_mc.yaml").write_text(TASK_YAML.format(data=data))


def our_loglikelihood(lm, context: str, continuation: str) -> float:
    """lm-eval's own split of (context, continuation) into tokens, scored by our library."""
    from gpt2cli.logprobs import sequence_logprobs

    whole = lm.encode(context + continuation)
    context_ids = lm.encode(context)
    continuation_ids = whole[len(context_ids) :]
    if not context_ids:
        context_ids = [lm.tokenizer.eot_id]
    entries = sequence_logprobs(lm.model, context_ids + continuation_ids)
    return sum(e.logprob or 0.0 for e in entries[len(context_ids) :])


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", help="model spec (default: a random tiny checkpoint)")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()

    import lm_eval
    from lm_eval.tasks import TaskManager
    from serverutil import ServerThread

    from gpt2cli import load

    with tempfile.TemporaryDirectory() as tmp:
        tmpdir = Path(tmp)
        if args.model is None:
            from checkpoints import make_checkpoint

            spec = str(make_checkpoint(tmpdir / "ckpt", n_positions=256, seed=1))
        else:
            spec = args.model
        lm = load(spec, device=args.device)
        (tmpdir / "tasks").mkdir()
        write_task(tmpdir / "tasks")
        srv = ServerThread(lm).start()
        try:
            results = lm_eval.simple_evaluate(
                model="local-completions",
                model_args={
                    "model": spec,
                    "base_url": srv.url + "/v1/completions",
                    "tokenizer_backend": "huggingface",
                    "tokenizer": str(lm.resolved.path),
                    "tokenized_requests": True,
                    "num_concurrent": 4,
                    "max_length": lm.window - 1,
                },
                tasks=["gpt2cli_tiny_mc"],
                task_manager=TaskManager(include_path=str(tmpdir / "tasks")),
                log_samples=True,
            )
        finally:
            srv.stop()
        worst, count = 0.0, 0
        for sample in results["samples"]["gpt2cli_tiny_mc"]:
            for (context, continuation), resp in zip(sample["arguments"], sample["resps"], strict=True):
                theirs = float(resp[0][0])
                ours = our_loglikelihood(lm, context, continuation)
                worst = max(worst, abs(theirs - ours))
                count += 1
        acc = results["results"]["gpt2cli_tiny_mc"].get("acc,none")
        print(
            f"model {spec}: acc {acc}; {count} log-likelihoods via the server vs our library: max |diff| {worst:.2e}"
        )
        if worst > 1e-4:
            raise SystemExit("the server's log-likelihoods disagree with the library's")


if __name__ == "__main__":
    main()
