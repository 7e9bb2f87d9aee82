"""What this machine measured: the measured / predicted ratios a speed prediction is scaled by.

A leaf: the plan's options carry the calibration their speeds were scaled by, and `launcher.speed` makes it from the
machine's record (`launcher.speed.calibration`).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Calibration:
    """The median measured / predicted ratios of `runs` verified runs on one machine, backend and build: decode
    (`factor`), prefill and attention (None where no run measured them: a short warm-up measures decode only)."""

    factor: float
    runs: int
    pp_factor: float | None = None
    attention_factor: float | None = None  # decode's attention
    prefill_attention_factor: float | None = None  # prefill's attention, tiled (f16 K and V on a CPU)
    prefill_loop_factor: float | None = None  # prefill's attention on decode's loop (a quantized cache on a CPU)
    same_model: bool = False  # the decode ratio is this model's own (runs of the same file), not another's
    pp_same_model: bool = False  # the prefill ratio likewise (this model's runs may have measured no prefill)

    def note(self) -> str:
        runs = f"{self.runs} verified run{'s' if self.runs != 1 else ''}{' of this model' if self.same_model else ''}"
        parts = [f"×{self.factor:.2f}"]
        borrowed = ""  # a prefill ratio from other models' runs, where the rest is this model's own
        if any(f is not None for f in (self.pp_factor, self.attention_factor, self.prefill_attention_factor,
                                       self.prefill_loop_factor)):  # fmt: skip
            parts = [f"decode ×{self.factor:.2f}"]
            if self.pp_factor is not None and self.same_model and not self.pp_same_model:
                borrowed = f"; prefill ×{self.pp_factor:.2f} from other models' runs"
            elif self.pp_factor is not None:
                parts.append(f"prefill ×{self.pp_factor:.2f}")
            if self.attention_factor is not None:
                parts.append(f"attention ×{self.attention_factor:.2f}")
            if self.prefill_attention_factor is not None:
                parts.append(f"prefill attention ×{self.prefill_attention_factor:.2f}")
            if self.prefill_loop_factor is not None:
                parts.append(f"prefill attention (quantized cache) ×{self.prefill_loop_factor:.2f}")
        return f"calibrated by {runs} on this machine: {', '.join(parts)}{borrowed}"
