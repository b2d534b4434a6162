"""Results of the real-model suite: one JSON per model, rendered into ``bench/RESULTS.md``.

Rendering reads only the JSON dicts (``bench/results/<model>.json``), so a run of
some models (``--models``) keeps the other models' sections from earlier runs,
and the Markdown is reproducible from the JSON alone. Other bench scripts drop
Markdown fragments into the same folder; they are appended verbatim.
"""
from __future__ import annotations

import math
from pathlib import Path

# how sessions ran when a row was timed (rows from before it existed carry none); importing it
# does not import onnxruntime
from onnxlr.runtime.sessions import TIMING_PROTOCOL

SCHEMA = "onnxlr.bench-suite/1"
#: a setting is "safe" when its error bound held and the task metric fell by at most this
SAFE_DROP = 0.01

COLUMNS = ["setting", "method", "rank", "bound", "layers", "params", "MACs", "speed-up",
           "spread", "efficiency", "output error", "{metric}", "agreement", "tool s"]


def _f(x, spec: str = ".3f", none: str = "-") -> str:
    if x is None:
        return none
    if isinstance(x, float) and not math.isfinite(x):
        return "inf"
    return format(x, spec)


def metric_pair(result: dict, row: dict) -> tuple[float | None, float | None]:
    """(before, after) of the task metric: the labelled score, or agreement where no labels."""
    if result.get("has_labels"):
        base = row.get("baseline_metric")
        return (result["baseline"]["metric"] if base is None else base), row.get("metric")
    return (1.0 if row.get("agreement") is not None else None), row.get("agreement")


def is_safe(result: dict, row: dict) -> bool:
    """Bound on and met, the layers changed, and the task metric within :data:`SAFE_DROP`."""
    if row.get("error") or row.get("bound") is None or not row.get("bound_met"):
        return False
    before, after = metric_pair(result, row)
    return (before is not None and after is not None and row.get("layers", 0) > 0
            and after >= before - SAFE_DROP - 1e-12)


def best_safe(result: dict) -> dict | None:
    """The safe row measured fastest (None when no row is safe)."""
    safe = [r for r in result["rows"] if is_safe(result, r) and r.get("speedup") is not None]
    return max(safe, key=lambda r: r["speedup"]) if safe else None


def row_cells(result: dict, row: dict) -> list[str]:
    if row.get("error"):
        return [row["setting"], row.get("method", "-"), row.get("rank", "-"),
                _f(row.get("bound"), "g", "none"), "error: " + row["error"].replace("|", "/")] \
            + [""] * (len(COLUMNS) - 5)
    before, after = metric_pair(result, row)
    rank = row["rank"] + (f" /{row['rank_multiple']}" if row.get("rank_multiple", 1) > 1 else "")
    bound = _f(row.get("bound"), "g", "none")
    if row.get("bound") is not None and row.get("bound_met") is False:
        bound += " (missed)"
    return [row["setting"], row["method"], rank, bound,
            f"{row['layers']}/{row['candidates']}", _f(row["params_ratio"]) + "x",
            _f(row["macs_ratio"]) + "x", _speed(row),
            _f(row.get("spread"), ".2f"), _f(row.get("efficiency"), ".2f"),
            _f(row.get("output_error"), ".3g"), f"{_f(before)} → {_f(after)}",
            _f(row.get("agreement")), _f(row.get("seconds"), ".0f")]


def _speed(row: dict, other_batch: bool = True) -> str:
    if not row.get("layers"):  # the same model timed twice: its "speed-up" is noise
        return "– (unchanged)"
    text = _f(row.get("speedup"), ".2f") + "x"
    other = row.get("speedup_other_batch") if other_batch else None
    if other:
        text += f" (b{other['batch']}: {other['speedup']:.2f}x)"
    return text


