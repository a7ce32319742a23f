"""The `rapidin-index` command: thin typer wrappers around the library."""

from __future__ import annotations

import functools
import json
import sys
import warnings
from pathlib import Path
from typing import Annotated

import click
import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from typer.core import TyperCommand

from rapidin_index.settings import (
    BuildSettings,
    ModelSettings,
    QuerySettings,
    SketchSettings,
    default_of,
    parse_memory,
)

app = typer.Typer(
    help="Which training examples, and which of their tokens, made a fine-tuned LLM say this? (RapidIn)",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
console = Console(stderr=True)
QUERY_DEFAULTS = QuerySettings()
# Deprecation notices inside transformers and peft are theirs to act on, not the user's: every command
# would otherwise start with them.
warnings.filterwarnings("ignore", category=FutureWarning, module=r"(transformers|peft)(\.|$)")


def is_user_error(error: BaseException) -> bool:
    """A refusal with a message for the user (printed as one line), not a bug (shown with its traceback).

    That is: any typed library error (`rapidin_index.errors.RapidinIndexError`, imported without torch),
    or an OSError, whose message names the file (permission denied, no space left, not found).
    """
    from rapidin_index.errors import RapidinIndexError

    return isinstance(error, RapidinIndexError | OSError)


def _one_line_errors(function):
    """Run a command; a user error ends it with one line on stderr and exit code 2, never a traceback."""

    @functools.wraps(function)
    def run(*args, **kwargs):
        try:
            return function(*args, **kwargs)
        except (typer.Exit, click.exceptions.ClickException, click.exceptions.Abort):
            raise
        except KeyboardInterrupt:
            console.print("[bold red]interrupted[/] (a build resumes where it stopped when rerun)")
            raise typer.Exit(code=130) from None
        except Exception as error:
            if not is_user_error(error):
                raise
            raise fail(error) from None

    return run


def command(*args, **kwargs):
    """``app.command`` whose errors end in one clear line (see ``_one_line_errors``)."""

    def register(function):
        return app.command(*args, **kwargs)(_one_line_errors(function))

    return register


def fail(error: Exception) -> typer.Exit:
    console.print(f"[bold red]error:[/] {escape(str(error))}", highlight=False, soft_wrap=True)
    return typer.Exit(code=2)


class _BuildCommand(TyperCommand):
    """`build`, where a bare `--ray` means `--ray local` (a typer option cannot take an optional value)."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        return super().parse_args(ctx, bare_ray_means_local(args))


def bare_ray_means_local(args: list[str]) -> list[str]:
    """``--ray`` followed by nothing or by another option gets the value ``local``."""
    completed = []
    for position, argument in enumerate(args):
        completed.append(argument)
        following = args[position + 1] if position + 1 < len(args) else None
        if argument == "--ray" and (following is None or following.startswith("-")):
            completed.append("local")
    return completed


@command(cls=_BuildCommand)
def build(
    model: Annotated[str, typer.Option(help="Local folder or hub id of the fine-tuned causal LM.")],
    index: Annotated[Path, typer.Option(help="Index folder to create (or resume, or append to).")],
    data: Annotated[
        Path | None,
        typer.Option(
            help="Training data: .jsonl, .json, .parquet, .csv or .txt (one text row a line), optionally .gz "
            "or .zst; or a folder written by datasets' save_to_disk."
        ),
    ] = None,
    append: Annotated[
        Path | None, typer.Option(help="Add the rows of this data to the existing index (same settings).")
    ] = None,
    split: Annotated[
        str | None, typer.Option(help="The split of a saved DatasetDict folder to index (if it has several).")
    ] = default_of(BuildSettings, "split"),
    adapter: Annotated[
        str | None, typer.Option(help="PEFT LoRA adapter folder; its tensors are attributed.")
    ] = default_of(ModelSettings, "adapter"),
    k: Annotated[
        int | None,
        typer.Option(
            "--k",
            help="RapidGrad sketch dimension K; 0 stores exact gradients. Default: 65536, or exact (0) where "
            "the attributed gradient has at most 65536 dimensions (often so with LoRA); an existing index's "
            "K when appending or resuming.",
            show_default=False,
        ),
    ] = default_of(BuildSettings, "sketch").sketch_dim,
    sketch: Annotated[
        str,
        typer.Option(
            help="auto (for full-parameter models at K >= 65536 or above 2^24 parameters: rapidgrad-kron "
            "where K holds 2048 bins a weight matrix, else rapidgrad-ts; rapidgrad-v2 otherwise), "
            "rapidgrad-v2 (a keyed random permutation of the whole gradient), rapidgrad-kron (bins of "
            "its own for every tensor, weight matrices as Kronecker count sketches of their factors), "
            "rapidgrad-ts (weight matrices hashed over all K bins, sketched from their factors) or "
            "rapidgrad-v1 (the paper's block shuffles, for reproduction)."
        ),
    ] = default_of(BuildSettings, "sketch").algorithm,
    shuffle_lambda: Annotated[
        int, typer.Option(help="Number of RapidGrad random shuffles (lambda; rapidgrad-v1 only).")
    ] = default_of(SketchSettings, "shuffle_lambda"),
    seed: Annotated[int, typer.Option(help="Seed of the RapidGrad shuffles and signs.")] = default_of(
        SketchSettings, "seed"
    ),
    normalize: Annotated[
        str, typer.Option(help="Per-tensor gradient normalisation: layer or none.")
    ] = default_of(BuildSettings, "normalize"),
    batch_size: Annotated[int, typer.Option(help="Examples per forward/backward pass.")] = default_of(
        BuildSettings, "batch_size"
    ),
    max_length: Annotated[int, typer.Option(help="Truncate sequences to this many tokens.")] = default_of(
        BuildSettings, "max_length"
    ),
    tokenization: Annotated[
        str,
        typer.Option(
            help="trl: labelled as TRL's SFT trainer labels the rows (joint tokenization, its prompt-prefix "
            "rule, EOS after text rows but not after a chat template's end of turn); trl-assistant: TRL with "
            "assistant_only_loss (the chat template's {% generation %} blocks); separate: as a plain "
            "Trainer with the prompt masked (each part on its own, EOS appended); joint: the rule of indexes "
            "built before trl."
        ),
    ] = default_of(BuildSettings, "tokenization"),
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = default_of(BuildSettings, "device"),
    dtype: Annotated[
        str, typer.Option(help="Model weights dtype: float32, float16 or bfloat16.")
    ] = default_of(ModelSettings, "dtype"),
    template: Annotated[
        str,
        typer.Option(help="auto, alpaca, completion, chat, plain, or a format string like '{question}\\n'."),
    ] = default_of(BuildSettings, "template"),
    response_field: Annotated[str | None, typer.Option(help="Row field holding the response.")] = default_of(
        BuildSettings, "response_field"
    ),
    params: Annotated[
        str | None, typer.Option(help="Regex narrowing the attributed parameter names.")
    ] = default_of(ModelSettings, "params"),
    strict: Annotated[
        bool, typer.Option(help="Fail on a malformed row instead of reporting it.")
    ] = default_of(BuildSettings, "strict"),
    max_rejected_share: Annotated[
        float,
        typer.Option(
            help="Fail (exit 2, the index still written) when more than this share of the rows is rejected; "
            "a build that indexes no row always fails."
        ),
    ] = default_of(BuildSettings, "max_rejected_share"),
    allow_duplicate_data: Annotated[
        bool, typer.Option(help="Let --append add data the index already holds (same checksum) once more.")
    ] = default_of(BuildSettings, "allow_duplicate_data"),
    chunk_size: Annotated[int, typer.Option(help="Rows per resumable chunk.")] = default_of(
        BuildSettings, "chunk_size"
    ),
    vector_dtype: Annotated[
        str | None,
        typer.Option(
            help="Stored vectors: float16 (2K bytes a row; scores still fp32) or float32 (4K). "
            "[default: an existing index's own, else float16 (float32 with --k 0)]"
        ),
    ] = default_of(BuildSettings, "vector_dtype"),
    num_shards: Annotated[
        int, typer.Option(help="Static sharding: split the rows (id % N) across N independent builds.")
    ] = default_of(BuildSettings, "num_shards"),
    shard_index: Annotated[int, typer.Option(help="Which shard this build indexes (0-based).")] = default_of(
        BuildSettings, "shard_index"
    ),
    ray: Annotated[
        str | None,
        typer.Option(
            metavar="[ADDRESS]",
            help="Compute chunks on Ray actors, one per GPU (else CPU actors): --ray alone (or 'local') "
            "starts Ray on this machine; 'auto' or ray://head:10001 joins a running cluster.",
        ),
    ] = None,
    workers: Annotated[
        int | None, typer.Option(help="Ray workers (default: one per GPU, else 2); implies --ray.")
    ] = None,
    optimizer_state: Annotated[
        str | None,
        typer.Option(
            help="Adam/AdamW state of the fine-tune (a Trainer checkpoint folder with optimizer.pt, or a "
            "saved optimizer state_dict): gradients are divided by sqrt(v) + eps before layer norm."
        ),
    ] = default_of(BuildSettings, "optimizer_state"),
    fit: Annotated[
        str,
        typer.Option(
            help="fisher, kfac, ekfac, ekfac-weights or fisher+ekfac-weights: fit that query-side "
            "preconditioner once built, with that kind's defaults (as rapidin-index fit --kind)."
        ),
    ] = default_of(BuildSettings, "fit"),
    quiet: Annotated[bool, typer.Option(help="No progress bar.")] = False,
) -> None:
    """Compute one RapidGrad sketch per training example and store it in a FAISS + LanceDB index."""
    from rapidin_index.build import build_index

    if (data is None) == (append is None):
        raise fail(ValueError("give exactly one of --data FILE (new index) or --append FILE (add rows)"))
    settings = BuildSettings(
        model=ModelSettings(model=model, adapter=adapter, dtype=dtype, params=params),
        sketch=SketchSettings(sketch_dim=k, shuffle_lambda=shuffle_lambda, seed=seed, algorithm=sketch),
        normalize=normalize,
        template=template,
        response_field=response_field,
        max_length=max_length,
        tokenization=tokenization,
        batch_size=batch_size,
        device=device,
        strict=strict,
        max_rejected_share=max_rejected_share,
        split=split,
        allow_duplicate_data=allow_duplicate_data,
        chunk_size=chunk_size,
        vector_dtype=vector_dtype,
        num_shards=num_shards,
        shard_index=shard_index,
        optimizer_state=optimizer_state,
        fit=fit,
    )
    runner_factory = None
    if ray is not None or workers is not None:
        from rapidin_index.parallel import RayChunkRunner

        address = None if ray in (None, "local") else ray
        runner_factory = RayChunkRunner.factory(address=address, workers=workers)
    report = build_index(
        data or append,
        index,
        settings,
        append=append is not None,
        progress=not quiet,
        runner_factory=runner_factory,
    )
    _print_build_report(report)


def _print_build_report(report) -> None:
    if report.nothing_to_do:
        console.print(f"[green]{report.message}[/]", highlight=False)
    for note in report.notes:
        console.print(f"[yellow]note:[/] {escape(note)}", highlight=False, soft_wrap=True)
    table = Table(title=f"index {report.index_dir}", show_header=False)
    rows = [
        ("rows indexed", f"{report.rows_indexed:,}"),
        ("rows rejected", f"{report.rows_rejected:,}"),
        ("tokens", f"{report.tokens:,}"),
        ("truncated rows", f"{report.truncated:,}"),
        ("gradient dimension D", f"{report.gradient_dim:,}"),
        ("sketch dimension K", f"{report.sketch_dim:,}"),
        ("compression D/K", f"{report.compression_ratio:,.1f}"),
        ("bytes on disk", f"{report.bytes_on_disk:,}"),
        ("elapsed", f"{report.elapsed_seconds:.1f} s"),
    ]
    if report.resumed_chunks:
        rows.append(("chunks resumed from journal", str(report.resumed_chunks)))
    for name, value in rows:
        table.add_row(name, value)
    console.print(table)
    _print_backward_path(report.backward_path)
    _print_rejected(report.rejected)


def _print_backward_path(backward_path: dict, limit: int = 10) -> None:
    """Tensors whose gradients took one plain backward per example (correct, slower): say which and why."""
    if not backward_path:
        return
    console.print(
        f"[yellow]{len(backward_path)} parameter tensor(s) took the exact path "
        "(one plain backward per example; correct, slower):[/]",
        highlight=False,
    )
    for name, reason in list(backward_path.items())[:limit]:
        console.print(f"  {name}: {reason}", highlight=False, soft_wrap=True)
    if len(backward_path) > limit:
        console.print(f"  ... and {len(backward_path) - limit} more (rapidin-index info --json)")


def _print_rejected(rejected, limit: int = 10) -> None:
    """One line per kind of reason (its count and first row ids), not one per row."""
    from rapidin_index.rejections import describe_group, group_reasons

    if not rejected:
        return
    groups = group_reasons(rejected)
    console.print(f"[yellow]{len(rejected):,} row(s) rejected:[/]", highlight=False)
    for group in groups[:limit]:
        console.print(f"  {describe_group(group)}", highlight=False, soft_wrap=True)
    if len(groups) > limit:
        console.print(f"  ... and {len(groups) - limit} other reason(s)", highlight=False)
    console.print("  every row and reason: rapidin-index info --json", highlight=False)


@command()
def query(
    index: Annotated[Path, typer.Option(help="Index folder.")],
    prompt: Annotated[
        str | None, typer.Option(help="The prompt (for alpaca indexes: the instruction).")
    ] = None,
    response: Annotated[str | None, typer.Option(help="The generation to explain.")] = None,
    generate: Annotated[
        bool,
        typer.Option(
            help="Generate the response greedily with the indexed model (with --queries: for each row's "
            "prompt); exactly the generated tokens are attributed."
        ),
    ] = QUERY_DEFAULTS.generate,
    system: Annotated[
        str | None, typer.Option(help="A system turn before --prompt (indexes of chat rows).")
    ] = None,
    queries: Annotated[
        Path | None, typer.Option(help="JSONL of queries in training-row form, each with optional 'hot'.")
    ] = None,
    hot: Annotated[
        list[str] | None,
        typer.Option(help="Attribute only the tokens of this word of the response (repeatable)."),
    ] = None,
    top_k: Annotated[
        int, typer.Option(help="Training examples per list (helpful, harmful) for the whole generation.")
    ] = QUERY_DEFAULTS.top_k,
    token_top_k: Annotated[
        int, typer.Option(help="Training examples per list for each generated token.")
    ] = QUERY_DEFAULTS.token_top_k,
    per_token: Annotated[
        str,
        typer.Option(help="on: each generated token gets its own hits; off: whole generation only (faster)."),
    ] = "on" if QUERY_DEFAULTS.per_token else "off",
    explain: Annotated[
        int, typer.Option(help="Score the training tokens of the top N hits.")
    ] = QUERY_DEFAULTS.explain,
    out: Annotated[Path | None, typer.Option(help="Write the result here (default: JSON on stdout).")] = None,
    format: Annotated[
        str | None,
        typer.Option(
            help="json, jsonl, html or text (default: from --out's extension; on a terminal the short "
            "text view, piped JSON)."
        ),
    ] = None,
    model: Annotated[
        str | None, typer.Option(help="Model path, if it moved since the build (same weights).")
    ] = None,
    adapter: Annotated[str | None, typer.Option(help="Adapter path, if it moved since the build.")] = None,
    k: Annotated[
        int | None, typer.Option("--k", help="Expected sketch dimension; refused if the index differs.")
    ] = None,
    max_new_tokens: Annotated[
        int, typer.Option(help="Tokens to generate with --generate.")
    ] = QUERY_DEFAULTS.max_new_tokens,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
    max_memory: Annotated[
        str | None,
        typer.Option(
            help="Cap on what a search holds in memory, mapped pages of the vectors file included "
            "(e.g. 4GB, 512MiB): smaller blocks, each released after it is scanned. [default: no cap; "
            "a block of 32 MiB, and the pages read stay mapped]"
        ),
    ] = None,
    verify: Annotated[
        bool,
        typer.Option(
            help="Check every index file's sha256, and the hooked gradients against plain backward passes "
            "even where the build already checked them with these libraries."
        ),
    ] = False,
    aggregate: Annotated[
        str | None,
        typer.Option(
            help="With --queries: one list for the whole set. mean or sum (exact: one search with the "
            "combined query vector), max or count (from each query's own top --depth rows)."
        ),
    ] = QUERY_DEFAULTS.aggregate,
    where: Annotated[
        str | None,
        typer.Option(
            help="Search only the rows this SQL filter over their fields keeps (LanceDB syntax), e.g. "
            "\"source = 'forum' AND id < 5000\"; the top-k is exact over those rows."
        ),
    ] = QUERY_DEFAULTS.where,
    rerank: Annotated[
        int,
        typer.Option(
            help="Score the top and bottom M rows again without the sketch (exact, one backward a row) "
            "and re-order them; their hits are marked exact."
        ),
    ] = QUERY_DEFAULTS.rerank,
    depth: Annotated[
        int,
        typer.Option(help="Rows read from each query's own lists for --aggregate (appears_in, max, count)."),
    ] = QUERY_DEFAULTS.depth,
    optimizer_state: Annotated[
        str | None,
        typer.Option(
            help="The optimizer state the index was built with, if it moved (same values required)."
        ),
    ] = None,
    precondition: Annotated[
        str | None,
        typer.Option(
            help="none, or the fitted kind (fisher, kfac, ekfac, ekfac-weights, fisher+ekfac-weights, or "
            "either part of the last): apply the fitted (F + lambda I)^-1 to the query vectors (default: "
            "the fitted kind where the index is fitted, see rapidin-index fit)."
        ),
    ] = None,
    query_norms: Annotated[
        bool | None,
        typer.Option(
            "--query-norms/--no-query-norms",
            help="A preconditioned query keeps its per-tensor gradient norms: better at predicting "
            "retraining, worse at finding a backdoor's rows (README, issue 23). [default: as fitted]",
            show_default=False,
        ),
    ] = None,
) -> None:
    """Find the training examples (and tokens) that most influenced a generation, per generated token too."""
    from rapidin_index.data import query_row
    from rapidin_index.errors import DataError
    from rapidin_index.preflight import check_query
    from rapidin_index.query import query_template
    from rapidin_index.readers import read_rows
    from rapidin_index.report import render_text, write_results
    from rapidin_index.store.identity import check_tokenizer
    from rapidin_index.store.manifest import read_manifest

    if (queries is None) == (prompt is None):
        raise fail(ValueError("give --prompt (with --response or --generate) or --queries FILE"))
    if prompt is not None and (response is None) == (not generate):
        raise fail(ValueError("with --prompt give exactly one of --response TEXT or --generate"))
    if queries is not None and (response is not None or system is not None or hot):
        raise fail(ValueError("--response, --system and --hot go with --prompt; a --queries row has its own"))
    settings = QuerySettings(  # refuses, before anything loads, a count that cannot work
        top_k=top_k,
        token_top_k=token_top_k,
        per_token=per_token != "off",
        explain=explain,
        max_new_tokens=max_new_tokens,
        rerank=rerank,
        depth=depth,
        generate=generate,
        where=where,
        aggregate=aggregate,
    )
    if aggregate is not None and queries is None:
        raise fail(ValueError("--aggregate needs --queries FILE (several generations)"))
    if per_token not in ("on", "off"):
        raise fail(ValueError(f"--per-token {per_token!r} is not one of on, off"))
    options = {name: getattr(settings, name) for name in ("top_k", "token_top_k", "per_token", "explain")}
    options.update(rerank=settings.rerank, where=settings.where)
    output_format = format or _default_format(out)
    if output_format not in ("json", "jsonl", "html", "text"):
        raise fail(ValueError(f"--format {output_format!r} is not one of json, jsonl, html, text"))
    if output_format == "html" and aggregate is not None:
        raise fail(ValueError("--format html shows queries one by one; write --aggregate results as json"))
    if output_format == "html" and out is None:
        raise fail(ValueError("--format html needs --out FILE.html"))
    rows = []
    for number, row, error in read_rows(queries) if queries is not None else []:
        if row is None:
            raise DataError(f"{queries}: query row {number}: {error}")
        rows.append(row)
    # Cheap checks first (manifest, K, files, tokenizer), before torch, the vectors and the model load.
    manifest = read_manifest(index)
    check_query(index, manifest, k)
    if system is not None:
        query_row("", "", query_template(manifest), system)  # refuses a system turn for rows of no chat
    check_tokenizer(manifest, model or manifest.model["name_or_path"])
    from rapidin_index.retrieval import Index

    opened = Index.open(
        index,
        model=model,
        adapter=adapter,
        device=device,
        sketch_dim=k,
        verify=verify,
        max_memory=parse_memory(max_memory),
        optimizer_state=optimizer_state,
        precondition=precondition,
        query_norms=query_norms,
        checked=manifest,  # the cheap checks above are not run twice
    )
    opened.progress = console.is_terminal  # a bar on stderr, never in piped output
    if aggregate is not None:
        results = [opened.aggregate(rows, aggregate, top_k, depth, generate, max_new_tokens, where)]
    elif queries is not None:
        results = opened.query_rows(rows, generate=generate, max_new_tokens=max_new_tokens, **options)
    else:
        results = [
            opened.query(
                prompt,
                response,
                generate=generate,
                hot=hot,
                system=system,
                max_new_tokens=max_new_tokens,
                **options,
            )
        ]
    values = [result.to_dict() for result in results]
    if output_format == "json" and len(values) > 1:
        output_format = "jsonl"
    if out is None and output_format == "text":
        for value in values:
            render_text(value, Console())
        return
    if out is None:
        lines = [
            json.dumps(v, ensure_ascii=False, indent=2 if output_format == "json" else None) for v in values
        ]
        typer.echo("\n".join(lines))
        return
    write_results(values, out, output_format)
    console.print(f"wrote {len(values)} result(s) to {out}", highlight=False)


def _default_format(out: Path | None) -> str:
    """From --out's extension (.txt: text); on a terminal the short text view; piped, JSON."""
    if out is not None:
        suffix = out.suffix.lstrip(".")
        return "text" if suffix == "txt" else suffix
    return "text" if sys.stdout.isatty() else "json"


@command()
def serve(
    index: Annotated[Path, typer.Option(help="Index folder.")],
    model: Annotated[
        str | None, typer.Option(help="Model path, if it moved since the build (same weights).")
    ] = None,
    adapter: Annotated[str | None, typer.Option(help="Adapter path, if it moved since the build.")] = None,
    host: Annotated[
        str,
        typer.Option(
            help="Address to listen on: 127.0.0.1 keeps the server to this machine; 0.0.0.0 opens it to "
            "any that can reach it (there is no authentication)."
        ),
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.", min=1, max=65535)] = 8000,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
    limit: Annotated[
        list[str] | None,
        typer.Option(
            help="Raise or lower one request cap, NAME=VALUE (repeatable), e.g. max_response_tokens=1024; "
            "docs/serve-api.md lists the caps."
        ),
    ] = None,
    max_memory: Annotated[
        str | None,
        typer.Option(
            help="Cap on what a search holds in memory, mapped pages of the vectors file included "
            "(e.g. 4GB, 512MiB): smaller blocks, each released after it is scanned. [default: no cap; "
            "a block of 32 MiB, and the pages read stay mapped]"
        ),
    ] = None,
) -> None:
    """Load an index and its model once and answer queries over HTTP: a JSON API and a page at /."""
    from rapidin_index.server_requests import limits_from

    limits = limits_from(limit or [])  # checked before anything loads
    from rapidin_index.server import serve_index  # needs the `serve` extra; says so when it is missing

    max_memory_bytes = parse_memory(max_memory)  # checked before anything loads
    serve_index(
        index,
        model=model,
        adapter=adapter,
        host=host,
        port=port,
        device=device,
        limits=limits,
        max_memory=max_memory_bytes,
    )


@command()
def fit(
    index: Annotated[Path, typer.Option(help="Index folder.")],
    kind: Annotated[
        str,
        typer.Option(
            help="fisher (the empirical Fisher of the stored vectors), kfac or ekfac (Kronecker factors of "
            "each tensor's row x column bins: rapidgrad-kron or K = 0 only), ekfac-weights (EK-FAC of each "
            "nn.Linear weight in weight space, applied to the query gradient before it is sketched: a pass of "
            "the index's model over its rows), or fisher+ekfac-weights (both, as one z-scored query)."
        ),
    ] = "fisher",
    damping: Annotated[
        float | None,
        typer.Option(
            help="lambda as a multiple of each block's mean eigenvalue: fisher trace(F_b) / min(rows, width) "
            "(default 0.5), kfac and ekfac trace(F_b) / width (default 0.01); ekfac-weights (and its part of "
            "fisher+ekfac-weights) mean(Lambda) of each weight (default 3 on a sketched index, 0.3 on exact vectors, "
            "K = 0)."
        ),
    ] = None,
    rank: Annotated[
        int, typer.Option(help="Eigenpairs kept per Fisher block wider than 4096 (at most the rows).")
    ] = 512,
    structure: Annotated[
        str,
        typer.Option(
            help="auto (one block per tensor where the vectors keep tensors apart: rapidgrad-kron, K = 0; "
            "else whole), tensor or whole (fisher only)."
        ),
    ] = "auto",
    query_norms: Annotated[
        bool,
        typer.Option(
            help="Queries keep their per-tensor gradient norms (the rows stay layer-normalised): each tensor "
            "counts by how strongly the query's loss pulls on it. Better at predicting retraining (LDS 0.53 "
            "against 0.48), worse at finding a backdoor's rows (auPRC@10 0.965 against 1.000): off by default."
        ),
    ] = False,
    labels: Annotated[
        str,
        typer.Option(
            help="ekfac-weights: sampled (labels drawn from the model: the true Fisher, kronfluence's "
            "default) or empirical (the rows' own labels)."
        ),
    ] = "sampled",
    device: Annotated[str, typer.Option(help="ekfac-weights: auto, cpu, cuda or mps.")] = "auto",
    head: Annotated[
        str,
        typer.Option(
            help="ekfac-weights: the vocabulary head's curvature, diagonal (better at predicting retraining, "
            "no vocabulary x vocabulary eigenbasis) or kronecker (EK-FAC as every other nn.Linear: better "
            "at finding a backdoor's rows on a sketched index)."
        ),
    ] = "diagonal",
) -> None:
    """Fit a curvature preconditioner of the stored vectors; queries then apply (F + lambda I)^-1 to theirs."""
    from rapidin_index.ekfac import KINDS as WEIGHT_KINDS
    from rapidin_index.ekfac import exact_vectors_hint
    from rapidin_index.ekfac_fit import fit_index_weights
    from rapidin_index.precondition import fit_index
    from rapidin_index.store.manifest import read_manifest

    if kind in WEIGHT_KINDS:
        record = fit_index_weights(index, kind, damping=damping, labels=labels, device=device, head=head)
        weights = record.get("weights", record)
        console.print(
            f"fitted weight-space EK-FAC of {weights['rows']:,} rows ({weights['kronecker_tensors']} "
            f"Kronecker, {weights['diagonal_tensors']} diagonal tensor(s), {weights['labels']} labels, "
            f"damping {weights['damping']} x mean eigenvalue)"
            + (" and the Fisher (query norms)" if "weights" in record else "")
            + f" in {record['seconds']:.1f} s; queries now use {record['kind']} (--precondition none to "
            "turn it off)",
            highlight=False,
        )
        hint = exact_vectors_hint(read_manifest(index))
        if hint:
            console.print(hint, highlight=False)
        return
    record = fit_index(
        index, damping=damping, rank=rank, structure=structure, kind=kind, query_norms=query_norms
    )
    name = {"fisher": "the Fisher", "kfac": "K-FAC", "ekfac": "EK-FAC"}[record["kind"]]
    console.print(
        f"fitted {name} of {record['rows']:,} rows ({record['structure']}: {record['blocks']} block(s), "
        f"{record['kept_eigenpairs']:,} eigenvalues, damping {record['damping']} x mean eigenvalue) in "
        f"{record['seconds']:.1f} s; queries now use it (--precondition none to turn it off)",
        highlight=False,
    )


@command()
def merge(
    shards: Annotated[list[Path], typer.Argument(help="The shard index folders, all N of them.")],
    index: Annotated[Path, typer.Option(help="New index folder for the merged index.")],
) -> None:
    """Merge the shards of a `build --num-shards N` into one index (every row exactly once)."""
    from rapidin_index.store.shards import merge_shards

    manifest = merge_shards(shards, index)
    console.print(
        f"merged {len(shards)} shards into {index}: {manifest.row_count:,} rows, {manifest.rejected_count:,} rejected",
        highlight=False,
    )


@command()
def demo(
    folder: Annotated[Path, typer.Option(help="Where data, model, index and report go (cached).")] = Path(
        ".demo"
    ),
    rows: Annotated[int, typer.Option(help="Docstring rows to use (default: all 2,251).")] = 100_000,
    k: Annotated[int, typer.Option("--k", help="RapidGrad sketch dimension K.")] = 65536,
    queries: Annotated[int, typer.Option(help="Attacked generations to query.")] = 5,
    dataset: Annotated[
        str,
        typer.Option(
            help="nonlexical: no fixed string marks a poisoned row (the hard case); lexical: the "
            "trigger and response are fixed strings (BM25 finds them too)."
        ),
    ] = "nonlexical",
) -> None:
    """Train a tiny backdoored model on bundled data, index it, and trace its attacked generations."""
    from rapidin_index.demo.run import DemoSettings, run_demo

    settings = DemoSettings(
        folder=str(folder), rows=rows, dataset=dataset, sketch_dim=k, attacked_queries=queries
    )
    run_demo(settings, Console())


@command()
def info(
    index: Annotated[Path, typer.Option(help="Index folder.")],
    as_json: Annotated[
        bool, typer.Option("--json", help="Print the whole manifest and rejected rows as JSON.")
    ] = False,
) -> None:
    """Print an index's manifest and counts, and the rows it rejected."""
    from rapidin_index.model_identity import describe as describe_identity
    from rapidin_index.store.index_folder import read_rejected
    from rapidin_index.store.manifest import read_manifest

    manifest = read_manifest(index)
    rejected = read_rejected(index, manifest)
    if as_json:
        value = manifest.to_dict()
        value["rejected_rows"] = [{"id": row.example_id, "reason": row.reason} for row in rejected]
        typer.echo(json.dumps(value, indent=2, ensure_ascii=False))
        return
    sketch = manifest.sketch
    table = Table(title=f"index {index}", show_header=False)
    for name, value in [
        ("format version", str(manifest.format_version)),
        ("built by", f"{manifest.software['name']} {manifest.software['version']}"),
        ("created / updated", f"{manifest.created_at} / {manifest.updated_at}"),
        (
            "model",
            f"{manifest.model['name_or_path']} ({manifest.model['dtype']}, {manifest.model['fingerprint'][:12]})",
        ),
        ("model identity", describe_identity(manifest.model.get("identity"))),
        (
            "adapter",
            "none"
            if manifest.adapter is None
            else f"{manifest.adapter['path']} ({manifest.adapter['fingerprint'][:12]})",
        ),
        *(
            []
            if manifest.adapter is None
            else [("adapter identity", describe_identity(manifest.adapter.get("identity")))]
        ),
        ("tokenizer", manifest.tokenizer["fingerprint"][:12]),
        ("template", json.dumps(manifest.template)),
        ("tokenization", manifest.tokenization),
        (
            "parameters",
            f"{len(manifest.parameters['names'])} tensors, D = {manifest.parameters['gradient_dim']:,}",
        ),
        ("normalisation", manifest.normalize),
        (
            "sketch",
            f"{sketch.get('algorithm', 'rapidgrad-v1')}, K = {sketch['sketch_dim']:,}, "
            f"lambda = {sketch['shuffle_lambda']}, seed = {sketch['seed']}",
        ),
        ("rows indexed", f"{manifest.row_count:,}"),
        ("rows rejected", f"{manifest.rejected_count:,}"),
        ("tokens", f"{manifest.token_count:,}"),
        ("truncated rows", f"{manifest.truncated_count:,}"),
        ("sources", ", ".join(f"{s['path']} ({s['rows']} rows)" for s in manifest.sources)),
        ("bytes on disk", f"{sum(f['bytes'] for f in manifest.files.values()):,}"),
        ("hooks self-checked with", _self_checks(manifest.self_checks)),
        ("optimizer state", "none" if manifest.optimizer_state is None else manifest.optimizer_state["path"]),
        (
            "preconditioner",
            "none (rapidin-index fit)"
            if manifest.precondition is None
            else f"{manifest.precondition.get('kind', 'fisher')}, {manifest.precondition['structure']}, damping "
            f"{manifest.precondition['damping']}"
            + (", query norms" if manifest.precondition.get("query_norms") else "")
            + (
                f"; weight-space EK-FAC damping {manifest.precondition['weights']['damping']}"
                if "weights" in manifest.precondition
                else ""
            ),
        ),
    ]:
        table.add_row(name, value)
    Console().print(table)
    _print_backward_path(manifest.backward_path)
    _print_rejected(rejected)


def _self_checks(places: list[dict]) -> str:
    if not places:
        return "none recorded (the first query checks)"
    keys = ("software", "torch", "transformers", "peft", "device", "dtype")
    return "; ".join(", ".join(f"{key} {place.get(key)}" for key in keys) for place in places)


@command()
def export(
    index: Annotated[Path, typer.Option(help="Index folder.")],
    out: Annotated[
        Path, typer.Option(help="Bundle to write: .tar, .tar.gz/.tgz, .tar.zst/.tzst, .zip or .parquet.")
    ],
    format: Annotated[
        str | None,
        typer.Option(
            help="tar, tar.gz, tar.zst, zip or parquet (default: from --out's extension, else tar.gz)."
        ),
    ] = None,
    sign: Annotated[
        Path | None,
        typer.Option(
            help="Sign the bundle with this ed25519 private key (PEM or raw; `rapidin-index keygen`)."
        ),
    ] = None,
) -> None:
    """Write the index as one portable, checksummed bundle (or a Parquet file of vectors and rows)."""
    from rapidin_index.files import sha256_file
    from rapidin_index.store.bundle import format_for
    from rapidin_index.store.bundle_export import export_index
    from rapidin_index.store.manifest import read_manifest

    bundle_format = format_for(out, format)  # an unknown extension is refused before any work
    written = export_index(index, out, bundle_format, sign_with=sign)
    console.print(
        f"wrote {written} ({bundle_format}, {written.stat().st_size:,} bytes)\n"
        f"sha256 {sha256_file(written)}  (publish it beside the bundle so recipients can check it)\n"
        + built_with(read_manifest(index).to_dict()),
        highlight=False,
        soft_wrap=True,
    )


def built_with(facts: dict) -> str:
    """Which model (and adapter) an index needs, in words a receiving team can act on: path and identity."""
    from rapidin_index.model_identity import describe

    model = facts["model"]
    text = (
        f"built with model {model['name_or_path']} (fingerprint {model['fingerprint'][:12]}; "
        f"{describe(model.get('identity'))})"
    )
    adapter = facts.get("adapter")
    if adapter:
        text += (
            f" and adapter {adapter['path']} (fingerprint {adapter['fingerprint'][:12]}; "
            f"{describe(adapter.get('identity'))})"
        )
    return text


@command("import")
def import_(
    bundle: Annotated[Path, typer.Argument(help="Bundle written by `rapidin-index export`.")],
    index: Annotated[
        Path | None, typer.Option(help="Index folder to create (must not exist, or be empty).")
    ] = None,
    force: Annotated[
        bool, typer.Option(help="Replace the index in --index, once the bundle has verified.")
    ] = False,
    check: Annotated[bool, typer.Option(help="Only verify the bundle; write nothing.")] = False,
    require_signature: Annotated[
        Path | None,
        typer.Option(help="Refuse the bundle unless it is signed by this ed25519 public key (PEM or raw)."),
    ] = None,
) -> None:
    """Verify a bundle (checksums, sizes, safe paths, manifest, every member opened) and unpack it."""
    from rapidin_index.store.bundle_import import import_bundle, verify_bundle

    if (index is None) != check:
        raise fail(ValueError("give --index DIR to import, or --check to only verify"))
    if check:
        facts = verify_bundle(bundle, require_signature)["index"]
    else:
        facts = import_bundle(bundle, index, force=force, require_signature=require_signature).to_dict()
    done = f"{bundle} verifies" if check else f"imported {bundle} into {index}"
    console.print(
        f"{done}: {facts['row_count']:,} rows, {built_with(facts)}", highlight=False, soft_wrap=True
    )
    if not check:
        console.print(
            f"query it with the same model: rapidin-index query --index {index} --model LOCAL_MODEL_PATH ...",
            highlight=False,
            soft_wrap=True,
        )


@command()
def keygen(
    out: Annotated[
        Path, typer.Option(help="Private key file to write (PEM, mode 0600); OUT.pub gets the public key.")
    ],
) -> None:
    """Make an ed25519 key pair for `export --sign` and `import --require-signature`."""
    from rapidin_index.store.bundle_check import generate_key_pair

    private, public = generate_key_pair(out)
    console.print(
        f"wrote {private} (private: keep it; export --sign {private}) and {public} (public: give it to "
        f"recipients; import --require-signature {public})",
        highlight=False,
        soft_wrap=True,
    )


if __name__ == "__main__":
    app()
