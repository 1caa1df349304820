"""The `kvpack` command line (typer + rich)."""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, cast

try:
    import typer
    from rich.console import Console
    from rich.table import Table
except ImportError as exc:  # typer and rich are the optional extra kvpack[cli]
    raise SystemExit(f"the kvpack command needs the extra kvpack[cli] ({exc}): pip install 'kvpack[cli]'") from None

from kvpack import codecs
from kvpack.bench.rows import print_rows
from kvpack.errors import KvpackError
from kvpack.format import read_container
from kvpack.models import DEFAULT_MODEL

if TYPE_CHECKING:
    from kvpack.eval.corpora import Document, Split

app = typer.Typer(help="kvpack: store and reuse the KV caches of language models, small and fast to move.",
                  no_args_is_help=True, pretty_exceptions_enable=False)
bench_app = typer.Typer(help="Benchmarks: print a table and write JSON (numbers for docs/results).",
                        no_args_is_help=True)
app.add_typer(bench_app, name="bench")
console = Console()

CodecOpt = Annotated[str, typer.Option("--codec", "-c", help=f"Codec name: {', '.join(codecs.available())}.")]
ParamOpt = Annotated[list[str] | None, typer.Option("--param", "-p", help="Codec parameter name=value (repeatable).")]
ModelOpt = Annotated[str, typer.Option("--model", "-m", help="Bundled model name or local checkpoint directory.")]
JsonOpt = Annotated[Path | None, typer.Option("--json", help="Write the results as JSON to this path.")]
SourcesOpt = Annotated[str | None, typer.Option(
    help="Corpus sources of the built-in documents, comma-separated: stdlib, site-packages (code), pydoc, metadata "
         "(prose); default stdlib,pydoc (docs/codecs.md: the cross-source protocol).")]
TextOpt = Annotated[list[Path] | None, typer.Option(
    help="Evaluate on these text files instead of built-in documents (repeatable): the own-files setting.")]



def load_model(name: str) -> tuple[Any, Any, Any]:
    """Load model, tokenizer and spec with a status line."""
    from kvpack import models
    from kvpack.spec import ModelSpec

    with console.status(f"loading model {name} ..."):
        t0 = time.perf_counter()
        model, tokenizer = models.load(name)
        spec = ModelSpec.from_model(model, tokenizer)
    console.print(f"[dim]loaded {name} in {time.perf_counter() - t0:.1f} s: {spec.num_layers} layers, "
                  f"{spec.num_kv_heads} KV heads, head dim {spec.head_dim}, {spec.dtype}[/dim]")
    return model, tokenizer, spec


def make_codec(name: str, params: list[str] | None) -> codecs.Codec:
    return codecs.get(name, **codecs.parse_params(params or []))


def _fail(exc: Exception) -> None:
    console.print(f"[bold red]error:[/bold red] {exc}")
    raise typer.Exit(2)


def corpus(docs: int, split: Split, sources: str | None, text: list[Path] | None = None,
           draw: int = 0) -> list[Document]:
    """The documents a command runs on: the user's ``--text`` files, or ``docs`` of ``split`` from ``--sources``
    (their ``draw``-th set, :func:`kvpack.eval.corpora.documents`)."""
    from kvpack.eval.corpora import DEFAULT_SOURCES, documents, parse_sources, text_documents

    if text and (sources or draw):
        raise ValueError("--text and --sources (or --draw) exclude each other (your files are their own source)")
    if text:
        return text_documents(text)
    return documents(docs, split, parse_sources(sources) if sources else DEFAULT_SOURCES, draw)


def _command_line() -> str:
    """The command as typed, for the "Produced by" line of a results page."""
    return "kvpack " + " ".join(sys.argv[1:])


@app.command()
def prefill(
    file: Annotated[Path, typer.Argument(help="Text file whose KV cache to compute.", exists=True, dir_okay=False)],
    output: Annotated[Path, typer.Option("-o", "--output", help="Where to write the .kvp file.")],
    codec: CodecOpt = "raw",
    param: ParamOpt = None,
    model: ModelOpt = DEFAULT_MODEL,
    max_tokens: Annotated[int, typer.Option(min=1, help="Keep at most this many tokens of the file.")] = 8192,
) -> None:
    """Compute the KV cache of a text file and store it encoded with a codec."""
    from kvpack.eval import progress_bar
    from kvpack.inference import prefill as run_prefill

    try:
        the_codec = make_codec(codec, param)
        lm, tokenizer, spec = load_model(model)
        ids = tokenizer(file.read_text(encoding="utf-8", errors="replace"), return_tensors="pt").input_ids[0]
        ids = ids[:max_tokens]
        with progress_bar() as bar:
            task = bar.add_task("prefill", total=len(ids))
            t0 = time.perf_counter()
            kv, _ = run_prefill(lm, spec, ids, step=256, on_progress=lambda n: bar.update(task, completed=n))
            t1 = time.perf_counter()
        data = the_codec.encode(kv)
        t2 = time.perf_counter()
        output.write_bytes(data)
    except KvpackError as exc:
        _fail(exc)
    console.print(f"{len(ids)} tokens prefilled in {t1 - t0:.1f} s; {codec} encoded {kv.fp16_bytes / 1e6:.1f} MB "
                  f"(fp16) into {len(data) / 1e6:.2f} MB ({kv.fp16_bytes / len(data):.2f}x) in {t2 - t1:.2f} s "
                  f"-> {output}")


