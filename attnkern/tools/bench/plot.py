"""The PNG of a sweep: TFLOP/s against sequence length, one line per provider, one panel per
(dtype, head dim, heads, causal, mode); modes are the columns. Cells that were not measured
(unsupported, OOM, error) leave a gap in their provider's line.

Uses matplotlib's object API with the Agg canvas (no pyplot, no display, no global state).
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Dict, List

from ..flops import MODES
from .report import group_key, group_title
from .runner import OK

_MARKERS = "osD^v<>phX*"


def _length_label(n: int) -> str:
    return f"{n // 1024}k" if n >= 1024 and n % 1024 == 0 else str(n)


def write_plot(doc: Dict, path: str, dpi: int = 90) -> None:
    """Draw the results document `doc` to a PNG at `path`. Raises ImportError without matplotlib."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    cells: List[Dict] = doc["cells"]
    modes = [m for m in MODES if any(c["mode"] == m for c in cells)]
    rows: "OrderedDict[tuple, None]" = OrderedDict()
    for c in cells:
        rows[group_key(c)[:-1]] = None  # everything but the mode
    providers = list(OrderedDict.fromkeys(c["provider"] for c in cells))
    styles = {p: (f"C{i % 10}", _MARKERS[i % len(_MARKERS)]) for i, p in enumerate(providers)}

    n_rows, n_cols = max(1, len(rows)), max(1, len(modes))
    fig = Figure(figsize=(4.6 * n_cols, 3.3 * n_rows + 1.0))
    FigureCanvasAgg(fig)
    axes = fig.subplots(n_rows, n_cols, squeeze=False)
    for r, row in enumerate(rows):
        for m, mode in enumerate(modes):
            ax = axes[r][m]
            panel = [c for c in cells if group_key(c) == row + (mode,)]
            lengths = sorted({c["Lq"] for c in panel})
            for p in providers:
                points = sorted((c["Lq"], c["tflops"]) for c in panel
                                if c["provider"] == p and c["status"] == OK and c["tflops"] is not None)
                if not points:
                    continue
                color, marker = styles[p]
                ax.plot([x for x, _ in points], [y for _, y in points], color=color, marker=marker,
                        label=p, linewidth=1.5, markersize=4)
            if panel:
                ax.set_title(group_title(panel[0]), fontsize=9)
            ax.set_xscale("log", base=2)
            if lengths:
                ax.set_xticks(lengths)
                ax.set_xticklabels([_length_label(n) for n in lengths], fontsize=8)
            ax.tick_params(axis="y", labelsize=8)
            ax.set_ylim(bottom=0)
            ax.grid(True, alpha=0.3)
            if r == n_rows - 1:
                ax.set_xlabel(doc.get("notes", {}).get("x_axis", "sequence length (Lq)"), fontsize=8)
            if m == 0:
                ax.set_ylabel("TFLOP/s", fontsize=8)
    handles = [h for ax in axes.flat for h in ax.get_lines()]
    by_label = OrderedDict()
    for h in handles:
        by_label.setdefault(h.get_label(), h)
    if by_label:
        fig.legend(list(by_label.values()), list(by_label.keys()), loc="lower center",
                   ncol=min(len(by_label), 5), fontsize=8, frameon=False)
    missing = [p for p in providers if p not in by_label]
    if missing:  # providers without a single measured cell: say so rather than leave them out silently
        why = []
        for p in missing:
            statuses = sorted({c["status"] for c in cells if c["provider"] == p})
            why.append(f"{p} ({'/'.join(statuses)})")
        fig.text(0.5, 0.005, "no data: " + ", ".join(why), ha="center", va="bottom", fontsize=7, color="0.4")
    device = doc.get("device", {})
    threads = device.get("threads")
    where = device.get("type", "?") + (f", {threads} thread{'s' if threads != 1 else ''}" if threads else "")
    fig.suptitle(f"attnkern bench: {device.get('name', '?')} ({where}), torch "
                 f"{doc.get('versions', {}).get('torch', '?')}, {str(doc.get('date', ''))[:10]}", fontsize=10)
    legend_rows = (len(by_label) + 4) // 5
    fig.tight_layout(rect=(0, 0.03 + 0.25 * legend_rows / (3.3 * n_rows + 1.0), 1, 0.97))
    fig.savefig(path, dpi=dpi)
