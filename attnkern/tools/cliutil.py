"""Small helpers the command-line tools share: argparse value types whose errors name the flag, and
the --device option."""
from __future__ import annotations

import argparse
import re
from typing import Callable

import torch


def arg_type(parse: Callable) -> Callable:
    """Wrap a parser so that its ValueError becomes argparse's error ("argument --flag: <message>")."""
    def wrapped(text):
        try:
            return parse(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    wrapped.__name__ = getattr(parse, "__name__", "value")
    return wrapped


def positive_int(text) -> int:
    if not re.fullmatch(r"\s*\d+\s*", str(text)) or int(text) < 1:
        raise ValueError(f"expected a positive whole number, got {text!r}")
    return int(text)


def non_negative_int(text) -> int:
    if not re.fullmatch(r"\s*\d+\s*", str(text)):
        raise ValueError(f"expected a whole number >= 0, got {text!r}")
    return int(text)


def finite_float(text) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"expected a number, got {text!r}") from None
    if value != value or value in (float("inf"), float("-inf")):
        raise ValueError(f"expected a finite number, got {text!r}")
    return value


def positive_float(text) -> float:
    value = finite_float(text)
    if value <= 0:
        raise ValueError(f"expected a number > 0, got {text!r}")
    return value


def dropout_probability(text) -> float:
    """A dropout probability in (0, 1): 0 is no dropout, and 1 drops everything (nothing to check)."""
    value = finite_float(text)
    if not 0 < value < 1:
        raise ValueError(f"expected a probability in (0, 1), got {text!r}")
    return value


def resolve_device(name, parser: argparse.ArgumentParser) -> torch.device:
    """--device: None -> cuda if available, else cpu; errors name the flag."""
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        parser.error(f"argument --device: expected cuda, cuda:N or cpu, got {name!r}")
    if device.type not in ("cuda", "cpu"):
        parser.error(f"argument --device: expected cuda, cuda:N or cpu, got {name!r}")
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("argument --device: CUDA is not available here (torch.cuda.is_available() is False)")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        parser.error(f"argument --device: there is no {name} ({torch.cuda.device_count()} CUDA device(s))")
    return device