def describe(data: bytes) -> dict[str, Any]:
    """Header summary and sizes of a container."""
    container = read_container(data)
    header = container.header
    info: dict[str, Any] = {
        "bytes": len(data),
        "kind": header.get("kind"),
        "codec": header.get("codec"),
        "sections": {name: len(view) for name, view in container.sections.items()},
    }
    spec, tokens = header.get("spec"), header.get("tokens")
    if isinstance(spec, dict) and isinstance(tokens, dict):
        elements = 2 * spec["num_layers"] * spec["num_kv_heads"] * spec["head_dim"] * tokens["count"]
        info.update(model=spec.get("name"), fingerprint=spec.get("fingerprint"), dtype=spec.get("dtype"),
                    layers=spec["num_layers"], kv_heads=spec["num_kv_heads"], head_dim=spec["head_dim"],
                    tokens=tokens["count"], positions=tokens.get("positions"),
                    bits_per_element=8 * len(data) / max(elements, 1),
                    ratio_vs_fp16=2 * elements / len(data))
    return info


@app.command()
def inspect(
    file: Annotated[Path, typer.Argument(help="A .kvp container.", exists=True, dir_okay=False)],
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
) -> None:
    """Show a container's header, section sizes, bits per element and ratio against fp16."""
    try:
        info = describe(file.read_bytes())
    except KvpackError as exc:
        _fail(exc)
    if as_json:
        print(json.dumps(info, indent=2))
        return
    table = Table(title=str(file), show_header=False)
    for key, value in info.items():
        table.add_row(key, f"{value:.3f}" if isinstance(value, float) else str(value))
    console.print(table)


@app.command()
def decode(
    file: Annotated[Path, typer.Argument(help="A .kvp container.", exists=True, dir_okay=False)],
    output: Annotated[Path, typer.Option("-o", "--output", help="Write the decoded tensors here (.safetensors).")],
    profile: Annotated[str | None, typer.Option(help="Calibration profile the chunk was encoded with.")] = None,
) -> None:
    """Decode a container into a safetensors file (layer.{i}.keys / layer.{i}.values, positions)."""
    from safetensors.torch import save_file

    try:
        t0 = time.perf_counter()
        kv = codecs.decode(file.read_bytes(), profile=profile)
        elapsed = time.perf_counter() - t0
    except KvpackError as exc:
        _fail(exc)
    tensors = {"positions": kv.positions}
    for i, (k, v) in enumerate(zip(kv.keys, kv.values, strict=True)):
        tensors[f"layer.{i}.keys"] = k.clone()
        tensors[f"layer.{i}.values"] = v.clone()
    save_file(tensors, str(output), metadata={"spec": json.dumps(kv.spec.to_json())})
    console.print(f"decoded {kv.num_tokens} tokens in {elapsed * 1e3:.1f} ms -> {output}")


@app.command("eval")
def eval_command(
    codec: CodecOpt = "raw",
    param: ParamOpt = None,
    docs: Annotated[int, typer.Option(min=1, help="Number of built-in eval documents (half code, half prose).")] = 6,
    text: TextOpt = None,
    sources: SourcesOpt = None,
    prefix: Annotated[int, typer.Option(min=1, help="Prefix tokens whose cache is encoded.")] = 1536,
    cont: Annotated[int, typer.Option(help="Continuation tokens scored on the decoded cache.")] = 512,
    passkey: Annotated[int | None, typer.Option(help="Also run passkey retrieval at this haystack length.")] = None,
    trials: Annotated[int, typer.Option(min=1, help="Passkey trials.")] = 20,
    model: ModelOpt = DEFAULT_MODEL,
    json_path: JsonOpt = None,
) -> None:
    """Measure a codec's ratio, quality (perplexity, KL, top-1, greedy, passkey) and speed on a real model."""
    from kvpack.eval import evaluate

    try:
        the_codec = make_codec(codec, param)
        documents_used = corpus(docs, "eval", sources, text)
        lm, tokenizer, spec = load_model(model)
        rows = evaluate(lm, tokenizer, spec, [the_codec], documents_used, prefix=prefix, cont=cont,
                        passkey_tokens=passkey, passkey_trials=trials)
    except (KvpackError, ValueError) as exc:
        _fail(exc)
    print_rows(rows, title=f"kvpack eval ({rows[0]['machine']})", console=console)
    if json_path:
        json_path.write_text(json.dumps(rows[0] if len(rows) == 1 else rows, indent=2))
        console.print(f"wrote {json_path}")


