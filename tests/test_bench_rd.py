"""The bench's rate-distortion arithmetic (bench/rd.py) and its trained-statistics synthetic adapter."""
import math

import numpy as np
import pytest

from bench import rd, synthetic


def rows(codec: str, points: list[tuple[float, float]]) -> list[dict]:
    return [{"codec": codec, "bits_per_param": rate, "sqnr_db_delta": q} for rate, q in points]


def test_curve_keeps_the_pareto_front_and_drops_lossless_points():
    data = rows("x", [(1, 5), (2, 4), (3, 9), (4, math.inf), (0.5, 1)])
    assert rd.curve(data, "x", rd.sqnr("delta")) == [(0.5, 1), (1, 5), (3, 9)]


def test_bd_rate_is_the_size_saved_at_equal_quality():
    anchor = [(1, 5), (2, 10), (4, 15), (8, 20)]
    half = [(r / 2, q) for r, q in anchor]  # the same quality at half the bytes
    data = rows("anchor", anchor) + rows("test", half)
    assert rd.bd_rate(data, "anchor", "test", rd.sqnr("delta")) == pytest.approx(-50, abs=0.5)
    assert rd.bd_rate(data, "test", "anchor", rd.sqnr("delta")) == pytest.approx(100, abs=1)
    assert rd.bd_rate(rows("one", [(1, 5)]) + data, "one", "test", rd.sqnr("delta")) == "n/a"


def test_bd_rate_of_fronts_that_share_no_quality_is_a_bound_at_the_ends_of_their_ranges():
    low = [(1, 5), (2, 6), (4, 7)]
    high = [(3, 8), (6, 9)]  # better at every rate: reaches 7 (low's best) with at most 3 where low needs 4
    data = rows("low", low) + rows("high", high)
    assert rd.bd_rate(data, "low", "high", rd.sqnr("delta")) == "≤ -25.0%"
    assert rd.bd_rate(data, "high", "low", rd.sqnr("delta")) == "≥ +33.3%"  # 4 against high's smallest, 3


def test_bd_rate_does_not_overshoot_on_fronts_that_saturate():
    # the bench's LLaMA LoRA r=16, -perplexity: --bpp at or above LoRAQuant-style at every rate (Akima said +894%)
    bpp = [(0.25, -3215.3), (0.5, -1078.4), (1.0, -648.1), (1.5, -349.6), (2.0, -331.2), (2.5, -325.9), (3.0, -324.3),
           (4.0, -323.0), (5.0, -322.4), (6.0, -322.2), (8.0, -322.0)]
    loraquant = [(1.09, -1181.0), (1.34, -432.5), (1.57, -429.3), (2.53, -336.8), (3.0, -336.6)]
    data = rows("bpp", bpp) + rows("lq", loraquant)
    assert rd.bd_rate(data, "lq", "bpp", rd.sqnr("delta")) == pytest.approx(-35, abs=3)  # piecewise linear: -35%


def test_value_at_interpolates_in_log_rate_and_refuses_to_extrapolate():
    data = [{"codec": "x", "bits_per_param": r, "kl": k} for r, k in ((1, 0.4), (4, 0.1))]
    assert rd.value_at(data, "x", 2, "kl") == pytest.approx(0.25)
    assert rd.value_at(data, "x", 0.5, "kl") is None and rd.value_at(data, "x", 5, "kl") is None
    assert rd.kl_db({"kl": 0.01}) == pytest.approx(20) and rd.kl_db({"kl": 0.0}) == math.inf


def test_envelope_is_the_best_quality_any_file_no_larger_offers():
    data = [{"codec": c, "file_bytes": size, "sqnr_db_delta": q} for c, size, q in
            [("a", 100, 3.0), ("b", 100, 3.5), ("a", 150, 3.2), ("b", 200, 6.0), ("c", 180, math.inf), ("c", 300, 6.0),
             ("a", 250, 7.0)]]
    front = rd.envelope(data, rd.sqnr("delta"))
    assert [(r["codec"], r["file_bytes"]) for r in front] == [("b", 100), ("b", 200), ("a", 250)]


def test_head_to_head_compares_each_file_with_the_target_made_at_its_size():
    made = lambda size, q: {"codec": rd.MATCHED, "target_bytes": size, "file_bytes": size - 3,
                            "bits_per_param": (size - 3) / 100, "sqnr_db_delta": q}
    other = lambda codec, size, q: {"codec": codec, "file_bytes": size, "bits_per_param": size / 100, "sqnr_db_delta": q}
    data = [other("a", 100, 3.0), made(100, 3.5),  # a win
            other("b", 200, 7.0), made(200, 6.5),  # a loss
            other("c", 300, 9.0), made(300, 9.0),  # a tie: the same file
            other("d", 400, math.inf),  # lossless: no margin
            other("e", 500, 1.0),  # no file made at its size
            other("sqz --bpp", 100, 9.9)]  # the curve itself: not compared
    head = rd.head_to_head(data, rd.sqnr("delta"))
    assert head["points"] == 3
    assert head["losses"] == [{"codec": "b", "bits_per_param": 2.0, "margin": -0.5}]
    assert head["closest"] == head["losses"][0]
    assert rd.fmt_head_to_head(head) == ("b at 2.00 bits/param (-0.50 dB)",) * 2
    assert rd.head_to_head_summary([("x", data, rd.sqnr("delta"))]) == (
        "3 files compared, `--size` worse on 1 (x: b at 2.00 bits/param (-0.50 dB))")
    none = rd.head_to_head(data[:2] + data[4:6], rd.sqnr("delta"))
    assert none["losses"] == [] and rd.fmt_head_to_head(none) == ("none", "c at 3.00 bits/param (+0.00 dB)")
    assert rd.head_to_head_summary([("x", data[:1], rd.sqnr("delta"))]) is None


def test_trained_like_adapter_has_the_statistics_it_was_given():
    spectrum = list(np.geomspace(1, 0.01, 16))
    given = {"q_proj": {"spectrum": spectrum, "b_row_logstd": 0.4, "a_rms_ratio": 1.3, "kurtosis_a": 2.6,
                        "kurtosis_b": 3.5}}
    tensors = synthetic.llama_adapter_like(given, rank=16, layers=1)
    a = tensors["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"]
    assert tuple(a.shape) == (16, synthetic.HIDDEN)
    got = synthetic.trained_statistics({k: v.float().numpy() for k, v in tensors.items()})["q_proj"]
    np.testing.assert_allclose(got["spectrum"], spectrum, rtol=0.25)
    assert got["a_rms_ratio"] == pytest.approx(1.3, rel=0.05)
    assert 0.25 < got["b_row_logstd"] < 0.55
