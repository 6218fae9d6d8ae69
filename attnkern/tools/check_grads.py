"""`attnkern check-grads`: validate outputs and gradients of attnkern's backends (or any SDPA-signature
function) against the float64 reference, on one shape from the command line or a default battery.

Each check is one `attnkern.testing.check_gradients` call; this module only chooses what to check,
prints the reports and sets the exit status: 0 when every check that ran passed, 1 when any failed
(or none could run), 2 for bad arguments.
"""
from __future__ import annotations

import argparse
import importlib
import inspect
import json
import math
import sys
import warnings
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional

import torch
import torch.nn.functional as F

from .. import backends
from ..api import attention, explain, scaled_dot_product_attention
from ..backends import BackendUnavailableError
from .bench import environment
from .bench.grid import DTYPE_NAMES, DTYPES, parse_dtypes, parse_window
from .cases import Case, dropout_rng, make_inputs
from .cliutil import arg_type, dropout_probability, finite_float, positive_float, positive_int, resolve_device
from ..config import use_backend
from ..testing import check_gradients

MASKS = ("none", "bool", "keypad", "float", "float-grad")


# The --mask names and the cases they stand for (attnkern/tools/cases.py's vocabulary).
def grad_case(name: str, B: int = 1, H: int = 2, Hkv: Optional[int] = None, L: int = 128, S: Optional[int] = None,
              E: int = 64, Ev: Optional[int] = None, causal: bool = False, mask: str = "none", window=None,
              softcap: Optional[float] = None, alibi: bool = False, dropout: float = 0.0) -> Case:
    """A check-grads case: `mask` one of MASKS -- bool (L, S) with a fully masked row, keypad bool
    (B, 1, 1, S) key padding, float (H, L, S) constant, float-grad (H, L, S) requiring grad (checks d_mask).
    `softcap`, `alibi` (slopes (H,): `case_variants`) and `dropout` (a fixed rng) as attention() takes them."""
    S = S or L
    masks = {"none": dict(mask="none"), "bool": dict(mask="bool", mask_dims="ls", masked_rows=(L // 2,)),
             "keypad": dict(mask="keypad"), "float": dict(mask="float", mask_dims="hls"),
             "float-grad": dict(mask="float_grad", mask_dims="hls")}
    return Case(name, L=L, S=S, E=E, Ev=Ev if Ev != E else None, B=B, Hq=H, Hkv=Hkv if Hkv != H else None,
                causal="top_left" if causal else "none", window=window, softcap=softcap,
                alibi="h" if alibi else "none", dropout=dropout, **masks[mask])


def battery(device: torch.device) -> List[Case]:
    """The default cases: each covers one feature; sizes fit the device (tiny on a CPU)."""
    if device.type == "cuda":
        return [
            grad_case("plain", B=2, H=8, L=1024, E=128),
            grad_case("causal gqa", B=2, H=8, Hkv=2, L=2048, E=64, causal=True),
            grad_case("Lq != Lk, key padding", B=4, H=4, L=1000, S=3000, E=80, mask="keypad"),
            grad_case("learned bias (d_mask)", B=2, H=4, L=512, S=768, E=64, mask="float-grad"),
            grad_case("Ev != E, fully masked row", B=1, H=4, L=777, S=513, E=96, Ev=32, mask="bool"),
            grad_case("causal sliding window", B=2, H=8, Hkv=2, L=2048, E=128, causal=True, window=(255, -1)),
            grad_case("softcap, ALiBi, dropout", B=2, H=8, Hkv=2, L=1024, E=128, causal=True, softcap=30.0,
                      alibi=True, dropout=0.1),
        ]
    return [
        grad_case("plain", B=2, H=2, L=64, E=32),
        grad_case("causal gqa", B=1, H=4, Hkv=2, L=96, E=64, causal=True),
        grad_case("Lq != Lk, key padding", B=2, H=2, L=48, S=80, E=40, mask="keypad"),
        grad_case("learned bias (d_mask)", B=1, H=2, L=40, S=56, E=16, mask="float-grad"),
        grad_case("Ev != E, fully masked row", B=1, H=2, L=33, S=47, E=48, Ev=16, mask="bool"),
        grad_case("sliding window", B=1, H=2, L=70, S=90, E=16, window=(9, 4)),
        grad_case("softcap, ALiBi, dropout", B=1, H=4, Hkv=2, L=40, S=56, E=16, causal=True, softcap=2.0,
                  alibi=True, dropout=0.2),
    ]


# --------------------------------------------------------------------------------------------------
# What is checked: attnkern backends by name, torch's SDPA, or a user's function.

@dataclass
class Target:
    label: str
    fn: Callable
    backend: Optional[str] = None  # an attnkern backend name (for availability and "auto" resolution)


def _attnkern_fn(backend: str) -> Callable:
    def fn(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False,
           window=None, softcap=None, alibi_slopes=None, dropout_rng=None):
        if any(x is not None for x in (window, softcap, alibi_slopes, dropout_rng)):
            # SDPA has none of these: attention() takes them (is_causal is top-left there too)
            return attention(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, causal=is_causal,
                             window=window, softcap=softcap, alibi_slopes=alibi_slopes, dropout_rng=dropout_rng,
                             scale=scale, enable_gqa=enable_gqa, return_lse=False, backend=backend)
        with use_backend(backend):
            return scaled_dot_product_attention(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa)

    fn.__qualname__ = f"attnkern[{backend}]"
    return fn


def load_function(spec: str) -> Callable:
    """'package.module:attribute' -> the callable it names (ValueError with the reason otherwise)."""
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise ValueError(f"expected MODULE:FUNCTION (e.g. mypkg.attn:my_sdpa), got {spec!r}")
    try:
        obj = importlib.import_module(module_name)
    except ImportError as exc:
        raise ValueError(f"cannot import {module_name!r}: {exc}") from None
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ValueError(f"{module_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ValueError(f"{spec} is not callable")
    return obj


def parse_backends(text: str) -> List[str]:
    known = backends.names() + ["torch"]
    out = []
    for t in str(text).split(","):
        t = t.strip()
        if t not in known:
            raise ValueError(f"unknown backend {t!r}; choose from {', '.join(known)}")
        out.append(t)
    return list(dict.fromkeys(out))


def targets(names: List[str], functions: List[str]) -> List[Target]:
    out = []
    for n in names:
        if n == "torch":
            out.append(Target("torch", F.scaled_dot_product_attention))
        else:
            out.append(Target(n, _attnkern_fn(n), backend=n))
    for spec in functions:
        out.append(Target(spec, load_function(spec)))
    return out


def default_backends(device: torch.device) -> List[str]:
    """Every attnkern backend that runs on this device (not "auto": it is one of them; not "cuda-emu",
    the CUDA kernels under the emulator, built on first use and slow: name it to check it)."""
    return [n for n in backends.names()
            if n not in ("auto", "cuda-emu") and backends.get(n).availability(device) is None]


# --------------------------------------------------------------------------------------------------

def _takes(fn, keyword: str) -> bool:
    """Whether fn accepts `keyword` (window=, softcap=, ...: attnkern.attention's arguments beyond SDPA's)."""
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False
    return keyword in params or any(p.kind == p.VAR_KEYWORD for p in params.values())


def case_variants(case: Case, device: torch.device, seed: int) -> Dict:
    """attention()'s arguments beyond SDPA's for `case`, as check_gradients takes them: the window, the
    softcap, random ALiBi slopes (Hq,) in [0.05, 1) drawn with `seed`, dropout with the case's fixed rng
    (cases.dropout_rng: the same in the forward and the backward, for fn and the reference)."""
    kw = dict(window=case.window, softcap=case.softcap)
    if case.alibi != "none":
        gen = torch.Generator().manual_seed(seed + 1)
        kw["alibi_slopes"] = (0.05 + 0.95 * torch.rand(case.Hq, generator=gen)).to(device)
    if case.dropout:
        kw.update(dropout_p=case.dropout, dropout_rng=dropout_rng(case, device))
    return kw


def run_check(target: Target, case: Case, dtype: torch.dtype, device: torch.device, seed: int,
              gradcheck: bool, scale: Optional[float] = None) -> Dict:
    """One check, as a dict: status PASS / FAIL / SKIP, the reason, the report (when one was made)."""
    q, k, v, mask = make_inputs(case, dtype, device, seed)
    gqa = case.enable_gqa
    label = target.label
    variants = case_variants(case, device, seed)
    needs = [kw for kw in ("window", "softcap", "alibi_slopes", "dropout_rng") if variants.get(kw) is not None]
    missing = [kw for kw in needs if target.backend is None and not _takes(target.fn, kw)]
    if missing:
        return {"status": "SKIP", "label": target.label,
                "reason": f"{target.label} takes no {', '.join(m + '=' for m in missing)} (SDPA's signature has none)"}
    if target.backend is not None:
        exp = explain(q, k, v, attn_mask=mask, dropout_p=case.dropout, is_causal=case.is_causal,
                      window=case.window, softcap=case.softcap, alibi_slopes=variants.get("alibi_slopes"),
                      scale=scale, enable_gqa=gqa, backend=target.backend)
        if exp.backend == "none":
            return {"status": "SKIP", "reason": exp.reason, "label": label}
        if target.backend == "auto":
            label = f"auto->{exp.backend}"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # e.g. auto's fallback warning: the label says which path ran
            report = check_gradients(target.fn, q, k, v, attn_mask=mask, is_causal=case.is_causal, scale=scale,
                                     enable_gqa=gqa, seed=seed, gradcheck=gradcheck, name=f"{label} / {case.name}",
                                     **variants)
    except (BackendUnavailableError, NotImplementedError) as exc:
        return {"status": "SKIP", "reason": str(exc).splitlines()[0], "label": label}
    except Exception as exc:  # noqa: BLE001 - the function under test failed: that is a failed check
        return {"status": "FAIL", "reason": f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}",
                "label": label}
    return {"status": "PASS" if report.passed else "FAIL", "reason": "; ".join(report.failures()),
            "label": label, "report": report}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--backends", type=arg_type(parse_backends), metavar="NAMES",
                   help=f"attnkern backends ({', '.join(backends.names())}) and/or torch (torch's SDPA); "
                        "default: every attnkern backend that runs on the device, or none when --fn is given")
    p.add_argument("--fn", action="append", default=[], metavar="MODULE:FUNCTION",
                   help="also check your own function with SDPA's signature (repeatable)")
    p.add_argument("--dtypes", type=arg_type(parse_dtypes), metavar="D,...",
                   help="fp16, bf16, fp32, fp64 (default fp16,bf16,fp32 on a GPU; fp32,fp16 on a CPU)")
    p.add_argument("--device", help="cuda, cuda:N or cpu (default: cuda if available)")
    s = p.add_argument_group("one shape instead of the default battery (any of these selects it)")
    s.add_argument("--batch", type=arg_type(positive_int), metavar="B", help="batch (default 1)")
    s.add_argument("--heads", type=arg_type(positive_int), metavar="H", help="query heads (default 2)")
    s.add_argument("--kv-heads", type=arg_type(positive_int), metavar="Hkv", help="key/value heads (default = H; fewer: GQA)")
    s.add_argument("--seqlen", type=arg_type(positive_int), metavar="L", help="query length (default 128)")
    s.add_argument("--kv-seqlen", type=arg_type(positive_int), metavar="S", help="key length (default = L)")
    s.add_argument("--head-dim", type=arg_type(positive_int), metavar="E", help="head dim (default 64)")
    s.add_argument("--v-head-dim", type=arg_type(positive_int), metavar="Ev", help="value head dim (default = E)")
    s.add_argument("--causal", action="store_true", help="is_causal=True (top-left)")
    s.add_argument("--mask", choices=MASKS, help="attention mask kind (default none)")
    s.add_argument("--window", type=arg_type(parse_window), metavar="LEFT,RIGHT",
                   help="a sliding window (attention's window=, -1 unbounded; with --causal a causal window)")
    s.add_argument("--softcap", type=arg_type(positive_float), metavar="C",
                   help="logit soft-capping (attention's softcap=): scores become C*tanh(scores/C)")
    s.add_argument("--alibi", action="store_true",
                   help="ALiBi (attention's alibi_slopes=): random slopes (H,) in [0.05, 1), drawn with --seed")
    s.add_argument("--dropout", type=arg_type(dropout_probability), metavar="P",
                   help="dropout probability (attention's dropout_p=) with a fixed dropout_rng, the same in the "
                        "forward and backward of the function and of the reference")
    s.add_argument("--scale", type=arg_type(finite_float), help="softmax scale (default 1/sqrt(E))")
    p.add_argument("--seed", type=int, default=0, help="seed of the random inputs and upstream gradient")
    p.add_argument("--gradcheck", action="store_true",
                   help="also run torch.autograd.gradcheck in float64 (where the backend runs float64)")
    p.add_argument("--json", metavar="PATH", help="write the results as JSON to PATH ('-' for stdout)")
    p.add_argument("--quiet", action="store_true", help="one line per check, no error tables")


_SHAPE_FLAGS = ("batch", "heads", "kv_heads", "seqlen", "kv_seqlen", "head_dim", "v_head_dim", "causal", "mask",
                "window", "softcap", "alibi", "dropout")


def custom_case(args, parser) -> Optional[Case]:
    if not any(getattr(args, f) not in (None, False) for f in _SHAPE_FLAGS):
        return None
    H = args.heads or 2
    Hkv = args.kv_heads or H
    if H % Hkv:
        parser.error(f"argument --kv-heads: the query heads ({H}) must be a multiple of the key/value heads ({Hkv})")
    return grad_case("command line", B=args.batch or 1, H=H, Hkv=Hkv, L=args.seqlen or 128, S=args.kv_seqlen,
                     E=args.head_dim or 64, Ev=args.v_head_dim, causal=args.causal, mask=args.mask or "none",
                     window=args.window, softcap=args.softcap, alibi=args.alibi, dropout=args.dropout or 0.0)


def run(args, parser: argparse.ArgumentParser, out=None) -> int:
    out = out or sys.stdout
    device = resolve_device(args.device, parser)
    try:
        chosen = targets(args.backends if args.backends is not None else
                         ([] if args.fn else default_backends(device)), args.fn)
    except ValueError as exc:
        parser.error(f"argument --fn: {exc}")
    if args.dtypes:
        dtypes = [DTYPES[d] for d in args.dtypes]
    else:
        dtypes = [torch.float16, torch.bfloat16, torch.float32] if device.type == "cuda" else [torch.float32, torch.float16]
    case = custom_case(args, parser)
    cases = [case] if case is not None else battery(device)
    text_out = sys.stderr if args.json == "-" else out

    results = []
    for target in chosen:
        for dtype in dtypes:
            for c in cases:
                r = run_check(target, c, dtype, device, args.seed, args.gradcheck, args.scale)
                r.update(case=c, dtype=dtype)
                results.append(r)
                _print_result(r, args.quiet, text_out)

    counts = {s: sum(r["status"] == s for r in results) for s in ("PASS", "FAIL", "SKIP")}
    print(f"\n{counts['PASS']} passed, {counts['FAIL']} failed, {counts['SKIP']} skipped", file=text_out)
    status = 0
    if counts["FAIL"]:
        status = 1
    elif not counts["PASS"]:
        print("nothing was checked: every check was skipped", file=sys.stderr)
        status = 1
    if args.json:
        doc = {"schema": "attnkern-check-grads/1", **environment.environment(device), "passed": status == 0,
               "counts": counts, "checks": [_as_json(r) for r in results]}
        text = json.dumps(_finite(doc), indent=1, allow_nan=False, default=str)
        if args.json == "-":
            print(text, file=out)
        else:
            try:
                with open(args.json, "w") as f:
                    f.write(text + "\n")
            except OSError as exc:
                print(f"could not write {args.json}: {exc}", file=sys.stderr)
                return 1
    return status


def _finite(x):
    """JSON has no NaN/Infinity: non-finite floats (e.g. a relative error against a zero reference) -> None."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_finite(v) for v in x]
    return x


def _as_json(r: Dict) -> Dict:
    c: Case = r["case"]
    return {"target": r["label"], "case": c.name, "shape": c.summary(), "dtype": DTYPE_NAMES[r["dtype"]],
            "status": r["status"], "reason": r["reason"],
            "report": r["report"].to_dict() if "report" in r else None}


def _print_result(r: Dict, quiet: bool, out) -> None:
    c: Case = r["case"]
    print(f"{r['status']}  {r['label']:<16} {DTYPE_NAMES[r['dtype']]:<5} {c.name:<28} {c.summary()}", file=out)
    if r["status"] == "SKIP" or "report" not in r:
        if r["reason"]:
            print(f"      {r['reason']}", file=out)
        return
    if quiet:
        for msg in r["report"].failures():
            print(f"      {msg}", file=out)
    else:
        print(r["report"].table(), file=out)


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="attnkern check-grads", description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    return run(parser.parse_args(argv), parser)