@app.command()
def demo(
    model: ModelOpt = DEFAULT_MODEL,
    codec: CodecOpt = "lossless",
    param: ParamOpt = None,
    store: Annotated[str | None, typer.Option(help="Store URL (default: a fresh disk store in a temp dir).")] = None,
) -> None:
    """The main job: cache a long context once, then answer questions about it with a much shorter TTFT."""
    from kvpack.demo import run_demo

    try:
        run_demo(console, model=model, codec=make_codec(codec, param), store_url=store)
    except KvpackError as exc:
        _fail(exc)


@app.command()
def calibrate(
    output: Annotated[Path, typer.Option("-o", "--output", help="Profile file (or directory) to write.")],
    codec: Annotated[str, typer.Option(help=f"Codec to calibrate: {', '.join(codecs.calibrated())}.")] = "transform",
    docs: Annotated[int, typer.Option(min=1, help="Calibration documents (never eval documents).")] = 6,
    text: Annotated[list[Path] | None, typer.Option(help="Calibrate on these text files instead (repeatable).")]
    = None,
    sources: Annotated[str | None, typer.Option(
        help="Draw the calibration documents from these corpus sources (comma-separated: stdlib, site-packages, "
             "pydoc, metadata) and record them in the profile, so eval rows say in-source or cross-source; "
             "default stdlib,pydoc, unrecorded.")] = None,
    draw: Annotated[int, typer.Option(
        min=0, help="Take the K-th set of documents of this size from the sources instead of the first (another "
                    "calibration of the same recipe, on other documents where the split holds enough).")] = 0,
    option: Annotated[list[str] | None, typer.Option(
        help="Calibration setting name=value (repeatable), e.g. rounding=0.4 or max_tokens=12288 for transform: the "
             "fields of the codec's CalibrationConfig (kvpack.codecs.<codec>.calibrate), checked before the model "
             "loads.")] = None,
    model: ModelOpt = DEFAULT_MODEL,
    for_vllm: Annotated[str | None, typer.Option(
        "--for-vllm", help="Bind the profile to the model vLLM serves from --model (the local checkpoint directory) "
                           "in this dtype (float32, bfloat16, float16), for kvpack's vLLM connector (docs/vllm.md).")]
    = None,
    json_path: Annotated[Path | None, typer.Option(
        "--json", help="Also write a record of this calibration (profile hash and size, documents, seconds, machine) "
                       "as JSON here; `kvpack bench cross-source` lists such records beside the settings.")] = None,
) -> None:
    """Build a codec's per-model calibration profile (PCA basis and bit allocations, or CacheGen's symbol tables)."""
    cls = codecs.codec_class(codec) if codec in codecs.available() else None
    if cls is None or not issubclass(cls, codecs.CalibratedCodec):
        _fail(ValueError(f"calibrate makes profiles for {', '.join(codecs.calibrated())}, not for {codec!r}"))
        return
    try:
        texts = [d.text for d in corpus(docs, "calibration", sources, text, draw)] if text else None
        chosen = corpus(docs, "calibration", sources, draw=draw) if sources or draw else docs
        options = {k: _literal(v) for k, v in codecs.parse_params(option or []).items()}
        cls.calibration_config(options)  # a bad --option is refused here, before the model loads
    except (KvpackError, ValueError) as exc:
        _fail(exc)
        return
    from kvpack.eval.corpora import DEFAULT_SOURCES, parse_sources, shared_documents, source_order

    if not isinstance(chosen, int):
        console.print(f"calibration documents from {sources or ','.join(DEFAULT_SOURCES)}"
                      f"{f' (draw {draw})' if draw else ''}: {', '.join(d.name for d in chosen)}")
    if draw:
        shared = shared_documents(docs, "calibration", parse_sources(sources) if sources else DEFAULT_SOURCES, draw)
        if shared:
            console.print(f"[yellow]note:[/yellow] draw {draw} repeats {len(shared)} of its {docs} documents from "
                          f"earlier draws (the split holds too few): {', '.join(shared)}")
    lm, tokenizer, spec = load_model(model)
    if for_vllm is not None:
        from kvpack.integrations.identity import spec_for_vllm

        try:
            spec = spec_for_vllm(spec, model, for_vllm)
        except (KvpackError, ValueError) as exc:
            _fail(exc)
            return
        console.print(f"profile bound to {model} as vLLM serves it in {for_vllm} (model {spec.fingerprint[:12]})")
    t0 = time.perf_counter()
    with console.status(f"calibrating {codec} ...") as status:
        def say(msg: str) -> None:
            status.update(f"calibrating {codec} ({time.perf_counter() - t0:.0f} s): {msg}")

        try:
            profile = cls.calibrate(lm, tokenizer, texts, docs=chosen, spec=spec, log=say, **options)
        except (KvpackError, ValueError) as exc:
            _fail(exc)
    if not isinstance(chosen, int):
        profile = replace(profile, meta={**profile.meta, "calibration_sources": source_order(d.source for d in chosen)})
    seconds = time.perf_counter() - t0
    path = profile.save(output)
    console.print(f"{codec} profile {profile.hash} ({profile.nbytes / 1e6:.2f} MB) written to {path} in "
                  f"{seconds:.0f} s")
    if json_path is not None:
        from kvpack.cpu import model_name

        record = {"kind": "calibration", "codec": codec, "profile_hash": profile.hash, "profile_bytes": profile.nbytes,
                  "seconds": seconds, "calibration_sources": profile.meta.get("calibration_sources"),
                  "documents": None if isinstance(chosen, int) else [d.name for d in chosen],
                  "n_documents": len(texts) if texts is not None else docs, "draw": draw,
                  "options": options, "machine": model_name(), "load": os.getloadavg()[0],
                  "command": _command_line()}
        json_path.write_text(json.dumps(record, indent=2))
        console.print(f"wrote {json_path}")
    for preset in profile.meta.get("presets", []):
        kl = "" if preset.get("kl") is None else f", KL {preset['kl']:.4f} on a held-out calibration document"
        console.print(f"  preset {preset['name']}{kl}")


