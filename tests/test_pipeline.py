"""Pipeline text: parsing, typed options, canonical printing, round-trips, named errors."""

from dataclasses import dataclass, field
from typing import Literal, Optional

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qcompile.errors import PipelineError
from qcompile.passes import PASSES, format_pipeline, parse_pipeline
from qcompile.passes.base import Pass, PassResult, option_docs


@dataclass(frozen=True)
class _DemoOptions:
    rank: float = field(default=0.5, metadata={"doc": "kept fraction or absolute rank"})
    bits: int = field(default=8, metadata={"doc": "bit width"})
    per_channel: bool = field(default=True, metadata={"doc": "per-channel scales"})
    method: Literal["energy", "vbmf"] = field(default="energy", metadata={"doc": "rank rule"})
    exclude: tuple[str, ...] = field(default=(), metadata={"doc": "node name patterns"})
    limit: Optional[int] = field(default=None, metadata={"doc": "optional cap"})
    label: str = field(default="x", metadata={"doc": "free text"})

    def __post_init__(self):
        if self.bits not in (4, 8):
            raise ValueError(f"bits must be 4 or 8, got {self.bits}")


class _Demo(Pass):
    name = "demo-pass"
    Options = _DemoOptions

    def call(self, graph, ctx):
        return PassResult(graph, False)


REG = {**PASSES, "demo-pass": _Demo}


def test_parse_real_passes_and_canonical_form():
    passes = parse_pipeline(" fold-bn ,dead-code,  annotate-costs ")
    assert [p.name for p in passes] == ["fold-bn", "dead-code", "annotate-costs"]
    assert format_pipeline(passes) == "fold-bn,dead-code,annotate-costs"
    assert parse_pipeline("") == []


def test_typed_options_and_defaults_omitted():
    [p] = parse_pipeline('demo-pass{rank=0.25,bits=4,per_channel=false,method=vbmf,exclude=[fc;"conv,1"],'
                         'limit=3,label="a b"}', REG)
    o = p.options
    assert (o.rank, o.bits, o.per_channel, o.method, o.exclude, o.limit, o.label) == \
        (0.25, 4, False, "vbmf", ("fc", "conv,1"), 3, "a b")
    text = format_pipeline([p])
    assert text == 'demo-pass{rank=0.25,bits=4,per_channel=false,method=vbmf,exclude=[fc;"conv,1"],limit=3,label="a b"}'
    assert parse_pipeline(text, REG) == [p]
    assert format_pipeline(parse_pipeline("demo-pass{bits=8}", REG)) == "demo-pass"


@pytest.mark.parametrize("text,needle", [
    ("fold-bn,lowrank{rank=3}", "unknown pass 'lowrank'"),
    ("demo-pass{ranks=3}", "has no option 'ranks'"),
    ("demo-pass{bits=eight}", "expects an integer"),
    ("demo-pass{bits=5}", "bits must be 4 or 8"),
    ("demo-pass{method=svd}", "one of energy/vbmf"),
    ("demo-pass{rank=0.5", "expected '}'"),
    ("demo-pass{rank=0.5,rank=0.2}", "given twice"),
    ("fold-bn,,dead-code", "expected a pass name"),
    ("Fold_BN", "expected a pass name"),
    ('demo-pass{label="open}', "unterminated string"),
])
def test_errors_name_the_problem(text, needle):
    with pytest.raises(PipelineError, match=needle.replace("(", r"\(").replace("'", "'")):
        parse_pipeline(text, REG)


def test_error_points_at_column():
    with pytest.raises(PipelineError) as e:
        parse_pipeline("fold-bn,nope", REG)
    assert "column 9" in str(e.value) and "^" in str(e.value)


def test_option_docs_listed():
    docs = {d["name"]: d for d in option_docs(_DemoOptions)}
    assert docs["bits"]["default"] == 8 and docs["bits"]["doc"] == "bit width"


_labels = st.text(alphabet=st.characters(codec="ascii", exclude_categories=("Cc",)), max_size=8)


@settings(max_examples=80, deadline=None)
@given(rank=st.floats(0.01, 64, allow_nan=False), bits=st.sampled_from([4, 8]), pc=st.booleans(),
       method=st.sampled_from(["energy", "vbmf"]),
       exclude=st.lists(_labels, max_size=3).map(tuple), limit=st.none() | st.integers(0, 99),
       label=_labels, prefix=st.sampled_from(["", "fold-bn", "dead-code,fold-bn"]))
def test_round_trip_property(rank, bits, pc, method, exclude, limit, label, prefix):
    p = _Demo(rank=rank, bits=bits, per_channel=pc, method=method, exclude=exclude, limit=limit, label=label)
    passes = parse_pipeline(prefix, REG) + [p]
    text = format_pipeline(passes)
    again = parse_pipeline(text, REG)
    assert again == passes
    assert format_pipeline(again) == text
