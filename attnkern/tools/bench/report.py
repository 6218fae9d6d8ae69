"""Benchmark results: the JSON document, the terminal table, and the comparison of two runs."""
from __future__ import annotations

import json
import math
from collections import defaultdict
from typing import Dict, Iterable, List, Optional, TextIO

from .grid import variant_label
from .runner import OK, cell_key

SCHEMA = "attnkern-bench/1"


def document(env: Dict, config: Dict, providers: Dict, cells: List[Dict], notes: Dict) -> Dict:
    """The results file: where it ran, what was asked, and every cell."""
    return {"schema": SCHEMA, **env, "config": config, "providers": providers, "notes": notes, "cells": cells}


def write_json(doc: Dict, path: str) -> None:
    with open(path, "w") as f:
        json.dump(doc, f, indent=1, allow_nan=False)
        f.write("\n")


def load_json(path: str) -> Dict:
    """Read a results file, with a clear error when it is not one."""
    try:
        with open(path) as f:
            doc = json.load(f)
    except OSError as exc:
        raise ValueError(f"cannot read {path}: {exc.strerror}") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path} is not valid JSON ({exc})") from None
    if not isinstance(doc, dict) or doc.get("schema") != SCHEMA or not isinstance(doc.get("cells"), list):
        raise ValueError(f"{path} is not an attnkern bench results file (no schema {SCHEMA!r})")
    return doc


# --------------------------------------------------------------------------------------------------
# Terminal table

def _num(x: Optional[float], digits: int = 3) -> str:
    if x is None:
        return "-"
    if x == 0:
        return "0"
    return f"{x:.{digits}g}" if abs(x) < 10 ** digits else f"{x:.0f}"


def _mib(n: Optional[int]) -> str:
    return "-" if n is None else f"{n / 2**20:.1f}"


def group_key(cell: Dict) -> tuple:
    """Cells shown (and plotted) together: same dtype, heads, head dims, causal, score mods and mode."""
    return (cell["dtype"], cell["E"], cell["Ev"], cell["H"], cell["Hkv"], cell["causal"], variant_label(cell),
            cell["mode"])


def group_title(cell: Dict) -> str:
    heads = f"H={cell['H']}" + (f" Hkv={cell['Hkv']}" if cell["Hkv"] != cell["H"] else "")
    ev = f" Ev={cell['Ev']}" if cell["Ev"] != cell["E"] else ""
    variant = variant_label(cell)
    return (f"{cell['dtype']}  E={cell['E']}{ev}  {heads}  {'causal' if cell['causal'] else 'non-causal'}  "
            + (f"{variant}  " if variant else "") + f"{cell['mode']}")


def print_table(cells: List[Dict], baseline: str, out: TextIO) -> None:
    groups: Dict[tuple, List[Dict]] = defaultdict(list)
    for c in cells:
        groups[group_key(c)].append(c)
    width = max([len(c["provider"]) for c in cells] + [8])
    header = (f"{'L':>6} {'Lk':>6} {'B':>4}  {'provider':<{width}}  {'median ms':>10} {'IQR ms':>9} "
              f"{'TFLOP/s':>8} {'peak MiB':>9} {'vs ' + baseline:>10}")
    for members in groups.values():
        print(f"\n== {group_title(members[0])} ==", file=out)
        print(header, file=out)
        previous = None
        for c in sorted(members, key=lambda c: (c["Lq"], c["Lk"])):
            shape = (c["Lq"], c["Lk"], c["B"])
            lead = f"{c['Lq']:>6} {c['Lk']:>6} {c['B']:>4}" if shape != previous else " " * 18
            previous = shape
            if c["status"] != OK:
                what = c["status"] + (f": {c['reason']}" if c["reason"] else "")
                print(f"{lead}  {c['provider']:<{width}}  {what}", file=out)
                continue
            iqr = c["q75_ms"] - c["q25_ms"]
            ratio = "-" if c["speedup_vs_baseline"] is None else f"{c['speedup_vs_baseline']:.2f}x"
            print(f"{lead}  {c['provider']:<{width}}  {_num(c['median_ms'], 4):>10} {_num(iqr, 2):>9} "
                  f"{_num(c['tflops']):>8} {_mib(c['peak_mem_bytes']):>9} {ratio:>10}", file=out)


def marked_summary(cells: Iterable[Dict]) -> List[str]:
    """One line per provider and status for the cells that were not measured."""
    counts: Dict[tuple, int] = defaultdict(int)
    for c in cells:
        if c["status"] != OK:
            counts[(c["provider"], c["status"])] += 1
    return [f"{provider}: {n} cell(s) {status}" for (provider, status), n in counts.items()]


# --------------------------------------------------------------------------------------------------
# Comparison of two runs