@bench_app.command("entropy")
def bench_entropy(json_path: JsonOpt = None) -> None:
    """rANS engine throughput (Msym/s at 1 and 2 threads) and bits/symbol against the empirical entropy."""
    from kvpack.bench.entropy import run

    run(json_path, console)


def _literal(value: str) -> int | float | bool | str:
    """A command-line value as the int, float or bool it spells, else the string."""
    for kind in (int, float):
        try:
            return kind(value)
        except ValueError:
            pass
    return {"true": True, "false": False}.get(value.lower(), value)


def parse_setting(text: str) -> codecs.Codec:
    """``NAME`` or ``NAME:k=v,k=v`` into a codec."""
    name, _, params = text.partition(":")
    return codecs.get(name, **codecs.parse_params([p for p in params.split(",") if p]))


@bench_app.command("codecs")
def bench_codecs(
    setting: Annotated[list[str] | None, typer.Option(
        help="Extra setting NAME:k=v,k=v (repeatable), e.g. transform:profile=P,preset=32x.")] = None,
    defaults: Annotated[bool, typer.Option(help="Include the default settings (raw, zstd, lossless, ...).")] = True,
    docs: Annotated[int, typer.Option(min=1, help="Eval documents (half code, half prose).")] = 6,
    text: TextOpt = None,
    sources: SourcesOpt = None,
    prefix: Annotated[int, typer.Option(min=1, help="Prefix tokens whose cache is encoded.")] = 1536,
    cont: Annotated[int, typer.Option(help="Continuation tokens scored.")] = 512,
    passkey: Annotated[int | None, typer.Option(help="Also run passkey retrieval at this haystack length.")] = None,
    trials: Annotated[int, typer.Option(min=1, help="Passkey trials.")] = 20,
    model: ModelOpt = DEFAULT_MODEL,
    json_path: JsonOpt = None,
    markdown: Annotated[Path | None, typer.Option(help="Write the Markdown results page here.")] = None,
    plot: Annotated[Path | None, typer.Option(help="Write a PNG of ratio against perplexity increase here.")] = None,
) -> None:
    """Every codec setting on the real model: ratio, bits/element, quality metrics and MB/s, side by side."""
    from kvpack.bench import codecs as bench
    from kvpack.eval import evaluate

    try:
        extra = [parse_setting(s) for s in setting or []]
        chosen = bench.settings(extra) if defaults else extra
        documents_used = corpus(docs, "eval", sources, text)
        lm, tokenizer, spec = load_model(model)
        rows = evaluate(lm, tokenizer, spec, chosen, documents_used, prefix=prefix, cont=cont,
                        passkey_tokens=passkey, passkey_trials=trials)
    except (KvpackError, ValueError) as exc:
        _fail(exc)
    print_rows(rows, title=f"kvpack bench codecs ({rows[0]['machine']})", console=console)
    profiles = {f"{c.name} {c.profile_hash()}": n for c in chosen if (n := c.profile_nbytes()) is not None}
    command = _command_line()
    bench.write_outputs(rows, console, command, profiles, json_path, markdown, plot)


