"""bench.schedules' both-directions check (bench/README.md, section 5): a host point dominates an optimizer when it
needs no more model calls and reaches no more error; points at a larger budget never count."""
from bench.schedules import dominance_lines, dominating


def host_point(schedule, error):
    return {"sampler": "qs_dpmpp_2m", "schedule": schedule, "error": error}


TABLE = {
    4: {"rows": {"oss": {"error": 0.30}}, "host": [host_point("simple", 0.30), host_point("karras", 0.50)]},
    5: {"rows": {"oss": {"error": 0.10}}, "host": [host_point("simple", 0.20), host_point("beta", 0.05)]},
    6: {"rows": {"oss": {"error": 0.25}}, "host": [host_point("simple", 0.01)]},
}


def test_host_points_at_no_more_calls_and_no_more_error_dominate_fewest_calls_first():
    assert dominating(TABLE, 4, 0.30) == [dict(host_point("simple", 0.30), nfe=4)]      # a tie dominates
    assert dominating(TABLE, 5, 0.10) == [dict(host_point("beta", 0.05), nfe=5)]       # 6-NFE point left out
    assert [(p["nfe"], p["schedule"]) for p in dominating(TABLE, 6, 0.25)] == [(5, "beta"), (5, "simple"),
                                                                               (6, "simple")]
    assert dominating(TABLE, 4, 0.29) == []


def test_dominance_line_names_the_fewest_call_point_or_none():
    table = {4: {"rows": {"oss": {"error": 0.29}}, "host": TABLE[4]["host"]}, 6: TABLE[6]}
    line, = dominance_lines(table, ["oss"])
    assert line.endswith("4 NFE: none; 6 NFE: 1, e.g. simple with qs_dpmpp_2m at 6 NFE (0.0100)")
