"""Quality harness: corpora, metrics and the evaluation loop behind `kvpack eval` and `kvpack bench codecs`."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from kvpack.codecs.base import Codec
from kvpack.eval import passkey
from kvpack.eval.corpora import Document, documents, text_documents
from kvpack.eval.quality import DocumentResult, Reference, evaluate_document, machine, reference, summarize
from kvpack.spec import ModelSpec

if TYPE_CHECKING:
    from rich.progress import Progress

__all__ = ["Document", "documents", "evaluate", "machine", "progress_bar", "text_documents"]


def progress_bar(disable: bool = False) -> Progress:
    """The rich progress bar kvpack shows on long work (rich comes with the ``cli`` extra, and with transformers)."""
    try:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
    except ImportError as exc:
        raise ModuleNotFoundError(f"progress bars need rich ({exc}): pip install 'kvpack[cli]'") from None
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    transient=True, disable=disable)


def evaluate(model: Any, tokenizer: Any, spec: ModelSpec, codecs: Sequence[Codec], docs: Sequence[Document],
             prefix: int = 1536, cont: int = 512, passkey_tokens: int | None = None, passkey_trials: int = 20,
             quiet: bool = False) -> list[dict[str, Any]]:
    """One JSON row per codec: ratio, bits/element, quality metrics and MB/s over ``docs`` (see BENCHMARKS.md).

    References are computed once per document and shared by all codecs. With ``passkey_tokens`` each row also
    gets, over ``passkey_trials`` haystacks (:mod:`kvpack.eval.passkey`), ``passkey_accuracy``, the mean
    ``passkey_key_logprob``, the per-trial ``passkey_hits`` and ``passkey_key_logprobs``, each also of the
    uncompressed cache (``..._reference``), and the paired comparison with it: ``passkey_gained`` /
    ``passkey_lost`` (trials only one of the two answers) and their exact McNemar p-value ``passkey_mcnemar_p``.
    """
    results: list[list[DocumentResult]] = [[] for _ in codecs]
    with progress_bar(quiet) as bar:
        task = bar.add_task("evaluating", total=len(docs) * (1 + len(codecs)))
        for doc in docs:
            bar.update(task, description=f"reference {doc.name[:40]}")
            ref: Reference = reference(model, tokenizer, spec, doc, prefix, cont)
            bar.advance(task)
            for i, codec in enumerate(codecs):
                bar.update(task, description=f"{codec.name} on {doc.name[:40]}")
                results[i].append(evaluate_document(model, ref, codec))
                bar.advance(task)
            del ref
        rows = [summarize(codec, res, prefix, cont) for codec, res in zip(codecs, results, strict=True)]
        if passkey_tokens:
            trials = passkey.make_trials(tokenizer, passkey_tokens, passkey_trials)
            bar.update(task, description=f"passkey at {passkey_tokens} tokens, {passkey_trials} trials")
            base, *outcomes = passkey.run(model, tokenizer, spec, trials, [None, *codecs])
            for row, outcome in zip(rows, outcomes, strict=True):
                gained, lost = outcome.flips(base)
                row.update(passkey_tokens=passkey_tokens, passkey_trials=passkey_trials,
                           passkey_accuracy=outcome.accuracy, passkey_accuracy_reference=base.accuracy,
                           passkey_key_logprob=outcome.mean_key_logprob,
                           passkey_key_logprob_reference=base.mean_key_logprob,
                           passkey_hits=[int(h) for h in outcome.hits],
                           passkey_hits_reference=[int(h) for h in base.hits],
                           passkey_key_logprobs=list(outcome.key_logprob),
                           passkey_key_logprobs_reference=list(base.key_logprob),
                           passkey_gained=gained, passkey_lost=lost, passkey_mcnemar_p=passkey.mcnemar_p(gained, lost))
    for row in rows:
        row["machine"] = machine()
        row.setdefault("passkey_accuracy", None)
        row.setdefault("passkey_accuracy_reference", None)
    return rows
