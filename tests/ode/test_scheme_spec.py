"""A scheme and its options as one config value (`cnn.ode.SchemeSpec`) at one address in every
experiment config (issue: one trainer, one scheme address)."""

import ml_collections
import pytest

from cnn.ode.schemes import SchemeSpec, get_scheme, scheme_specs


def test_name_and_mapping_values_build_the_scheme_they_name():
    assert SchemeSpec.parse("lm") == SchemeSpec("lm", {}, "lm")
    spec = SchemeSpec.parse({"name": "backward_euler", "iterations": 20, "tolerance": 1e-3})
    assert (spec.name, spec.options, spec.label) == ("backward_euler", {"iterations": 20, "tolerance": 1e-3},
                                                     "backward_euler")
    direct = get_scheme("backward_euler", iterations=20, tolerance=1e-3)
    assert spec.build() == direct
    assert get_scheme({"name": "backward_euler", "iterations": 20, "tolerance": 1e-3}) == direct
    assert spec.model_options() == {"scheme": "backward_euler",
                                    "scheme_options": {"iterations": 20, "tolerance": 1e-3}}
    assert SchemeSpec.parse("euler").model_options() == {"scheme": "euler"}


def test_config_containers_and_lists_become_plain_values():
    value = ml_collections.ConfigDict({"spec": {"name": "lm", "k_init": [0.1, 0.2], "label": "lm_pos"}}).spec
    spec = SchemeSpec.parse(value)
    assert spec == SchemeSpec("lm", {"k_init": (0.1, 0.2)}, "lm_pos")
    assert spec.build().knobs[0].init_range == (0.1, 0.2)


def test_bad_values_name_what_is_wrong():
    with pytest.raises(ValueError, match="has no 'name'"):
        SchemeSpec.parse({"iterations": 2})
    with pytest.raises(ValueError, match="unknown scheme name='lmm'"):
        SchemeSpec.parse("lmm")
    with pytest.raises(ValueError, match="has no option q="):
        SchemeSpec.parse({"name": "lm", "q": 1})
    with pytest.raises(ValueError, match="label='a b'"):
        SchemeSpec.parse({"name": "lm", "label": "a b"})
    with pytest.raises(ValueError, match="expected a scheme name or a mapping"):
        SchemeSpec.parse(3)
    with pytest.raises(ValueError, match=r"given twice"):
        get_scheme({"name": "euler", "h": 0.5}, h=0.25)


def test_a_list_needs_distinct_labels():
    specs = scheme_specs(["lm", {"name": "lm", "constrain": True, "label": "lm_constrained"}])
    assert [s.label for s in specs] == ["lm", "lm_constrained"]
    with pytest.raises(ValueError, match=r"label\(s\) \['lm'\] more than once"):
        scheme_specs(["lm", {"name": "lm", "constrain": True}])
    with pytest.raises(ValueError, match="empty"):
        scheme_specs(())
    with pytest.raises(ValueError, match="expected a tuple"):
        scheme_specs("lm")