@bench_app.command("cross-source")
def bench_cross_source(
    runs: Annotated[list[Path], typer.Argument(help="JSON of `kvpack bench codecs` or `kvpack eval` runs, and of "
                                                    "`kvpack calibrate --json` records.",
                                               exists=True, dir_okay=False)],
    json_path: JsonOpt = None,
    markdown: Annotated[Path | None, typer.Option(help="Write the Markdown results page here.")] = None,
) -> None:
    """In-source vs cross-source vs own-files ratio and Δppl (code and prose apart) per setting, from the rows of
    runs with calibrate/eval --sources (docs/codecs.md); measures nothing."""
    from kvpack.bench import crosssource

    try:
        rows, calibrations = crosssource.load(runs)
    except (KeyError, ValueError) as exc:
        _fail(exc)
    crosssource.print_summary(rows, console)
    if json_path:
        json_path.write_text(json.dumps({"settings": crosssource.summary(rows),
                                         "unprofiled": crosssource.unprofiled(rows), "profiles": calibrations},
                                        indent=2))
        console.print(f"wrote {json_path}")
    if markdown:
        markdown.write_text(crosssource.markdown(rows, _command_line(), calibrations))
        console.print(f"wrote {markdown}")


@bench_app.command("speed")
def bench_speed(
    setting: Annotated[list[str] | None, typer.Option(
        help="Extra setting NAME:k=v,k=v (repeatable), e.g. transform:profile=P,preset=32x.")] = None,
    docs: Annotated[int, typer.Option(min=1, help="Eval documents (half code, half prose).")] = 6,
    prefix: Annotated[int, typer.Option(min=1, help="Prefix tokens whose cache is encoded.")] = 1536,
    repeats: Annotated[int, typer.Option(min=1, help="Timed runs per measurement (median).")] = 5,
    anchors: Annotated[bool, typer.Option(help="Also measure zstd -3/-19 and ZipNN on the same bytes.")] = True,
    defaults: Annotated[bool, typer.Option(help="Include the default settings (lossless, fp8, kivi).")] = True,
    model: ModelOpt = DEFAULT_MODEL,
    json_path: JsonOpt = None,
    markdown: Annotated[Path | None, typer.Option(help="Write the Markdown results page here.")] = None,
) -> None:
    """Ratio, bits/element, encode/decode MB/s and error of each codec on real caches, next to zstd and ZipNN."""
    from kvpack.bench import speed

    try:
        extra = [parse_setting(s) for s in setting or []]
        lm, tokenizer, spec = load_model(model)
        entries = speed.caches(lm, tokenizer, spec, corpus(docs, "eval", None), prefix)
        rows = speed.run(entries, extra, json_path, console, repeats=repeats, anchors=anchors, defaults=defaults)
    except (KvpackError, ValueError) as exc:
        _fail(exc)
    if markdown:
        markdown.write_text(speed.markdown(rows, _command_line()))


@bench_app.command("lossless-context")
def bench_lossless_context(
    docs: Annotated[int, typer.Option(min=1, help="Eval documents (half code, half prose).")] = 6,
    prefix: Annotated[int, typer.Option(min=1, help="Prefix tokens whose cache is measured.")] = 2048,
    model: ModelOpt = DEFAULT_MODEL,
    json_path: JsonOpt = None,
    markdown: Annotated[Path | None, typer.Option(help="Write the Markdown results page here.")] = None,
) -> None:
    """Would context modelling raise `lossless`? Its symbol's cost under richer contexts, at 256-token and
    whole-document chunks (bf16 caches)."""
    from kvpack.bench import lossless_context, speed

    try:
        lm, tokenizer, spec = load_model(model)
        entries = speed.caches(lm, tokenizer, spec, corpus(docs, "eval", None), prefix)
        rows = lossless_context.run(entries, json_path=json_path, console=console)
    except (KvpackError, ValueError) as exc:
        _fail(exc)
    if markdown:
        markdown.write_text(lossless_context.markdown(rows, _command_line()))


