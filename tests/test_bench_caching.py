"""bench.caching's both-directions check (bench/README.md, section 5): a host point dominates a Quickstep default when
it matches or beats it on compute ratio and PSNR, compute ratios compared as the tables print them."""
from bench.caching import dominated, dominating


def point(family, ratio, psnr, config="x"):
    return {"family": family, "config": config, "compute_ratio": ratio, "psnr": psnr}


def test_equal_skips_with_bookkeeping_flops_apart_count_as_the_same_compute():
    # two runs computing 8 of 24 steps: 3.0000x for the host, 2.9996x where the cache's own work is counted
    ours = point("ModelCache", 2.9996, 24.5, "ModelCache (default)")
    host = [point("EasyCache", 3.0001, 19.3), point("EasyCache", 3.0001, 25.0), point("EasyCache", 3.43, 30.0),
            point("LazyCache", 2.67, 17.6)]
    rows = [ours, *host]
    assert dominating(rows, ours) == [host[1], host[2]]        # the tie on compute with more PSNR, and more of both
    assert dominated(rows, ["ModelCache"], "EasyCache") == (1, 3)   # it matches the 3.00x point at 19.3 dB only
    assert dominated(rows, ["ModelCache"], "LazyCache") == (1, 1)
    assert dominating(rows, point("ModelCache", 3.5, 31.0)) == []


def test_tuning_table_gives_each_setting_its_range_over_the_seeds():
    from bench.caching import tuning_markdown
    setting = {"end_percent": 1.0, "threshold": 0.2, "max_consecutive": 2}
    rows = [dict(setting, seed=s, compute_ratio=r, psnr=p) for s, r, p in [(0, 2.67, 38.8), (1, 2.40, 29.5),
                                                                            (2, 2.67, 36.8)]]
    rows.append(dict(setting, max_consecutive=3, seed=0, compute_ratio=3.43, psnr=35.1))
    table = tuning_markdown("digits-flow", rows).splitlines()
    assert table[-2] == "| 1.0 | 0.2 | 2 | 2.40-2.67x | 29.5 / 36.8 | 1 of 3 |"
    assert table[-1] == "| 1.0 | 0.2 | 3 | 3.43-3.43x | 35.1 / 35.1 | 0 of 1 |"
