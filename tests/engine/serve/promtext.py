"""Read a Prometheus text exposition with prometheus_client's own parser (what scrapers do)."""

from __future__ import annotations

from dataclasses import dataclass

from prometheus_client.parser import text_string_to_metric_families


@dataclass(frozen=True)
class Family:
    name: str  # as the parser reports it (counters without the _total suffix)
    type: str
    samples: tuple[tuple[str, tuple[tuple[str, str], ...], float], ...]

    def label_names(self) -> dict[str, frozenset[str]]:
        """Label names per sample name (e.g. ``x_bucket`` has ``le``)."""
        out: dict[str, set[str]] = {}
        for sample_name, labels, _ in self.samples:
            out.setdefault(sample_name, set()).update(k for k, _ in labels)
        return {k: frozenset(v) for k, v in out.items()}


def parse(text: str) -> dict[str, Family]:
    families = {}
    for fam in text_string_to_metric_families(text):
        samples = tuple((s.name, tuple(sorted(s.labels.items())), float(s.value)) for s in fam.samples)
        families[fam.name] = Family(fam.name, fam.type, samples)
    return families


def value(families: dict[str, Family], sample: str, **labels: str) -> float:
    """Sum of the samples named ``sample`` whose labels include ``labels``."""
    family_name = sample
    for suffix in ("_total", "_bucket", "_count", "_sum", "_created"):
        if sample.endswith(suffix) and sample.removesuffix(suffix) in families:
            family_name = sample.removesuffix(suffix)
            break
    fam = families.get(family_name)
    if fam is None:
        raise KeyError(f"no metric family for sample {sample!r}")
    total = 0.0
    for name, lab, v in fam.samples:
        d = dict(lab)
        if name == sample and all(d.get(k) == str(x) for k, x in labels.items()):
            total += v
    return total