def model_section(result: dict) -> str:
    """One model's heading, provenance, table and notes."""
    header = [c.format(metric=result["metric"] + " before → after") for c in COLUMNS]
    lines = [f"### {result['title']}", "",
             f"Model: {result['source']}. Task metric: {result['metric']}; agreement: "
             f"{result['agreement']}. Run {result['date']}, {result['seconds']:.0f} s"
             f"{' (--quick)' if result.get('quick') else ''}; load average "
             f"{result['machine'].get('load_start', '?')} → {result['machine'].get('load_end', '?')}.",
             "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row_cells(result, r)) + " |" for r in result["rows"]]
    lines += [""] + [f"- {n}" for n in result.get("notes", [])]
    older = [r["setting"] for r in result["rows"] if r.get("protocol") != TIMING_PROTOCOL]
    if older:
        lines.append(f"- **timed the old way** (an earlier run, while ORT sessions still "
                     f"spin-waited: on this machine the same model timed against itself then read "
                     f"0.79-1.27x, so these speed-ups are noisy; their task metric is on that "
                     f"run's test inputs): {', '.join(older)}")
    if result.get("not_run"):
        lines.append(f"- **not run** (the run was stopped before them): "
                     f"{', '.join(result['not_run'])}")
    return "\n".join(lines) + "\n"


def headline(results: list[dict]) -> str:
    """Per model, the best safe setting: MACs ratio, speed-up and metric before → after."""
    lines = ["| model | setting | layers | MACs | speed-up (ORT CPU) | task metric | before → after |",
             "|---|---|---|---|---|---|---|"]
    for res in results:
        row, label = best_safe(res), None
        if row is None:  # show what the defaults did, and say why it is not the headline
            row = next((r for r in res["rows"] if r["setting"] == "default" and not r.get("error")),
                       None)
            if row is None:
                lines.append(f"| {res['name']} | no safe setting | - | - | - | {res['metric']} | - |")
                continue
            before, after = metric_pair(res, row)
            why = ("nothing factorised" if not row["layers"] else "missed the bound"
                   if not row.get("bound_met") else "task metric lost")
            label = f"no safe setting; default: {why}"
        before, after = metric_pair(res, row)
        lines.append(f"| {res['name']} | {label or row['setting']} | {row['layers']}/{row['candidates']} | "
                     f"{row['macs_ratio']:.3f}x | {_speed(row, other_batch=False)} | {res['metric']} | "
                     f"{_f(before)} → {_f(after)} |")
    return "\n".join(lines) + "\n"


def machine_line(machine: dict) -> str:
    return (f"{machine.get('cpu', '?')}, {machine.get('cores', '?')} cores, "
            f"{machine.get('platform', '?')}, Python {machine.get('python', '?')}, "
            f"onnxruntime {machine.get('onnxruntime', '?')}, onnx {machine.get('onnx', '?')}, "
            f"onnxlr {machine.get('onnxlr', '?')}")


def render(results: list[dict], fragments: dict[str, str]) -> str:
    """The whole ``RESULTS.md``: header, headline, one section per model, then fragments."""
    latest = max(results, key=lambda r: r["date"]) if results else None
    out = ["# Results", "",
           "Generated by `python -m bench.suite` (see bench/real/README.md); do not edit by hand: the "
           "suite's sections come from `bench/results/<model>.json`, and the other sections are "
           "the Markdown fragments other bench scripts write to `bench/results/`.", ""]
    if latest is not None:
        m = latest["machine"]
        out += ["## Real trained models", "",
                f"Machine: {machine_line(m)}. ORT CPU provider, {latest['threads']} intra-op "
                f"threads, latency timed A/B interleaved in one process (at least "
                f"{min(r['rounds'] for r in results)} rounds after warm-up, more for fast models) and reported as the median of per-round ratios "
                "(original / optimised); *spread* is the larger p90/p10 of the two models' "
                "latencies (above 1.5: the machine was busy). Efficiency = speed-up × MACs "
                "ratio (1.0: the speed-up the MAC reduction promises). MACs and params count the "
                "candidate layers (Gemm, MatMul, Conv). *bound* is `max_error` (relative L2 of "
                "every output on the calibration inputs; 0.05 is onnxlr's default, *none* "
                "switches it off); *output error* is the worst output's relative L2 on the "
                "held-out inputs; */8* means ranks rounded up to multiples of 8. The *search* "
                "rows are `optimize(calib=..., metric=<the task metric against the calibration "
                "labels as a plug-in; NudeNet, without labels: box F1 against the original>, "
                "max_drop=<bound>)`: their bound is the allowed drop of that metric, judged "
                "on half of the calibration set held out (its 80% paired-bootstrap bound). A second speed-up in brackets is the "
                "same two models at another batch size. "
                f"The shared machine was loaded while measuring: speed-ups are noisy.", "",
                "Best safe setting per model (bound on and met, task metric within "
                f"{SAFE_DROP * 100:g} point of the original, fastest measured):", "",
                headline(results)]
        out += [model_section(r) for r in results]
    if fragments:
        out += ["## Other benchmarks (fragments in bench/results/)", ""]
    for name in sorted(fragments):
        out += [f"<!-- bench/results/{name} -->", fragments[name].rstrip() + "\n"]
    return "\n".join(out).rstrip() + "\n"


def read_fragments(folder: Path) -> dict[str, str]:
    return {p.name: p.read_text() for p in sorted(folder.glob("*.md"))}
