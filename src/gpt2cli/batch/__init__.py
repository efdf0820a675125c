"""Batch jobs over JSONL: score or generate one output line per input line, resumably.

``jsonl`` reads input lines and writes the output file (append, resume, repair); ``tasks``
turns a chunk of parsed lines into output lines with a loaded model; ``run`` drives a job
in this process or over ``--workers`` processes; ``raydata`` runs the same tasks as a Ray
Data pipeline (docs/batch.md).
"""
