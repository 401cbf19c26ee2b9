"""Analyses on the command line: one function plus one registration gives ``sae-lens-attn NAME`` and its JSON.

An analysis is a function of a :class:`Context` (the model, the SAE, the site it reads and the token rows,
loaded from the common flags ``--sae``, ``--model``, ``--dataset``, ``--tokens``, ... of
:mod:`.commands`) that yields :class:`Part`\\ s: text to print and a dict to merge into the report.
:func:`register` makes it a subcommand with those flags, its own :class:`Option`\\ s and ``--out FILE``,
which writes the merged report as JSON. ``analyze`` itself is one (:mod:`.report`). With ``explorer=True`` it
is also a panel of the explorer (``sae_lens_attn.frontends.explorer.registered``), run on the prompt typed
there: the parts' text shown, their data returned as JSON.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, NamedTuple


class Context(NamedTuple):
    """What every analysis on the command line starts from."""

    model: Any
    sae: Any
    site: Any
    rows: Any
    """Token rows of ``--dataset`` (the sample text by default), about ``--tokens`` tokens."""
    args: Any
    """The parsed flags (the common ones, ``--seed`` included, and the analysis' own options)."""


class Part(NamedTuple):
    """One step's output: ``text`` is printed as it comes, ``data`` is merged into the JSON report."""

    text: str
    data: dict


@dataclass(frozen=True)
class Option:
    """A flag of one analysis (``--name``, its type, default and help)."""

    flag: str
    type: Callable = int
    default: Any = None
    help: str = ""
    minimum: float | None = None
    """The smallest value allowed (a smaller one is refused naming the flag, on the command line and in the
    explorer), or None."""

    @property
    def dest(self) -> str:
        """The option's name in the parsed flags and in the explorer's form (``--n-seq`` -> ``n_seq``)."""
        return self.flag.lstrip("-").replace("-", "_")

    def parse(self, text: str):
        """``text`` as this option's value; a value of the wrong type is a ValueError, one under ``minimum`` a
        :class:`BelowMinimum` naming the flag."""
        value = self.type(text)
        if self.minimum is not None and value < self.minimum:
            raise BelowMinimum(f"{self.flag} must be >= {self.minimum}, got {value}")
        return value


class BelowMinimum(ValueError):
    """An option's value under its ``minimum``; the message names the flag and the bound."""


@dataclass(frozen=True)
class Analysis:
    """A registered analysis: the subcommand ``name`` runs ``run`` on the loaded :class:`Context`."""

    name: str
    run: Callable[[Context], Iterable[Part]]
    help: str = ""
    options: tuple[Option, ...] = ()
    description: str = ""
    explorer: bool = False
    """Also a panel of the explorer, run with ``rows`` = the prompt's tokens (one row) and the chosen SAE: for
    analyses that say something about any text, not only about a large sample."""


#: Registered analyses by subcommand name, in registration order (the order of ``--help``).
ANALYSES: dict[str, Analysis] = {}


def register(analysis: Analysis) -> Analysis:
    """Add ``analysis`` as a subcommand; a second analysis under a taken name is refused."""
    if ANALYSES.get(analysis.name, analysis) is not analysis:
        raise ValueError(f"an analysis named {analysis.name!r} is already registered")
    ANALYSES[analysis.name] = analysis
    return analysis
