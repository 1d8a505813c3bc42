"""The arousal policy (AdSNN, Zambrano et al. 2019, docs/science.md section 1): when, and by what
test, an input's precision is raised. What "precision" means is each neuron type's own
(``Neuron.precision_control``): ``low``/``high`` are ASN's m_f, ``threshold_scale`` VSN's threshold
factor; ``sim/arousal.py`` acts on the policy during a simulation.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from ann2snn.errors import OptionError
from ann2snn.options import parse_number

TESTS = ("margin", "ratio")


@dataclass(frozen=True)
class ArousalPolicy:
    low: float = 0.3  # m_f everyone starts with
    high: float = 0.1  # m_f of aroused inputs
    at: int = 40  # decision step (1 step = 1 ms)
    recheck: tuple[int, ...] = field(default_factory=tuple)
    threshold: float = 0.5  # arouse when the certainty (``test``) is below this
    test: str = "margin"  # certainty of the readout: margin or ratio (see ``certainty``)
    threshold_scale: float = 0.0  # VSN (Ts > 1): aroused inputs fire against thresholds x this
    layers: tuple[str, ...] = ()  # spiking layers whose precision arousal raises; () = all

    def __post_init__(self):
        if not (0 < self.high < 2 and 0 < self.low < 2 and self.at >= 1 and 0 <= self.threshold <= 1
                and 0 <= self.threshold_scale <= 1):
            raise ValueError("needs 0 < high, low < 2, at >= 1, 0 <= threshold <= 1, 0 <= threshold_scale <= 1")
        if self.test not in TESTS:
            raise ValueError(f"the test is one of {', '.join(TESTS)}")

    @classmethod
    def parse(cls, text: str, base: "ArousalPolicy | None" = None) -> "ArousalPolicy":
        """``low=0.3;high=0.1;at=40;threshold=0.5;test=ratio;recheck=80,120;layers=act2,act3``:
        fields separated by ';' and list items by ',', as everywhere in the CLI (``--normalize
        'MEAN;STD'``, ``--sweep m_f=0.1,0.2``); without a ';' the older form with ',' between
        fields and '+' in lists (``recheck=80+120``) is read when every ','-part is a KEY=VALUE. Keys not given come from ``base``
        (e.g. the policy a budget search stored in the artifact), then the defaults."""
        values: dict = asdict(base) if base is not None else {}
        old = ";" not in text and all("=" in part for part in text.split(",") if part.strip())
        fields, items = (",", "+") if old else (";", ",")
        for item in filter(None, (f.strip() for f in text.split(fields))):
            key, sep, value = item.partition("=")
            if not sep or key not in cls.__dataclass_fields__:
                raise OptionError("arousal_policy", f"{item!r}: expected KEY=VALUE with KEY one of "
                                f"{', '.join(cls.__dataclass_fields__)}")
            if key == "layers":
                values[key] = tuple(filter(None, value.split(items)))
                continue
            if key == "test":
                if value not in TESTS:
                    raise OptionError("arousal_policy", f"{item!r}: the test is one of {', '.join(TESTS)}")
                values[key] = value
                continue
            number = lambda v: parse_number(v, "arousal_policy", key in ("at", "recheck"), item)  # noqa: E731
            values[key] = tuple(map(number, value.split(items))) if key == "recheck" else number(value)
        try:
            return cls(**values)
        except ValueError as exc:
            raise OptionError("arousal_policy", f"{text!r}: {exc}") from None

    def check_layers(self, names: list[str]) -> None:
        unknown = [n for n in self.layers if n not in names]
        if unknown:
            raise OptionError("arousal_policy", f"layers: {unknown[0]} is not a spiking layer of this network "
                            f"(layers: {', '.join(names)})")

    def raises(self, layer: str) -> bool:
        """Whether arousal changes the precision of ``layer``."""
        return not self.layers or layer in self.layers
