"""How the output layer, which never spikes, is read as class scores at every time step."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Readout:
    """How class scores are read from the output layer, which never spikes: r(t) is the output,
    or its exponential filter r(t) = d r(t-1) + (1 - d) out(t) when ``tau`` is set; the
    prediction at step t >= ``start`` is argmax of sum_{k=start..t} r(k), before it argmax r(t).
    With ``hold`` (a time code, whose output rises to its value and stays) it is argmax out(t)."""

    tau: float | None = None
    start: int = 0
    hold: bool = False  # a time code: the prediction at step t is argmax of out(t) alone


    def within(self, timesteps: int) -> "Readout":
        """This readout, reading from step 0 when ``start`` lies beyond the simulation."""
        return self if self.start < timesteps else Readout(self.tau, 0, self.hold)

    def describe(self) -> str:
        if self.hold:
            return "argmax of the output at step t (complete once the last layer's window has closed)"
        r = "output" if self.tau is None else f"output filtered with tau {self.tau:g} ms"
        return (f"argmax of the {r} summed over steps {self.start + 1}..t" if self.start
                else f"argmax of the {r} summed over all steps so far") + \
            (f"; before step {self.start + 1}, of the {r} at t" if self.start else "")
