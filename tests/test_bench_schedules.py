"""bench.schedules' both-directions check (bench/README.md, section 5): a host point dominates an optimizer when it
needs no more counted model calls and reaches no more error; points with more calls never count."""
from bench.schedules import BEST_PAIR, dominance_lines, dominating


def host_point(schedule, error, nfe):
    return {"sampler": "ipndm", "schedule": schedule, "error": error, "nfe": nfe}


def rows(error, best_pair):
    return {"oss": {"error": error}, BEST_PAIR: {"error": best_pair}}


TABLE = {
    4: {"rows": rows(0.30, 0.30), "host": [host_point("simple", 0.30, 4), host_point("karras", 0.50, 4)]},
    5: {"rows": rows(0.10, 0.05), "host": [host_point("simple", 0.20, 5), host_point("beta", 0.05, 5)]},
    6: {"rows": rows(0.25, 0.01), "host": [host_point("simple", 0.01, 6)]},
}


def test_host_points_at_no_more_calls_and_no_more_error_dominate_fewest_calls_first():
    assert dominating(TABLE, 4, 0.30) == [host_point("simple", 0.30, 4)]      # a tie dominates
    assert dominating(TABLE, 5, 0.10) == [host_point("beta", 0.05, 5)]        # the 6-call point is left out
    assert [(p["nfe"], p["schedule"]) for p in dominating(TABLE, 6, 0.25)] == [(5, "beta"), (5, "simple"),
                                                                               (6, "simple")]
    assert dominating(TABLE, 4, 0.29) == []


def test_lines_give_the_ratio_to_the_host_pair_and_the_fewest_call_dominating_point_or_none():
    table = {4: {"rows": rows(0.29, 0.58), "host": TABLE[4]["host"]}, 6: TABLE[6]}
    ratio, dominated = dominance_lines(table, ["oss"])
    assert ratio == "- oss / the host's best pair: 0.50x / 25.00x"
    assert dominated.endswith("4 NFE: none; 6 NFE: 1, e.g. simple with ipndm at 6 NFE (0.0100)")
