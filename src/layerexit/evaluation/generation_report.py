"""The report of a comparison of generation strategies (the dict ``generation.evaluate.compare`` returns).

One Markdown table of the measured figures per strategy (average exit layer, tokens per second, measured and
ideal speed-up against the full model, token match, ROUGE-L, identical outputs, speculative acceptance), the
timing warnings written as the classifier report writes them, and two figures drawn by
:mod:`layerexit.evaluation.plots` (``speed_vs_agreement.png``, ``exit_layers.png``). The payload is read, never
changed: ``results.json`` is whatever the caller wrote.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..io import write_text_atomic
from .formatting import md_table
from .report import timing_warnings_note


def generation_report(payload: Mapping[str, Any], title: str = "Generation evaluation") -> str:
    """The Markdown text of ``report.md`` (the figures it links are drawn by :func:`write_generation_report`)."""
    full = payload["full"]
    lines = [f"# {title}", "",
             f"{payload['prompts']} prompts, up to {payload['max_new_tokens']} new tokens, batch size 1. Full model "
             f"(our loop, never exiting): {full['tokens_per_second']:.2f} tokens/s. Exit machinery adds "
             f"{payload['exit_parameters']:,} parameters to {payload['backbone_parameters']:,} "
             f"({100 * payload['exit_parameters'] / payload['backbone_parameters']:.2f}%). All figures measured "
             f"(fastest of {payload.get('rounds', 1)} interleaved round(s) per prompt and strategy).", ""]
    rows = [_row(e, payload["prompts"]) for e in payload["results"]]
    lines.append(md_table(["strategy", "avg layers", "tokens/s", "speed-up vs full", "ideal (L/avg layers)",
                           "token match", "ROUGE-L", "identical", "acceptance"], rows))
    note = timing_warnings_note([(e["name"], w) for e in payload["results"] for w in e.get("warnings") or []])
    if note:
        lines += ["", note]
    lines += ["", "![speed vs agreement](speed_vs_agreement.png)", ""]
    if any("exit_histogram" in e for e in payload["results"]):
        lines += ["![exit layers](exit_layers.png)", ""]
    return "\n".join(lines) + "\n"


def write_generation_report(payload: Mapping[str, Any], folder: str | Path,
                            title: str = "Generation evaluation") -> str:
    """Draw the figures and write ``report.md`` into ``folder``; return the report's text."""
    from .plots import plot_exit_layers, plot_strategies  # imported here: plots pulls in matplotlib

    folder = Path(folder)
    plot_strategies(payload, folder / "speed_vs_agreement.png")
    if any("exit_histogram" in e for e in payload["results"]):
        plot_exit_layers(payload, folder / "exit_layers.png")
    text = generation_report(payload, title)
    write_text_atomic(folder / "report.md", text)
    return text


def _row(e: Mapping[str, Any], prompts: int) -> list[str]:
    return [e["name"], f"{e['avg_layers']:.2f}" if "avg_layers" in e else "—", f"{e['tokens_per_second']:.2f}",
            f"{e['speedup_measured']:.2f}x", f"{e['speedup_ideal']:.2f}x" if "speedup_ideal" in e else "—",
            f"{100 * e['token_match']:.1f}%", f"{e['rouge_l']:.3f}", f"{e['identical_prompts']}/{prompts}",
            f"{100 * e['acceptance']:.0f}%" if "acceptance" in e else ""]


__all__ = ["generation_report", "write_generation_report"]