@bench_app.command("transform-context")
def bench_transform_context(
    param: ParamOpt = None,
    docs: Annotated[int, typer.Option(min=1, help="Eval documents (half code, half prose).")] = 6,
    sources: SourcesOpt = None,
    prefix: Annotated[int, typer.Option(min=1, help="Prefix tokens whose cache is measured.")] = 1536,
    model: ModelOpt = DEFAULT_MODEL,
    json_path: JsonOpt = None,
    markdown: Annotated[Path | None, typer.Option(help="Write the Markdown results page here.")] = None,
) -> None:
    """Would context-conditioned entropy tables raise `transform`? Its level symbols' cost under richer models,
    at 256-token and whole-document chunks (-p profile=P -p preset=32x)."""
    from kvpack.bench import speed, transform_context
    from kvpack.codecs.transform import Transform

    try:
        codec = cast(Transform, make_codec("transform", param))
        lm, tokenizer, spec = load_model(model)
        entries = speed.caches(lm, tokenizer, spec, corpus(docs, "eval", sources), prefix)
        rows = transform_context.run(codec, entries, json_path=json_path, console=console)
    except (KvpackError, ValueError) as exc:
        _fail(exc)
    if markdown:
        markdown.write_text(transform_context.markdown(rows, _command_line()))


@bench_app.command("gpu")
def bench_gpu(
    contexts: Annotated[str | None, typer.Option(help="Context lengths in tokens, comma-separated.")] = None,
    repeats: Annotated[int, typer.Option(min=1, help="Timed runs per measurement (median).")] = 5,
    tiny: Annotated[bool, typer.Option(help="A tiny model and context: checks the script (with --device cpu: under "
                                            "Triton's interpreter); its numbers mean nothing.")] = False,
    device: Annotated[str, typer.Option(help="cuda (the benchmark) or cpu (only with --tiny).")] = "cuda",
    json_path: JsonOpt = None,
) -> None:
    """GPU decode GB/s per codec and TTFT (recompute vs loading over host memory and emulated 10/25 Gbps links) of a
    Llama-3.1-8B-shaped model with random bf16 weights, at 8K and 32K tokens (docs/gpu.md). Needs CUDA."""
    from kvpack.bench import gpu

    try:
        if device != "cuda" and not tiny:
            raise ValueError("--device cpu runs only with --tiny (Triton's interpreter is far too slow for more)")
        config = gpu.GpuBenchConfig.tiny(device) if tiny else gpu.GpuBenchConfig(device=device)
        config = gpu.with_contexts(replace(config, repeats=repeats if not tiny else 1),
                                   tuple(int(n) for n in contexts.split(",")) if contexts else None)
        result = gpu.run(config, log=console.print)
    except (KvpackError, ValueError) as exc:
        _fail(exc)
    text = json.dumps(result, indent=1)
    if json_path:
        json_path.write_text(text + "\n")
    else:
        print(text)


