"""Output verification, the pure part: how far two peers' hidden states may differ, and who lied.

With `--verify`, the client sends some steps to a second peer serving the same span and compares
the two outputs. Honest peers differ only by arithmetic: thread counts, kernels, and their dtype
or quantization. The tolerance is the relative distance ||a - b|| / ||b|| that the looser of the
two peers' formats produces on honest hardware, with margin; a peer that changes the answer
moves the hidden states far beyond it. When two peers disagree, a third one decides.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

# relative distance of honest outputs after a span, by the peer's format (measured, then x3-10)
_TOLERANCE = {
    ("float32", "none"): 1e-3,
    ("bfloat16", "none"): 5e-2,
    ("float16", "none"): 2e-2,
    ("float32", "int8"): 0.15,
    ("bfloat16", "int8"): 0.15,
    ("float32", "nf4"): 0.3,
    ("bfloat16", "nf4"): 0.3,
}
_UNKNOWN_FORMAT = 0.3


def tolerance(a: tuple[str, str], b: tuple[str, str]) -> float:
    """The allowed distance between peers of formats a and b, each (dtype, quant)."""
    return max(_TOLERANCE.get(a, _UNKNOWN_FORMAT), _TOLERANCE.get(b, _UNKNOWN_FORMAT))


def distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| over the rows of a step, in float32."""
    a, b = a.float(), b.float()
    return float((a - b).norm() / b.norm().clamp_min(1e-12))


@dataclass(frozen=True)
class Verdict:
    ok: bool
    distance: float
    tolerance: float
    liar: str | None = None  # the peer found lying, when a third opinion settled it

    def describe(self, primary: str, checker: str) -> str:
        if self.ok:
            return f"{primary[:10]} agrees with {checker[:10]} ({self.distance:.2e} <= {self.tolerance:.0e})"
        who = f"{self.liar[:10]} lied" if self.liar else "cannot tell which is wrong"
        return f"{primary[:10]} and {checker[:10]} disagree ({self.distance:.2e} > {self.tolerance:.0e}): {who}"


def judge(primary: torch.Tensor, checker: torch.Tensor, tol: float) -> Verdict:
    d = distance(primary, checker)
    return Verdict(d <= tol, d, tol)


def arbitrate(primary_id: str, primary: torch.Tensor, checker_id: str, checker: torch.Tensor,
              third: torch.Tensor, tol_primary: float, tol_checker: float) -> str | None:
    """Given a third opinion, the id of the peer that lied, or None if the third settles nothing."""
    p_ok = distance(primary, third) <= tol_primary
    c_ok = distance(checker, third) <= tol_checker
    if p_ok and not c_ok:
        return checker_id
    if c_ok and not p_ok:
        return primary_id
    return None


@dataclass
class VerifyPolicy:
    """Which steps are checked: a fraction of them, at random, or all (rate 1)."""

    rate: float = 0.0
    seed: int | None = None

    def __post_init__(self) -> None:
        if not 0.0 <= self.rate <= 1.0:
            raise ValueError(f"--verify takes a fraction in [0, 1] or 'all', not {self.rate}")
        self._rng = random.Random(self.seed)

    def check_this_step(self) -> bool:
        return self.rate >= 1.0 or (self.rate > 0 and self._rng.random() < self.rate)


def parse_verify(text: str | None) -> float:
    if text is None or text == "":
        return 0.0
    if text == "all":
        return 1.0
    try:
        rate = float(text)
    except ValueError:
        raise ValueError(f"--verify takes a fraction like 0.1 or 'all', not {text!r}") from None
    if not 0 <= rate <= 1:
        raise ValueError(f"--verify takes a fraction in [0, 1] or 'all', not {text!r}")
    return rate