def compare(a: Dict, b: Dict, out: TextIO, a_name: str = "A", b_name: str = "B") -> int:
    """Print, per cell measured in both runs, B's speedup over A (A's time / B's time); then the geometric
    mean per provider. Returns the number of cells compared."""
    def describe(doc, name):
        dev = doc.get("device", {})
        return (f"{name}: {dev.get('name', '?')} ({dev.get('type', '?')}), commit {str(doc.get('git_commit'))[:10]}, "
                f"{doc.get('date', '?')}")

    print(describe(a, "A"), file=out)
    print(describe(b, "B"), file=out)
    a_cells = {cell_key(c): c for c in a["cells"] if c.get("status") == OK}
    b_cells = {cell_key(c): c for c in b["cells"] if c.get("status") == OK}
    common = [k for k in a_cells if k in b_cells]
    only = len(set(a_cells) ^ set(b_cells))
    if not common:
        print("no measured cell is common to both runs", file=out)
        return 0
    width = max(len(k[-1]) for k in common)
    print(f"\nspeedup = A's median time / B's (above 1: B is faster)", file=out)
    print(f"{'cell':<52} {'provider':<{width}} {'A ms':>9} {'B ms':>9} {'speedup':>8}", file=out)
    logs: Dict[str, List[float]] = defaultdict(list)
    for k in common:
        ca, cb = a_cells[k], b_cells[k]
        speedup = ca["median_ms"] / cb["median_ms"]
        logs[k[-1]].append(math.log(speedup))
        dtype, B, H, Hkv, Lq, Lk, E, Ev, causal, variant, mode, provider = k
        label = (f"{dtype} B={B} H={H}{'/' + str(Hkv) if Hkv != H else ''} L={Lq}{' Lk=' + str(Lk) if Lk != Lq else ''}"
                 f" E={E}{' Ev=' + str(Ev) if Ev != E else ''}{' causal' if causal else ''}"
                 f"{' ' + variant if variant else ''} {mode}")
        print(f"{label:<52} {provider:<{width}} {_num(ca['median_ms'], 4):>9} {_num(cb['median_ms'], 4):>9} "
              f"{speedup:>7.2f}x", file=out)
    print("\ngeometric mean speedup per provider:", file=out)
    for provider, values in logs.items():
        print(f"  {provider:<{width}} {math.exp(sum(values) / len(values)):.2f}x over {len(values)} cell(s)",
              file=out)
    if only:
        print(f"({only} measured cell(s) appear in only one of the runs)", file=out)
    return len(common)


# --------------------------------------------------------------------------------------------------
# Markdown summary (for bench/results/, beside each recorded GPU run's JSON; see bench/README.md)

def markdown_summary(doc: Dict) -> str:
    """A short markdown record of a run: where and what, then per (dtype, head dim, heads, causal, mode)
    a table of TFLOP/s, providers by sequence length, with the speedup over the baseline in brackets."""
    dev, ver = doc.get("device", {}), doc.get("versions", {})
    baseline = doc.get("config", {}).get("baseline", "sdpa")
    lines = [
        f"# attnkern bench: {dev.get('name', '?')} ({dev.get('type', '?')})",
        "",
        f"- date: {doc.get('date')}, host: {doc.get('host')}, commit: {doc.get('git_commit')}"
        + (" (with uncommitted changes)" if doc.get("git_dirty") else ""),
        f"- torch {ver.get('torch')}, triton {ver.get('triton')}, CUDA {ver.get('cuda')}, cuDNN {ver.get('cudnn')}, "
        f"Python {ver.get('python')}",
        f"- command: `{doc.get('command', '')}`",
        f"- TFLOP/s by FlashAttention's benchmark convention (attnkern/tools/flops.py); [x] = speedup over {baseline} (its median time / this one's); "
        "cells not measured say why in the JSON",
    ]
    groups: Dict[tuple, List[Dict]] = defaultdict(list)
    for c in doc["cells"]:
        groups[group_key(c)].append(c)
    for members in groups.values():
        lengths = sorted({(c["Lq"], c["Lk"]) for c in members})
        providers = list(dict.fromkeys(c["provider"] for c in members))
        by = {(c["provider"], c["Lq"], c["Lk"]): c for c in members}
        head = [f"L={lq}" + (f"/{lk}" if lk != lq else "") for lq, lk in lengths]
        lines += ["", f"## {group_title(members[0])}", "", "| provider | " + " | ".join(head) + " |",
                  "|---|" + "---|" * len(head)]
        for p in providers:
            row = []
            for lq, lk in lengths:
                c = by.get((p, lq, lk))
                if c is None:
                    row.append("")
                elif c["status"] != OK:
                    row.append(c["status"])
                else:
                    ratio = c.get("speedup_vs_baseline")
                    row.append(_num(c["tflops"]) + (f" [{ratio:.2f}x]" if ratio is not None and p != baseline else ""))
            lines.append(f"| {p} | " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"