@bench_app.command("capacity", add_help_option=False,
                   context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def bench_capacity(ctx: typer.Context) -> None:
    """Hit rate, bytes stored and mean/p95 TTFT of a Zipf workload under store budgets, per codec (--help: options)."""
    from kvpack.bench import capacity

    capacity.main(ctx.args)


@bench_app.command("ttft")
def bench_ttft(
    setting: Annotated[list[str] | None, typer.Option(
        help="Codec setting NAME:k=v,k=v to load (repeatable; default raw, and lossless/fp8/kivi when present).")]
    = None,
    lengths: Annotated[str, typer.Option(help="Context lengths in tokens, comma-separated.")] = "1024,2048,4096,8192",
    links: Annotated[str, typer.Option(help="Link rates in Gbit/s, comma-separated; empty for none.")]
    = "0.1,1,10,25",
    strategies: Annotated[str, typer.Option(help="Of recompute, load, adaptive; comma-separated.")]
    = "recompute,load,adaptive",
    drop: Annotated[bool, typer.Option(help="Also run the drop scenario (10 Gbps falling to 1 Gbps).")] = True,
    emulate_links: Annotated[bool, typer.Option(
        help="Emulate the links (sleep per read) even where shaped links (root, netns, tc) work.")] = False,
    repeats: Annotated[int, typer.Option(
        min=1, help="Timed runs per measurement after the warm-up (lower median).")] = 3,
    drop_runs: Annotated[int, typer.Option(help="Runs of the levels arm under a TTFT target in the drop scenario.")]
    = 20,
    drop_length: Annotated[int | None, typer.Option(help="Context length of that arm (default 4096).")] = None,
    slo_factor: Annotated[float, typer.Option(
        help="Its TTFT target: this times the best codec's adaptive TTFT on the steady 10 Gbps link.")] = 1.2,
    model: ModelOpt = DEFAULT_MODEL,
    json_path: JsonOpt = None,
    markdown: Annotated[Path | None, typer.Option(help="Write the Markdown results page here.")] = None,
    plot: Annotated[Path | None, typer.Option(help="Write a PNG of TTFT against context length here.")] = None,
    render: Annotated[Path | None, typer.Option(
        help="Measure nothing: write --markdown/--plot from this JSON (e.g. a run's .partial.json).")] = None,
) -> None:
    """TTFT: recompute vs loading each codec (all chunks, or adaptively) from memory, disk and shaped links."""
    import torch

    from kvpack import models
    from kvpack.bench import ttft

    if render is not None:
        ttft.render(json.loads(render.read_text()), markdown, plot, _command_line())
        return
    try:
        config = ttft.TtftConfig(lengths=tuple(int(x) for x in lengths.split(",") if x.strip()),
                                 links_gbps=tuple(float(x) for x in links.split(",") if x.strip()),
                                 strategies=tuple(x.strip() for x in strategies.split(",") if x.strip()),
                                 repeats=repeats, drop=drop, emulate_links=emulate_links, drop_runs=drop_runs,
                                 drop_length=drop_length, slo_factor=slo_factor)
        chosen = [parse_setting(s) for s in setting or []] or [
            codecs.get(name, **params) for name, params in ttft.DEFAULT_SETTINGS if name in codecs.available()]
        lm, tokenizer, spec = load_model(model)
        ttft.run(lm, tokenizer, spec, chosen, config, console=console, json_path=json_path, markdown_path=markdown,
                 plot_path=plot, command=_command_line(), float32_model=models.load(model, dtype=torch.float32)[0])
    except (KvpackError, ValueError) as exc:
        _fail(exc)


@bench_app.command("vllm")
def bench_vllm(
    setting: Annotated[list[str] | None, typer.Option(
        help="Codec setting NAME:k=v,k=v of a connector arm (repeatable; default raw, lossless, fp8, kivi:bits=4); "
             "a calibrated codec needs its profile, e.g. transform:profile=P.kvprof.")] = None,
    lengths: Annotated[str, typer.Option(help="Context lengths in tokens, comma-separated; empty for none.")]
    = "1024,2048,4096,8192",
    repeats: Annotated[int, typer.Option(min=1, help="Timed cold and warm requests per length (medians).")] = 3,
    requests: Annotated[int, typer.Option(help="Requests of the serving run.")] = 100,
    contexts: Annotated[int, typer.Option(help="Distinct contexts of the serving run.")] = 20,
    context_tokens: Annotated[int, typer.Option(help="Tokens per serving context.")] = 2048,
    concurrency: Annotated[int, typer.Option(help="Serving requests in flight at once.")] = 4,
    serving_tokens: Annotated[int, typer.Option(help="Tokens each serving request generates.")] = 16,
    alpha: Annotated[float, typer.Option(help="Zipf exponent of the serving order (0: uniform).")] = 0.0,
    seed: Annotated[int, typer.Option(help="Seed of the serving order.")] = 0,
    serving_setting: Annotated[list[str] | None, typer.Option(
        help="Codec setting of a serving run with the connector (one of the settings; repeatable; default "
             "lossless); empty: no serving run.")] = None,
    store_bytes: Annotated[int, typer.Option(
        help="Cap each connector arm's disk store at this many bytes, LRU-evicted (0: unbounded).")] = 0,
    baseline: Annotated[bool, typer.Option(help="Also run vLLM without the connector.")] = True,
    dtype: Annotated[str, typer.Option(help="vLLM's model dtype: float32 or bfloat16 (refused on AMX hosts).")]
    = "float32",
    kv_cache_gib: Annotated[int, typer.Option(help="vLLM's KV cache space in GiB.")] = 4,
    arm_timeout: Annotated[float, typer.Option(help="Seconds one arm's vLLM process may run.")] = 3600.0,
    venv: Annotated[Path, typer.Option(help="The vLLM venv (make vllm-venv).")] = Path(".venv-vllm"),
    checkpoint: Annotated[Path | None, typer.Option(help="Checkpoint directory (default: the venv's SmolLM2).")]
    = None,
    workdir: Annotated[Path | None, typer.Option(help="Where the arms' stores and logs go (a temporary folder).")]
    = None,
    json_path: JsonOpt = None,
    markdown: Annotated[Path | None, typer.Option(help="Write the Markdown results page here.")] = None,
    plot: Annotated[Path | None, typer.Option(help="Write a PNG of TTFT against context length here.")] = None,
    render: Annotated[Path | None, typer.Option(help="Measure nothing: write --markdown/--plot from this JSON.")]
    = None,
) -> None:
    """TTFT cold vs warm per codec and a serving run with and without kvpack's connector, in vLLM (docs/vllm.md)."""
    from kvpack.bench import vllm

    command = _command_line()
    if render is not None:
        vllm.render(json.loads(render.read_text()), markdown, plot, command)
        return
    try:
        config = vllm.VllmBenchConfig(
            settings=tuple(setting or vllm.DEFAULT_SETTINGS),
            lengths=tuple(int(x) for x in lengths.split(",") if x.strip()), repeats=repeats, requests=requests,
            contexts=contexts, context_tokens=context_tokens, concurrency=concurrency, serving_tokens=serving_tokens,
            alpha=alpha, seed=seed, serving_settings=tuple(s for s in serving_setting or ["lossless"] if s),
            store_bytes=store_bytes or None, baseline=baseline, dtype=dtype,
            kv_cache_gib=kv_cache_gib, arm_timeout_s=arm_timeout)

        def save(doc: dict[str, Any]) -> None:
            if json_path:
                json_path.write_text(json.dumps(doc | {"command": command}, indent=1))

        doc = vllm.run(config, venv, checkpoint, workdir, console.print, on_arm=save) | {"command": command}
    except (KvpackError, ValueError) as exc:
        _fail(exc)
    save(doc)
    render_command = "kvpack bench vllm --render JSON" + (f" --markdown {markdown.name}" if markdown else "") + \
        (f" --plot {plot.name}" if plot else "")
    vllm.render(doc, markdown, plot, render_command)
    console.print_json(json.dumps({"target": vllm.target(doc), "serving": doc["serving"]}))


@bench_app.command("reuse")
def bench_reuse(
    cases: Annotated[int, typer.Option(help="RAG cases (half code, half prose).")] = 6,
    segments: Annotated[str, typer.Option(help="Segment counts, comma-separated (alternating per pair of cases).")]
    = "4,8",
    segment_tokens: Annotated[str, typer.Option(help="Segment length range LOW-HIGH in tokens.")] = "256-512",
    ratios: Annotated[str, typer.Option(help="Recompute ratios, comma-separated.")] = "0.05,0.1,0.15,0.2,0.3",
    passkey_trials: Annotated[int, typer.Option(min=1, help="Passkey trials (key in one of 8 segments).")] = 20,
    passkey_tokens: Annotated[int, typer.Option(help="Tokens per passkey segment.")] = 256,
    edit_cases: Annotated[int, typer.Option(help="Edited documents (half code, half prose).")] = 6,
    edit_tokens: Annotated[int, typer.Option(help="Tokens per edited document.")] = 4096,
    continuation: Annotated[int, typer.Option(help="Continuation tokens scored.")] = 64,
    repeats: Annotated[int, typer.Option(min=1, help="Timed runs per TTFT arm after the warm-up (lower median).")] = 3,
    dtype: Annotated[str, typer.Option(help="auto (faster of bfloat16/float32), float32 or bfloat16.")] = "auto",
    greedy: Annotated[int, typer.Option(help="Greedy tokens compared after the question.")] = 8,
    parts: Annotated[str, typer.Option(help="Of rag, timing, edits, passkey; comma-separated, run in that order.")]
    = "rag,timing,edits,passkey",
    from_json: Annotated[Path | None, typer.Option(
        help="Only render --markdown/--plot from this JSON (with --json: write it back, targets re-judged).")] = None,
    resume: Annotated[Path | None, typer.Option(
        help="The JSON of a run with the same options that stopped part-way: keep its parts, run the rest.")] = None,
    model: ModelOpt = DEFAULT_MODEL,
    json_path: JsonOpt = None,
    markdown: Annotated[Path | None, typer.Option(help="Write the Markdown results page here.")] = None,
    plot: Annotated[Path | None, typer.Option(help="Write a PNG of KL against recompute ratio here.")] = None,
) -> None:
    """Segments at new positions, passkey across segments and edits, per repair policy, against full recompute."""
    from kvpack.bench import reuse

    render = f"kvpack bench reuse --from-json {from_json or json_path}" + (f" --markdown {markdown}" if markdown
                                                                          else "") + (f" --plot {plot}" if plot else "")
    if from_json is not None:  # targets re-judged by this version's rules (--json writes them back)
        doc = json.loads(from_json.read_text())
        reuse.write(doc | {"targets": reuse.targets(doc)}, json_path, markdown, plot, render)
        return
    try:
        low, _, high = segment_tokens.partition("-")
        config = reuse.ReuseConfig(
            cases=cases, segment_counts=tuple(int(x) for x in segments.split(",")),
            segment_tokens=(int(low), int(high or low)), ratios=tuple(float(x) for x in ratios.split(",")),
            passkey_trials=passkey_trials, passkey_segment_tokens=passkey_tokens, edit_cases=edit_cases,
            edit_tokens=edit_tokens, continuation=continuation, greedy_tokens=greedy, repeats=repeats, dtype=dtype)
        doc = reuse.run(model, config, console.print, _command_line(),
                        tuple(p.strip() for p in parts.split(",") if p.strip()),
                        checkpoint=lambda d: reuse.write(d, json_path, markdown, plot, render),
                        resume=json.loads(resume.read_text()) if resume else None)
    except (KvpackError, ValueError) as exc:
        _fail(exc)
    console.print_json(json.dumps(doc["targets"]))


if __name__ == "__main__":
    app()
